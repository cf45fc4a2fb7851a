"""glibc malloc tuning for CPU inference: each case runs in a fresh interpreter, because the
tuning changes the whole process for good."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from napari_stm.core.host_memory import OPT_OUT

glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux")
    or platform.libc_ver()[0] != "glibc"
    or tuple(int(v) for v in platform.libc_ver()[1].split(".")[:2]) < (2, 33),
    reason="the tuning is for glibc's malloc; mallinfo2 needs glibc 2.33",
)

PROBE = """
import ctypes, threading
import torch
from napari_stm.core.host_memory import reuse_freed_memory
tuned = reuse_freed_memory()
assert reuse_freed_memory() is tuned  # once per process

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
seen = {}

def frame():
    # A frame's worth of large activations (56 MB), in a worker thread as the prefetcher and
    # a GUI's worker run them: where they come from, and what is left once they are freed.
    blocks = [torch.ones(n) for n in (6_000_000, 3_000_000, 5_000_000)]
    seen["mapped"] = libc.mallinfo2().hblkhd >> 20
    del blocks
    seen["kept"] = libc.mallinfo2().fordblks >> 20

worker = threading.Thread(target=frame)
worker.start()
worker.join()
print(tuned, seen["mapped"], seen["kept"])
"""


def probe(**env: str) -> tuple[bool, int, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != OPT_OUT}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    tuned, mapped, kept = out.stdout.split()
    return tuned == "True", int(mapped), int(kept)


@glibc
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    # Counted through malloc's own books rather than page faults: fault counts move with the
    # kernel's transparent huge pages and reclaim, and failed CI on another machine.
    tuned, mapped, kept = probe()
    plain, plain_mapped, plain_kept = probe(**{OPT_OUT: "1"})
    assert tuned and not plain
    # glibc maps each block on its own and unmaps it on free: the next frame faults it in again.
    assert plain_mapped >= 50 and plain_kept < 8
    # Tuned, the blocks come from the one heap and stay there, free, for the next frame.
    assert mapped < 8 and kept >= 56


@glibc
def test_malloc_options_in_the_environment_are_left_alone():
    tuned, *_ = probe(MALLOC_ARENA_MAX="2")
    assert not tuned
