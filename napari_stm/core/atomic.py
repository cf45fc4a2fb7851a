"""Files that appear whole or not at all.

Every file the package writes for a user (masks, label stacks, probabilities, scores, weights,
checkpoints, downloads, pictures) goes through :func:`atomic_path`: written under a hidden
temporary name beside its target and renamed over it only once complete, so an interrupted
write never leaves a truncated file where a good one was.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".part") -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed over ``path`` when the block ends
    without an error, deleted when it raises.

    ``suffix`` ends the temporary name: writers that choose a format by extension, or append
    their own (``numpy.savez`` adds ``.npz``), need the target's (``".part.npz"``).
    """
    path = Path(path)
    # Same folder, so the rename is atomic (one file system).
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
