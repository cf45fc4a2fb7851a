"""Importing Triton inside a napari process without crashing it.

torchvision imports ``torch._dynamo``, which imports Triton when it is installed (it is, with
every CUDA build of torch on Linux). Triton's ``libtriton.so`` carries its own copy of LLVM; if
Mesa's OpenGL driver has already loaded the system ``libLLVM`` (llvmpipe, radeonsi, and on
Debian/Ubuntu every Mesa driver: napari's canvas does this at start-up), loading libtriton
afterwards segfaults in LLVM's static initialisers. Binding libtriton to its own symbols first
(``RTLD_DEEPBIND``) avoids the clash. Nothing happens off Linux, when Triton is not installed or
already imported, or when no libLLVM is loaded.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys


def _llvm_loaded() -> bool:
    try:
        with open("/proc/self/maps") as maps:
            return any("libLLVM" in line for line in maps)
    except OSError:
        return False


def import_triton_safely() -> None:
    """Import Triton now (main thread), isolated from an already loaded system LLVM."""
    if not sys.platform.startswith("linux") or "triton" in sys.modules:
        return
    if importlib.util.find_spec("triton") is None or not _llvm_loaded():
        return
    flags = sys.getdlopenflags()
    sys.setdlopenflags(flags | os.RTLD_DEEPBIND)
    try:
        importlib.import_module("triton")
    except Exception:  # torch copes without Triton; a broken install must not stop the widget
        pass
    finally:
        sys.setdlopenflags(flags)
