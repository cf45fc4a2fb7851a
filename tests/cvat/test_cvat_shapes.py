"""CVAT mask RLE and polygons <-> boolean masks."""

import numpy as np
import pytest
from cvat_helpers import iou
from cvat_sdk.masks import decode_mask, encode_mask

from cvat_function.shapes import (
    ShapeError,
    mask_from_polygon,
    mask_from_rle,
    mask_from_shape,
    polygon_from_mask,
    rle_from_mask,
    shape_points,
)


def _disc(h=60, w=80, cy=30, cx=35, r=18):
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 < r**2


def test_rle_round_trip_matches_cvat_sdk():
    m = _disc()
    m[0, :5] = True  # touches the border, starts with a run of ones in its bbox row
    points = rle_from_mask(m)
    assert points == encode_mask(m)
    assert np.array_equal(mask_from_rle(points, 60, 80), m)
    assert np.array_equal(decode_mask(points, image_width=80, image_height=60), m)


def test_rle_is_cvat_sdks_for_any_mask():
    # Our box handed to encode_mask: the same points as encode_mask finding it itself.
    rng = np.random.default_rng(0)
    for _ in range(50):
        m = np.zeros((40, 70), bool)
        y, x, h, w = rng.integers(0, 40), rng.integers(0, 70), *rng.integers(1, 30, 2)
        m[y : y + h, x : x + w] = rng.random(m[y : y + h, x : x + w].shape) > 0.4
        want = encode_mask(m) if m.any() else None
        assert rle_from_mask(m) == want


def test_empty_mask_has_no_shape():
    empty = np.zeros((8, 8), bool)
    assert rle_from_mask(empty) is None
    assert polygon_from_mask(empty) is None
    assert shape_points("mask", empty) is None


@pytest.mark.parametrize(
    "points, message",
    [
        ([1, 2, 3], "too few elements"),
        ([5, 0, 0, 2, 2], "does not match"),  # 5 pixels in a 3x3 bbox
        ([9, 0, 0, 200, 2], "bounding box"),  # bbox beyond the image
        ([4.5, 0, 0, 1, 1], "non-integer"),
        (["a", 0, 0, 1, 1], "non-numeric"),
        ("0,0,1,1", "must be a list"),
    ],
)
def test_malformed_rle_is_named(points, message):
    with pytest.raises(ShapeError, match="malformed mask RLE|points") as e:
        mask_from_rle(points, 10, 10)
    assert message in str(e.value)


def test_polygon_rasterises_pixel_centres():
    # CVAT coordinates are pixel edges: [2, 8) x [1, 5) covers pixels 2..7 x 1..4.
    m = mask_from_polygon([2, 1, 8, 1, 8, 5, 2, 5], 10, 10)
    expected = np.zeros((10, 10), bool)
    expected[1:5, 2:8] = True
    assert np.array_equal(m, expected)


def test_polygon_round_trip():
    disc = _disc()
    points = polygon_from_mask(disc)
    assert len(points) % 2 == 0 and len(points) >= 6
    assert iou(mask_from_polygon(points, 60, 80), disc) > 0.97
    square = np.zeros((20, 20), bool)
    square[3:11, 4:15] = True
    assert np.array_equal(mask_from_polygon(polygon_from_mask(square), 20, 20), square)


def test_polygon_keeps_the_largest_part():
    m = np.zeros((40, 40), bool)
    m[2:6, 2:6] = True
    m[10:30, 10:30] = True
    back = mask_from_polygon(polygon_from_mask(m), 40, 40)
    assert iou(back, m & (np.arange(40)[:, None] >= 10)) > 0.97


def test_polygon_of_one_pixel_and_of_the_whole_image():
    one = np.zeros((10, 10), bool)
    one[3, 4] = True
    assert np.array_equal(mask_from_polygon(polygon_from_mask(one), 10, 10), one)
    full = np.ones((10, 10), bool)
    points = polygon_from_mask(full)
    assert min(points) >= 0 and max(points) <= 10
    assert mask_from_polygon(points, 10, 10).all()


@pytest.mark.parametrize(
    "points, message",
    [
        ([1, 1, 5, 1, 5], "even number"),
        ([1, 1, 5, 1], "at least 3 vertices"),
        ([1, 1, 5, float("nan"), 3, 4], "non-finite"),
        ([1, 1, 5, True, 3, 4], "non-numeric"),
        (None, "must be a list"),
    ],
)
def test_malformed_polygon_is_named(points, message):
    with pytest.raises(ShapeError, match=message):
        mask_from_polygon(points, 10, 10)


def test_unsupported_and_empty_shapes():
    with pytest.raises(ShapeError, match="unsupported shape type 'ellipse'"):
        mask_from_shape("ellipse", [0, 0, 4, 4], 10, 10)
    with pytest.raises(ShapeError, match="covers no pixel"):
        mask_from_shape("polygon", [50, 50, 60, 50, 60, 60], 10, 10)
