"""Losses: cross-entropy over soft-aggregated objects, optionally on the hardest pixels only.

The soft aggregation itself is the engine's (``napari_stm.core.readout.soft_aggregate`` with
``logits=True``), taken inside the step function both training and inference call.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def bootstrapped_cross_entropy(logits: Tensor, target: Tensor, top_fraction: float = 1.0) -> Tensor:
    """Cross-entropy averaged over the ``top_fraction`` highest-loss pixels of the batch.

    ``logits`` [B, C, H, W], ``target`` [B, H, W] int64. 1.0 is plain cross-entropy; smaller
    values concentrate training on the pixels still wrong (boundaries, thin parts), as STCN's
    bootstrapped loss does once the easy pixels are learnt.
    """
    if not 0 < top_fraction <= 1:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    loss = F.cross_entropy(logits, target, reduction="none").flatten()
    if top_fraction >= 1:
        return loss.mean()
    k = max(1, int(loss.numel() * top_fraction))
    return loss.topk(k, sorted=False).values.mean()


def bootstrap_fraction(step: int, total: int, final: float, start: float, end: float) -> float:
    """Share of pixels the loss keeps at ``step``: 1.0 until ``start * total``, then linearly
    down to ``final`` at ``end * total`` (STCN's warm-up), ``final`` after."""
    if final >= 1:
        return 1.0
    a, b = start * total, end * total
    if step < a:
        return 1.0
    if step >= b or b <= a:
        return final
    return 1.0 + (final - 1.0) * (step - a) / (b - a)
