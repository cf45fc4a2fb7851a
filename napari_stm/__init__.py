"""napari-stm: Space-Time Memory video object segmentation for napari, CVAT and the shell.

>>> from napari_stm import Propagator, load_model
>>> prop = Propagator(load_model("stm-lite"), frames)
>>> prop.add_reference(0, first_frame_labels)
>>> masks = {res.t: res.labels for res in prop.propagate("both")}
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# Imported on first use, so that napari can read the plugin manifest without loading torch.
_EXPORTS = {
    "Propagator": "napari_stm.core.engine",
    "PropagationConfig": "napari_stm.core.engine",
    "Tracker": "napari_stm.core.engine",
    "FrameResult": "napari_stm.core.engine",
    "load_model": "napari_stm.core.weights",
    "available_models": "napari_stm.core.weights",
    "InputError": "napari_stm.core.errors",
    "CheckpointError": "napari_stm.core.errors",
    "evaluate": "napari_stm.evaluation",
    "open_frames": "napari_stm.io",
    "read_masks": "napari_stm.io",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'napari_stm' has no attribute {name!r}")
