"""The propagation engine: reference masks on any frames in, every frame out.

``Tracker`` walks one direction frame by frame around a memory bank (the whole contract of a
streaming adapter such as a CVAT tracking session). ``Propagator`` holds a video and the frames a
person annotated, and runs trackers forward, backward or both ways between the references.
"""

from __future__ import annotations

import contextlib
import os
import queue
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from napari_stm.core.errors import InputError
from napari_stm.core.frames import (
    FrameReader,
    Geometry,
    Normalize,
    check_labels,
    clear_padding,
    from_network,
)
from napari_stm.core.frames import geometry as make_geometry
from napari_stm.core.memory import MemoryBank
from napari_stm.core.model import MemoryEntry, QueryFeatures, VOSNetwork
from napari_stm.core.motion import MotionEstimate
from napari_stm.core.readout import MotionPrior, motion_prior, soft_aggregate

Direction = Literal["forward", "backward", "both"]
MemoryMode = Literal["bounded", "official"]

#: object slots of the official evaluation code: the unused ones take part in its softmax
OFFICIAL_SLOTS = 11
#: a pixel whose most likely class is below this probability counts as uncertain
UNCERTAIN_BELOW = 0.75
#: "both" keeps one direction's probabilities on disk past this size, not in RAM
SPILL_BYTES = 256 * 1024 * 1024


@dataclass
class PropagationConfig:
    """How propagation runs. The defaults suit most videos."""

    #: "bounded" (flat time and memory per frame) or "official" (the paper's procedure)
    memory: MemoryMode = "bounded"
    #: a memory frame every N frames
    mem_every: int = 5
    #: most memory frames one read sees (bounded mode), references and previous frame included
    max_memory: int = 10
    #: top-k memory positions per query position; None: the network's default (0: dense)
    top_k: int | None = None
    #: motion prior of the memory read: how far an object moves in a frame (one standard
    #: deviation, a share of the frame's longer side); None: measured from the tracked objects
    #: (core/motion.py) for networks that use the prior, 0: off
    motion_sigma: float | None = None
    #: a frame is written into long-lived memory only if its confidence reaches this (0: always)
    confidence_gate: float = 0.5
    #: resize frames internally so their longer side is at most this (masks come back full
    #: size); None: the network's working size (``VOSNetwork.working_side``), 0: full size
    max_side: int | None = None
    #: "cpu", "cuda", "mps"; None: where the model is
    device: str | None = None
    #: bf16 autocast on CUDA
    amp: bool = True
    #: intensity scaling: "auto" (uint8 / 255, other dtypes by robust percentiles)
    normalize: Normalize = "auto"
    #: frames read and normalised ahead in a background thread while the network runs (0: off);
    #: None: 2 on CUDA (the CPU is idle while the GPU works), off on CPU (where the reading
    #: thread competes with the network for the cores: 10% slower measured on 2 cores)
    prefetch: int | None = None
    #: convolutions in channels-last layout; None: on CUDA and CPU (measured on CPU at 480p,
    #: 2 threads: stm-lite 380 against 453 ms a frame, stm-resnet50 2126 against 2467), not MPS
    channels_last: bool | None = None
    #: run the network through ``torch.compile`` (the first frames wait for the compilation)
    compile: bool = False

    def __post_init__(self) -> None:
        if self.memory not in ("bounded", "official"):
            raise InputError(f"memory must be 'bounded' or 'official', not {self.memory!r}")
        if self.mem_every < 1:
            raise InputError(f"mem_every must be at least 1, not {self.mem_every}")
        if self.max_memory < 2:
            raise InputError(f"max_memory must be at least 2, not {self.max_memory}")
        if self.motion_sigma is not None and not self.motion_sigma >= 0:
            raise InputError(f"motion_sigma must be 0 (off) or positive, not {self.motion_sigma}")
        if self.top_k is not None and self.top_k < 0:
            raise InputError(f"top_k must be positive, not {self.top_k}")
        if not 0 <= self.confidence_gate <= 1:
            raise InputError(f"confidence_gate must be in [0, 1], not {self.confidence_gate}")
        if self.max_side is not None and self.max_side != 0 and self.max_side < 16:
            raise InputError(
                f"max_side must be 0 (full size) or at least 16 pixels, not {self.max_side}"
            )
        if self.prefetch is not None and self.prefetch < 0:
            raise InputError(f"prefetch must be 0 (off) or more frames, not {self.prefetch}")


@dataclass
class FrameResult:
    """One segmented frame. ``probs`` is computed on first access."""

    t: int
    labels: np.ndarray
    is_reference: bool
    _probs: Tensor | np.ndarray = field(repr=False)
    _geo: Geometry | None = field(default=None, repr=False)

    @property
    def probs(self) -> np.ndarray:
        """float32 [N+1, H, W]: background, then objects by ascending id."""
        if isinstance(self._probs, Tensor):
            assert self._geo is not None
            p = from_network(self._probs[None].float(), self._geo)[0]
            self._probs = p.cpu().numpy()
        return self._probs

    def __iter__(self) -> Iterator[Any]:
        # Lets adapters unpack ``t, labels, probs = result``.
        return iter((self.t, self.labels, self.probs))


#: devices where ``PropagationConfig.amp`` runs the networks under bfloat16 autocast and keeps
#: the memory in float16. Not CPU: bfloat16 is 8-60x slower than float32 on CPUs without native
#: support (the tests add "cpu" to run the accelerator's arithmetic here).
AMP_DEVICES = frozenset({"cuda"})


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    if device.type in AMP_DEVICES and enabled:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class _Net:
    """The network as the engine calls it: images in channels-last layout and the network
    compiled, when the configuration asks for them."""

    def __init__(self, model: VOSNetwork, config: PropagationConfig, device: torch.device) -> None:
        cl = config.channels_last
        self.channels_last = device.type in ("cuda", "cpu") if cl is None else cl
        if self.channels_last:
            # In place and idempotent: the weights keep their values, only their layout changes.
            model.to(memory_format=torch.channels_last)
        calls = (model.encode_query, model.encode_memory, model.segment)
        if config.compile:
            # Kept on the model, so every tracker and video of a session reuses one compilation.
            cache = getattr(model, "_napari_stm_compiled", None)
            if cache is None:
                cache = model._napari_stm_compiled = {}
            compiled = cache.get(device.type)
            if compiled is None:
                # On CPU inductor's freezing folds batch norms into convolutions and prepacks
                # their weights: stm-lite's query encoder alone 80 against 117 ms at 480p, 2
                # threads (119 against 127 inside a pass). The weights become constants of the
                # compiled code, which is why it is kept per model object (loading weights
                # makes a new one). Not measured on CUDA, so not used there.
                options = {"freezing": True} if device.type == "cpu" else None
                compiled = cache[device.type] = tuple(
                    torch.compile(f, options=options) for f in calls
                )
            calls = tuple(_or_eager(c, f) for c, f in zip(compiled, calls, strict=True))
        self._query, self._memory, self._segment = calls

    def _layout(self, image: Tensor) -> Tensor:
        return image.contiguous(memory_format=torch.channels_last) if self.channels_last else image

    def encode_query(self, image: Tensor) -> QueryFeatures:
        return self._query(self._layout(image))

    def encode_memory(
        self, image: Tensor, masks: Tensor, query: QueryFeatures | None = None
    ) -> MemoryEntry:
        return self._memory(self._layout(image), masks, query)

    def segment(
        self,
        query: QueryFeatures,
        keys: Tensor,
        values: Tensor,
        top_k: int | None,
        prior: MotionPrior | None,
    ) -> Tensor:
        if prior is None:
            # Networks written before the motion prior take four arguments.
            return self._segment(query, keys, values, top_k)
        return self._segment(query, keys, values, top_k, prior)


def _geometry(size: tuple[int, int], model: VOSNetwork, config: PropagationConfig) -> Geometry:
    side = model.working_side if config.max_side is None else config.max_side
    return make_geometry(size, model.pad_multiple, side or None)


def _or_eager(compiled: Callable, eager: Callable) -> Callable:
    """``compiled``, or ``eager`` for good once compiling fails (on CPU inductor needs a C++
    compiler, which a laptop may lack): a slower run, not a failed one."""
    import torch._dynamo  # noqa: F401  (torch.compile loaded it; named for the except below)

    use = [compiled]

    def call(*args: Any) -> Any:
        try:
            return use[0](*args)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            if use[0] is eager:
                raise
            warnings.warn(
                f"torch.compile failed ({str(e).splitlines()[0][:200]}); running uncompiled",
                RuntimeWarning,
                stacklevel=2,
            )
            use[0] = eager
            return eager(*args)

    return call


class _Prefetcher:
    """Reads frames in a background thread, in the order a pass will ask for them, at most
    ``depth`` ahead: frame t + 1 is read and normalised while frame t is computed.

    A read error is handed over with its frame and raised there, as a synchronous read would.
    ``close`` stops the thread (a read under way finishes first).
    """

    #: seconds ``close`` waits for a read under way
    JOIN_TIMEOUT = 30.0

    def __init__(self, read: Callable[[int], Tensor], order: Iterable[int], depth: int) -> None:
        self._read = read
        self._order = list(order)
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="napari-stm-prefetch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with torch.inference_mode():
            for t in self._order:
                if self._stop.is_set():
                    return
                try:
                    item = (t, self._read(t), None)
                except Exception as err:  # raised in the caller's thread, at this frame
                    item = (t, None, err)
                while True:
                    try:
                        self._queue.put(item, timeout=0.05)
                        break
                    except queue.Full:
                        if self._stop.is_set():
                            return
                if item[2] is not None:
                    return

    def get(self, t: int) -> Tensor:
        got, image, err = self._queue.get()
        if err is not None:
            raise err
        if got != t:  # pragma: no cover - a bug in the pass, not a user error
            raise RuntimeError(f"prefetch order broken: frame {got} came for frame {t}")
        return image

    def close(self) -> None:
        self._stop.set()
        self.thread.join(self.JOIN_TIMEOUT)
        while not self._queue.empty():
            self._queue.get_nowait()


class _DirectReader:
    """What ``_Prefetcher`` does, without a thread (``prefetch=0``)."""

    def __init__(self, read: Callable[[int], Tensor]) -> None:
        self.get = read

    def close(self) -> None:
        pass


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


def one_hot(labels: Tensor, ids: list[int]) -> Tensor:
    """[H, W] integer labels -> [len(ids), H, W] float masks (unknown ids are background)."""
    return (
        torch.stack([(labels == i) for i in ids]).float()
        if ids
        else labels.new_zeros((0, *labels.shape), dtype=torch.float32)
    )


class Tracker:
    """One direction of propagation, frame by frame, around a memory bank.

    ``step(frame, labels)`` memorises a reference; ``step(frame)`` segments the next frame and
    updates the memory under the configured policy.
    """

    def __init__(
        self,
        model: VOSNetwork,
        config: PropagationConfig | None = None,
        object_ids: list[int] | None = None,
        keep_sources: bool = True,
    ) -> None:
        self.model = model
        self.config = config or PropagationConfig()
        self.device = torch.device(self.config.device) if self.config.device else model.device
        self.net = _Net(model, self.config, self.device)
        official = self.config.memory == "official"
        half = self.device.type in AMP_DEVICES and self.config.amp and not official
        self.bank = MemoryBank(
            max_frames=None if official else self.config.max_memory,
            storage_dtype=torch.float16 if half else None,
        )
        self.object_ids: list[int] = sorted(object_ids or [])
        self.active = torch.zeros(len(self.object_ids), dtype=torch.bool)
        self.geo: Geometry | None = None
        self.steps = 0  # frames seen since the pass started
        self._pending: tuple[int, Tensor, Tensor, QueryFeatures | None, bool] | None = None
        self._sources: dict[int, tuple[Tensor, Tensor]] = {}
        # What each memory entry was made from, so objects that appear later can be added to
        # it. A caller that knows every object up front (Propagator) saves that memory.
        self._keep_sources = keep_sources
        self._intensity: tuple[np.ndarray, np.ndarray] | None = None
        self._last_t: int | None = None
        self._referenced = False
        self.motion = MotionEstimate()

    # -- saving -------------------------------------------------------------------------------
    #: version of :meth:`state_dict`'s layout (2: stm-lite's memory values are stored
    #: projected, 129 channels instead of 256, so version-1 memories cannot be read on)
    STATE_VERSION = 2

    def state_dict(self) -> dict[str, Any]:
        """The session's memory and bookkeeping as tensors, numbers and strings only.

        Loadable with ``torch.load(..., weights_only=True)``; the model and configuration are
        not part of it. The frame waiting to enter memory is written first.
        """
        with torch.inference_mode():
            self._flush_pending()
        geo = self.geo
        return {
            "version": self.STATE_VERSION,
            "object_ids": list(self.object_ids),
            "active": self.active.clone(),
            "geo": None if geo is None else [list(geo.size), list(geo.inner), list(geo.pad)],
            "steps": self.steps,
            "last_t": self._last_t,
            "referenced": self._referenced,
            "intensity": None
            if self._intensity is None
            else [torch.from_numpy(np.array(a)) for a in self._intensity],
            "sources": [[t, img.cpu(), p.cpu()] for t, (img, p) in self._sources.items()],
            "bank": self.bank.state_dict(),
            "motion": self.motion.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` (on this tracker's device)."""
        if state.get("version") != self.STATE_VERSION:
            raise InputError(
                f"tracker state version {state.get('version')!r}, expected {self.STATE_VERSION}"
            )
        self.object_ids = [int(i) for i in state["object_ids"]]
        self.active = state["active"].bool().cpu()
        geo = state["geo"]
        self.geo = None if geo is None else Geometry(*(tuple(int(v) for v in g) for g in geo))
        self.steps = int(state["steps"])
        self._last_t = None if state["last_t"] is None else int(state["last_t"])
        self._referenced = bool(state["referenced"])
        intensity = state["intensity"]
        self._intensity = None if intensity is None else tuple(a.numpy() for a in intensity)
        self._sources = {
            int(t): (img.to(self.device), p.to(self.device)) for t, img, p in state["sources"]
        }
        self._pending = None
        self.bank.load_state_dict(state["bank"], self.device)
        self.motion = MotionEstimate()
        if "motion" in state:  # absent from states saved before the motion prior
            self.motion.load_state_dict(state["motion"])

    # -- introspection ------------------------------------------------------------------------
    @property
    def memory_frames(self) -> int:
        # A pending frame takes the place of the previous-frame entry when it is written.
        replaces = "previous" in self.bank.kinds()
        return len(self.bank) + (self._pending is not None and not replaces)

    @property
    def memory_nbytes(self) -> int:
        """Bytes held between steps: the memory bank, the frames kept to re-encode it, and the
        frame waiting to enter memory (its image, masks and query features)."""
        held = [t for pair in self._sources.values() for t in pair]
        if self._pending is not None:
            _, image, probs, query, _ = self._pending
            held += [image, probs]
            if query is not None:
                held += [query.key, query.value, *query.skips, *query.extra.values()]
        return self.bank.nbytes + sum(t.element_size() * t.numel() for t in held if t is not None)

    @property
    def top_k(self) -> int | None:
        if self.config.memory == "official":
            return None
        k = self.config.top_k if self.config.top_k is not None else self.model.default_top_k
        return k or None

    @property
    def motion_sigma(self) -> float | None:
        """Spread per frame of the read's motion prior (None: no prior)."""
        if self._measures_motion:
            return self.motion.sigma
        if self.config.memory == "official":
            return None
        return self.config.motion_sigma or None

    @property
    def _measures_motion(self) -> bool:
        """Whether the prior's spread comes from :attr:`motion` (else nobody reads it)."""
        return (
            self.config.memory != "official"
            and self.config.motion_sigma is None
            and self.model.motion_prior
        )

    # -- streaming API ------------------------------------------------------------------------
    def step(self, frame: Any, labels: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Segment ``frame`` (H x W or H x W x C), or memorise it with ``labels`` as reference.

        Returns (labels H x W uint8, probs float32 [N+1, H, W]).
        """
        reader = FrameReader([frame], self.config.normalize, self._intensity)
        if reader.needs_range:
            self._intensity = reader.intensity_range
        if self.geo is None:
            self.geo = _geometry(reader.size, self.model, self.config)
        elif reader.size != self.geo.size:
            raise InputError(
                f"image size changed inside a session: {reader.size[1]}x{reader.size[0]}, "
                f"the session started with {self.geo.size[1]}x{self.geo.size[0]}"
            )
        t = 0 if self._last_t is None else self._last_t + 1
        with torch.inference_mode():
            image = reader.tensor(0, self.geo, self.device)
            if labels is not None:
                lab = check_labels(labels, self.geo.size, f"frame {t}")
                self.add_reference(t, image, lab)
                result = self.reference_result(t, lab)
            else:
                if not self._referenced:
                    raise InputError("no reference yet: the first frame needs a mask")
                probs, query = self.segment(t, image)
                self.remember(t, image, probs, query)
                result = self.result(t, probs)
        return result.labels, result.probs

    # -- engine API ---------------------------------------------------------------------------
    def ensure_objects(self, ids: list[int]) -> None:
        """Add object ids; memory written before is re-encoded with the new objects absent."""
        new = sorted(set(ids) - set(self.object_ids))
        if not new:
            return
        old_ids = self.object_ids
        self.object_ids = sorted(set(old_ids) | set(new))
        index = [self.object_ids.index(i) for i in old_ids]
        active = torch.zeros(len(self.object_ids), dtype=torch.bool)
        active[index] = self.active
        self.active = active

        def widen(probs: Tensor) -> Tensor:
            out = probs.new_zeros((len(self.object_ids), *probs.shape[1:]))
            out[index] = probs
            return out

        sources = {t: (img, widen(p)) for t, (img, p) in self._sources.items()}
        if self._pending is not None:
            t, img, p, _, keep = self._pending
            self._pending = (t, img, widen(p), None, keep)
        if not self._keep_sources:
            if len(self.bank):
                raise RuntimeError("this tracker keeps no sources: pass every object id up front")
            return
        # Re-added oldest first, so the working memory still forgets in the order it learnt.
        slots = sorted(self.bank.slots, key=lambda s: s.seq)
        self.bank.clear()
        self._sources = {}
        for s in slots:
            img, p = sources[s.t]
            self._store(s.t, img, p, self._encode(img, p), s.kind)

    def add_reference(
        self, t: int, image: Tensor, labels: np.ndarray, entry: MemoryEntry | None = None
    ) -> None:
        """Memorise frame ``t`` with a person's labels as permanent memory."""
        ids = [int(i) for i in np.unique(labels) if i != 0]
        known = {i for i, on in zip(self.object_ids, self.active.tolist(), strict=True) if on}
        if set(ids) - known:
            # Frames memorised before an object was tracked hold it as background, also where
            # it was already visible; read beside its first mask they would contradict it.
            # Only references, which a person drew in full, stay.
            self.bank.discard(("working", "previous", "permanent"))
        self.ensure_objects(ids)
        self._pending = None
        self._visit(t)
        self._referenced = True
        if not self.object_ids:
            return  # no object drawn yet: nothing to memorise
        lab = torch.from_numpy(labels).to(self.device)
        probs = from_labels(lab, self.object_ids, self.geo)
        if self._measures_motion:
            self.motion.observe(t, probs)
        if entry is None:
            entry = self._encode(image, probs)
        self._store(t, image, probs, entry, "reference")
        self.active |= torch.tensor([i in ids for i in self.object_ids], dtype=torch.bool)

    def preload_reference(self, t: int, image: Tensor, probs: Tensor, entry: MemoryEntry) -> None:
        """A reference the pass has not reached yet: in memory, but its objects not yet active."""
        self._store(t, image, probs, entry, "reference")

    def activate(self, ids: list[int]) -> None:
        self.active |= torch.tensor([i in ids for i in self.object_ids], dtype=torch.bool)

    def segment(self, t: int, image: Tensor) -> tuple[Tensor, QueryFeatures]:
        """Probabilities [N+1, Hp, Wp] of frame ``t`` from the memory (padded network size)."""
        self._flush_pending()
        self._visit(t)
        n = len(self.object_ids)
        if n == 0:
            # Nothing to track (references without objects): every pixel is background.
            return image.new_ones((1, *image.shape[-2:])), QueryFeatures(key=image[:, :0])
        with _autocast(self.device, self.config.amp):
            query = self.net.encode_query(image)
            keys, values = self.bank.tensors(t)
            # The memory goes in as stored: the read converts it (readout.memory_read).
            obj = self.net.segment(query, keys, values, self.top_k, self._motion_prior(t, query))
        obj = obj.float() * self.active.to(obj.device, torch.float32)[:, None, None]
        extra = max(0, OFFICIAL_SLOTS - 1 - n) if self.config.memory == "official" else 0
        probs = torch.softmax(soft_aggregate(obj, extra_slots=extra), dim=0)[: n + 1]
        if self._measures_motion:
            # After aggregation: one object's own map also lights up every look-alike, and its
            # centre then jumps to their mean (measured 0.15 of the frame on ctc-sim-01's nuclei).
            self.motion.observe(t, probs[1:])
        return probs, query

    def remember(
        self, t: int, image: Tensor, probs: Tensor, query: QueryFeatures | None = None
    ) -> None:
        """Offer segmented frame ``t`` to the memory (written lazily, before the next read)."""
        if not self.object_ids:
            return
        every = (self.steps - 1) % self.config.mem_every == 0
        if self.config.memory == "official":
            keep = every
        else:
            keep = every and confidence(probs) >= self.config.confidence_gate
        obj = probs[1:]
        if self.config.memory == "official":
            assert self.geo is not None
            obj = clear_padding(obj, self.geo)
        self._pending = (t, image, obj.contiguous(), query, keep)

    def result(self, t: int, probs: Tensor) -> FrameResult:
        assert self.geo is not None
        full = from_network(probs[None], self.geo)[0]
        # max(0).indices, not argmax(0): the same first-maximum index, but argmax over a short
        # leading dimension took 80 ms of a 480p frame on CPU, max 7 ms.
        cls = full.max(0).indices.to(torch.uint8).cpu().numpy()
        lut = np.array([0, *self.object_ids], dtype=np.uint8)
        # Held off the accelerator: a caller keeping every result must not fill GPU memory.
        return FrameResult(t, lut[cls], False, probs.cpu(), self.geo)

    def reference_result(self, t: int, labels: np.ndarray) -> FrameResult:
        lab = torch.from_numpy(labels)
        probs = torch.cat([(lab == 0)[None].float(), one_hot(lab, self.object_ids)])
        return FrameResult(t, labels.copy(), True, probs.numpy())

    # -- internals ----------------------------------------------------------------------------
    def _visit(self, t: int) -> None:
        self.steps += 1
        self._last_t = t

    def _motion_prior(self, t: int, query: QueryFeatures) -> MotionPrior | None:
        sigma = self.motion_sigma
        if sigma is None:
            return None
        grid = query.key.shape[-2:]
        gaps = torch.tensor([abs(t - s) for s in self.bank.times(t)], device=query.key.device)
        return motion_prior(gaps, (grid[0], grid[1]), sigma)

    def _encode(self, image: Tensor, obj_probs: Tensor) -> MemoryEntry:
        with _autocast(self.device, self.config.amp):
            return self.net.encode_memory(image, obj_probs)

    def _store(self, t: int, image: Tensor, probs: Tensor, entry: MemoryEntry, kind: str) -> None:
        self.bank.add(t, entry, kind)  # type: ignore[arg-type]
        self._keep_source(t, image, probs)

    def _keep_source(self, t: int, image: Tensor, probs: Tensor) -> None:
        if self._keep_sources:
            self._sources[t] = (image, probs)
        live = set(self.bank.frames())
        for old in [s for s in self._sources if s not in live]:
            del self._sources[old]

    def _flush_pending(self) -> None:
        if self._pending is None:
            return
        t, image, probs, query, keep = self._pending
        self._pending = None
        with _autocast(self.device, self.config.amp):
            entry = self.net.encode_memory(image, probs, query)
        self.bank.add(t, entry, "previous")
        if keep:
            kind = "permanent" if self.config.memory == "official" else "working"
            self.bank.promote_previous(kind)
        self._keep_source(t, image, probs)


def from_labels(labels: Tensor, ids: list[int], geo: Geometry | None) -> Tensor:
    """Reference labels [H, W] -> object probabilities [N, Hp, Wp] at network size."""
    from napari_stm.core.frames import to_network

    masks = one_hot(labels, ids)[None]
    if geo is not None:
        masks = to_network(masks, geo, mode="area")
    return masks[0]


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
        self.device = torch.device(self.config.device) if self.config.device else model.device
        self.geo = _geometry(self.reader.size, model, self.config)
        self.net = _Net(model, self.config, self.device)
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
        return {
            t
            for p in self._plan(direction, refs, start, stop)
            if p.mode != "store"
            for t in p.frames
        }

    def _range(
        self, direction: str, start: int | None, stop: int | None
    ) -> tuple[int, int, list[int]]:
        if direction not in ("forward", "backward", "both"):
            raise InputError(f"direction must be forward, backward or both, not {direction!r}")
        n = len(self.reader)
        start = 0 if start is None else int(start)
        stop = n if stop is None else int(stop)
        if not 0 <= start < stop <= n:
            raise InputError(f"start/stop {start}..{stop} do not fit a video of {n} frames")
        if not self.references:
            raise InputError("no reference frame: draw a mask on at least one frame")
        refs = sorted(t for t in self.references if start <= t < stop)
        if not refs:
            raise InputError(
                f"no reference frame between {start} and {stop - 1}: annotated frames are "
                f"{sorted(self.references)}"
            )
        return start, stop, refs

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
        plan = self._plan(direction, refs, start, stop)
        return self._propagate(plan, progress, cancel)

    # Decorated rather than a ``with`` block inside: a generator holding inference mode
    # across ``yield`` would also switch it on in the caller's code between frames.
    @torch.inference_mode()
    def _propagate(
        self, plan: list[Pass], progress: ProgressFn | None, cancel: threading.Event | None
    ) -> Iterator[FrameResult]:
        total = sum(len(p.frames) - p.emit_from for p in plan if p.mode != "store")
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

    @staticmethod
    def _plan(direction: Direction, refs: list[int], start: int, stop: int) -> list[Pass]:
        """The passes a direction needs; each starts on a reference and yields each frame once."""
        if direction == "forward":
            return [Pass(list(range(refs[0], stop)))]
        if direction == "backward":
            return [Pass(list(range(refs[-1], start - 1, -1)))]
        plan: list[Pass] = []
        if refs[0] > start:
            plan.append(Pass(list(range(refs[0], start - 1, -1))))
        for a, b in zip(refs, refs[1:], strict=False):
            if b - a > 1:
                plan.append(Pass(list(range(b, a, -1)), mode="store", span=(a, b)))
                plan.append(Pass(list(range(a, b)), mode="fused", span=(a, b)))
            else:
                plan.append(Pass([a]))
        plan.append(Pass(list(range(refs[-1], stop))))
        seen: set[int] = set()
        for p in plan:
            if p.mode != "store":
                p.emit_from = 1 if p.frames[0] in seen else 0
                seen.update(p.frames)
        return plan

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
                with _autocast(self.device, self.config.amp):
                    entry = self.net.encode_memory(image, probs)
                self._entries[t] = (image, probs, entry)

    def _run_pass(
        self, plan: Pass, stored: np.ndarray | None, cancel: threading.Event | None
    ) -> Iterator[FrameResult]:
        tracker = Tracker(self.model, self.config, self.object_ids, keep_sources=False)
        tracker.geo = self.geo
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

    def _reader(self, order: list[int]) -> _Prefetcher | _DirectReader:
        def read(t: int) -> Tensor:
            return self.reader.tensor(t, self.geo, self.device)

        depth = self.config.prefetch
        if depth is None:
            depth = 2 if self.device.type == "cuda" else 0
        if depth and len(order) > 1:
            return _Prefetcher(read, order, depth)
        return _DirectReader(read)

    def _walk(
        self,
        plan: Pass,
        tracker: Tracker,
        frames: _Prefetcher | _DirectReader,
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
            probs, query = tracker.segment(t, image)
            if plan.mode == "store":
                assert stored is not None
                stored[t - lo] = (probs * 255).round().to(torch.uint8).cpu().numpy()
            elif plan.mode == "fused":
                assert stored is not None
                probs = self._fuse(t, probs, stored, plan.span, self._sides(plan.span))
            # The fused probabilities are the better guess, so they are what gets memorised.
            tracker.remember(t, image, probs, query)
            if plan.mode != "store":
                yield tracker.result(t, probs)

    def _sides(self, span: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Which objects the forward (from a) and backward (from b) side of a span track."""
        ids = self.object_ids
        a, b = span
        return (
            torch.tensor([i in self.references[a] for i in ids]),
            torch.tensor([i in self.references[b] for i in ids]),
        )

    @staticmethod
    def _fuse(
        t: int,
        forward: Tensor,
        stored: np.ndarray,
        span: tuple[int, int],
        sides: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        # Between references a and b each side is trusted in proportion to its closeness.
        a, b = span
        w_back = (t - a) / (b - a)
        backward = torch.from_numpy(np.asarray(stored[t - a - 1])).to(forward) / 255.0
        w = torch.full((forward.shape[0], 1, 1), w_back, dtype=forward.dtype)
        if sides is not None:
            # An object drawn on only one of the two references is unknown to the other side
            # (not absent): its probability comes from the side that tracks it.
            fwd, back = sides
            w[1:][back & ~fwd] = 1.0
            w[1:][fwd & ~back] = 0.0
        w = w.to(forward.device)
        fused = (1 - w) * forward + w * backward
        return fused / fused.sum(0, keepdim=True).clamp_min(1e-6)


@dataclass
class Pass:
    """Frames one tracker walks, in order; the first is a reference."""

    frames: list[int]
    #: "plain": yield; "store": keep probabilities for a later fused pass; "fused": blend, yield
    mode: Literal["plain", "store", "fused"] = "plain"
    span: tuple[int, int] = (0, 0)
    emit_from: int = 0
