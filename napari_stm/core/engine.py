"""The propagation engine's public names, from the modules that hold them.

``config`` (what changes results, what only changes speed), ``runtime`` (a model prepared for a
device once), ``step`` (one frame), ``policy`` (what the memory keeps), ``tracker`` (a stream of
frames), ``plan`` (which frames a run computes) and ``propagator`` (references on any frames,
passes between them). Kept so that ``from napari_stm.core.engine import ...`` goes on working.
"""

from __future__ import annotations

from napari_stm.core.config import (
    AlgorithmConfig,
    Direction,
    MemoryMode,
    PropagationConfig,
    RuntimeConfig,
)
from napari_stm.core.explain import Explanation
from napari_stm.core.plan import Pass
from napari_stm.core.policy import OFFICIAL_SLOTS, UNCERTAIN_BELOW, confidence
from napari_stm.core.propagator import SPILL_BYTES, ProgressFn, Propagator
from napari_stm.core.tracker import (
    FrameResult,
    SharedFrame,
    Tracker,
    flush_trackers,
    from_labels,
    one_hot,
    step_trackers,
)

__all__ = [
    "OFFICIAL_SLOTS",
    "SPILL_BYTES",
    "UNCERTAIN_BELOW",
    "AlgorithmConfig",
    "Direction",
    "Explanation",
    "FrameResult",
    "MemoryMode",
    "Pass",
    "ProgressFn",
    "PropagationConfig",
    "Propagator",
    "RuntimeConfig",
    "SharedFrame",
    "Tracker",
    "confidence",
    "flush_trackers",
    "from_labels",
    "one_hot",
    "step_trackers",
]
