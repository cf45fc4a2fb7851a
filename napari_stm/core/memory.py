"""The memory bank: the entries of one pass or session, and the tensors a read sees.

Which frames enter it, as what kind, and how large it may grow is its memory policy's choice
(core/policy.py); the bank carries out the cap it is given: the working memory forgets its
oldest entry first and gets what the cap leaves after the previous frame and two references; a
further reference (a correction) is read beside them, not in place of a frame the pass
remembered; of more than ``max_frames - 2`` references the nearest in time are read.

Entries live in one preallocated buffer per tensor, slot by slot, so a read is a view of the
buffer's used prefix and no concatenation happens per frame.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from napari_stm.core.model import MemoryEntry

Kind = Literal["reference", "permanent", "working", "previous"]

#: references that share the cap with the working memory (the two ends of a stretch); each
#: further one is read beside it (see ``MemoryBank._make_room_for_working``)
SHARED_REFERENCES = 2

#: a process-wide number for every entry written: an entry's contents never change under its
#: number (a rewrite gets a new one), so what is derived from them can be kept by it
_ENTRIES = itertools.count()


@dataclass
class Slot:
    t: int
    kind: Kind
    #: when it was written: the working memory forgets the lowest first
    seq: int = 0
    #: which entry it holds (:data:`_ENTRIES`): a slot moved in the buffer keeps it
    entry: int = field(default_factory=lambda: next(_ENTRIES))


class MemoryBank:
    """Memory entries of one propagation pass (or one tracking session)."""

    def __init__(
        self,
        max_frames: int | None = None,
        storage_dtype: torch.dtype | None = None,
    ) -> None:
        if max_frames is not None and max_frames < 2:
            raise ValueError("max_frames must be at least 2 (a reference and the previous frame)")
        self.max_frames = max_frames
        self.storage_dtype = storage_dtype
        self.slots: list[Slot] = []
        self._seq = 0
        self._keys: Tensor | None = None  # [Nk, Ck, S, hw]
        self._values: Tensor | None = None  # [N, Cv, S, hw]
        self._hw: tuple[int, int] | None = None

    # -- bookkeeping -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.slots)

    @property
    def nbytes(self) -> int:
        total = 0
        for buf in (self._keys, self._values):
            if buf is not None:
                total += buf.element_size() * buf.numel()
        return total

    def kinds(self) -> list[Kind]:
        return [s.kind for s in self.slots]

    def frames(self, kind: Kind | None = None) -> list[int]:
        return [s.t for s in self.slots if kind is None or s.kind == kind]

    def clear(self) -> None:
        self.slots.clear()
        self._keys = self._values = None
        self._hw = None

    # -- writing -----------------------------------------------------------------------------
    def add(self, t: int, entry: MemoryEntry, kind: Kind) -> None:
        """Store ``entry`` for frame ``t``; a previous-frame entry replaces the last one."""
        if kind == "previous":
            for i, s in enumerate(self.slots):
                if s.kind == "previous":
                    self._write(i, entry)
                    self._seq += 1
                    s.t, s.seq, s.entry = t, self._seq, next(_ENTRIES)
                    return
        else:
            # A frame memorised again (e.g. a correction) replaces its older entry.
            self._drop(lambda s: s.t == t and s.kind != "previous")
        if kind == "working":
            self._make_room_for_working()
        self._write(len(self.slots), entry)
        self._seq += 1
        self.slots.append(Slot(t, kind, self._seq))

    def promote_previous(self, kind: Kind = "permanent") -> None:
        """Keep the temporary previous-frame entry (the every-N rule)."""
        prev = next((s for s in self.slots if s.kind == "previous"), None)
        if prev is None:
            return
        if kind == "working":
            self._make_room_for_working()
        prev.kind = kind

    def discard(self, kinds: tuple[Kind, ...]) -> None:
        """Forget every entry of these kinds."""
        self._drop(lambda s: s.kind in kinds)

    def _make_room_for_working(self) -> None:
        if self.max_frames is None:
            return
        fixed = sum(1 for s in self.slots if s.kind in ("reference", "permanent"))
        # References always stay; the working memory gets what is left after the previous
        # frame and two references, never less than one entry. A third reference and more (the
        # annotator's corrections) are read beside it: each used to take a working entry's
        # place, so a correct reference made the pass forget a frame it remembered, and J fell
        # on frames after it (DAVIS development sequences, true masks on 0 and t, then t + 1:
        # docs/architecture.md, eleventh session of issue 17).
        shared = min(fixed, SHARED_REFERENCES, self.max_frames - 2)
        budget = max(1, self.max_frames - 1 - shared)
        working = sorted((s for s in self.slots if s.kind == "working"), key=lambda s: s.seq)
        while len(working) >= budget:
            oldest = working.pop(0)
            self._drop(lambda s, o=oldest: s is o)

    def _drop(self, pred) -> None:  # noqa: ANN001 - a private predicate on slots
        i = 0
        while i < len(self.slots):
            if pred(self.slots[i]):
                last = len(self.slots) - 1
                if i != last:
                    # Keep used slots a contiguous prefix: move the last entry into the hole.
                    self._copy_slot(last, i)
                    self.slots[i] = self.slots[last]
                self.slots.pop()
            else:
                i += 1

    def _copy_slot(self, src: int, dst: int) -> None:
        assert self._keys is not None and self._values is not None
        self._keys[:, :, dst] = self._keys[:, :, src]
        self._values[:, :, dst] = self._values[:, :, src]

    def _write(self, slot: int, entry: MemoryEntry) -> None:
        keys, values = entry.keys, entry.values
        if keys.dim() != 4 or values.dim() != 4:
            raise ValueError("memory entries are [Nk, Ck, h, w] keys and [N, Cv, h, w] values")
        hw = tuple(keys.shape[-2:])
        dtype = self.storage_dtype or keys.dtype
        if self._keys is None:
            self._hw = hw
            cap = self.max_frames or 8
            self._keys = keys.new_empty((*keys.shape[:2], cap, hw[0] * hw[1]), dtype=dtype)
            self._values = values.new_empty((*values.shape[:2], cap, hw[0] * hw[1]), dtype=dtype)
        elif (
            hw != self._hw
            or keys.shape[:2] != self._keys.shape[:2]
            or (values.shape[:2] != self._values.shape[:2])
        ):
            raise ValueError(
                f"memory entry of shape {tuple(keys.shape)} / {tuple(values.shape)} does not "
                f"match the bank ({tuple(self._keys.shape)} / {tuple(self._values.shape)})"
            )
        if slot >= self._keys.shape[2]:
            # Unbounded (official) memory grows by doubling, so appends stay amortised O(1).
            self._keys = _grow(self._keys)
            self._values = _grow(self._values)
        self._keys[:, :, slot] = keys.flatten(2).to(dtype)
        self._values[:, :, slot] = values.flatten(2).to(dtype)

    # -- saving --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The used entries and their bookkeeping as tensors, numbers and strings only."""
        n = len(self.slots)
        return {
            "slots": [[s.t, s.kind, s.seq] for s in self.slots],
            "seq": self._seq,
            "keys": None if self._keys is None else self._keys[:, :, :n].clone(),
            "values": None if self._values is None else self._values[:, :, :n].clone(),
            "hw": None if self._hw is None else list(self._hw),
            "storage_dtype": None if self.storage_dtype is None else str(self.storage_dtype),
        }

    def load_state_dict(self, state: dict, device: torch.device | None = None) -> None:
        self.slots = [Slot(int(t), kind, int(seq)) for t, kind, seq in state["slots"]]
        self._seq = int(state["seq"])
        self._hw = None if state["hw"] is None else tuple(state["hw"])
        self._keys = self._values = None
        dtype = state.get("storage_dtype")
        self.storage_dtype = None if dtype is None else getattr(torch, dtype.split(".")[-1])
        if state["keys"] is not None:
            n = len(self.slots)
            cap = max(self.max_frames or 8, n)
            for name in ("keys", "values"):
                used = state[name].to(device) if device is not None else state[name]
                if self.storage_dtype is not None:
                    used = used.to(self.storage_dtype)
                buf = used.new_empty((*used.shape[:2], cap, used.shape[3]))
                buf[:, :, :n] = used
                setattr(self, f"_{name}", buf)

    # -- reading -----------------------------------------------------------------------------
    def tensors(self, current_t: int | None = None) -> tuple[Tensor, Tensor]:
        """Keys [Nk, Ck, M] and values [N, Cv, M] of the frames the next read should see.

        Every working entry and the previous frame are read, and the references nearest in time
        to ``current_t``, as many as the cap leaves but at least ``max_frames - 2``; all of them
        stay stored.
        """
        if not self.slots or self._keys is None or self._values is None:
            raise ValueError("the memory is empty: add a reference frame first")
        keys, values = self._keys, self._values
        idx = self._selection(current_t)
        if idx is not None:
            sel = torch.tensor(idx, device=keys.device)
            k = keys.index_select(2, sel)
            v = values.index_select(2, sel)
            return k.flatten(2), v.flatten(2)
        n = len(self.slots)
        return keys[:, :, :n].flatten(2), values[:, :, :n].flatten(2)

    def times(self, current_t: int | None = None) -> list[int]:
        """The frame of each memory frame :meth:`tensors` returns, in its order."""
        return [s.t for s in self._read_slots(current_t)]

    def entries(self, current_t: int | None = None) -> tuple[int, ...]:
        """The entry number (:class:`Slot`) of each memory frame :meth:`tensors` returns."""
        return tuple(s.entry for s in self._read_slots(current_t))

    def _read_slots(self, current_t: int | None) -> list[Slot]:
        """The slots :meth:`tensors` reads, in its order."""
        idx = self._selection(current_t)
        return self.slots if idx is None else [self.slots[i] for i in idx]

    def _selection(self, current_t: int | None) -> list[int] | None:
        """Slots a read sees, in order; None when it sees all of them."""
        if self.max_frames is None or len(self.slots) <= self.max_frames:
            return None
        others = [i for i, s in enumerate(self.slots) if s.kind not in ("reference", "permanent")]
        fixed = [i for i, s in enumerate(self.slots) if s.kind in ("reference", "permanent")]
        # Not only what the working memory leaves: a reference added when the working memory
        # was full (it shrinks at its next entry) then pushed every other reference out of the
        # read, the first among them, for as long as no frame entered the working memory.
        room = max(1, self.max_frames - 2, self.max_frames - len(others))
        if len(fixed) <= room:
            return None
        if current_t is not None:
            fixed.sort(key=lambda i: abs(self.slots[i].t - current_t))
        return sorted(fixed[:room] + others)


def _grow(buf: Tensor) -> Tensor:
    new = buf.new_empty((*buf.shape[:2], buf.shape[2] * 2, buf.shape[3]))
    new[:, :, : buf.shape[2]] = buf
    return new
