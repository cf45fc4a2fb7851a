"""How fast the tracked objects move, which sets the width of the memory read's motion prior.

A fixed width cannot serve every video: nuclei in a time-lapse move a thousandth of the frame
per frame and look alike, so the read must stay local; a skater crosses a tenth of the frame in
a few frames, and a tight prior loses her. The engine therefore measures the motion it tracks:
the displacement of each object's centre between two segmented frames, per frame, as a share of
the frame's longer side, and of those the median over objects (:data:`QUANTILE`). The prior's
spread follows it, rising at once and falling slowly, within :data:`MIN_SIGMA` and
:data:`MAX_SIGMA`; for objects small against the frame the narrowest spread is
:data:`SIZE_GAIN` of their diameter instead (see :attr:`MotionEstimate.floor`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

#: narrowest spread per frame (a share of the frame's longer side)
MIN_SIGMA = 0.03
#: widest spread per frame; past it the prior barely constrains the read
MAX_SIGMA = 0.15
#: spread per measured displacement: an object may move this many times its last speed
GAIN = 2.0
#: per segmented frame, the remembered speed falls to this share unless a faster one is seen
DECAY = 0.8
#: which object's speed counts: the median (0.5) by default, since one object whose mask
#: spread onto look-alikes jumps in centre and would widen the prior for all (1.0: the fastest)
QUANTILE = 0.5
#: an object of fewer pixels than this has no reliable centre
MIN_MASS = 16.0
#: narrowest spread per frame for small objects, in diameters of the first objects seen (the
#: references'), when that is below MIN_SIGMA: 70 nuclei 24 pixels across in a 1024-pixel
#: frame (benchmarks/long_timelapse.py-style probe, 21 frames, at 1024 a side) kept mean J
#: 0.883 with a spread of 0.4 diameters against 0.677 with MIN_SIGMA, which is 1.3 diameters
#: there: look-alikes a few diameters away out-voted each nucleus and it vanished. Objects of
#: 7.5% of the frame's longer side or more (every DAVIS 2016 sequence's first mask, the CTC
#: time-lapses' cells) keep MIN_SIGMA.
SIZE_GAIN = 0.4


def won_centres(
    top: tuple[Tensor, Tensor], n: int, at: tuple[Tensor, ...] | None = None
) -> tuple[Tensor, Tensor]:
    """Each object's pixels where it wins, from a class maximum ``top`` (values, class indices
    of any integer dtype with the background 0) [(B,) H, W] over ``n`` objects (of each of B
    maps): their count [(B,) n] and centre (row, column) [(B,) n, 2] as a share of the longer
    side. Over B maps in one pass: the trackers of one network call (100 one-object trackers
    took 100 ms a 480p frame on CPU one by one); each map's equal to its own call bit for bit
    (one count per object and map, its pixels summed in the same order). ``at``: the object
    pixels' positions, ``top[1].nonzero(as_tuple=True)``, when already known."""
    value, cls = top
    h, w = value.shape[-2:]
    batch = value.shape[:-2]
    # Class indices with the background 0: objects from 1. The object pixels first, then
    # those of them above 0.5: the same pixels in the same order, without a pass over the
    # whole float map (20 one-object maps of a 480p frame: 6 against 13 ms on CPU).
    # Class indices are never negative: the nonzero ones are the objects' (no compared copy).
    at = cls.nonzero(as_tuple=True) if at is None else at
    above = value[at] > 0.5
    at = tuple(a[above] for a in at)
    ys, xs = at[-2], at[-1]
    won = cls[at].long() - 1
    bins = n
    if batch:
        won = won + at[0] * n
        bins = batch[0] * n
    mass, centres = _counted(won, ys, xs, bins, max(h, w))
    return mass.reshape(*batch, n), centres.reshape(*batch, n, 2)


def _counted(won: Tensor, ys: Tensor, xs: Tensor, bins: int, side: int) -> tuple[Tensor, Tensor]:
    """The count [bins] and centre (row, column) [bins, 2], as a share of ``side``, of the
    pixels (``ys``, ``xs``) won by each bin (``won``)."""
    mass = torch.bincount(won, minlength=bins).to(torch.float32)
    sums = [torch.bincount(won, weights=v.double(), minlength=bins) for v in (ys, xs)]
    safe = mass.clamp(min=1e-6).double()
    return mass, (torch.stack(sums, dim=1) / safe[:, None] / side).float()


class MotionEstimate:
    """The tracked objects' speed, measured from one segmented frame to the next."""

    def __init__(self, initial: float = MIN_SIGMA) -> None:
        #: spread used until a first motion is measured
        self.initial = initial
        self.speed: float | None = None
        #: median diameter of the first objects seen, a share of the frame's longer side; kept
        #: from then on, so that an object hidden for a while does not narrow the prior
        self.size: float | None = None
        self._last: tuple[int, Tensor, Tensor] | None = None

    @property
    def floor(self) -> float:
        """Narrowest spread per frame: MIN_SIGMA, or SIZE_GAIN diameters of small objects."""
        if self.size is None:
            return MIN_SIGMA
        return min(MIN_SIGMA, SIZE_GAIN * self.size)

    @property
    def sigma(self) -> float:
        """Spread per frame of the motion prior, a share of the frame's longer side."""
        if self.speed is None:
            # Until a motion is measured the object may be fast: the size floor waits for it.
            return self.initial
        return min(MAX_SIGMA, max(self.floor, GAIN * self.speed))

    def observe(
        self,
        t: int,
        probs: Tensor,
        disjoint: bool = False,
        top: tuple[Tensor, Tensor] | None = None,
        measured: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        """Take the objects' probabilities [N, H, W] (or one-hot masks) in frame ``t``.

        An object is where its probability exceeds 0.5. ``disjoint``: at most one object
        exceeds 0.5 at any pixel (aggregated probabilities, which sum to at most 1, or
        disjoint masks), so the objects' pixels come from one maximum over objects: one pass
        over the maps instead of five (0.1 s of a 100-object 480p frame on CPU). ``top``: that
        maximum when already known, over background and objects (values, class indices with
        the background 0), as :meth:`napari_stm.core.step.StepOutput.top` gives it;
        ``measured``: :func:`won_centres` of that maximum when already known.
        """
        n, h, w = probs.shape
        if (disjoint or top is not None or measured is not None) and n > 0:
            # Where an object wins, not its probability everywhere: a faint 1e-3 over a large
            # frame outweighs a small object and would pull its centre towards the frame's.
            if measured is not None:
                mass, centres = measured
            elif top is None:
                value, owner = probs.max(0)
                ys, xs = (value > 0.5).nonzero(as_tuple=True)
                mass, centres = _counted(owner[ys, xs], ys, xs, n, max(h, w))
            else:
                mass, centres = won_centres(top, n)
        else:
            # Where an object wins (see above).
            p = (probs > 0.5).float()
            mass = p.sum((1, 2))
            ys_ = torch.arange(h, device=p.device, dtype=torch.float32)
            xs_ = torch.arange(w, device=p.device, dtype=torch.float32)
            safe = mass.clamp(min=1e-6)
            centres = torch.stack([p.sum(2) @ ys_ / safe, p.sum(1) @ xs_ / safe], dim=1)
            centres = centres / max(h, w)
        present = mass >= MIN_MASS
        if self.size is None and bool(present.any()):
            diameters = (4.0 * mass[present] / torch.pi).sqrt() / max(h, w)
            self.size = diameters.median().item()
        if self._last is not None and self._last[0] != t and self._last[1].shape[0] == n:
            last_t, last_centres, last_present = self._last
            both = present & last_present
            if bool(both.any()):
                steps = (centres - last_centres)[both].norm(dim=1) / abs(t - last_t)
                moved = steps.quantile(QUANTILE, interpolation="lower").item()
                self.speed = moved if self.speed is None else max(moved, DECAY * self.speed)
        self._last = (t, centres, present)

    def state_dict(self) -> dict[str, Any]:
        last = None if self._last is None else [self._last[0], *(x.cpu() for x in self._last[1:])]
        return {"initial": self.initial, "speed": self.speed, "size": self.size, "last": last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.initial = float(state["initial"])
        self.speed = None if state["speed"] is None else float(state["speed"])
        # States written before the size was measured (a CVAT session across an upgrade).
        size = state.get("size")
        self.size = None if size is None else float(size)
        last = state["last"]
        self._last = None if last is None else (int(last[0]), last[1], last[2].bool())
