"""CVAT shapes <-> boolean masks.

CVAT stores a mask shape as its own run-length code followed by the inclusive bounding box
``[x1, y1, x2, y2]`` (what ``cvat_sdk.masks.encode_mask`` writes) and a polygon as flat
``[x1, y1, x2, y2, ...]`` vertex coordinates. Coordinates are on pixel edges: pixel ``i`` spans
``[i, i + 1)``, so its centre is ``i + 0.5``; scikit-image puts pixel centres on integers,
hence the half-pixel shifts below (a polygon rasterised and traced back lands on itself).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from cvat_sdk.masks import decode_mask, encode_mask
from skimage.draw import polygon as fill_polygon
from skimage.measure import approximate_polygon, find_contours, label

#: the shape types the tracker and fill-task understand
SUPPORTED_TYPES = ("mask", "polygon")
#: how far (pixels) a traced polygon may stray from the mask outline to save vertices
POLYGON_TOLERANCE = 0.7


class ShapeError(ValueError):
    """A shape that cannot be turned into a mask; the message names the problem."""


def _numbers(points: Any, what: str) -> list[float]:
    if not isinstance(points, (list, tuple)):
        raise ShapeError(f"{what}: 'points' must be a list of numbers, got {type(points).__name__}")
    out = []
    for p in points:
        # bool is an int subclass; a True among coordinates is a client bug, not a 1.
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p):
            raise ShapeError(f"{what}: 'points' holds a non-numeric or non-finite value {p!r}")
        out.append(p)
    return out


def mask_from_rle(points: Sequence[float], height: int, width: int) -> np.ndarray:
    """Decode CVAT mask ``points`` (RLE + inclusive bbox) into an H x W bool array."""
    values = _numbers(points, "mask")
    try:
        return decode_mask(values, image_width=width, image_height=height)
    except ValueError as e:
        raise ShapeError(f"malformed mask RLE for a {width}x{height} image: {e}") from None


def rle_from_mask(mask: np.ndarray) -> list[float] | None:
    """CVAT mask ``points`` for a bool mask; None when the mask is empty."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return None
    return [int(v) for v in encode_mask(mask)]


def mask_from_polygon(points: Sequence[float], height: int, width: int) -> np.ndarray:
    """Rasterise CVAT polygon ``points`` into an H x W bool array (pixel centres inside)."""
    values = _numbers(points, "polygon")
    if len(values) % 2 or len(values) < 6:
        raise ShapeError(
            f"malformed polygon: need an even number of coordinates, at least 3 vertices "
            f"(6 numbers), got {len(values)}"
        )
    xy = np.asarray(values, dtype=np.float64).reshape(-1, 2)
    mask = np.zeros((height, width), dtype=bool)
    rr, cc = fill_polygon(xy[:, 1] - 0.5, xy[:, 0] - 0.5, shape=(height, width))
    mask[rr, cc] = True
    return mask


def polygon_from_mask(mask: np.ndarray, tolerance: float = POLYGON_TOLERANCE) -> list[float] | None:
    """Outline of the largest connected part of ``mask`` as CVAT polygon points.

    A CVAT polygon is one simple ring, so holes and smaller parts are dropped. None when the
    mask is empty.
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return None
    components = label(mask, connectivity=2)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    largest = components == int(np.argmax(sizes))
    # Padding closes contours that touch the image border.
    padded = np.pad(largest, 1).astype(np.float32)
    contours = find_contours(padded, 0.5)
    ring = max(contours, key=len) - 1.0  # undo the padding
    exact = ring[:-1]  # find_contours repeats the first vertex to close the ring
    ring = approximate_polygon(ring, tolerance=tolerance)[:-1]
    if len(ring) < 3:
        # A sliver approximated away: keep the exact outline instead.
        ring = exact
    xy = ring[:, ::-1] + 0.5  # (row, col) centres -> (x, y) edges
    h, w = mask.shape
    xy[:, 0] = np.clip(xy[:, 0], 0, w)
    xy[:, 1] = np.clip(xy[:, 1], 0, h)
    return [round(float(v), 2) for v in xy.ravel()]


def mask_from_shape(shape_type: str, points: Any, height: int, width: int) -> np.ndarray:
    """Mask of a CVAT ``mask`` or ``polygon`` shape; ShapeError for anything else."""
    if shape_type == "mask":
        mask = mask_from_rle(points, height, width)
    elif shape_type == "polygon":
        mask = mask_from_polygon(points, height, width)
    else:
        raise ShapeError(
            f"unsupported shape type {shape_type!r}: this function follows "
            f"{' and '.join(SUPPORTED_TYPES)} shapes"
        )
    if not mask.any():
        raise ShapeError(f"the {shape_type} covers no pixel of the {width}x{height} image")
    return mask


def shape_points(shape_type: str, mask: np.ndarray) -> list[float] | None:
    """CVAT ``points`` of ``mask`` as a shape of ``shape_type``; None when the mask is empty."""
    if shape_type == "mask":
        return rle_from_mask(mask)
    if shape_type == "polygon":
        return polygon_from_mask(mask)
    raise ShapeError(f"unsupported shape type {shape_type!r}")
