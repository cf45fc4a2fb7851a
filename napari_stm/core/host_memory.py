"""Reuse of freed host memory by glibc's malloc, for CPU inference.

Every frame allocates and frees the same large activations (a 480p frame's first EfficientNet
stages: 13-40 MB each). glibc serves blocks that large with ``mmap`` and returns them to the OS on
free, so every frame page-faults its activations in again: stm-lite's query encoder took 190-214
ms of a full-size 480p frame inside a pass against 85-90 with the memory kept (2 threads, this
project's machines). PyTorch's advice is to preload jemalloc or tcmalloc, which a pip install
cannot do; ``mallopt`` gets the same reuse from glibc itself:

- ``M_ARENA_MAX`` 1: threads started afterwards (the prefetch thread, a GUI's worker) share the
  main heap. A thread on its own arena would lose glibc's adaptive threshold below and map
  every large block afresh (2x slower, measured).
- ``M_MMAP_THRESHOLD`` 32 MB (glibc's most): blocks up to it come from the heap.
- ``M_TOP_PAD`` 512 MB: the heap grows, and keeps free at its top, 512 MB beyond what it
  needs, so the larger blocks are carved from it too and nothing is handed back per frame.
  Pages count towards resident memory only once touched: peak RSS stays within 5%.

It changes the whole process, irreversibly, so only the command line (``napari-stm``, whose
process is ours) and the CVAT function on CPU call it; a library user or a napari session can
set the same with ``MALLOC_ARENA_MAX=1 MALLOC_TOP_PAD_=536870912`` in the environment at start.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

#: environment variable that leaves the C library's malloc as it is
OPT_OUT = "NAPARI_STM_SYSTEM_MALLOC"

_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, 32 << 20), (_M_TOP_PAD, 512 << 20))

_done: bool | None = None


def reuse_freed_memory() -> bool:
    """Tune glibc's malloc for repeated large allocations (see the module's text); True when
    it is tuned. Does nothing off Linux/glibc, when ``NAPARI_STM_SYSTEM_MALLOC`` is set, or
    when the environment already sets malloc's own ``MALLOC_*`` options."""
    global _done
    if _done is None:
        _done = _tune()
    return _done


def _tune() -> bool:
    if os.environ.get(OPT_OUT) or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return all(libc.mallopt(option, value) == 1 for option, value in _SETTINGS)
