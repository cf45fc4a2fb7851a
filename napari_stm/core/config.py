"""How propagation runs: what changes the results, apart from what only changes the speed.

:class:`AlgorithmConfig` holds every setting that changes which labels come out (the memory
policy, its cadence and gate, the read, the working size, the intensity scaling); two runs with
equal algorithm settings, model and references give the same labels. :class:`RuntimeConfig`
holds what only changes how fast they come (device, precision, layout, compilation, prefetch).
:class:`PropagationConfig` is both, with flat keyword arguments, and is what the engine takes.

Adapters derive their field lists from these dataclasses (``dataclasses.fields``), never from
hand-written lists: :func:`algorithm_settings` is what a cached prediction depends on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from napari_stm.core.errors import InputError
from napari_stm.core.frames import Normalize

Direction = Literal["forward", "backward", "both"]
MemoryMode = Literal["bounded", "official"]


@dataclass
class AlgorithmConfig:
    """Settings that change the labels a propagation returns."""

    #: memory policy (core/policy.py): "bounded" (flat time and memory per frame) or
    #: "official" (the paper's procedure)
    memory: MemoryMode = "bounded"
    #: a memory frame every N frames
    mem_every: int = 5
    #: most memory frames one read sees (bounded mode), the previous frame and two references
    #: included; each further reference (a correction) is read beside them (core/memory.py)
    max_memory: int = 10
    #: top-k memory positions per query position; None: the network's default (0: dense)
    top_k: int | None = None
    #: motion prior of the memory read: how far an object moves in a frame (one standard
    #: deviation, a share of the frame's longer side); None: measured from the tracked objects
    #: (core/motion.py) for networks that use the prior, 0: off
    motion_sigma: float | None = None
    #: a frame is written into long-lived memory only if its confidence reaches this (0: always)
    confidence_gate: float = 0.5
    #: resize frames internally so their longer side is at most this (masks come back full
    #: size); None: the network's working size (``VOSNetwork.working_side``), 0: full size
    max_side: int | None = None
    #: intensity scaling: "auto" (uint8 / 255, other dtypes by robust percentiles)
    normalize: Normalize = "auto"

    def __post_init__(self) -> None:
        from napari_stm.core.policy import POLICIES

        if self.memory not in POLICIES:
            raise InputError(
                f"memory must be {' or '.join(repr(p) for p in POLICIES)}, not {self.memory!r}"
            )
        if self.mem_every < 1:
            raise InputError(f"mem_every must be at least 1, not {self.mem_every}")
        if self.max_memory < 2:
            raise InputError(f"max_memory must be at least 2, not {self.max_memory}")
        if self.motion_sigma is not None and not self.motion_sigma >= 0:
            raise InputError(f"motion_sigma must be 0 (off) or positive, not {self.motion_sigma}")
        if self.top_k is not None and self.top_k < 0:
            raise InputError(f"top_k must be positive, not {self.top_k}")
        if not 0 <= self.confidence_gate <= 1:
            raise InputError(f"confidence_gate must be in [0, 1], not {self.confidence_gate}")
        if self.max_side is not None and self.max_side != 0 and self.max_side < 16:
            raise InputError(
                f"max_side must be 0 (full size) or at least 16 pixels, not {self.max_side}"
            )


@dataclass
class RuntimeConfig:
    """Settings that change only the speed (and float rounding) of a propagation."""

    #: "cpu", "cuda", "mps"; None: where the model is
    device: str | None = None
    #: bf16 autocast on CUDA
    amp: bool = True
    #: frames read and normalised ahead in a background thread while the network runs (0: off);
    #: None: 2 on CUDA (the CPU is idle while the GPU works), off on CPU (where the reading
    #: thread competes with the network for the cores: 10% slower measured on 2 cores)
    prefetch: int | None = None
    #: convolutions in channels-last layout; None: on CUDA and CPU (measured on CPU at 480p,
    #: 2 threads: stm-lite 380 against 453 ms a frame, stm-resnet50 2126 against 2467), not MPS
    channels_last: bool | None = None
    #: run the network through ``torch.compile`` (the first frames wait for the compilation)
    compile: bool = False

    def __post_init__(self) -> None:
        if self.prefetch is not None and self.prefetch < 0:
            raise InputError(f"prefetch must be 0 (off) or more frames, not {self.prefetch}")


# RuntimeConfig first in the bases: dataclass fields are collected from the last base on, so
# the algorithm's fields come first, as they always did.
@dataclass
class PropagationConfig(RuntimeConfig, AlgorithmConfig):
    """How propagation runs. The defaults suit most videos."""

    def __post_init__(self) -> None:
        AlgorithmConfig.__post_init__(self)
        RuntimeConfig.__post_init__(self)

    @property
    def algorithm(self) -> AlgorithmConfig:
        return AlgorithmConfig(**_values(self, AlgorithmConfig))

    @property
    def runtime(self) -> RuntimeConfig:
        return RuntimeConfig(**_values(self, RuntimeConfig))

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | Any) -> PropagationConfig:
        """The configuration from whichever of its fields ``options`` (a mapping, or an object
        such as an ``argparse.Namespace``) holds; the others keep their defaults."""
        if not isinstance(options, Mapping):
            options = vars(options)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in options.items() if k in names})


def algorithm_settings(config: AlgorithmConfig) -> dict[str, Any]:
    """The settings that change the labels, by name (what a cached prediction depends on)."""
    return _values(config, AlgorithmConfig)


def _values(config: Any, kind: type) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(kind)}
