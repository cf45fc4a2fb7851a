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

from napari_stm.core.backbones import efficientnet_lite, lite0_normalize
from napari_stm.core.model import MemoryEntry, QueryFeatures, VOSNetwork
from napari_stm.core.readout import MotionPrior, memory_read

#: resolution of the keys (memory positions)
STRIDE = 8
#: resolution of the mask values: each stride-8 position carries its 2x2 stride-4 sub-cells
VALUE_STRIDE = 4


class Lite0Match(VOSNetwork):
    """Mask propagation by feature matching on a frozen ImageNet EfficientNet-Lite0.

    Keys (shared by all objects, 176 channels at stride 8) concatenate three L2-normalised parts,
    then normalise again: stride-4 features average-pooled to stride 8 (colour and edges, which
    sharpen boundaries), stride-8 features, and stride-16 features upsampled to stride 8 (context
    that tells apart similar-looking textures; without it, objects in real videos get lost).

    Values are the objects' masks averaged over each 4x4 cell, the four cells of a key position
    stacked as its four channels: read at stride 4, boundaries stay sharper and follow moving
    objects better than at stride 8 (mean IoU 0.73 against 0.67 on the first 20 frames of 8
    DAVIS-2016 sequences at half resolution), at no cost in matching.
    """

    name = "lite0-match"
    pad_multiple = 16
    default_top_k: int | None = 20
    memory_from_query = True

    def __init__(self, pretrained: bool = True, temperature: float = 0.05) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.backbone = efficientnet_lite(pretrained=pretrained, with_head=False)
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
        feats = self.backbone.features(lite0_normalize(image), strides=(4, 8, 16))
        size = feats[8].shape[-2:]
        parts = [
            F.avg_pool2d(F.normalize(feats[4], dim=1), 2),
            feats[8],
            F.interpolate(
                F.normalize(feats[16], dim=1), size=size, mode="bilinear", align_corners=False
            ),
        ]
        key = F.normalize(torch.cat([F.normalize(p, dim=1) for p in parts], dim=1), dim=1)
        return QueryFeatures(key=key)

    def encode_memory(
        self, image: Tensor, masks: Tensor, query: QueryFeatures | None = None, groups: int = 1
    ) -> MemoryEntry:
        # ``groups``: each object's values are its own mask alone, whatever its group.
        if masks.dim() != 3 or masks.shape[-2:] != image.shape[-2:]:
            raise ValueError(
                f"masks must be [N, H, W] with the image's size {tuple(image.shape[-2:])}, "
                f"got {tuple(masks.shape)}"
            )
        key = query.key if query is not None else self.encode_query(image).key
        sub = STRIDE // VALUE_STRIDE
        values = F.pixel_unshuffle(F.avg_pool2d(masks[:, None].to(key.dtype), VALUE_STRIDE), sub)
        if values.shape[-2:] != key.shape[-2:]:
            raise ValueError(
                f"image size {tuple(image.shape[-2:])} is not a multiple of {self.pad_multiple}"
            )
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
        key = query.key
        h, w = key.shape[-2:]
        n, cv = mem_values.shape[:2]
        reader, scale = self.read_query(query)
        read = memory_read(mem_keys, mem_values, reader, top_k, scale, prior)
        probs = F.pixel_shuffle(read.reshape(n, cv, h, w), STRIDE // VALUE_STRIDE)
        probs = F.interpolate(
            probs, scale_factor=VALUE_STRIDE, mode="bilinear", align_corners=False
        )
        return probs.squeeze(1).clamp(0.0, 1.0)
