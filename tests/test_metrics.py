"""J and F against values worked out by hand, and against the official dilation formulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.ndimage import binary_dilation, gaussian_filter
from skimage.morphology import disk

from napari_stm.metrics import (
    boundary_tolerance,
    db_eval_boundary,
    db_eval_iou,
    db_statistics,
    f_measure,
    seg2bmap,
)


def left_columns(width: int, size: int = 64) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[:, :width] = True
    return mask


def square(y0: int, x0: int, side: int, size: int = 64) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[y0 : y0 + side, x0 : x0 + side] = True
    return mask


def test_iou_hand_values():
    gt = left_columns(32)
    assert db_eval_iou(gt, gt) == 1.0
    assert db_eval_iou(gt, left_columns(33)) == pytest.approx(32 / 33)
    assert db_eval_iou(gt, ~gt) == 0.0
    empty = np.zeros((64, 64), bool)
    assert db_eval_iou(empty, empty) == 1.0  # nothing to find, nothing found
    assert db_eval_iou(empty, gt) == 0.0
    assert db_eval_iou(gt, empty) == 0.0
    # Several frames at once, as the official function allows.
    stack = db_eval_iou(np.stack([gt, empty]), np.stack([left_columns(16), empty]))
    np.testing.assert_allclose(stack, [0.5, 1.0])


def test_seg2bmap_square_is_ring_offset_towards_origin():
    # A 20x20 square at rows/cols 10..29: the boundary is the ring of the square 9..29.
    bmap = seg2bmap(square(10, 10, 20))
    ring = square(9, 9, 21) & ~square(10, 10, 19)
    np.testing.assert_array_equal(bmap, ring)
    assert bmap.sum() == 80
    # A vertical edge gives one boundary column (the last foreground one), full height.
    edge = seg2bmap(left_columns(32))
    assert edge.sum() == 64 and edge[:, 31].all()


def test_tolerance_is_ceil_of_diagonal_fraction():
    assert boundary_tolerance((64, 64)) == 1  # ceil(0.008 * 90.5)
    assert boundary_tolerance((200, 200)) == 3  # ceil(2.26)
    assert boundary_tolerance((480, 854)) == 8  # DAVIS 480p
    assert boundary_tolerance((10, 10), bound_th=4) == 4  # >= 1 means pixels


def test_f_shift_within_and_beyond_tolerance():
    gt = left_columns(32)  # boundary column 31, tolerance 1 pixel
    assert f_measure(gt, gt) == 1.0
    assert f_measure(left_columns(33), gt) == 1.0  # boundary at column 32: 1 px away
    assert f_measure(left_columns(34), gt) == 0.0  # 2 px away: nothing matches
    assert f_measure(left_columns(31), gt) == 1.0
    # 200x200: tolerance 3 pixels.
    gt = left_columns(100, size=200)
    assert f_measure(left_columns(103, size=200), gt) == 1.0
    assert f_measure(left_columns(104, size=200), gt) == 0.0


def test_f_precision_and_recall_differ():
    gt = square(10, 10, 20)  # 80 boundary pixels
    pred = gt.copy()
    pred[50, 50] = True  # a far speck adds 4 unmatched boundary pixels
    # precision 80/84, recall 1: F = 2 * 80 / (80 + 84)
    assert f_measure(pred, gt) == pytest.approx(160 / 164)
    # Swapped roles: recall 80/84, precision 1, the same F.
    assert f_measure(gt, pred) == pytest.approx(160 / 164)
    assert db_eval_iou(gt, pred) == pytest.approx(400 / 401)


def test_f_empty_cases():
    empty = np.zeros((64, 64), bool)
    gt = square(10, 10, 20)
    assert f_measure(empty, empty) == 1.0
    assert f_measure(empty, gt) == 0.0  # precision 1, recall 0
    assert f_measure(gt, empty) == 0.0  # precision 0, recall 1
    np.testing.assert_array_equal(
        db_eval_boundary(np.stack([gt, empty]), np.stack([gt, empty])), [1.0, 1.0]
    )


def official_f(pred: np.ndarray, gt: np.ndarray, bound_th: float = 0.008) -> float:
    """The official formulation: dilate each boundary with a disk, count overlaps."""
    radius = bound_th if bound_th >= 1 else math.ceil(bound_th * np.linalg.norm(pred.shape))
    pred_b, gt_b = seg2bmap(pred), seg2bmap(gt)
    pred_dil = binary_dilation(pred_b, disk(radius))
    gt_dil = binary_dilation(gt_b, disk(radius))
    n_pred, n_gt = pred_b.sum(), gt_b.sum()
    if n_pred == 0 or n_gt == 0:
        precision, recall = float(n_pred == 0), float(n_gt == 0)
    else:
        precision = (pred_b & gt_dil).sum() / n_pred
        recall = (gt_b & pred_dil).sum() / n_gt
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def test_f_matches_disk_dilation_on_blobs():
    rng = np.random.default_rng(1)
    for trial in range(30):
        h, w = rng.integers(16, 120, size=2)
        gt = gaussian_filter(rng.random((h, w)), 3) > 0.5
        if trial % 2:
            pred = np.roll(gt, int(rng.integers(-4, 5)), axis=int(rng.integers(0, 2)))
        else:
            pred = gaussian_filter(rng.random((h, w)), 3) > 0.5
        th = 0.008 if trial % 3 else float(rng.integers(1, 5))
        assert f_measure(pred, gt, bound_th=th) == pytest.approx(official_f(pred, gt, th))


def test_statistics_official_decay_bins():
    values = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]
    mean, recall, decay = db_statistics(values)
    assert mean == pytest.approx(0.55)
    assert recall == pytest.approx(0.5)  # 0.5 itself is not > 0.5
    # Edges round(linspace(1, 8, 5)) - 1 = [0, 2, 4, 5, 7]; bins share edge frames:
    # first [0.9, 0.8, 0.7], last [0.4, 0.3, 0.2] -> 0.8 - 0.3 (array_split would give 0.6).
    assert decay == pytest.approx(0.5)
    assert db_statistics([1.0, 1.0, 0.0, 0.0])[2] == pytest.approx(1.0)
    assert db_statistics([0.7]) == pytest.approx((0.7, 1.0, 0.0))
    # Long videos: the official uint8 edges would wrap past 256 frames; ours do not.
    long = np.r_[np.ones(300), np.zeros(300)]
    assert db_statistics(long)[2] == pytest.approx(1.0)
    assert all(math.isnan(v) for v in db_statistics([]))
