"""Windows around small objects, for per-object convolutions that need not see the whole frame.

A network that runs some convolutions once per object (stm-lite's value encoder and decoder)
pays for the whole frame per object, although a small object's answer only changes near it. A
:class:`CropPlan` says, per object, which window of the network's coarsest grid (one cell = one
stride-16 feature) must be computed for real (its *core*: where the object is, grown by how far
its influence reaches) and which larger window the convolutions run on (the core grown by their
receptive field, so that the core comes out as on the whole frame). Objects whose windows have
one size run as one batch; objects whose window is not much smaller than the frame run on the
whole frame, as before.

Windows are counted in grid cells, so their pixel edges fall on multiples of the grid's stride
and strided convolutions see the same pixel lattice as on the whole frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: window sides are rounded up to a multiple of this many cells, so that objects of similar
#: size share a window size and run as one batch
SIDE_STEP = 2


@dataclass(frozen=True)
class Box:
    """Rows ``[top, bottom)`` and columns ``[left, right)`` of a grid, in cells."""

    top: int
    bottom: int
    left: int
    right: int

    @property
    def size(self) -> tuple[int, int]:
        return self.bottom - self.top, self.right - self.left

    def scaled(self, factor: int) -> tuple[slice, slice]:
        """Row and column slices of this box on a grid ``factor`` times finer."""
        return (
            slice(self.top * factor, self.bottom * factor),
            slice(self.left * factor, self.right * factor),
        )

    def within(self, outer: Box) -> Box:
        """This box in the coordinates of ``outer`` (which holds it)."""
        return Box(
            self.top - outer.top,
            self.bottom - outer.top,
            self.left - outer.left,
            self.right - outer.left,
        )


@dataclass(frozen=True)
class CropGroup:
    """Objects whose windows have one size: one batch of convolutions."""

    objects: list[int]
    #: the window each object's convolutions run on
    windows: list[Box]
    #: the part of each window that is pasted into the whole-frame result
    cores: list[Box]


@dataclass(frozen=True)
class CropPlan:
    #: objects computed on the whole frame
    full: list[int]
    #: objects computed on windows, by window size
    groups: list[CropGroup]
    #: objects absent everywhere (no cell above the threshold): nothing to compute
    absent: list[int]

    @property
    def cropped(self) -> bool:
        return bool(self.groups or self.absent)


def plan_crops(
    maps: Tensor, threshold: float, reach: int, context: int, max_share: float
) -> CropPlan:
    """Windows for the objects of ``maps`` [N, h, w] (one value per grid cell and object: a mask's
    coverage, a read-out's soft mask).

    An object's core is the bounding box of its cells above ``threshold``, grown by ``reach``
    cells; its window is the core grown by ``context`` cells, its sides rounded up to
    :data:`SIDE_STEP` cells, within the grid. Objects whose window covers more than
    ``max_share`` of the grid run on the whole frame, and all of them do when the windows
    would not save a whole frame's pass.
    """
    n, h, w = maps.shape
    present = maps > threshold
    rows = present.any(dim=2)  # [N, h]
    cols = present.any(dim=1)  # [N, w]
    has = rows.any(dim=1).tolist()
    # First and last present row/column of each object, one transfer for all of them.
    ar_h = torch.arange(h, device=maps.device)
    ar_w = torch.arange(w, device=maps.device)
    top = torch.where(rows, ar_h, h).amin(dim=1).tolist()
    bottom = torch.where(rows, ar_h, -1).amax(dim=1).tolist()
    left = torch.where(cols, ar_w, w).amin(dim=1).tolist()
    right = torch.where(cols, ar_w, -1).amax(dim=1).tolist()

    full: list[int] = []
    absent: list[int] = []
    by_size: dict[tuple[int, int], CropGroup] = {}
    for i in range(n):
        if not has[i]:
            absent.append(i)
            continue
        core = Box(
            max(0, top[i] - reach),
            min(h, bottom[i] + 1 + reach),
            max(0, left[i] - reach),
            min(w, right[i] + 1 + reach),
        )
        window = _window(core, context, h, w)
        wh, ww = window.size
        if wh * ww > max_share * h * w:
            full.append(i)
            continue
        group = by_size.setdefault((wh, ww), CropGroup([], [], []))
        group.objects.append(i)
        group.windows.append(window)
        group.cores.append(core)
    groups = list(by_size.values())
    # Windows cost one whole-frame pass more (the background every object shares outside its
    # window): not worth it unless the windows together are smaller than the frames they save.
    windows = sum(len(g.objects) * g.windows[0].size[0] * g.windows[0].size[1] for g in groups)
    saved = sum(len(g.objects) for g in groups) + len(absent)
    if h * w + windows >= saved * h * w:
        return CropPlan(list(range(n)), [], [])
    return CropPlan(full, groups, absent)


def _window(core: Box, context: int, h: int, w: int) -> Box:
    """``core`` grown by ``context`` on every side, sides rounded up to SIDE_STEP, slid back
    inside the h x w grid (it then still holds core + context wherever the grid has room)."""

    def side(lo: int, hi: int, n: int) -> tuple[int, int]:
        lo, hi = lo - context, hi + context
        length = min(n, -(-(hi - lo) // SIDE_STEP) * SIDE_STEP)
        lo = max(0, min(lo, n - length))
        return lo, lo + length

    top, bottom = side(core.top, core.bottom, h)
    left, right = side(core.left, core.right, w)
    return Box(top, bottom, left, right)


def gather(x: Tensor, windows: list[Box], factor: int, objects: list[int] | None = None) -> Tensor:
    """Crops of ``x`` [1 or G, C, factor*h, factor*w] at ``windows`` (grid cells) -> [G, C, ...].

    ``x`` with a batch of one is the frame's features, shared by every window; with G, one map
    per window; with ``objects``, x is [N, C, ...] (one map per object) and window g is cut
    from map ``objects[g]`` (no copy of the whole maps first: 100 objects' masks at 480p are
    77 MB)."""
    crops = []
    for g, box in enumerate(windows):
        rows, cols = box.scaled(factor)
        i = 0 if x.shape[0] == 1 else (g if objects is None else objects[g])
        crops.append(x[i, :, rows, cols])
    return torch.stack(crops)


def positions(box: Box, width: int) -> Tensor:
    """Flat indices (row-major, in a grid ``width`` cells wide) of the cells of ``box``."""
    rows = torch.arange(box.top, box.bottom)[:, None]
    cols = torch.arange(box.left, box.right)[None, :]
    return (rows * width + cols).flatten()


def paste(out: Tensor, objects: list[int], crops: Tensor, group: CropGroup, factor: int) -> None:
    """Write each window's core of ``crops`` [G, C, ...] into ``out`` [N, C, ...] (in place)."""
    for g, (i, window, core) in enumerate(zip(objects, group.windows, group.cores, strict=True)):
        rows, cols = core.scaled(factor)
        inner_rows, inner_cols = core.within(window).scaled(factor)
        out[i, :, rows, cols] = crops[g, :, inner_rows, inner_cols]
