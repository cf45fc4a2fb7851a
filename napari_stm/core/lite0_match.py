"""``lite0-match``: a baseline that needs no video training.

Frozen ImageNet EfficientNet-Lite0 features serve as keys; the memorised masks themselves are the
values. A query pixel takes the mask value of the memory pixels whose features it matches best
(a top-k softmax over cosine similarities), so the model works from the moment the package is
installed, with weights that ship with it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from napari_stm.core.backbones import efficientnet_lite0, lite0_normalize
from napari_stm.core.model import MemoryEntry, QueryFeatures, VOSNetwork
from napari_stm.core.readout import memory_read

#: resolution of the keys and values
STRIDE = 8


class Lite0Match(VOSNetwork):
    """Mask propagation by feature matching on a frozen ImageNet EfficientNet-Lite0.

    Keys (shared by all objects) are the L2-normalised stride-8 features concatenated with the
    L2-normalised stride-16 features upsampled to stride 8, normalised again; the stride-16 half
    brings context, the stride-8 half position accuracy. Values are the objects' masks averaged
    over each 8x8 cell.
    """

    name = "lite0-match"
    pad_multiple = 16
    default_top_k: int | None = 20

    def __init__(self, pretrained: bool = True, temperature: float = 0.05) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.backbone = efficientnet_lite0(pretrained=pretrained, with_head=False)
        self.backbone.requires_grad_(False)
        #: cosine similarities are at most 1: dividing by a small temperature sharpens the read
        self.scale = 1.0 / temperature
        self.eval()

    def train(self, mode: bool = True) -> Lite0Match:
        # Frozen ImageNet batch-norm statistics must never be replaced by a batch's.
        super().train(mode)
        self.backbone.eval()
        return self

    def encode_query(self, image: Tensor) -> QueryFeatures:
        feats = self.backbone.features(lite0_normalize(image), strides=(8, 16))
        fine = F.normalize(feats[8], dim=1)
        coarse = F.interpolate(
            F.normalize(feats[16], dim=1), size=fine.shape[-2:], mode="bilinear", align_corners=False
        )
        key = F.normalize(torch.cat([fine, F.normalize(coarse, dim=1)], dim=1), dim=1)
        return QueryFeatures(key=key)

    def encode_memory(
        self, image: Tensor, masks: Tensor, query: QueryFeatures | None = None
    ) -> MemoryEntry:
        if masks.dim() != 3 or masks.shape[-2:] != image.shape[-2:]:
            raise ValueError(
                f"masks must be [N, H, W] with the image's size {tuple(image.shape[-2:])}, "
                f"got {tuple(masks.shape)}"
            )
        key = query.key if query is not None else self.encode_query(image).key
        values = F.avg_pool2d(masks[:, None].to(key.dtype), STRIDE)
        if values.shape[-2:] != key.shape[-2:]:
            raise ValueError(
                f"image size {tuple(image.shape[-2:])} is not a multiple of {self.pad_multiple}"
            )
        return MemoryEntry(keys=key, values=values)

    def segment(
        self,
        query: QueryFeatures,
        mem_keys: Tensor,
        mem_values: Tensor,
        top_k: int | None = None,
    ) -> Tensor:
        key = query.key
        h, w = key.shape[-2:]
        read = memory_read(mem_keys, mem_values, key.flatten(2), top_k=top_k, scale=self.scale)
        probs = read.reshape(-1, 1, h, w)
        probs = F.interpolate(
            probs, scale_factor=STRIDE, mode="bilinear", align_corners=False
        ).squeeze(1)
        return probs.clamp(0.0, 1.0)
