"""CVAT shapes in, engine steps, CVAT shapes out: the one translation layer of the Nuclio
handler (``nuclio/model_handler.py``) and the cvat-sdk agent (``agent.py``).

Each tracked shape is one object of its own :class:`~napari_stm.core.engine.Tracker` (CVAT
keeps one state per shape and may drop or correct any of them on any frame).

Rectangles. CVAT Community's UI offers only trackers that follow rectangles, so a rectangle is
accepted too: the filled box is memorised as the object's first mask, the engine tracks that
region as a mask, and each frame's answer is the bounding box of the tracked mask. Seeding
the first mask with the object inside the box instead (OpenCV's GrabCut, or the engine reading
the frame back) gives better first masks but no better boxes on held-out DAVIS sequences:
``benchmarks/cvat_boxes.py``.
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
from napari_stm.core.engine import PropagationConfig, SharedFrame, Tracker
from napari_stm.core.model import VOSNetwork

#: object id of the one object a tracker follows
OBJECT_ID = 1


def reference_mask(
    shape_type: str,
    points: Any,
    size: tuple[int, int],
    max_vertices: int = MAX_POLYGON_VERTICES,
) -> np.ndarray:
    """The pixels a CVAT shape covers, the mask a tracker memorises for it (for a rectangle:
    the filled box); ShapeError if bad."""
    return mask_from_shape(
        shape_type, points, *size, types=TRACKER_TYPES, max_vertices=max_vertices
    )


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
    trackers: Sequence[Tracker], frame: np.ndarray | SharedFrame, share: bool = True
) -> list[np.ndarray]:
    """Each tracker's object on ``frame`` (bool masks, in order). With ``share`` the frame is
    encoded once for all of them (:class:`~napari_stm.core.engine.SharedFrame`), as CVAT's
    SAM2 agent function computes image features once per frame in ``preprocess_image``."""
    if share and not isinstance(frame, SharedFrame):
        frame = SharedFrame(frame)
    if not share and isinstance(frame, SharedFrame):
        frame = frame.frame
    return [tracker.step(frame)[0] == OBJECT_ID for tracker in trackers]


def shape_out(shape_type: str, mask: np.ndarray) -> dict | None:
    """The CVAT shape of ``mask`` as ``shape_type`` (a rectangle: its bounding box); None when
    the object is not on this frame."""
    points = shape_points(shape_type, mask)
    return None if points is None else {"type": shape_type, "points": points}
