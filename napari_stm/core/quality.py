"""How sure the engine is of each object in each frame, and which objects look lost.

Confidence of object k in a frame (``object_confidence``): the Jaccard index its mask would be
expected to reach if the engine's probabilities were right. With M the pixels where k wins
(its label) and p its probability after soft aggregation,

    confidence = sum_{x in M} p(x) / (|M| + sum_{x not in M} p(x))

i.e. the expected intersection of a mask drawn from p with M over their expected union. It is
1 for a mask whose every pixel is certain and which leaves no probability outside, falls as the
border blurs or probability spreads elsewhere (onto a look-alike, into the background), and is
0 when the object has no pixel at all: the engine cannot vouch for a disappearance. It lies in
[0, 1]; higher is surer. How well it ranks frames by their true J is measured, not assumed
(``benchmarks/calibrate_confidence.py``, docs/architecture.md).

Flags (``FLAG_*``): "reference" for an object of a frame a person annotated; "lost" when the
object's area collapses against what the pass saw of it: below :data:`LOST_SHARE` of its area
on the pass's reference or of its area on the frame before.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import Tensor

#: an object whose area falls below this share of its reference's or the previous frame's
#: is flagged lost
LOST_SHARE = 0.25
#: flags of :class:`~napari_stm.core.engine.FrameResult`
FLAG_NONE = ""
FLAG_LOST = "lost"
FLAG_REFERENCE = "reference"
#: the frame to correct next lies at least this many frames from every reference
SUGGEST_GAP = 2
#: frames: how fast a correction's expected help falls with the distance from it
#: (:func:`frame_to_correct`)
REACH = 6.0


def object_confidence(
    probs: Tensor,
    top: tuple[Tensor, Tensor] | None = None,
    within: tuple[slice, slice] | None = None,
) -> Tensor:
    """Expected Jaccard index of each object's mask, [N] float32 in [0, 1].

    ``probs`` [N+1, H, W]: background then objects (the soft-aggregated probabilities);
    ``top``: ``probs.max(0)``'s values and indices when already known; ``within``: rows and
    columns outside which every pixel is background (its class index 0), to count the masks
    there only (the same sums: each object's pixels are added in the same order).
    """
    n1 = probs.shape[0]
    top, cls = probs.float().max(0) if top is None else top
    if within is not None:
        top, cls = top[within], cls[within]
    cls = cls.flatten()
    # Inside its own mask an object's probability is the top one, so the intersection of every
    # object is one weighted count of the labels.
    inter = torch.bincount(cls, weights=top.flatten(), minlength=n1)[1:]
    area = torch.bincount(cls, minlength=n1)[1:].to(inter.dtype)
    outside = probs[1:].float().sum((1, 2)).to(inter.dtype) - inter
    union = area + outside
    conf = torch.where(area > 0, inter / union.clamp_min(1e-6), torch.zeros_like(inter))
    return conf.clamp(0, 1).float()


def label_areas(labels: np.ndarray, ids: list[int]) -> dict[int, int]:
    """Pixels of each id in a label image (ids absent from it count 0)."""
    flat = labels.ravel()
    if flat.dtype.kind not in "iu":
        raise TypeError(f"labels must be integers, not {flat.dtype}")
    counts = np.bincount(flat.astype(np.int64, copy=False), minlength=max(ids, default=0) + 1)
    return {i: int(counts[i]) for i in ids}


class LostWatch:
    """Flags objects whose area collapses within one pass.

    An object is lost in a frame when its area is below :data:`LOST_SHARE` of its area on the
    reference the pass started from, or of its area on the frame the pass segmented before. An
    object the reference does not hold is never flagged by it (it is not tracked there).
    """

    def __init__(self, share: float = LOST_SHARE) -> None:
        self.share = share
        self.reference: dict[int, int] = {}
        self.previous: dict[int, int] = {}

    def see_reference(self, areas: dict[int, int]) -> None:
        self.reference.update({i: a for i, a in areas.items() if a > 0})
        self.previous = dict(areas)

    def flags(self, areas: dict[int, int]) -> dict[int, str]:
        out: dict[int, str] = {}
        for i, a in areas.items():
            before = max(self.reference.get(i, 0), self.previous.get(i, 0))
            # max: a collapse against either the reference or the frame before counts; an
            # object never seen with any area cannot collapse.
            out[i] = FLAG_LOST if before > 0 and a < self.share * before else FLAG_NONE
        self.previous = dict(areas)
        return out


def mean_confidence(confidence: Mapping[int, float], objects: Iterable[int]) -> float:
    """A frame's confidence as :func:`frame_to_correct` reads it: the mean over ``objects`` of
    each one's confidence in the frame (an object the frame has none for counts 0). `bench
    annotate --pickers tool` and the napari widget's "next frame to correct" both ask this."""
    return float(np.mean([float(confidence.get(i, 0.0)) for i in objects]))


def frame_to_correct(
    confidence: Mapping[int, float],
    references: Iterable[int],
    gap: int = SUGGEST_GAP,
    reach: float = REACH,
) -> int | None:
    """The frame a person should correct next (``confidence``: frame -> mean object
    confidence; None when every frame is a reference).

    A correction on frame t helps the frames it becomes the nearest reference of, and the more
    the nearer they lie to it. So each candidate t scores

        sum of (1 - confidence(u)) * exp(-|u - t| / reach)

    over the frames u nearer to t than to every reference (u = t included); the highest
    score wins, ties to the earliest. Candidates are the frames at least ``gap`` frames from
    every reference, or every frame that is not a reference when none lies that far. Frames
    missing from ``confidence`` (not computed yet) count as sure.

    Why not the least sure frame: the frames beside a reference inherit its hard pose or blur,
    so the least sure frame kept landing beside the last correction, where it reaches few
    frames; and one unsure frame amid sure ones is worth less than the middle of an unsure run.
    Measured with the simulated annotator (3 rounds from frame 0, development sequences only,
    docs/architecture.md "Which frame to correct next").
    """
    refs = sorted({int(r) for r in references})
    free = [int(t) for t in confidence if int(t) not in refs]
    if not free:
        return None
    lo = min(free + refs)
    hi = max(free + refs)
    n = hi - lo + 1
    deficit = np.zeros(n)
    for t in free:
        deficit[t - lo] = 1.0 - float(confidence[t])
    frames = np.arange(lo, hi + 1)
    # distance of every frame to its nearest reference (inf without one: any t claims it)
    to_ref = (
        np.abs(frames[:, None] - np.asarray(refs)[None, :]).min(1) if refs else np.full(n, np.inf)
    )
    score = np.zeros(n)
    # exp(-12) of the weight is past what confidences can tell apart
    width = min(n - 1, int(np.ceil(12 * reach)))
    for k in range(-width, width + 1):
        # frame u = t + k counts for t when t would be nearer to it than every reference
        u = slice(max(k, 0), n + min(k, 0))
        t = slice(max(-k, 0), n - max(k, 0))
        score[t] += np.exp(-abs(k) / reach) * np.where(abs(k) < to_ref[u], deficit[u], 0.0)
    far = [t for t in free if all(abs(t - r) >= gap for r in refs)] or free
    return min(far, key=lambda t: (-score[t - lo], t))
