"""Who owns each labels frame, and which frames a run must compute.

A frame is *painted* when it holds labels the widget did not write (or labels it wrote that a
person has since changed): painted frames are references for the engine and are never
overwritten. A frame is *predicted* when its content is exactly what the widget wrote (a hash
of the bytes is kept per written frame), and *empty* when it is all background.

The ledger is a plain JSON-able dict kept in the labels layer's ``metadata`` so that closing
and reopening the widget does not turn earlier predictions into "painted" references. Each
run records the references it used; a later run recomputes a prediction only when a reference
near it (the one it was propagated from, in the run's direction) was added, changed or erased.
No napari imports here.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from napari_stm.core.config import Direction
from napari_stm.core.errors import InputError
from napari_stm.core.plan import check_direction, covering_calls, depends_on, reachable

METADATA_KEY = "napari_stm"


class Overwrite(str, Enum):
    """Which frames a run may write; painted frames are never written."""

    OUTDATED = "empty frames + outdated predictions"
    EMPTY = "empty frames only"
    ALL = "empty frames + all predictions"


class State(str, Enum):
    EMPTY = "empty"
    PAINTED = "painted"
    PREDICTED = "predicted"


def frame_hash(frame: np.ndarray) -> str:
    """Digest of a labels frame's content (dtype and shape included)."""
    arr = np.ascontiguousarray(frame)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def signature(**settings: Any) -> str:
    """What makes two runs' predictions interchangeable: the model, its weights, the direction
    and every setting that changes results (``core.config.algorithm_settings``)."""
    return json.dumps(settings, sort_keys=True, default=str)


def get_ledger(metadata: dict) -> dict:
    """The ledger inside a layer's metadata, created empty if missing or malformed."""
    led = metadata.get(METADATA_KEY)
    if (
        not isinstance(led, dict)
        or not isinstance(led.get("written"), dict)
        or not isinstance(led.get("runs"), dict)
    ):
        led = {"written": {}, "runs": {}, "next_run": 0}
        metadata[METADATA_KEY] = led
    return led


@dataclass
class FrameInfo:
    state: State
    hash: str
    #: the run that wrote a predicted frame
    run: str | None = None


def classify(frames: Iterable[np.ndarray], keys: Sequence[str], ledger: dict) -> list[FrameInfo]:
    """State of each labels frame of a sequence (``keys[t]`` names frame ``t``)."""
    out = []
    written = ledger["written"]
    for key, frame in zip(keys, frames, strict=True):
        h = frame_hash(frame)
        entry = written.get(key)
        if isinstance(entry, dict) and entry.get("hash") == h:
            out.append(FrameInfo(State.PREDICTED, h, str(entry.get("run"))))
        elif np.any(frame):
            out.append(FrameInfo(State.PAINTED, h))
        else:
            out.append(FrameInfo(State.EMPTY, h))
    return out


@dataclass
class RunPlan:
    references: list[int]
    #: frames this run writes, ascending
    write: list[int]
    #: engine calls: [start, stop) ranges to hand ``Propagator.propagate``, in order
    calls: list[tuple[int, int]] = field(default_factory=list)
    #: frames in the range no reference reaches in the chosen direction
    unreachable: list[int] = field(default_factory=list)
    #: earlier predictions left as they are (up to date)
    kept: list[int] = field(default_factory=list)
    #: references added, changed or erased since the predictions they affect were made
    changed: list[int] = field(default_factory=list)


def plan_run(
    infos: Sequence[FrameInfo],
    keys: Sequence[str],
    ledger: dict,
    direction: Direction,
    start: int,
    stop: int,
    overwrite: Overwrite,
    sig: str,
) -> RunPlan:
    """Decide which frames of ``[start, stop)`` a run computes, and the engine calls for them
    (the engine's own planner, core/plan.py, decides what a reference reaches).

    Raises InputError when there is no painted frame to start from.
    """
    n = len(infos)
    check_direction(direction)
    start, stop = max(0, start), min(n, stop)
    if start >= stop:
        raise InputError(f"the frame range {start}..{stop - 1} is empty")
    refs = [t for t, f in enumerate(infos) if f.state is State.PAINTED]
    if not refs:
        raise InputError(
            "no painted frame: paint the objects on at least one frame of the labels layer"
        )
    ref_hash = {keys[t]: infos[t].hash for t in refs}
    reached = reachable(refs, n, direction)

    # Per earlier run: the frames affected by references that changed since that run.
    stale_by_run: dict[str, set[int] | None] = {}
    changed: set[int] = set()
    key_to_t = {k: t for t, k in enumerate(keys)}
    for run_id in {f.run for f in infos if f.state is State.PREDICTED}:
        run = ledger["runs"].get(run_id)
        if not isinstance(run, dict) or run.get("signature") != sig:
            stale_by_run[run_id] = None  # other model or settings: everything is outdated
            continue
        old = run.get("references", {})
        diff = {k for k in set(old) | set(ref_hash) if old.get(k) != ref_hash.get(k)}
        stale: set[int] = set()
        for k in diff:
            if k in key_to_t:  # a reference of another sequence (other z / time) is irrelevant
                c = key_to_t[k]
                changed.add(c)
                stale.update(depends_on(c, refs, n, direction))
        stale_by_run[run_id] = stale

    write, unreachable, kept = [], [], []
    for t in range(start, stop):
        info = infos[t]
        if info.state is State.PAINTED:
            continue
        if info.state is State.PREDICTED:
            if overwrite is Overwrite.EMPTY:
                kept.append(t)
                continue
            if overwrite is Overwrite.OUTDATED:
                stale = stale_by_run.get(info.run or "")
                if stale is not None and t not in stale:
                    kept.append(t)
                    continue
        if t not in reached:
            unreachable.append(t)
            continue
        write.append(t)

    return RunPlan(
        references=refs,
        write=write,
        calls=covering_calls(write, refs, direction),
        unreachable=unreachable,
        kept=kept,
        changed=sorted(changed),
    )


def record_run(ledger: dict, sig: str, references: dict[str, str]) -> str:
    """Register a run (its settings and the references it used); returns its id."""
    run_id = str(ledger.get("next_run", 0))
    ledger["next_run"] = int(run_id) + 1
    ledger["runs"][run_id] = {"signature": sig, "references": dict(references)}
    return run_id


def record_write(ledger: dict, key: str, content_hash: str, run_id: str) -> None:
    ledger["written"][key] = {"hash": content_hash, "run": run_id}


def prune(ledger: dict, keys: Sequence[str], infos: Sequence[FrameInfo]) -> None:
    """Forget written frames a person has changed since, and runs nothing refers to."""
    for key, info in zip(keys, infos, strict=True):
        if info.state is not State.PREDICTED:
            ledger["written"].pop(key, None)
    used = {str(e.get("run")) for e in ledger["written"].values() if isinstance(e, dict)}
    for run_id in list(ledger["runs"]):
        if run_id not in used:
            del ledger["runs"][run_id]


def snapshot(ledger: dict) -> dict:
    return copy.deepcopy(ledger)
