"""The STM network of Oh et al., "Video Object Segmentation using Space-Time Memory Networks"
(ICCV 2019).

Module, parameter and buffer names follow the official checkpoint (``STM_weights.pth`` without
its DataParallel ``module.`` prefix), so it loads with ``load_state_dict(strict=True)``. The
arithmetic follows the official code step for step (same operands, same order of sums), which
is what makes our outputs match the official evaluation to float precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import resnet50_stages
from .model import MemoryEntry, QueryFeatures, VOSNetwork
from .readout import MotionPrior, memory_read

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
KEY_DIM = 128
VALUE_DIM = 512


class _ResNetEncoder(nn.Module):
    """ResNet-50 up to res4 (stride 16), normalising its [0, 1] RGB input itself."""

    def __init__(self, with_masks: bool = False) -> None:
        super().__init__()
        if with_masks:
            # Created before conv1 so the state_dict order is the checkpoint's.
            self.conv1_m = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
            self.conv1_o = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        stages = resnet50_stages()
        self.conv1 = stages["conv1"]
        self.bn1 = stages["bn1"]
        self.relu = stages["relu"]
        self.maxpool = stages["maxpool"]
        self.res2 = stages["res2"]
        self.res3 = stages["res3"]
        self.res4 = stages["res4"]
        # Buffers, not constants: the official checkpoint stores them.
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def normalise(self, image: Tensor) -> Tensor:
        return (image - self.mean) / self.std

    def stages_after_conv1(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.maxpool(self.relu(self.bn1(x)))  # 1/4
        r2 = self.res2(x)  # 1/4, 256
        r3 = self.res3(r2)  # 1/8, 512
        r4 = self.res4(r3)  # 1/16, 1024
        return r4, r3, r2


class EncoderQ(_ResNetEncoder):
    """Query encoder: the frame alone."""

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.stages_after_conv1(self.conv1(self.normalise(image)))


class EncoderM(_ResNetEncoder):
    """Memory encoder: the frame, one object's mask and the union of the other objects' masks,
    each through its own first convolution, summed."""

    def __init__(self) -> None:
        super().__init__(with_masks=True)

    def forward(self, image: Tensor, mask: Tensor, others: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """image [1 or B, 3, H, W], mask and others [B, H, W]."""
        # The frame is the same for every object: one convolution, broadcast over the batch.
        x = self.conv1(self.normalise(image))
        x = x + self.conv1_m(mask[:, None]) + self.conv1_o(others[:, None])
        return self.stages_after_conv1(x)


class KeyValue(nn.Module):
    """Key and value embeddings of r4 features."""

    def __init__(self, indim: int, keydim: int, valdim: int) -> None:
        super().__init__()
        self.Key = nn.Conv2d(indim, keydim, kernel_size=3, padding=1)
        self.Value = nn.Conv2d(indim, valdim, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.Key(x), self.Value(x)


class ResBlock(nn.Module):
    """Pre-activation residual block of two 3x3 convolutions."""

    def __init__(self, indim: int, outdim: int | None = None, stride: int = 1) -> None:
        super().__init__()
        outdim = indim if outdim is None else outdim
        self.downsample = (
            None
            if indim == outdim and stride == 1
            else nn.Conv2d(indim, outdim, kernel_size=3, padding=1, stride=stride)
        )
        self.conv1 = nn.Conv2d(indim, outdim, kernel_size=3, padding=1, stride=stride)
        self.conv2 = nn.Conv2d(outdim, outdim, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        r = self.conv1(F.relu(x))
        r = self.conv2(F.relu(r))
        if self.downsample is not None:
            x = self.downsample(x)
        return x + r


class Refine(nn.Module):
    """Merge a skip feature with the upsampled coarser decoder feature."""

    def __init__(self, inplanes: int, planes: int, scale_factor: int = 2) -> None:
        super().__init__()
        self.convFS = nn.Conv2d(inplanes, planes, kernel_size=3, padding=1)
        self.ResFS = ResBlock(planes, planes)
        self.ResMM = ResBlock(planes, planes)
        self.scale_factor = scale_factor

    def forward(self, f: Tensor, pm: Tensor) -> Tensor:
        s = self.ResFS(self.convFS(f))
        m = s + F.interpolate(
            pm, scale_factor=self.scale_factor, mode="bilinear", align_corners=False
        )
        return self.ResMM(m)


class Decoder(nn.Module):
    """Memory read-out (1/16) plus r3 (1/8) and r2 (1/4) skips -> 2-class logits at 1/1."""

    def __init__(self, mdim: int = 256) -> None:
        super().__init__()
        self.convFM = nn.Conv2d(2 * VALUE_DIM, mdim, kernel_size=3, padding=1)
        self.ResMM = ResBlock(mdim, mdim)
        self.RF3 = Refine(512, mdim)  # 1/16 -> 1/8
        self.RF2 = Refine(256, mdim)  # 1/8 -> 1/4
        self.pred2 = nn.Conv2d(mdim, 2, kernel_size=3, padding=1)

    def forward(self, r4: Tensor, r3: Tensor, r2: Tensor) -> Tensor:
        m4 = self.ResMM(self.convFM(r4))
        m3 = self.RF3(r3, m4)
        m2 = self.RF2(r2, m3)
        p2 = self.pred2(F.relu(m2))
        return F.interpolate(p2, scale_factor=4, mode="bilinear", align_corners=False)


class STM(VOSNetwork):
    """Space-Time Memory network with ResNet-50 encoders (the paper's model)."""

    name = "stm-resnet50"
    pad_multiple = 16
    default_top_k = None

    def __init__(self) -> None:
        super().__init__()
        self.Encoder_M = EncoderM()
        self.Encoder_Q = EncoderQ()
        self.KV_M_r4 = KeyValue(1024, keydim=KEY_DIM, valdim=VALUE_DIM)
        self.KV_Q_r4 = KeyValue(1024, keydim=KEY_DIM, valdim=VALUE_DIM)
        self.Decoder = Decoder(256)

    def encode_query(self, image: Tensor) -> QueryFeatures:
        self._check_image(image)
        r4, r3, r2 = self.Encoder_Q(image)
        k4, v4 = self.KV_Q_r4(r4)
        return QueryFeatures(key=k4, value=v4, skips=(r3, r2))

    def encode_memory(
        self, image: Tensor, masks: Tensor, query: QueryFeatures | None = None, groups: int = 1
    ) -> MemoryEntry:
        # ``query`` is of no use here: the memory encoder sees the masks from its first layer.
        self._check_image(image)
        if masks.ndim != 3 or masks.shape[-2:] != image.shape[-2:] or masks.shape[0] < 1:
            raise ValueError(
                f"masks must be [N >= 1, H, W] matching the image {tuple(image.shape[-2:])}, "
                f"got {tuple(masks.shape)}"
            )
        if groups > 1:  # every object's own pass through the encoder already: no batch to gain
            entries = [self.encode_memory(image, m) for m in masks.chunk(groups)]
            return MemoryEntry(
                keys=torch.cat([e.keys for e in entries]),
                values=torch.cat([e.values for e in entries]),
            )
        masks = masks.to(image.dtype)
        n = masks.shape[0]
        # "Other objects" summed as the official code does (objects before, then objects after)
        # rather than total - own, so the result is the same to the last bit.
        zero = torch.zeros_like(masks[0])
        others = torch.stack(
            [
                (masks[:o].sum(dim=0) if o else zero)
                + (masks[o + 1 :].sum(dim=0) if o + 1 < n else zero)
                for o in range(n)
            ]
        ).clamp(0, 1)
        r4, _, _ = self.Encoder_M(image, masks, others)
        k4, v4 = self.KV_M_r4(r4)
        return MemoryEntry(keys=k4, values=v4)

    def segment(
        self,
        query: QueryFeatures,
        mem_keys: Tensor,
        mem_values: Tensor,
        top_k: int | None = None,
        prior: MotionPrior | None = None,
    ) -> Tensor:
        if query.value is None or len(query.skips) != 2:
            raise TypeError("STM.segment needs query features made by STM.encode_query")
        k4, v4 = query.key, query.value
        r3, r2 = query.skips
        n = mem_values.shape[0]
        _, _, h, w = k4.shape
        read = memory_read(mem_keys, mem_values, k4.flatten(2), top_k, None, prior)
        m4 = torch.cat([read.reshape(n, VALUE_DIM, h, w), v4.expand(n, -1, -1, -1)], dim=1)
        logits = self.Decoder(m4, r3.expand(n, -1, -1, -1), r2.expand(n, -1, -1, -1))
        return F.softmax(logits, dim=1)[:, 1]

    def _check_image(self, image: Tensor) -> None:
        if image.ndim != 4 or image.shape[:2] != (1, 3):
            raise ValueError(f"STM expects an image [1, 3, H, W], got {tuple(image.shape)}")
        h, w = image.shape[-2:]
        if h % self.pad_multiple or w % self.pad_multiple:
            raise ValueError(
                f"STM needs image sides that are multiples of {self.pad_multiple}, got {h}x{w}"
            )
