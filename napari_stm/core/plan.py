"""Which frames a propagation computes, in which passes, from which references.

A pass is one tracker walking frames in order from a reference. ``forward`` is one pass from the
first reference to the end of the range, ``backward`` one pass from the last reference back to
its start; ``both`` walks outwards from the outer references and, between two references, first
backwards (its probabilities stored) and then forwards, taking each object from one side
or both (core/fuse.py). A pass reads the references among its own frames (:attr:`Pass.reads`): a
stretch's forward side reads the reference it starts from, and the other end reaches its frames
through the fusion; the backward side also reads the stretch's first reference and, on a long
stretch, not its own previous frame (:attr:`Pass.reads_previous`). In
``both`` one forward side walks on from the first reference to the end
(:attr:`Pass.walks_on`), so a reference changes the frames from the reference before it to the
end (:func:`affected`).
Ranges are ``[start, stop)``: ``stop`` is the frame after the last.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from napari_stm.core.config import Direction
from napari_stm.core.errors import InputError

DIRECTIONS = ("forward", "backward", "both")
#: the backward side of a stretch longer than this many frames does not read its previous
#: frame (:meth:`Pass.reads_previous`)
LONG_STRETCH = 20


@dataclass
class Pass:
    """Frames one tracker walks, in order; the first is a reference."""

    frames: list[int]
    #: "plain": yield; "store": keep probabilities for a later fused pass; "fused": blend, yield
    mode: Literal["plain", "store", "fused"] = "plain"
    #: the two references a "store" or "fused" pass lies between
    span: tuple[int, int] = (0, 0)
    #: frames of the pass computed but not yielded (the first, when an earlier pass yielded it)
    emit_from: int = 0
    #: the forward side of ``both``: it walks on with the memory of the forward pass before it
    #: (or, starting a later call, with the memory it had on reaching its first frame)
    walks_on: bool = False

    @property
    def reads(self) -> set[int]:
        """The frames whose references this pass reads: its own and, for the backward side of a
        stretch (``store``), the stretch's first reference, where the forward side stands. Not the
        references before it: each correction made there added one more far reference to the
        backward side of every later stretch, and a near twin of one it read already (frames 0 and
        1) doubled the far look's weight in its read (DAVIS drift-turn, references 0, 4 and 63, a
        true mask on frame 1: the backward side from 63 fell from J 0.90 to 0.84 on frame 61, and
        mean J fell). The forward side does not read the far end of its stretch: read across many
        frames a reference is matched by appearance alone; among look-alike objects (cells) that
        mixes identities, and on DAVIS training sequences it sank the pass it was meant to help
        (horsejump-low, 60 frames: forward side J 0.80 alone, 0.72 reading the far end); it reaches
        the far end through the fusion and memorises what it takes. Without a, the backward side had
        only its own reference, and a correction's backward side was then worse than the forward
        side on the frames before it (the annotator's correction lowered them; docs/architecture.md,
        "Frames between two references", has the measurements). A pass that walks on
        (:attr:`walks_on`) also reads what the forward side memorised before its first frame, the
        references before it among them."""
        if self.mode == "store":
            return set(self.frames) | {self.span[0]}
        return set(self.frames)

    @property
    def reads_previous(self) -> bool:
        """Whether the reads of this pass see its previous frame (its own guess of the
        frame before, a temporary memory entry). Not on the backward side of a stretch longer
        than :data:`LONG_STRETCH`: there the previous frame carries the drift of a long walk
        and, read at a gap of one (the read's closest match, and the motion prior favours it),
        outweighs the true mask of a even beside a; the backward side was then clearly worse
        than the forward side on the frames near a, and their mean lowered J there. On a short
        stretch the previous frame has drifted little and the backward side gains from it.
        Frames kept as working memory are still read. Measurements in docs/architecture.md
        ("The backward side of a long stretch reads no previous frame")."""
        a, b = self.span
        return self.mode != "store" or b - a <= LONG_STRETCH

    @property
    def yields(self) -> list[int]:
        """The frames this pass hands to the caller."""
        return [] if self.mode == "store" else self.frames[self.emit_from :]


def check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise InputError(f"direction must be forward, backward or both, not {direction!r}")


def check_range(
    direction: str, n: int, start: int | None, stop: int | None, references: list[int]
) -> tuple[int, int, list[int]]:
    """``[start, stop)`` of a video of ``n`` frames (None: its ends), and the references in it.

    Raises :class:`InputError` naming what is wrong.
    """
    check_direction(direction)
    start = 0 if start is None else int(start)
    stop = n if stop is None else int(stop)
    if not 0 <= start < stop <= n:
        raise InputError(f"start/stop {start}..{stop} do not fit a video of {n} frames")
    if not references:
        raise InputError("no reference frame: draw a mask on at least one frame")
    refs = sorted(t for t in references if start <= t < stop)
    if not refs:
        raise InputError(
            f"no reference frame between {start} and {stop - 1}: annotated frames are "
            f"{sorted(references)}"
        )
    return start, stop, refs


def plan_passes(direction: Direction, refs: list[int], start: int, stop: int) -> list[Pass]:
    """The passes a direction needs; each starts on a reference and yields each frame once."""
    if direction == "forward":
        return [Pass(list(range(refs[0], stop)))]
    if direction == "backward":
        return [Pass(list(range(refs[-1], start - 1, -1)))]
    plan: list[Pass] = []
    if refs[0] > start:
        plan.append(Pass(list(range(refs[0], start - 1, -1))))
    # One forward side walks from the first reference to the end, through every stretch,
    # adding each reference when it gets there (``walks_on``): a correction adds to the memory
    # the frames after it had and takes nothing away. A forward side started afresh on each
    # reference knows only that frame; on a hard one (an occlusion, the frame an annotator
    # corrects first) an object hidden there was lost for good, and the correction lowered J
    # on every frame after it (synthetic occluded clip, seed 4: 0.848 -> 0.669).
    for a, b in zip(refs, refs[1:], strict=False):
        if b - a > 1:
            plan.append(Pass(list(range(b, a, -1)), mode="store", span=(a, b)))
            plan.append(Pass(list(range(a, b)), mode="fused", span=(a, b), walks_on=True))
        else:
            plan.append(Pass([a], walks_on=True))
    plan.append(Pass(list(range(refs[-1], stop)), walks_on=True))
    seen: set[int] = set()
    for p in plan:
        if p.mode != "store":
            p.emit_from = 1 if p.frames[0] in seen else 0
            seen.update(p.frames)
    return plan


def reach(plan: list[Pass]) -> set[int]:
    """Every frame the passes yield."""
    return {t for p in plan for t in p.yields}


def affected(references: list[int], t: int, start: int, stop: int) -> tuple[int, int]:
    """Frames ``[lo, hi)`` whose ``both`` result a reference on frame ``t`` changes: from the
    reference before it (or ``start``) to ``stop``: the forward side walks on through every
    later stretch with what it memorised."""
    before = [r for r in references if start <= r < t]
    return (max(before) if before else start, stop)


def reachable(refs: list[int], n: int, direction: Direction) -> set[int]:
    """Frames of a video of ``n`` frames that a propagation from ``refs`` computes."""
    return reach(plan_passes(direction, sorted(refs), 0, n))


def depends_on(ref: int, refs: list[int], n: int, direction: Direction) -> list[int]:
    """Frames whose prediction depends on reference ``ref`` (one of ``refs``): those after it up
    to the next reference (forward), before it back to the previous one (backward), or, for
    both, those back to the previous one and every frame after it that is not a reference (the
    forward side walks on through every later stretch, :func:`affected`)."""
    after = [r for r in refs if r > ref]
    before = [r for r in refs if r < ref]
    fwd = range(ref + 1, after[0] if after else n)
    bwd = range(before[-1] + 1 if before else 0, ref)
    if direction == "forward":
        return list(fwd)
    if direction == "backward":
        return list(bwd)
    return [*bwd, *(t for t in range(ref + 1, n) if t not in after)]


def covering_calls(
    frames: list[int], refs: list[int], direction: Direction
) -> list[tuple[int, int]]:
    """The ``[start, stop)`` ranges to hand ``Propagator.propagate`` so that it computes every
    frame of ``frames`` (ascending, all reachable from ``refs``): one call per gap between
    references, starting on the reference(s) it propagates from (a range needs one inside it),
    computing a gap once however many pieces of it are wanted."""
    gaps: dict[tuple[int | None, int | None], list[int]] = {}
    for t in frames:
        before = [r for r in refs if r < t]
        after = [r for r in refs if r > t]
        gap = (before[-1] if before else None, after[0] if after else None)
        gaps.setdefault(gap, []).append(t)
    calls = []
    for (p, q), wanted in sorted(gaps.items(), key=lambda kv: kv[1][0]):
        first, last = wanted[0], wanted[-1]
        if direction == "forward":
            assert p is not None, f"frame {first} lies before every reference"
            calls.append((p, last + 1))
        elif direction == "backward":
            assert q is not None, f"frame {last} lies after every reference"
            calls.append((first, q + 1))
        else:
            calls.append((first if p is None else p, last + 1 if q is None else q + 1))
    return calls
