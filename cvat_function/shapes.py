"""CVAT shapes <-> boolean masks, checked before anything is allocated for them.

CVAT stores a mask shape as its own run-length code followed by the inclusive bounding box
``[x1, y1, x2, y2]`` (what ``cvat_sdk.masks.encode_mask`` writes), a polygon as flat
``[x1, y1, x2, y2, ...]`` vertex coordinates and a rectangle as ``[xtl, ytl, xbr, ybr]``.
Coordinates are on pixel edges: pixel ``i`` spans ``[i, i + 1)``, so its centre is ``i + 0.5``;
a polygon or rectangle covers the pixels whose centres it contains.

Client data is checked first: the points are a list of finite numbers within
:data:`~cvat_function.limits.MAX_COORDINATE`; mask runs are non-negative integers that add
up to exactly the area of their box *before* ``cvat_sdk.masks.decode_mask`` unpacks them
(its ``np.repeat`` would otherwise allocate whatever the runs say, or overflow); polygons have
at most ``max_polygon_vertices`` vertices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from cvat_sdk.masks import decode_mask, encode_mask
from skimage.measure import approximate_polygon, find_contours, label

from cvat_function.limits import MAX_COORDINATE

#: the shape types fill-task reads from a task
SUPPORTED_TYPES = ("mask", "polygon")
#: the shape types the tracker follows (a rectangle is followed as the object inside it)
TRACKER_TYPES = ("rectangle", "mask", "polygon")
#: how far (pixels) a traced polygon may stray from the mask outline to save vertices
POLYGON_TOLERANCE = 0.7
#: vertices of one polygon unless the caller says otherwise
MAX_POLYGON_VERTICES = 10_000
#: cuts of polygon edges with pixel rows (an ordinary outline: about twice its height in rows)
MAX_CROSSINGS = 2_000_000


class ShapeError(ValueError):
    """A shape that cannot be turned into a mask; the message names the problem."""


class ShapeTooLarge(ShapeError):
    """A shape over a size limit (vertices, crossings): the request is too large, not malformed."""


def _quote(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:
        text = type(value).__name__
    text = text.encode("ascii", "backslashreplace").decode("ascii")
    return text if len(text) <= 40 else text[:37] + "..."


def _numbers(
    points: Any, what: str, max_count: int | None = None, bound: float = MAX_COORDINATE
) -> list[float]:
    if not isinstance(points, (list, tuple)):
        raise ShapeError(f"{what}: 'points' must be a list of numbers, got {type(points).__name__}")
    if max_count is not None and len(points) > max_count:
        raise ShapeTooLarge(
            f"{what}: {len(points)} numbers in 'points', over the limit of {max_count}"
        )
    out = []
    for p in points:
        # bool is an int subclass; a True among coordinates is a client bug, not a 1.
        if isinstance(p, bool) or not isinstance(p, (int, float)):
            raise ShapeError(f"{what}: 'points' holds a non-numeric value {_quote(p)}")
        # Compared before any float(): an int of 400 digits has no float, a comparison is exact.
        if isinstance(p, float) and not math.isfinite(p):
            raise ShapeError(f"{what}: 'points' holds a non-finite value {_quote(p)}")
        if not -bound <= p <= bound:
            raise ShapeError(f"{what}: 'points' holds {_quote(p)}, out of range")
        out.append(p)
    return out


def _whole(value: float, what: str) -> int:
    if isinstance(value, int):
        return value
    if value.is_integer():
        return int(value)
    raise ShapeError(f"malformed mask RLE: non-integer {what} {_quote(value)}")


def mask_from_rle(points: Sequence[float], height: int, width: int) -> np.ndarray:
    """Decode CVAT mask ``points`` (RLE + inclusive bbox) into an H x W bool array."""
    # A run is at most the image, and at most one run per pixel (and one more) makes sense.
    area_max = height * width
    values = _numbers(points, "mask", max_count=area_max + 5, bound=max(area_max, MAX_COORDINATE))
    if len(values) < 5:
        raise ShapeError(
            f"malformed mask RLE: too few elements ({len(values)}): runs and a box are needed"
        )
    box = [_whole(v, "box coordinate") for v in values[-4:]]
    x1, y1, x2, y2 = box
    if not (0 <= x1 <= x2 < width and 0 <= y1 <= y2 < height):
        raise ShapeError(
            f"malformed mask RLE: the bounding box {box} is not inside the {width}x{height} image"
        )
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    # Every value is within +-area_max, so float64 holds them and their sum exactly.
    runs = np.asarray(values[:-4], dtype=np.float64)
    if (runs < 0).any():
        raise ShapeError(f"malformed mask RLE: negative run {_quote(float(runs.min()))}")
    if (runs != np.floor(runs)).any():
        bad = runs[runs != np.floor(runs)][0]
        raise ShapeError(f"malformed mask RLE: non-integer run {_quote(float(bad))}")
    total = int(runs.sum())
    if total != area:
        raise ShapeError(
            f"malformed mask RLE: the runs cover {total} pixels, the bounding box {area} "
            "(encoded bitmap does not match encoded bounding box)"
        )
    # Checked: decode_mask's np.repeat allocates exactly the box.
    return decode_mask(values, image_width=width, image_height=height)


def rle_from_mask(mask: np.ndarray) -> list[float] | None:
    """CVAT mask ``points`` for a bool mask; None when the mask is empty."""
    mask = np.asarray(mask, dtype=bool)
    # The box from row and column "any"s, handed to encode_mask: without one it takes the
    # frame's nonzero() indices, 1.5 ms per 480p mask (0.15 s of a 100-shape request).
    rows = np.flatnonzero(mask.any(axis=1))
    if not rows.size:
        return None
    top, bottom = int(rows[0]), int(rows[-1]) + 1
    cols = np.flatnonzero(mask[top:bottom].any(axis=0))
    box = [int(cols[0]), top, int(cols[-1]) + 1, bottom]
    return [int(v) for v in encode_mask(mask, bbox=box)]


def mask_from_polygon(
    points: Sequence[float], height: int, width: int, max_vertices: int = MAX_POLYGON_VERTICES
) -> np.ndarray:
    """Rasterise CVAT polygon ``points`` into an H x W bool array (pixel centres inside)."""
    values = _numbers(points, "polygon", max_count=2 * max_vertices)
    if len(values) % 2 or len(values) < 6:
        raise ShapeError(
            f"malformed polygon: need an even number of coordinates, at least 3 vertices "
            f"(6 numbers), got {len(values)}"
        )
    return fill_polygon(np.asarray(values, dtype=np.float64).reshape(-1, 2), height, width)


def fill_polygon(xy: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pixels whose centres lie inside the polygon ``xy`` (N x 2, pixel-edge coordinates),
    by the even-odd rule.

    A scanline fill: each edge is cut with the rows whose centres it spans, and each row is
    filled between pairs of cuts. The work grows with the cuts (about twice the height for an
    ordinary outline), where ``skimage.draw.polygon`` tests every pixel of the bounding box
    against every edge (32 s for 10,000 vertices on 1000 x 1000 pixels) and Pillow's
    ``ImageDraw.polygon`` rounds vertices to whole pixels.
    """
    x0, y0 = xy[:, 0], xy[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    lo, hi = np.minimum(y0, y1), np.maximum(y0, y1)
    # Rows r with centre r + 0.5 in [lo, hi): a vertex is counted by one of its edges only.
    r0 = np.clip(np.ceil(lo - 0.5), 0, height).astype(np.int64)
    r1 = np.clip(np.ceil(hi - 0.5), 0, height).astype(np.int64)
    counts = np.maximum(r1 - r0, 0)
    total = int(counts.sum())
    # Edges times rows in the worst case (a zig-zag): bounded before anything that size exists.
    if total > MAX_CROSSINGS:
        raise ShapeTooLarge(
            f"polygon: its {len(xy)} edges cross the image rows {total} times (too complex)"
        )
    mask = np.zeros((height, width), dtype=bool)
    if total == 0:
        return mask
    edge = np.repeat(np.arange(len(xy)), counts)
    first = np.cumsum(counts) - counts
    rows = r0[edge] + (np.arange(total) - first[edge])
    t = (rows + 0.5 - y0[edge]) / (y1[edge] - y0[edge])
    xs = x0[edge] + t * (x1[edge] - x0[edge])
    order = np.lexsort((xs, rows))
    rows, xs = rows[order], xs[order]
    # Every row is cut an even number of times; consecutive cuts bound the inside spans.
    span_rows = rows[0::2]
    c0 = np.clip(np.ceil(xs[0::2] - 0.5), 0, width).astype(np.int64)
    # A centre on a left or right boundary is inside (as a traced outline puts it there).
    c1 = np.clip(np.floor(xs[1::2] - 0.5) + 1, 0, width).astype(np.int64)
    keep = c1 > c0
    edges = np.zeros((height, width + 1), dtype=np.int8)
    np.add.at(edges, (span_rows[keep], c0[keep]), 1)
    np.add.at(edges, (span_rows[keep], c1[keep]), -1)
    mask[:] = np.cumsum(edges, axis=1, dtype=np.int8)[:, :width] > 0
    return mask


def mask_from_rectangle(points: Sequence[float], height: int, width: int) -> np.ndarray:
    """The pixels whose centres lie inside a CVAT rectangle ``[xtl, ytl, xbr, ybr]``."""
    values = _numbers(points, "rectangle", max_count=4)
    if len(values) != 4:
        raise ShapeError(
            f"malformed rectangle: need 4 numbers [xtl, ytl, xbr, ybr], got {len(values)}"
        )
    xtl, ytl, xbr, ybr = values
    if not (xtl < xbr and ytl < ybr):
        raise ShapeError(
            f"malformed rectangle: [{xtl}, {ytl}, {xbr}, {ybr}] is not top-left, bottom-right"
        )
    c0, c1 = (int(np.clip(math.ceil(v - 0.5), 0, width)) for v in (xtl, xbr))
    r0, r1 = (int(np.clip(math.ceil(v - 0.5), 0, height)) for v in (ytl, ybr))
    mask = np.zeros((height, width), dtype=bool)
    mask[r0:r1, c0:c1] = True
    return mask


def box_from_mask(mask: np.ndarray) -> list[float] | None:
    """CVAT rectangle points of the bounding box of ``mask`` (pixel edges); None when empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


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


def mask_from_shape(
    shape_type: str,
    points: Any,
    height: int,
    width: int,
    types: Sequence[str] = SUPPORTED_TYPES,
    max_vertices: int = MAX_POLYGON_VERTICES,
) -> np.ndarray:
    """Mask of a CVAT shape of one of ``types``; ShapeError for anything else."""
    if shape_type not in types:
        raise ShapeError(
            f"unsupported shape type {_quote(shape_type)}: this function follows "
            f"{', '.join(types)} shapes"
        )
    if shape_type == "mask":
        mask = mask_from_rle(points, height, width)
    elif shape_type == "polygon":
        mask = mask_from_polygon(points, height, width, max_vertices)
    elif shape_type == "rectangle":
        mask = mask_from_rectangle(points, height, width)
    else:
        raise ShapeError(f"unsupported shape type {_quote(shape_type)}")
    if not mask.any():
        raise ShapeError(f"the {shape_type} covers no pixel of the {width}x{height} image")
    return mask


def shape_points(shape_type: str, mask: np.ndarray) -> list[float] | None:
    """CVAT ``points`` of ``mask`` as a shape of ``shape_type``; None when the mask is empty."""
    if shape_type == "mask":
        return rle_from_mask(mask)
    if shape_type == "polygon":
        return polygon_from_mask(mask)
    if shape_type == "rectangle":
        return box_from_mask(mask)
    raise ShapeError(f"unsupported shape type {_quote(shape_type)}")
