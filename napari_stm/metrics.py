"""Region (J) and boundary (F) similarity exactly as the DAVIS 2017 evaluation computes them.

Definitions follow davis2017-evaluation (`davis2017/metrics.py`, `davis2017/utils.py`):

- J: intersection over union of two binary masks; both empty counts as 1.
- F: boundary F-measure. Boundaries are 1-pixel maps from `seg2bmap` (offset half a pixel
  towards the origin), matched within a tolerance of `ceil(0.008 * image diagonal)` pixels:
  a boundary pixel of one mask is matched when a boundary pixel of the other lies within a
  disk of that radius (the official code dilates with `cv2.dilate(bmap, disk(r))`; a pixel is
  inside that dilation exactly when its Euclidean distance to the boundary is <= r, which is
  what is computed here, with a k-d tree over the boundary pixels).
- Statistics per object over frames: Mean, Recall (fraction of frames > 0.5) and Decay (mean
  of the first quarter minus mean of the last quarter, with the official, overlapping bins).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

__all__ = [
    "BOUNDARY_THRESHOLD",
    "boundary_tolerance",
    "db_eval_boundary",
    "db_eval_iou",
    "db_statistics",
    "f_measure",
    "seg2bmap",
]

BOUNDARY_THRESHOLD = 0.008


def _binary(mask: Any) -> np.ndarray:
    return np.asarray(mask).astype(bool)


def db_eval_iou(annotation: Any, segmentation: Any, void_pixels: Any = None) -> Any:
    """Jaccard index of binary masks [..., H, W] (ground truth, prediction); empty/empty = 1.

    Returns a float for 2-D inputs, an array over the leading axes otherwise.
    """
    gt, pred = _binary(annotation), _binary(segmentation)
    if gt.shape != pred.shape:
        raise ValueError(f"annotation {gt.shape} and segmentation {pred.shape} shapes differ")
    keep = np.ones_like(gt) if void_pixels is None else ~_binary(void_pixels)
    inter = np.sum(gt & pred & keep, axis=(-2, -1))
    union = np.sum((gt | pred) & keep, axis=(-2, -1))
    with np.errstate(divide="ignore", invalid="ignore"):
        j = inter / union
    j = np.where(union == 0, 1.0, j)
    return float(j) if j.ndim == 0 else j


def seg2bmap(seg: Any) -> np.ndarray:
    """1-pixel boundary map of a binary mask, as in the BSDS/DAVIS `seg2bmap`.

    A pixel is on the boundary when it differs from its east, south or south-east neighbour;
    the last row only compares east, the last column only south, the corner never counts.
    """
    seg = _binary(seg)
    east = np.zeros_like(seg)
    south = np.zeros_like(seg)
    south_east = np.zeros_like(seg)
    east[:, :-1] = seg[:, 1:]
    south[:-1, :] = seg[1:, :]
    south_east[:-1, :-1] = seg[1:, 1:]
    bmap = (seg ^ east) | (seg ^ south) | (seg ^ south_east)
    bmap[-1, :] = seg[-1, :] ^ east[-1, :]
    bmap[:, -1] = seg[:, -1] ^ south[:, -1]
    bmap[-1, -1] = False
    return bmap


def boundary_tolerance(shape: tuple[int, ...], bound_th: float = BOUNDARY_THRESHOLD) -> float:
    """Match radius in pixels: `bound_th` itself when >= 1, else a fraction of the diagonal."""
    if bound_th >= 1:
        return float(bound_th)
    return float(math.ceil(bound_th * math.hypot(shape[0], shape[1])))


def _matched(source: np.ndarray, target: np.ndarray, radius: float) -> int:
    """Number of `source` boundary pixels within `radius` (Euclidean) of a `target` pixel."""
    distance, _ = cKDTree(np.argwhere(target)).query(np.argwhere(source), k=1)
    # Squared pixel distances are integers: compare with the largest integer within r^2,
    # half a unit apart, so float rounding of the distances cannot flip a decision.
    limit = math.floor(radius * radius + 1e-9)
    return int(np.count_nonzero(distance * distance <= limit + 0.5))


def f_measure(
    foreground_mask: Any,
    gt_mask: Any,
    void_pixels: Any = None,
    bound_th: float = BOUNDARY_THRESHOLD,
) -> float:
    """Boundary F-measure of one prediction (`foreground_mask`) against one ground truth."""
    pred, gt = _binary(foreground_mask), _binary(gt_mask)
    if pred.ndim != 2 or pred.shape != gt.shape:
        raise ValueError(f"f_measure needs two H x W masks, got {pred.shape} and {gt.shape}")
    if void_pixels is not None:
        keep = ~_binary(void_pixels)
        pred, gt = pred & keep, gt & keep
    radius = boundary_tolerance(pred.shape, bound_th)
    pred_boundary, gt_boundary = seg2bmap(pred), seg2bmap(gt)
    n_pred = int(np.count_nonzero(pred_boundary))
    n_gt = int(np.count_nonzero(gt_boundary))
    if n_pred == 0 and n_gt == 0:
        precision, recall = 1.0, 1.0
    elif n_pred == 0:
        precision, recall = 1.0, 0.0
    elif n_gt == 0:
        precision, recall = 0.0, 1.0
    else:
        precision = _matched(pred_boundary, gt_boundary, radius) / n_pred
        recall = _matched(gt_boundary, pred_boundary, radius) / n_gt
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def db_eval_boundary(
    annotation: Any,
    segmentation: Any,
    void_pixels: Any = None,
    bound_th: float = BOUNDARY_THRESHOLD,
) -> Any:
    """Boundary F of masks H x W (a float) or T x H x W (an array of T floats)."""
    gt, pred = np.asarray(annotation), np.asarray(segmentation)
    if gt.shape != pred.shape:
        raise ValueError(f"annotation {gt.shape} and segmentation {pred.shape} shapes differ")
    if gt.ndim == 2:
        return f_measure(pred, gt, void_pixels, bound_th)
    if gt.ndim != 3:
        raise ValueError(f"db_eval_boundary takes H x W or T x H x W masks, got {gt.shape}")
    voids = [None] * len(gt) if void_pixels is None else void_pixels
    return np.array([f_measure(p, g, v, bound_th) for p, g, v in zip(pred, gt, voids, strict=True)])


def db_statistics(per_frame_values: Any) -> tuple[float, float, float]:
    """(Mean, Recall, Decay) of one object's per-frame J or F values, NaNs ignored.

    Decay uses the official bins: 5 edges `round(linspace(1, n, 5)) - 1`, bin i covering
    frames edges[i] .. edges[i+1] inclusive (neighbouring bins share their edge frame).
    """
    values = np.asarray(per_frame_values, dtype=np.float64)
    if values.size == 0:
        return math.nan, math.nan, math.nan
    with np.errstate(invalid="ignore"):
        mean = float(np.nanmean(values)) if not np.all(np.isnan(values)) else math.nan
        recall = float(np.nanmean(values > 0.5))
    # +1e-10: numpy rounds halves to even; the official edges round them up.
    edges = (np.round(np.linspace(1, len(values), 5) + 1e-10) - 1).astype(int)
    bins = [values[edges[i] : edges[i + 1] + 1] for i in range(4)]
    first, last = bins[0], bins[3]
    if np.all(np.isnan(first)) or np.all(np.isnan(last)):
        return mean, recall, math.nan
    decay = float(np.nanmean(first) - np.nanmean(last))
    return mean, recall, decay
