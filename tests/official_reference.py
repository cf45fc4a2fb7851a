"""The official STM reference files in ../shared/reference/stm_official (made by running the
official code): where they are, and the deterministic weights recipe loaded as a module."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "stm_official"
FIXTURE = REFERENCE / "fixture"
MAKE_WEIGHTS = REFERENCE / "make_weights.py"


def load_make_weights() -> ModuleType:
    """``make_weights.py``: ``make_state_dict(salt)`` gives weights in the official layout
    (``module.`` keys, as STM_weights.pth), ``read_keys()`` the checkpoint's names and shapes."""
    spec = importlib.util.spec_from_file_location("stm_make_weights", MAKE_WEIGHTS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def strip_prefix(state_dict: dict) -> dict:
    """The official checkpoint's keys without DataParallel's ``module.``: our STM's names."""
    return {k.removeprefix("module."): v for k, v in state_dict.items()}
