"""A video, the frames a person annotated, and propagation between them.

The :class:`Propagator` asks the planner (core/plan.py) which passes a direction needs, runs one
:class:`~napari_stm.core.tracker.Tracker` per pass with every reference in its memory, reads
frames (ahead, when configured) and blends the two sides between two references. Progress and
cancellation are per frame.
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
from napari_stm.core.frames import FrameReader, check_labels
from napari_stm.core.model import MemoryEntry, VOSNetwork
from napari_stm.core.plan import Pass, check_range, plan_passes, reach
from napari_stm.core.runtime import DirectReader, Prefetcher, frame_source, prepare
from napari_stm.core.tracker import FrameResult, Tracker, from_labels, working_geometry

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
        self.geo = working_geometry(self.reader.size, model, self.config)
        self.references: dict[int, np.ndarray] = {}
        self._entries: dict[int, tuple[Tensor, Tensor, MemoryEntry]] = {}
        self._entry_ids: list[int] = []
        self._tracker: Tracker | None = None

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
    def object_ids(self) -> list[int]:
        ids: set[int] = set()
        for lab in self.references.values():
            ids.update(int(i) for i in np.unique(lab) if i != 0)
        return sorted(ids)

    def add_reference(self, t: int, labels: Any) -> None:
        """Labels a person drew on frame ``t``: permanent memory, returned exactly as given."""
        if not isinstance(t, (int, np.integer)) or not 0 <= t < len(self.reader):
            raise InputError(
                f"reference frame {t} is outside the video (frames 0..{len(self.reader) - 1})"
            )
        self.references[int(t)] = check_labels(labels, self.reader.size, f"reference frame {t}")
        self._entries.pop(int(t), None)

    def remove_reference(self, t: int) -> None:
        self.references.pop(t, None)
        self._entries.pop(t, None)

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
                "paint at least one object id (1..255)"
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
        if ids != self._entry_ids:
            self._entries.clear()
            self._entry_ids = ids
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
        tracker = Tracker(
            self.model, self.config, self.object_ids, keep_sources=False, geometry=self.geo
        )
        self._tracker = tracker
        for t, (image, probs, entry) in self._entries.items():
            if t != plan.frames[0]:
                tracker.preload_reference(t, image, probs, entry)
        lo = min(plan.frames)
        frames = self._reader([t for t in plan.frames if t not in self.references])
        try:
            yield from self._walk(plan, tracker, frames, stored, lo, cancel)
        finally:
            frames.close()
            self._tracker = None  # its memory is of no use once the pass is over

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
        for t in plan.frames:
            if cancel is not None and cancel.is_set():
                return
            if t in self.references:
                image, _, entry = self._entries[t]
                tracker.add_reference(t, image, self.references[t], entry)
                if plan.mode != "store":
                    yield tracker.reference_result(t, self.references[t])
                continue
            image = frames.get(t)
            out = tracker.segment(t, image)
            probs = out.probs
            if plan.mode == "store":
                assert stored is not None
                stored[t - lo] = (probs * 255).round().to(torch.uint8).cpu().numpy()
            elif plan.mode == "fused":
                assert stored is not None
                probs = self._fuse(t, probs, stored, plan.span)
            # The fused probabilities are the better guess, so they are what gets memorised.
            tracker.remember(t, image, probs, out.query)
            if plan.mode != "store":
                yield tracker.result(t, probs)

    def _fuse(self, t: int, forward: Tensor, stored: np.ndarray, span: tuple[int, int]) -> Tensor:
        """Frame ``t`` between references ``span``: its forward probabilities blended with the
        backward ones the store pass kept. Every fused frame goes through here."""
        # Each side is trusted in proportion to its closeness.
        a, b = span
        w_back = (t - a) / (b - a)
        backward = torch.from_numpy(np.asarray(stored[t - a - 1])).to(forward) / 255.0
        w = torch.full((forward.shape[0], 1, 1), w_back, dtype=forward.dtype)
        # An object drawn on only one of the two references is unknown to the other side (not
        # absent): its probability comes from the side that tracks it.
        ids = self.object_ids
        fwd = torch.tensor([i in self.references[a] for i in ids])
        back = torch.tensor([i in self.references[b] for i in ids])
        w[1:][back & ~fwd] = 1.0
        w[1:][fwd & ~back] = 0.0
        w = w.to(forward.device)
        fused = (1 - w) * forward + w * backward
        return fused / fused.sum(0, keepdim=True).clamp_min(1e-6)
