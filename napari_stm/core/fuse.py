"""Frames between two references: which side each object comes from, and the merge.

Between references a and b the engine has two guesses of every frame: the forward side (a
pass from a, reading a) and the backward side (a pass from b, reading b and a; core/plan.py
``Pass.reads``). Each object comes from one side, or, where the two sides
agree on it, is their mean (below); never a blend of two sides that disagree: a blend of two
weak masks is a weaker one, and the forward pass memorises what it takes.

Which side: the nearer one, unless the farther one is surer of the object (its confidence,
core/quality.py) by more than :data:`NEAR_MARGIN`. The confidence ranks a pass's frames well
but is a weak referee between two passes: a side many frames from its reference, already
wrong, can score as high as the nearer, right one (DAVIS bear, references on frames 0 and 39,
frame 2: backward side J 0.78 at confidence 0.962, forward side J 0.95 at 0.961), and once the
forward pass memorised such a guess it stayed wrong (J 0.79 on the frames after it). This is
how a correct new reference lowered J on frames it reaches: on DAVIS hike, references 31 and
42, frame 32 took the backward side (J 0.60, confidence 0.884) over the forward side one
frame from its reference (J 0.89, 0.874), and the forward pass carried the error on. Where
one side is clearly surer (lost objects, cells that entered or left) the two differ by far
more than the margin; docs/architecture.md has the measurements that chose it.

Where the two sides agree on an object (their masks of it overlap by :data:`AGREE_IOU` or
more) the frame yields their mean, and the forward side memorises its own guess. Two sides
that found the same object differ in its border, which the confidence cannot referee; the
nearer one was taken, and after a correction whose own side was the weaker, the frames near
it got worse and the forward side, having memorised them, worse after them (ctc-sim-01, left
half, true mask on frame 28: frames 15-27 took the backward side, 0.06 J worse over 17 cells,
each within the margin; mean J 0.845 -> 0.842). Where they disagree, one of them lost or
swapped the object: the mean would be a blend of two different things, and the forward side
memorises the side it yields (a side that lost the object recovers only that way).
"""

from __future__ import annotations

import torch
from torch import Tensor

#: how much surer (in expected Jaccard) the farther side must be to be taken over the nearer
NEAR_MARGIN = 0.05
#: the two sides agree on an object when their masks of it overlap by this much (IoU)
AGREE_IOU = 0.5


def take_backward(
    conf_forward: Tensor, conf_backward: Tensor, backward_nearer: bool, agree: Tensor | None = None
) -> Tensor:
    """[N] float: each object's weight of the backward side: 1 taken from it, 0 from the
    forward side, 0.5 (the mean of the two) where ``agree`` [N bool] says both sides found it
    (:func:`agreement`)."""
    if backward_nearer:
        take = (conf_backward + NEAR_MARGIN >= conf_forward).float()
    else:
        take = (conf_backward > conf_forward + NEAR_MARGIN).float()
    return take if agree is None else torch.where(agree, torch.full_like(take, 0.5), take)


def agreement(forward: Tensor, backward: Tensor) -> Tensor:
    """[N] bool: whether the two sides' masks of each object (``[N+1, H, W]`` probabilities,
    background first; each pixel to its most probable class) overlap by at least
    :data:`AGREE_IOU`. An object neither side finds counts as agreed (their mean is nothing)."""
    n = forward.shape[0] - 1
    ids = torch.arange(1, n + 1, device=forward.device)[:, None, None]
    f, b = forward.argmax(0) == ids, backward.argmax(0) == ids
    inter = (f & b).flatten(1).sum(1)
    union = (f | b).flatten(1).sum(1)
    return inter >= AGREE_IOU * union


def merge(forward: Tensor, backward: Tensor, take: Tensor) -> Tensor:
    """Each object's probabilities from ``forward`` or, where ``take`` [N] is 1, ``backward``
    (both [N+1, H, W], background first), or ``(1 - take) forward + take backward`` between.
    The objects taken (wholly or partly) from the backward side replace theirs in the forward
    side's distribution, and the rest of it (its background and its other objects) is
    rescaled to fill what they leave of each pixel, so that a side taken whole is
    handed on exactly: a frame whose objects all come from the forward side is its own guess,
    as if the later reference were not there. (Rebuilding the background as prod(1 - p_k), as
    soft aggregation does, changed every fused frame a little, also those the later reference
    does not change, and the forward pass memorised that: ctc-sim-01, left half, a correct
    mask on frame 28 lowered frames 1-14 by about 0.003 J each while taking none of their
    objects from its side.)"""
    w = take.to(forward)[:, None, None]
    mixed = forward[1:] + w * (backward[1:] - forward[1:])
    moved = w > 0
    # what the moved objects hold of each pixel, after and before
    held, was = (mixed * moved).sum(0), (forward[1:] * moved).sum(0)
    rest = (1 - held).clamp_min(0) / (1 - was).clamp_min(1e-6)
    merged = forward * rest
    merged[1:] = torch.where(moved, mixed, merged[1:])
    return merged / merged.sum(0, keepdim=True).clamp_min(1e-6)
