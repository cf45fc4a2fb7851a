"""A video, the frames a person annotated, and propagation between them.

The :class:`Propagator` asks the planner (core/plan.py) which passes a direction needs, runs one
:class:`~napari_stm.core.tracker.Tracker` per pass with the references that pass reads, reads
frames (ahead, when configured) and, between two references, takes each object from one side
or, where the two agree on it, their mean (core/fuse.py). Progress and cancellation are per
frame. Each computed frame leaves a small record of its read, from which
:meth:`Propagator.explain` rebuilds where a pixel came from.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from napari_stm.core.config import Direction, PropagationConfig
from napari_stm.core.errors import InputError
from napari_stm.core.explain import (
    Explanation,
    ReadRecord,
    grid_position,
    heatmaps,
    pack_labels,
    unpack_masks,
)
from napari_stm.core.frames import FrameReader, Geometry, check_labels
from napari_stm.core.fuse import agreement, merge, take_backward
from napari_stm.core.model import MemoryEntry, VOSNetwork
from napari_stm.core.plan import Pass, affected, check_range, plan_passes, reach
from napari_stm.core.policy import make_policy
from napari_stm.core.readout import motion_prior, read_weights
from napari_stm.core.runtime import DirectReader, Prefetcher, frame_source, prepare
from napari_stm.core.tracker import (
    FrameResult,
    Tracker,
    frame_confidence,
    from_labels,
    working_geometry,
)

#: "both" keeps one direction's probabilities on disk past this size, not in RAM
SPILL_BYTES = 256 * 1024 * 1024

ProgressFn = Callable[[int, int], Any]


class Propagator:
    """A video, the frames a person annotated, and propagation between them.

    >>> prop = Propagator(model, frames)
    >>> prop.add_reference(0, labels0)
    >>> for res in prop.propagate("forward"):
    ...     save(res.t, res.labels)
    """

    def __init__(
        self, model: VOSNetwork, frames: Any, config: PropagationConfig | None = None
    ) -> None:
        self.model = model
        self.config = config or PropagationConfig()
        self.reader = FrameReader(frames, self.config.normalize)
        self.runtime = prepare(model, self.config)
        self.device = self.runtime.device
        self.references: dict[int, np.ndarray] = {}
        self._geo: Geometry | None = None
        self._entries_geo: Geometry | None = None
        self._entries: dict[int, tuple[Tensor, Tensor, MemoryEntry]] = {}
        self._entry_ids: list[int] = []
        self._tracker: Tracker | None = None
        # Per object confidence of the frames the backward side of a stretch computed.
        self._stored_conf: dict[int, Tensor] = {}
        # What each computed frame's read saw, by the pass that yielded it ("yield") and, for
        # frames between two references, by the backward pass ("store").
        self._reads: dict[str, dict[int, ReadRecord]] = {"yield": {}, "store": {}}
        # Between two references: per object, 1 where the backward side was taken.
        self._backward: dict[int, Tensor] = {}
        # The forward side of "both" (it walks on from pass to pass within one call) and its
        # memory on reaching each reference, from which a later call that starts there walks on
        # exactly as a whole run would.
        self._forward: Tracker | None = None
        self._states: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self.reader)

    @property
    def memory_frames(self) -> int:
        """Frames in the memory of the pass running now (0 before the first pass)."""
        return 0 if self._tracker is None else self._tracker.memory_frames

    @property
    def memory_nbytes(self) -> int:
        """Bytes of the memory of the pass running now."""
        return 0 if self._tracker is None else self._tracker.memory_nbytes

    @property
    def geo(self) -> Geometry:
        """How frames map to the network. It follows the references: a network with an object
        size (``VOSNetwork.object_side``) works at the size their objects choose, each object
        as it is on the first reference that holds it. Not on every reference: then a
        correction rescaled the whole video, every frame changed, also those it does not
        reach (left half of dic-hela-01, 40 frames, stm-lite-cells: the working side went 224,
        232, 240, 238 over three corrections, and the first, a correct mask of frame 38,
        took mean J from 0.827 to 0.796)."""
        if self._geo is None:
            self._geo = working_geometry(
                self.reader.size, self.model, self.config, self._first_drawn()
            )
        return self._geo

    def _first_drawn(self) -> list[np.ndarray]:
        """The references in time order, each holding only the objects no earlier one holds."""
        seen: set[int] = set()
        out = []
        for t in sorted(self.references):
            lab = self.references[t]
            ids = self._holds(t)
            new = sorted(ids - seen)
            seen |= ids
            if new:
                out.append(lab if len(new) == len(ids) else np.where(np.isin(lab, new), lab, 0))
        return out

    @property
    def object_ids(self) -> list[int]:
        return sorted(set().union(*map(self._holds, self.references)))

    def add_reference(self, t: int, labels: Any) -> None:
        """Labels a person drew on frame ``t``: permanent memory, returned exactly as given."""
        if not isinstance(t, (int, np.integer)) or not 0 <= t < len(self.reader):
            raise InputError(
                f"reference frame {t} is outside the video (frames 0..{len(self.reader) - 1})"
            )
        lab = check_labels(labels, self.reader.size, f"reference frame {t}")
        # Its own copy: a view of the caller's array (a napari layer painted on later) would
        # change under the memories encoded from it, and set_references would see no change.
        own = lab.flags.owndata and lab is not labels
        self.references[int(t)] = lab if own else lab.copy()
        self._entries.pop(int(t), None)
        self._forget_states(int(t))
        self._geo = None

    def remove_reference(self, t: int) -> None:
        self.references.pop(t, None)
        self._entries.pop(t, None)
        self._forget_states(t)
        self._geo = None

    def set_references(self, references: dict[int, Any]) -> bool:
        """Make the references exactly ``references`` (frame -> labels): only those added,
        changed or gone are replaced, so what the propagator kept for the others (the forward
        side's memory on reaching each, :meth:`affected`) stays, and propagating the frames a
        change affects gives what a fresh run from all of them would.

        Returns False when the object ids or the geometry changed: then every frame computed
        before is out of date, not only those :meth:`affected` names (and the kept memories
        are dropped)."""
        before = (self.object_ids, self.geo) if self.references else None
        for t in [t for t in self.references if t not in references]:
            self.remove_reference(t)
        for t, labels in references.items():
            old = self.references.get(int(t))
            if old is None or not np.array_equal(old, np.asarray(labels)):
                self.add_reference(int(t), labels)
        return before is None or before == (self.object_ids, self.geo)

    def _forget_states(self, t: int) -> None:
        # The forward side's memory on reaching reference r depends on every reference before r.
        self._states = {r: s for r, s in self._states.items() if r < t}

    def affected(
        self, t: int, start: int | None = None, stop: int | None = None
    ) -> tuple[int, int]:
        """Frames ``[lo, hi)`` of ``[start, stop)`` whose ``both`` result a reference on frame
        ``t`` changes: from the reference before it to the one after it (both included, and
        returned as given), or to the range's ends. Propagating ``("both", lo, hi)`` after a
        correction on ``t`` gives what propagating everything would."""
        start = 0 if start is None else int(start)
        stop = len(self.reader) if stop is None else int(stop)
        return affected(list(self.references), int(t), start, stop)

    # -- where a pixel came from ----------------------------------------------------------------
    @torch.inference_mode()
    def explain(self, t: int, y: int, x: int) -> Explanation:
        """Which memory frames, and where in them, the read of pixel (y, x) of frame ``t``
        looked (see :mod:`napari_stm.core.explain`). The memory is rebuilt from what the pass
        recorded, not stored: a few memory encodings and one query encoding."""
        h, w = self.reader.size
        if not 0 <= int(t) < len(self.reader):
            raise InputError(f"frame {t} is outside the video (frames 0..{len(self.reader) - 1})")
        if not (0 <= int(y) < h and 0 <= int(x) < w):
            raise InputError(f"pixel ({y}, {x}) is outside the {w}x{h} frame")
        t = int(t)
        if t in self.references:
            raise InputError(f"frame {t} is a reference: it was drawn, not read from memory")
        kind = "yield"
        record = self._reads[kind].get(t)
        if record is None:
            raise InputError(f"frame {t} has not been propagated yet")
        n = len(self.object_ids)
        self._encode_references()  # a reference added since the pass has no entry yet
        image = self.reader.tensor(t, self.geo, self.device)
        with self.runtime.precision():
            query = self.runtime.encode_query(image)
        grid = (int(query.key.shape[-2]), int(query.key.shape[-1]))
        pos = grid_position(int(y), int(x), self.geo, grid)
        # The object under the pixel, where the frame's labels put it at network size.
        masks = unpack_masks(record, n, torch.device("cpu"))
        ph, pw = record.shape
        cy = (pos // grid[1]) * ph // grid[0] + ph // grid[0] // 2
        cx = (pos % grid[1]) * pw // grid[1] + pw // grid[1] // 2
        here = [k for k in range(n) if masks[k, min(ph - 1, cy), min(pw - 1, cx)] > 0]
        obj = here[0] if here else None
        # Between two references an object came from the forward side (0), the backward
        # side (1) or, where both found it, their mean (0.5): explain each read it came from,
        # weighed as the frame took it.
        back = self._backward.get(t)
        share_back = 0.0 if back is None or obj is None else float(back[obj])
        sides = [(kind, 1.0 - share_back), ("store", share_back)]
        mixed: dict[int, Tensor] = {}
        for side, weight in sides:
            if weight == 0.0:
                continue
            read = self._reads[side][t]
            for m, cells in self._side_read(side, t, read, query, pos, obj, n, grid):
                # a frame both sides read (a reference), or one read twice, counts once
                mixed[m] = mixed[m] + weight * cells if m in mixed else weight * cells
        frames = sorted(mixed)
        per_frame = torch.stack([mixed[m] for m in frames])
        share = per_frame.sum(1).double()
        return Explanation(
            t,
            int(y),
            int(x),
            frames,
            (share / share.sum()).cpu().numpy(),
            heatmaps(per_frame.flatten(), len(frames), grid, self.geo),
            None if obj is None else self.object_ids[obj],
        )

    def _side_read(
        self,
        kind: str,
        t: int,
        record: ReadRecord,
        query: Any,
        pos: int,
        obj: int | None,
        n: int,
        grid: tuple[int, int],
    ) -> list[tuple[int, Tensor]]:
        """The read one side (``kind``: "yield" or "store") made at memory position ``pos`` of
        frame ``t`` (``n`` objects), rebuilt from its record: (memory frame, [cells] weights)
        in its order."""
        keys = []
        for m in record.memory:
            if m in self._entries:
                entry = self._entries[m][2]
            else:
                m_masks = unpack_masks(self._reads[kind][m], n, self.device)
                m_image = self.reader.tensor(m, self.geo, self.device)
                with self.runtime.precision():
                    entry = self.runtime.encode_memory(m_image, m_masks)
            keys.append(entry.keys.flatten(2).float())
        mem_keys = torch.cat(keys, dim=-1)
        reader, scale = self.model.read_query(query)
        prior = None
        if record.sigma:
            gaps = torch.tensor([abs(t - m) for m in record.memory], device=mem_keys.device)
            prior = motion_prior(gaps, grid, record.sigma)
        top_k = make_policy(self.config, self.model).top_k
        at = torch.tensor([pos], device=mem_keys.device)
        weights = read_weights(mem_keys, reader, at, top_k, scale, prior)[:, 0]  # [Nk, M]
        if weights.shape[0] > 1:  # one key set per object: the pixel's object's
            weights = weights[obj] if obj is not None else weights.mean(0)
        else:
            weights = weights[0]
        cells = weights.reshape(len(record.memory), -1)
        return list(zip(record.memory, cells, strict=True))

    # -- running ------------------------------------------------------------------------------
    def reach(
        self, direction: Direction, start: int | None = None, stop: int | None = None
    ) -> set[int]:
        """The frames ``propagate`` with these arguments yields."""
        start, stop, refs = self._range(direction, start, stop)
        return reach(plan_passes(direction, refs, start, stop))

    def _range(
        self, direction: str, start: int | None, stop: int | None
    ) -> tuple[int, int, list[int]]:
        return check_range(direction, len(self.reader), start, stop, list(self.references))

    def propagate(
        self,
        direction: Direction = "forward",
        start: int | None = None,
        stop: int | None = None,
        progress: ProgressFn | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[FrameResult]:
        """Yield every frame of [start, stop) that the direction reaches from the references.

        forward: from the first reference on; backward: from the last reference back;
        both: everything, frames between two references fused from both sides.
        Cancelling (``cancel.set()``) stops after the frame being computed.
        Bad arguments raise :class:`InputError` here, before the first frame is asked for.
        """
        start, stop, refs = self._range(direction, start, stop)
        if not self.object_ids:
            raise InputError(
                f"the reference masks (frames {sorted(self.references)}) contain no object: "
                "paint at least one object (any id above 0)"
            )
        plan = plan_passes(direction, refs, start, stop)
        return self._propagate(plan, progress, cancel)

    # Decorated rather than a ``with`` block inside: a generator holding inference mode
    # across ``yield`` would also switch it on in the caller's code between frames.
    @torch.inference_mode()
    def _propagate(
        self, plan: list[Pass], progress: ProgressFn | None, cancel: threading.Event | None
    ) -> Iterator[FrameResult]:
        total = sum(len(p.yields) for p in plan)
        done = 0
        if progress is not None:
            progress(0, total)
        self._encode_references()
        self._forward = None
        stored: np.ndarray | None = None
        for p in plan:
            if cancel is not None and cancel.is_set():
                return
            if p.mode == "store":
                stored = self._store_buffer(p.frames)
            # Closed here, not whenever it is collected: its prefetch thread must stop when
            # the caller cancels or drops this generator.
            with contextlib.closing(self._run_pass(p, stored, cancel)) as results:
                for i, res in enumerate(results):
                    if i >= p.emit_from:
                        done += 1
                        if progress is not None:
                            progress(done, total)
                        yield res
                    if cancel is not None and cancel.is_set():
                        return
            if p.mode == "fused":
                stored = None

    def _store_buffer(self, frames: list[int]) -> np.ndarray:
        shape = (max(frames) + 1 - min(frames), len(self.object_ids) + 1, *self.geo.padded)
        if int(np.prod(shape)) > SPILL_BYTES:
            fd, path = tempfile.mkstemp(prefix="napari-stm-", suffix=".u8")
            os.close(fd)
            buf = np.memmap(path, dtype=np.uint8, mode="w+", shape=shape)
            os.unlink(path)  # the mapping keeps the data alive; nothing is left on disk
            return buf
        return np.zeros(shape, np.uint8)

    def _encode_references(self) -> None:
        ids = self.object_ids
        if ids != self._entry_ids or self.geo != self._entries_geo:
            self._entries.clear()
            self._states.clear()
            self._entry_ids = ids
            self._entries_geo = self.geo
        for t, lab in self.references.items():
            if t not in self._entries:
                image = self.reader.tensor(t, self.geo, self.device)
                probs = from_labels(torch.from_numpy(lab).to(self.device), ids, self.geo)
                with self.runtime.precision():
                    entry = self.runtime.encode_memory(image, probs)
                self._entries[t] = (image, probs, entry)

    def _run_pass(
        self, plan: Pass, stored: np.ndarray | None, cancel: threading.Event | None
    ) -> Iterator[FrameResult]:
        if plan.walks_on and self._forward is not None:
            tracker = self._forward
        else:
            tracker = Tracker(
                self.model, self.config, self.object_ids, keep_sources=False, geometry=self.geo
            )
            state = self._states.get(plan.frames[0]) if plan.walks_on else None
            if state is not None:
                tracker.resume(state)
            reads = plan.reads
            for t, (image, probs, entry) in self._entries.items():
                if t != plan.frames[0] and t in reads and self._teaches(t, plan):
                    tracker.preload_reference(t, image, probs, entry)
        if plan.walks_on:
            self._forward = tracker
        self._tracker = tracker
        lo = min(plan.frames)
        frames = self._reader([t for t in plan.frames if t not in self.references])
        try:
            yield from self._walk(plan, tracker, frames, stored, lo, cancel)
        finally:
            frames.close()
            self._tracker = None  # its memory is of no use once the pass is over

    def _teaches(self, t: int, plan: Pass) -> bool:
        """Whether reference ``t``, outside the pass's frames, may be read by it: only if it
        holds every object the pass starts with. Read by a pass tracking an object it lacks,
        it teaches that the object is nowhere, and the pass loses it where it enters (an
        object drawn first on the later reference of a stretch: J 0.07 on the frames it
        enters, 0.6 without that read; tests/test_engine.py)."""
        return t in plan.frames or self._holds(plan.frames[0]) <= self._holds(t)

    def _holds(self, t: int) -> set[int]:
        """The object ids reference ``t`` holds."""
        return {int(i) for i in np.unique(self.references[t]) if i != 0}

    def _reader(self, order: list[int]) -> Prefetcher | DirectReader:
        def read(t: int) -> Tensor:
            return self.reader.tensor(t, self.geo, self.device)

        return frame_source(read, order, self.config, self.device)

    def _walk(
        self,
        plan: Pass,
        tracker: Tracker,
        frames: Prefetcher | DirectReader,
        stored: np.ndarray | None,
        lo: int,
        cancel: threading.Event | None,
    ) -> Iterator[FrameResult]:
        tracked = None
        if plan.mode == "fused":
            fwd, back = self._sides(plan.span)
            tracked = fwd | back
        for t in plan.frames:
            if cancel is not None and cancel.is_set():
                return
            if t in self.references:
                image, _, entry = self._entries[t]
                if plan.walks_on and tracker.steps > 0:
                    # Its memory on reaching t, for a later call that starts at t.
                    self._states[t] = tracker.snapshot()
                tracker.add_reference(t, image, self.references[t], entry)
                if plan.mode != "store":
                    yield tracker.reference_result(t, self.references[t])
                continue
            image = frames.get(t)
            sigma = tracker.motion_sigma  # the read's; the step then measures this frame
            out = tracker.segment(t, image, previous=plan.reads_previous)
            probs = out.probs
            # The class maximum of the step's own probabilities, computed once for the read
            # record, the labels and the confidence (many objects; fused probabilities differ).
            top = out.top() if tracker.many_objects else None
            memo = probs
            if plan.mode == "store":
                assert stored is not None
                stored[t - lo] = (probs * 255).round().to(torch.uint8).cpu().numpy()
                self._stored_conf[t] = frame_confidence(probs, self.geo, top).cpu()
            elif plan.mode == "fused":
                assert stored is not None
                probs, memo = self._fuse(t, probs, stored, plan.span)
                top = None
            else:
                self._backward.pop(t, None)
            kind = "store" if plan.mode == "store" else "yield"
            self._reads[kind][t] = ReadRecord(
                out.read.times or [], sigma, *pack_labels(probs, None if top is None else top[1])
            )
            # What the forward side memorises: per object one side's guess, never a blend of
            # the two (core/fuse.py); its own where the two sides agree. This is how the far
            # reference of a stretch reaches the forward pass: it never reads it.
            tracker.remember(t, image, memo, out.query)
            if plan.mode != "store":
                yield tracker.result(t, probs, tracked, top)

    def _sides(self, span: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Which objects the forward (from a) and backward (from b) side of a stretch track:
        an object drawn on only one of its references is unknown to the other side."""
        ids = self.object_ids
        a, b = span
        return (
            torch.tensor([i in self.references[a] for i in ids]),
            torch.tensor([i in self.references[b] for i in ids]),
        )

    def _fuse(
        self, t: int, forward: Tensor, stored: np.ndarray, span: tuple[int, int]
    ) -> tuple[Tensor, Tensor]:
        """Frame ``t`` between references ``span``: what it yields and what the forward side
        memorises. Each object from one side, the nearer unless the farther is clearly surer,
        or, where the two sides agree on it, their mean, of which the forward side memorises
        its own guess (core/fuse.py); an object drawn on only one of the two references from
        that side. Every fused frame goes through here."""
        a, b = span
        backward = torch.from_numpy(np.asarray(stored[t - a - 1])).to(forward) / 255.0
        c_fwd = frame_confidence(forward, self.geo).cpu()
        agree = agreement(forward, backward).cpu()
        take = take_backward(c_fwd, self._stored_conf[t], b - t < t - a, agree)
        fwd, back = self._sides(span)
        take[back & ~fwd] = 1.0
        take[fwd & ~back] = 0.0
        self._backward[t] = take.clone()
        merged = merge(forward, backward, take)
        agreed = take == 0.5
        if not bool(agreed.any()):
            return merged, merged  # nothing yielded as a mean: memorised as yielded
        return merged, merge(forward, backward, torch.where(agreed, 0.0, take))
