"""Memory policies: what a tracker memorises, keeps, forgets, and how its memory is read.

- ``official``: the paper's evaluation procedure. References and every ``mem_every``-th frame
  of the pass are kept forever; the previous frame is a temporary entry; the read is dense and
  position-blind; the soft aggregation runs over the official code's 11 object slots; a frame
  is memorised with its probabilities at the frame's size, zero-padded; memory is kept in
  float32 as the paper's code did. Memory grows with the video.
- ``bounded``: references are permanent; every ``mem_every``-th frame is written into a capped
  working memory only when its prediction is confident (errors written into memory spread),
  which forgets its oldest entry first; a frame where most objects vanished is not memorised
  at all; the read takes the network's top-k and motion prior;
  under mixed precision the memory is stored in float16. Time and memory per frame stay flat.

A policy is chosen by name (``PropagationConfig.memory``) from :data:`POLICIES`; nothing
outside this module tests that name. The bank (core/memory.py) stores the entries and carries
out the eviction and nearest-reference read selection its cap implies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from napari_stm.core.frames import clear_padding
from napari_stm.core.memory import Kind, MemoryBank
from napari_stm.core.model import VOSNetwork

if TYPE_CHECKING:
    from napari_stm.core.config import AlgorithmConfig
    from napari_stm.core.frames import Geometry

#: object slots of the official evaluation code: the unused ones take part in its softmax
OFFICIAL_SLOTS = 11
#: a pixel whose most likely class is below this probability counts as uncertain
UNCERTAIN_BELOW = 0.75
#: an object whose probability mass falls below this share of its mass on the references has
#: vanished; a frame where most tracked objects vanished stays out of memory (see ``admits``)
VANISHED_SHARE = 0.05
#: an object whose probability mass grows past this many times its mass on the last frame
#: memorised (or half its reference mass, when more) has spilled onto other things; a frame
#: where most tracked objects spilled stays out of memory (see ``admits``)
EXPLODED_GROWTH = 2.0


def confidence(probs: Tensor) -> float:
    """Share of the object region whose class is certain (1.0 when nothing is uncertain).

    ``probs`` [N+1, H, W]. The region is every pixel assigned to an object plus every
    uncertain pixel, so a mask that bleeds into the background scores low.
    """
    top, cls = probs.max(0)
    uncertain = top < UNCERTAIN_BELOW
    region = (cls > 0) | uncertain
    n = int(region.sum())
    return 1.0 if n == 0 else 1.0 - float(uncertain.sum()) / n


class MemoryPolicy:
    """The choices of one memory policy, for one configuration and network."""

    name: ClassVar[str]
    #: the kind a segmented frame kept by :meth:`keep` becomes
    kept_kind: ClassVar[Kind]

    def __init__(self, config: AlgorithmConfig, model: VOSNetwork) -> None:
        self.config = config
        self.model = model

    def bank(self, half_precision: bool) -> MemoryBank:
        """An empty memory for a pass (``half_precision``: the runtime computes in it)."""
        raise NotImplementedError

    @property
    def top_k(self) -> int | None:
        """Memory positions per query position the read keeps (None: all)."""
        raise NotImplementedError

    @property
    def measures_motion(self) -> bool:
        """Whether the read's motion prior follows the tracked objects' measured speed."""
        raise NotImplementedError

    @property
    def fixed_motion_sigma(self) -> float | None:
        """The motion prior's spread when it is not measured (None: no prior)."""
        raise NotImplementedError

    def extra_slots(self, objects: int) -> int:
        """Empty object slots that take part in the soft aggregation's softmax."""
        return 0

    def keep(self, since: int, probs: Tensor) -> bool:
        """Whether a segmented frame ``since`` frames after the first of its pass, with class
        probabilities ``probs`` [N+1, H, W], enters long-lived memory."""
        raise NotImplementedError

    def memorised(self, probs: Tensor, geo: Geometry | None) -> Tensor:
        """The object probabilities [N, Hp, Wp] a segmented frame is memorised with."""
        return probs[1:].contiguous()

    def admits(self, mass: Tensor, reference_mass: Tensor, previous_mass: Tensor) -> bool:
        """Whether a segmented frame whose objects hold probability mass ``mass`` [N] enters
        memory at all, even as the previous frame. ``reference_mass`` [N]: each object's mass
        on its references (0: not tracked); ``previous_mass`` [N]: on the last frame memorised;
        all at the same network size."""
        return True

    def _every(self, since: int) -> bool:
        return since % self.config.mem_every == 0


class OfficialPolicy(MemoryPolicy):
    name = "official"
    kept_kind = "permanent"

    def bank(self, half_precision: bool) -> MemoryBank:
        return MemoryBank(max_frames=None, storage_dtype=None)

    @property
    def top_k(self) -> int | None:
        return None

    @property
    def measures_motion(self) -> bool:
        return False

    @property
    def fixed_motion_sigma(self) -> float | None:
        return None

    def extra_slots(self, objects: int) -> int:
        return max(0, OFFICIAL_SLOTS - 1 - objects)

    def keep(self, since: int, probs: Tensor) -> bool:
        return self._every(since)

    def memorised(self, probs: Tensor, geo: Geometry | None) -> Tensor:
        # As the official code: probabilities at the frame's size, zero-padded (the network's
        # answer inside the padding never reaches the memory encoder).
        assert geo is not None
        return clear_padding(probs[1:], geo).contiguous()


class BoundedPolicy(MemoryPolicy):
    name = "bounded"
    kept_kind = "working"

    def bank(self, half_precision: bool) -> MemoryBank:
        return MemoryBank(
            max_frames=self.config.max_memory,
            storage_dtype=torch.float16 if half_precision else None,
        )

    @property
    def top_k(self) -> int | None:
        k = self.config.top_k if self.config.top_k is not None else self.model.default_top_k
        return k or None

    @property
    def measures_motion(self) -> bool:
        return self.config.motion_sigma is None and self.model.motion_prior

    @property
    def fixed_motion_sigma(self) -> float | None:
        return self.config.motion_sigma or None

    def keep(self, since: int, probs: Tensor) -> bool:
        return self._every(since) and confidence(probs) >= self.config.confidence_gate

    def admits(self, mass: Tensor, reference_mass: Tensor, previous_mass: Tensor) -> bool:
        # A frame where the object was lost (occluded, or missed) shows it, where visible, as
        # background; memorised, it teaches every later read that the object's look is
        # background, and the object never comes back (DAVIS soccerball: a ball lost behind
        # a tree stayed lost for 27 frames in plain view). Left out, the reads keep the last
        # frames that held the object and can find it again. With many objects, one lost
        # cell must not freeze the memory of the others: most must have vanished.
        tracked = reference_mass > 0
        if not bool(tracked.any()):
            return True
        gone = tracked & (mass < VANISHED_SHARE * reference_mass)
        # The opposite failure: while the object hides, its mask spills onto the background
        # (DAVIS bmx-bumps: a rider behind a bank, 3k true pixels predicted as 9k, 14k, 20k in
        # three frames); memorised, the background becomes the object for every later read.
        # True masks of 24 DAVIS sequences never grew past 1.65x in one frame. The floor of
        # half the reference lets an object come back from behind an occluder at full size.
        base = torch.maximum(previous_mass, 0.5 * reference_mass)
        spilled = tracked & (mass > EXPLODED_GROWTH * base)
        return int((gone | spilled).sum()) * 2 <= int(tracked.sum())


POLICIES: dict[str, type[MemoryPolicy]] = {p.name: p for p in (BoundedPolicy, OfficialPolicy)}


def make_policy(config: AlgorithmConfig, model: VOSNetwork) -> MemoryPolicy:
    return POLICIES[config.memory](config, model)
