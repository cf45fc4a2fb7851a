"""CVAT shapes in, engine steps, CVAT shapes out: the one translation layer of the Nuclio
handler (``nuclio/model_handler.py``) and the cvat-sdk agent (``agent.py``).

Each tracked shape is one object of its own :class:`~napari_stm.core.engine.Tracker` (CVAT
keeps one state per shape and may drop or correct any of them on any frame).

Rectangles. CVAT Community's UI offers only trackers that follow rectangles, so a rectangle is
accepted too: the object inside it is tracked as a mask and each frame's answer is the
bounding box of that mask. The first mask comes from the box itself (:func:`box_seeded_mask`):
the engine memorises the filled box as the object, reads the same frame back from that memory
and keeps what it segments inside the box; when that is under :data:`BOX_MIN_FILL` of the box
(nothing box-like found), the filled box is used as it is.
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
from napari_stm.core.engine import PropagationConfig, Tracker
from napari_stm.core.model import VOSNetwork

#: object id of the one object a tracker follows
OBJECT_ID = 1
#: a box-seeded mask filling less of its box than this falls back to the filled box
BOX_MIN_FILL = 0.1


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


def box_seeded_mask(
    model: VOSNetwork, config: PropagationConfig, image: np.ndarray, box: np.ndarray
) -> np.ndarray:
    """The object inside a filled box: the frame segmented from a memory holding the box."""
    probe = new_tracker(model, config)
    probe.step(image, box.astype(np.uint8) * OBJECT_ID)
    labels, _ = probe.step(image)
    inside = (labels == OBJECT_ID) & box
    return inside if inside.sum() >= BOX_MIN_FILL * box.sum() else box


def object_mask(
    model: VOSNetwork,
    config: PropagationConfig,
    image: np.ndarray,
    shape_type: str,
    mask: np.ndarray,
) -> np.ndarray:
    """What a tracker memorises for a shape: its mask, or for a rectangle the object inside."""
    return box_seeded_mask(model, config, image, mask) if shape_type == "rectangle" else mask


def start(
    model: VOSNetwork, config: PropagationConfig, image: np.ndarray, mask: np.ndarray
) -> Tracker:
    """A tracker holding ``mask`` on ``image`` as its reference."""
    tracker = new_tracker(model, config)
    remember(tracker, image, mask)
    return tracker


def remember(tracker: Tracker, image: np.ndarray, mask: np.ndarray) -> None:
    """Add ``mask`` on ``image`` to the tracker's memory (a start or a correction)."""
    tracker.step(image, mask.astype(np.uint8) * OBJECT_ID)


def follow(trackers: Sequence[Tracker], image: np.ndarray) -> list[np.ndarray]:
    """Each tracker's object on ``image`` (bool masks, in order)."""
    return [tracker.step(image)[0] == OBJECT_ID for tracker in trackers]


def shape_out(shape_type: str, mask: np.ndarray) -> dict | None:
    """The CVAT shape of ``mask`` as ``shape_type`` (a rectangle: its bounding box); None when
    the object is not on this frame."""
    points = shape_points(shape_type, mask)
    return None if points is None else {"type": shape_type, "points": points}
