"""A tiny, deterministic matching network that really tracks synthetic objects.

``TinyMatch`` is a miniature of ``lite0-match``: keys are colour and fixed random-filter
responses pooled to stride 4 and L2-normalised; values are the memorised masks pooled to the same
grid; a query pixel takes the mask value of the memory pixels it matches best (top-k softmax).
It needs no weights file, builds in milliseconds and runs a 64 x 96 frame in a few milliseconds,
so engine tests exercise real propagation without the cost of a real backbone.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from napari_stm.core.model import MemoryEntry, QueryFeatures, VOSNetwork
from napari_stm.core.readout import MotionPrior, memory_read

#: resolution of keys and values
STRIDE = 4


class TinyMatch(VOSNetwork):
    """Mask propagation by matching fixed colour/texture features (a test network)."""

    name = "tiny-match"
    pad_multiple = 16
    default_top_k: int | None = 8

    def __init__(self, temperature: float = 0.05, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.filters = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        with torch.no_grad():
            self.filters.weight.copy_(torch.randn(self.filters.weight.shape, generator=gen))
        self.scale = 1.0 / temperature
        self.requires_grad_(False)
        self.eval()

    def encode_query(self, image: Tensor) -> QueryFeatures:
        colour = (image - 0.5) * 4.0
        texture = torch.tanh(self.filters(image - 0.5))
        feats = F.avg_pool2d(torch.cat([colour, texture], dim=1), STRIDE)
        return QueryFeatures(key=F.normalize(feats, dim=1))

    def encode_memory(
        self, image: Tensor, masks: Tensor, query: QueryFeatures | None = None, groups: int = 1
    ) -> MemoryEntry:
        # ``groups``: each object's values are its own mask alone, whatever its group.
        key = query.key if query is not None else self.encode_query(image).key
        values = F.avg_pool2d(masks[:, None].to(key.dtype), STRIDE)
        return MemoryEntry(keys=key, values=values)

    def read_query(self, query: QueryFeatures) -> tuple[Tensor, float | None]:
        return query.key.flatten(2), self.scale

    def segment(
        self,
        query: QueryFeatures,
        mem_keys: Tensor,
        mem_values: Tensor,
        top_k: int | None = None,
        prior: MotionPrior | None = None,
    ) -> Tensor:
        h, w = query.key.shape[-2:]
        key, scale = self.read_query(query)
        read = memory_read(mem_keys, mem_values, key, top_k, scale, prior)
        probs = F.interpolate(read.reshape(-1, 1, h, w), scale_factor=STRIDE, mode="bilinear")
        return probs.squeeze(1).clamp(0.0, 1.0)


class TinyMatchWithPrior(TinyMatch):
    """TinyMatch with the engine's motion prior (as stm-lite): look-alike objects told apart by
    where they were."""

    motion_prior = True


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def mean_iou(pred: dict[int, np.ndarray], gt: np.ndarray, ids: list[int]) -> float:
    """Mean over frames and objects of the IoU of predicted and true labels."""
    scores = [iou(lab == k, gt[t] == k) for t, lab in pred.items() for k in ids]
    return float(np.mean(scores))
