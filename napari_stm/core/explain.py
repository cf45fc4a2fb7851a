"""Where a pixel came from: which memory frames, and where in them, a frame's read looked.

The engine does not keep any frame's attention (a 480p frame reads about 10 x 1000 x 1000
weights). A pass keeps, per frame it computes, a :class:`ReadRecord`: the memory frames the read
saw, in order, the motion prior's spread, and the frame's labels at network size (compressed).
``Propagator.explain(t, y, x)`` rebuilds that memory from those records (references from their
stored entries, other frames encoded again from their recorded labels) and recomputes the read
of the one query position under (y, x) with :func:`napari_stm.core.readout.read_weights`.

For networks whose memory keys do not depend on the masks (stm-lite, lite0-match: the key of a
frame is its query key) the weights are exactly those of the pass. For the paper's STM, whose
keys see the mask, they are those of memory encoded from the recorded labels rather than the
pass's soft probabilities: close, not identical.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from napari_stm.core.frames import Geometry, from_network


@dataclass
class Explanation:
    """The read of one pixel of frame ``t``."""

    t: int
    y: int
    x: int
    #: the memory frames the read saw, in time order
    frames: list[int]
    #: share of the read's weight that went to each of ``frames`` (sums to 1)
    weights: np.ndarray
    #: [len(frames), H, W] float32 at the frame's full size: each pixel holds the weight of
    #: the memory position (a cell of the network's grid, 16 pixels at working size) it lies in
    heatmaps: np.ndarray
    #: object whose key set was read (networks with one key set per object), else None
    object: int | None = None


@dataclass
class ReadRecord:
    """What one frame's memory read saw."""

    #: memory frames in the order of the read's memory positions
    memory: list[int]
    #: the motion prior's spread (None: no prior)
    sigma: float | None
    #: the frame's labels at padded network size, zlib-compressed uint8 (indices into the
    #: object ids + 1, 0 background)
    labels: bytes
    shape: tuple[int, int]


def pack_labels(probs: Tensor, cls: Tensor | None = None) -> tuple[bytes, tuple[int, int]]:
    """Network-size probabilities [N+1, Hp, Wp] (or their ``cls = probs.max(0).indices``
    when already known) -> compressed class indices."""
    cls = (probs.max(0).indices if cls is None else cls).to(torch.uint8).cpu().numpy()
    return zlib.compress(cls.tobytes(), 1), (int(cls.shape[0]), int(cls.shape[1]))


def unpack_masks(record: ReadRecord, n: int, device: torch.device) -> Tensor:
    """The recorded labels as object masks [n, Hp, Wp] float32."""
    cls = np.frombuffer(zlib.decompress(record.labels), dtype=np.uint8).reshape(record.shape)
    lab = torch.from_numpy(cls.copy()).to(device)
    return torch.stack([(lab == k + 1) for k in range(n)]).float()


def grid_position(y: int, x: int, geo: Geometry, grid: tuple[int, int]) -> int:
    """Index of the network grid cell that holds full-size pixel (y, x)."""
    h, w = geo.size
    ih, iw = geo.inner
    left, _, top, _ = geo.pad
    ph, pw = geo.padded
    py = (y + 0.5) * ih / h + top
    px = (x + 0.5) * iw / w + left
    gy = min(grid[0] - 1, int(py * grid[0] / ph))
    gx = min(grid[1] - 1, int(px * grid[1] / pw))
    return gy * grid[1] + gx


def heatmaps(weights: Tensor, frames: int, grid: tuple[int, int], geo: Geometry) -> np.ndarray:
    """Per-position read weights [frames * h * w] -> [frames, H, W] at the frame's full size."""
    maps = weights.float().reshape(1, frames, *grid)
    maps = F.interpolate(maps, size=geo.padded, mode="nearest")
    return from_network(maps, geo)[0].cpu().numpy().astype(np.float32)
