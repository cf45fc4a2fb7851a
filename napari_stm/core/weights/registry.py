"""Named models: how to build each, where its default weights come from, which is the default.

``factory`` strings are imported only when a model is built, so listing the registry imports no
network code.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from torch import Tensor

from napari_stm.core.errors import CheckpointError
from napari_stm.core.model import VOSNetwork
from napari_stm.core.weights.download import check_sha256_format

StateDict = dict[str, Tensor]


@dataclass(frozen=True)
class ModelSpec:
    """How to build one named model and where its weights come from.

    ``factory`` is ``"module:Class"`` (imported only when the model is built, so listing the
    registry imports no network code) or any zero-argument callable returning a
    :class:`VOSNetwork`. ``weights`` is the default checkpoint: None, a path (relative paths are
    inside the ``napari_stm`` package) or an http(s) URL, pinned by ``sha256``.
    ``weights_source`` tells users where to get weights when they are required but not given.
    ``key_map`` turns a checkpoint in a foreign layout into this model's parameter names; it runs
    after a DataParallel ``module.`` prefix has been stripped. ``object_side`` is the object size
    these weights were trained to see (see ``VOSNetwork.object_side``), ``working_side`` the
    frame size they work best at (``VOSNetwork.working_side``).
    """

    name: str
    factory: str | Callable[[], VOSNetwork]
    description: str
    weights: str | None = None
    sha256: str | None = None
    weights_required: bool = False
    weights_source: str | None = None
    key_map: Callable[[StateDict], StateDict] | None = None
    #: these weights' ``VOSNetwork.object_side`` (None: the network class's)
    object_side: int | None = None
    #: these weights' ``VOSNetwork.working_side`` (None: the network class's)
    working_side: int | None = None

    def __post_init__(self) -> None:
        if not self.name or any(c.isspace() for c in self.name):
            raise ValueError(f"model name must be a non-empty word, got {self.name!r}")
        if isinstance(self.factory, str) and self.factory.count(":") != 1:
            raise ValueError(
                f"model {self.name!r}: factory must be 'module:Class', got {self.factory!r}"
            )
        if self.sha256 is not None:
            check_sha256_format(self.sha256)

    def build(self) -> VOSNetwork:
        """Construct the network (randomly initialised unless its constructor loads weights)."""
        factory = self.factory
        if isinstance(factory, str):
            module_name, attr = factory.split(":")
            try:
                factory = getattr(importlib.import_module(module_name), attr)
            except (ImportError, AttributeError) as e:
                raise ImportError(
                    f"model {self.name!r}: cannot import its factory {self.factory!r}: {e}"
                ) from e
        model = factory()
        if not isinstance(model, VOSNetwork):
            raise TypeError(
                f"model {self.name!r}: factory {self.factory!r} returned "
                f"{type(model).__name__}, not a VOSNetwork"
            )
        model.name = self.name
        return model


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec, *, replace: bool = False) -> ModelSpec:
    """Add a named model. Re-registering a name needs ``replace=True``."""
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f"model {spec.name!r} is already registered (pass replace=True)")
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> ModelSpec:
    """Remove a named model and return its spec."""
    spec = get_spec(name)
    del _REGISTRY[name]
    return spec


def get_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        names = ", ".join(_REGISTRY) or "none"
        raise CheckpointError(f"unknown model {name!r}; available models: {names}") from None


#: the model every adapter uses when none is named: trained by us and bundled, so it works
#: offline the moment the package is installed
DEFAULT_MODEL = "stm-lite"
#: the bundled model for microscopy, chosen when none is named and the frames look like it
MICROSCOPY_MODEL = "stm-lite-cells"


def default_model_name(
    frame_shape: tuple[int, ...] | None = None, dtype: np.dtype | str | type | None = None
) -> str:
    """The model adapters use when none is named.

    Given the frames' shape (H, W) or (H, W, C) and sample type: ``stm-lite-cells`` for
    single-channel frames or frames of more than 8 bits a sample (what microscopes write:
    fluorescence, DIC, phase contrast), ``stm-lite`` for 8-bit colour (natural video).
    Without them: ``stm-lite``. Measured on held-out data (docs/model_card.md): each model
    wins on its own kind and loses on the other, and the frames' format is what tells the two
    apart before any pixel is read.
    """
    name = DEFAULT_MODEL
    if frame_shape is not None and looks_like_microscopy(frame_shape, dtype):
        name = MICROSCOPY_MODEL
    return name if name in _REGISTRY else next(iter(_REGISTRY))


def looks_like_microscopy(
    frame_shape: tuple[int, ...], dtype: np.dtype | str | type | None = None
) -> bool:
    """Single-channel frames, or samples wider than 8 bits (uint16, float ...)."""
    grey = len(frame_shape) == 2 or (len(frame_shape) == 3 and frame_shape[2] == 1)
    deep = dtype is not None and np.dtype(dtype) not in (np.dtype(np.uint8), np.dtype(bool))
    return grey or deep


def available_models() -> dict[str, str]:
    """Registered model names and their one-line descriptions, in registration order."""
    return {name: spec.description for name, spec in _REGISTRY.items()}


# --------------------------------------------------------------------------- the models

OFFICIAL_STM_WEIGHTS_URL = "https://www.dropbox.com/s/mtfxdr93xc3q55i/STM_weights.pth?dl=1"

register(
    ModelSpec(
        name="stm-resnet50",
        factory="napari_stm.core.network:STM",
        description="STM (Oh et al., ICCV 2019), ResNet-50 encoders; loads the official "
        "STM_weights.pth",
        weights_required=True,
        weights_source=(
            "the official STM_weights.pth by the STM authors, licensed CC BY-NC-SA 4.0 "
            f"(non-commercial): {OFFICIAL_STM_WEIGHTS_URL}"
        ),
    )
)
register(
    ModelSpec(
        name="stm-lite",
        factory="napari_stm.core.stm_lite:STMLite",
        description="STM on an ImageNet EfficientNet-Lite0, trained by us (docs/model_card.md); "
        "bundled, the default for 8-bit colour frames; works at 576 pixels a side unless "
        "--max-side says otherwise; "
        "weights for non-commercial research use",
        weights="weights/stm_lite.pth",
        sha256="c478ad84843370379406636a80669b471e3d358c965bde98efd6bd235b6a7968",
        # Longer side, J&F on 13 DAVIS sequences it never saw (docs/model_card.md): 512 0.840,
        # 576 0.856, 640 0.860; 640 costs 1.5x the time of 576 a frame at 480p.
        working_side=576,
    )
)
register(
    ModelSpec(
        name="stm-lite-cells",
        factory="napari_stm.core.stm_lite:STMLite",
        description="stm-lite fine-tuned on microscopy time-lapses (fluorescent nuclei, DIC "
        "cells; docs/model_card.md); bundled; the default for single-channel or 16-bit "
        "frames (masks keep their size over long time-lapses); weights for non-commercial "
        "research use",
        weights="weights/stm_lite_cells.pth",
        sha256="a96b9ce643dd824b4c065276680294a911ba898e6c8a8f72d97b707ac807afe3",
        # Its microscopy crops showed cells 16-96 pixels across. Working-size sweep on the
        # training halves of both time-lapses (docs/model_card.md): HeLa's 128-pixel cells
        # J 0.56 at 512 a side, 0.72-0.73 at 192-256 (48-64 px); SIM+ nuclei J 0.81 at 30-40 px,
        # 0.74 at 54, 0.71 at 20.
        object_side=56,
    )
)
register(
    ModelSpec(
        name="stm-lite2",
        factory="napari_stm.core.stm_lite:stm_lite2",
        description="stm-lite's design on an ImageNet EfficientNet-Lite2 (about 1.35x the CPU "
        "time a frame); no weights are bundled: train them with `napari-stm train --backbone "
        "lite2` (docs/training.md) and pass --weights",
        weights_required=True,
        weights_source="your own training run: `napari-stm train OUT --backbone lite2 ...` "
        "(docs/training.md); the file is OUT/stm_lite.pth",
    )
)
register(
    ModelSpec(
        name="lite0-match",
        factory="napari_stm.core.lite0_match:Lite0Match",
        description="ImageNet EfficientNet-Lite0 features matched across frames; needs no "
        "trained weights",
    )
)
