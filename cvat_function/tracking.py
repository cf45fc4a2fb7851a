"""CVAT shapes in, engine steps, CVAT shapes out: the one translation layer of the Nuclio
handler (``nuclio/model_handler.py``) and the cvat-sdk agent (``agent.py``).

Each tracked shape is one object of its own :class:`~napari_stm.core.engine.Tracker` (CVAT
keeps one state per shape and may drop or correct any of them on any frame).

Rectangles. CVAT Community's UI offers only trackers that follow rectangles, so a rectangle is
accepted too: the object inside it is tracked as a mask and each frame's answer is the
bounding box of that mask. The first mask comes from the box (:func:`box_seeded_mask`):
OpenCV's GrabCut, initialised with the rectangle, separates the object from the background
inside it (colour models of the box and of a margin around it, graph cut); when that keeps
under :data:`BOX_MIN_FILL` of the box, the filled box is used as it is. Measured against the
alternatives in ``benchmarks/cvat_boxes.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cvat_function.sessions import new_tracker
from cvat_function.shapes import (
    MAX_POLYGON_VERTICES,
    TRACKER_TYPES,
    mask_from_shape,
    shape_points,
)
from napari_stm.core.engine import PropagationConfig, SharedFrame, Tracker, step_trackers
from napari_stm.core.model import VOSNetwork

#: object id of the one object a tracker follows
OBJECT_ID = 1
#: a box-seeded mask filling less of its box than this falls back to the filled box
BOX_MIN_FILL = 0.1
#: GrabCut's rounds, and the longest side (pixels) of the crop it runs on
GRABCUT_ITERATIONS = 5
GRABCUT_SIDE = 400


def reference_mask(
    shape_type: str,
    points: Any,
    size: tuple[int, int],
    max_vertices: int = MAX_POLYGON_VERTICES,
) -> np.ndarray:
    """The pixels a CVAT shape covers (for a rectangle: the filled box); ShapeError if bad."""
    return mask_from_shape(
        shape_type, points, *size, types=TRACKER_TYPES, max_vertices=max_vertices
    )


def box_seeded_mask(image: np.ndarray, box: np.ndarray) -> np.ndarray:
    """The object inside a filled box on ``image`` (H x W x 3 RGB uint8), by GrabCut.

    GrabCut runs on the box and a margin around it (the margin is its background sample),
    at most :data:`GRABCUT_SIDE` pixels a side, so its cost does not grow with the frame.
    """
    import cv2

    rows = np.flatnonzero(box.any(axis=1))
    cols = np.flatnonzero(box.any(axis=0))
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    h, w = box.shape
    margin = max(8, (max(y1 - y0, x1 - x0)) // 4)
    cy0, cy1 = max(0, y0 - margin), min(h, y1 + margin)
    cx0, cx1 = max(0, x0 - margin), min(w, x1 + margin)
    crop = np.ascontiguousarray(image[cy0:cy1, cx0:cx1, ::-1])  # RGB -> OpenCV's BGR
    scale = min(1.0, GRABCUT_SIDE / max(crop.shape[:2]))
    if scale < 1.0:
        size = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))
        crop = cv2.resize(crop, size, interpolation=cv2.INTER_AREA)
    rx0, ry0 = int((x0 - cx0) * scale), int((y0 - cy0) * scale)
    rx1 = max(rx0 + 1, int(round((x1 - cx0) * scale)))
    ry1 = max(ry0 + 1, int(round((y1 - cy0) * scale)))
    labels = np.zeros(crop.shape[:2], np.uint8)
    try:
        cv2.setRNGSeed(0)  # GrabCut's k-means start: the same box gives the same mask
        cv2.grabCut(
            crop,
            labels,
            (rx0, ry0, rx1 - rx0, ry1 - ry0),
            np.zeros((1, 65)),
            np.zeros((1, 65)),
            GRABCUT_ITERATIONS,
            cv2.GC_INIT_WITH_RECT,
        )
    except cv2.error:  # a box without background around it (the whole frame) has no model
        return box
    fg = ((labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)).astype(np.uint8)
    if scale < 1.0:
        fg = cv2.resize(fg, (cx1 - cx0, cy1 - cy0), interpolation=cv2.INTER_NEAREST)
    inside = np.zeros_like(box)
    inside[cy0:cy1, cx0:cx1] = fg.astype(bool)
    inside &= box
    return inside if inside.sum() >= BOX_MIN_FILL * box.sum() else box


def object_mask(image: np.ndarray, shape_type: str, mask: np.ndarray) -> np.ndarray:
    """What a tracker memorises for a shape: its mask, or for a rectangle the object inside."""
    return box_seeded_mask(image, mask) if shape_type == "rectangle" else mask


def start(
    model: VOSNetwork, config: PropagationConfig, frame: np.ndarray | SharedFrame, mask: np.ndarray
) -> Tracker:
    """A tracker holding ``mask`` on ``frame`` as its reference."""
    tracker = new_tracker(model, config)
    remember(tracker, frame, mask)
    return tracker


def remember(tracker: Tracker, frame: np.ndarray | SharedFrame, mask: np.ndarray) -> None:
    """Add ``mask`` on ``frame`` to the tracker's memory (a start or a correction)."""
    tracker.step(frame, mask.astype(np.uint8) * OBJECT_ID)


def follow(
    trackers: Sequence[Tracker],
    frame: np.ndarray | SharedFrame,
    share: bool = True,
    ahead: Sequence[Tracker] = (),
) -> list[np.ndarray]:
    """Each tracker's object on ``frame`` (bool masks, in order). With ``share`` the frame is
    encoded once for all of them (:class:`~napari_stm.core.engine.SharedFrame`), as CVAT's
    SAM2 agent function computes image features once per frame in ``preprocess_image``, and
    the trackers that read their memory alike read and decode in one network call
    (:func:`~napari_stm.core.engine.step_trackers`); ``ahead``: trackers likely to be
    followed on the same ``frame`` by later calls, computed in the same network calls."""
    if share and not isinstance(frame, SharedFrame):
        frame = SharedFrame(frame)
    if not share:
        raw = frame.frame if isinstance(frame, SharedFrame) else frame
        return [tracker.step(raw)[0] == OBJECT_ID for tracker in trackers]
    assert isinstance(frame, SharedFrame)
    return [r.labels == OBJECT_ID for r in step_trackers(trackers, frame, ahead)]


def shape_out(shape_type: str, mask: np.ndarray) -> dict | None:
    """The CVAT shape of ``mask`` as ``shape_type`` (a rectangle: its bounding box); None when
    the object is not on this frame."""
    points = shape_points(shape_type, mask)
    return None if points is None else {"type": shape_type, "points": points}
