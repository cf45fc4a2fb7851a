"""A stream of frames through one step at a time, around a memory bank.

``Tracker.step(frame, labels)`` memorises a reference, ``Tracker.step(frame)`` segments the next
frame: the whole contract of a streaming adapter such as a CVAT tracking session. The
:class:`~napari_stm.core.propagator.Propagator` drives trackers through its passes with the
finer calls (``add_reference``, ``segment``, ``remember``, ``result``). What is memorised, kept
and read is the tracker's memory policy's choice (core/policy.py); each frame is computed by
the one step function (core/step.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from napari_stm.core import step as stepping
from napari_stm.core.config import AlgorithmConfig, PropagationConfig
from napari_stm.core.errors import InputError
from napari_stm.core.frames import (
    FrameReader,
    Geometry,
    boxes_at,
    check_labels,
    crop_padding,
    fit_side,
    foreground_box,
    from_network,
    label_dtype,
    labels_window,
    object_diameters,
    to_network,
)
from napari_stm.core.frames import geometry as make_geometry
from napari_stm.core.model import MemoryEntry, QueryFeatures, VOSNetwork
from napari_stm.core.motion import MotionEstimate, won_centres
from napari_stm.core.policy import make_policy
from napari_stm.core.quality import FLAG_REFERENCE, LostWatch, label_areas, object_confidence
from napari_stm.core.readout import MotionPrior, ObjectPriors, motion_prior
from napari_stm.core.runtime import Runtime, half_precision, prepare
from napari_stm.core.step import Read, StepOutput, class_max, class_won, step


class SharedFrame:
    """One frame that several trackers step (the objects of one CVAT request, each its own
    tracker): its network input and query features are made by the first tracker that needs
    them and reused by every tracker that sees the frame alike (same network runtime, geometry
    and intensity range); the memory read and the decoding stay each tracker's own."""

    def __init__(self, frame: Any) -> None:
        self.frame = frame
        self._made: dict[tuple, tuple[Tensor, QueryFeatures | None]] = {}
        #: how many query encodings this frame saved
        self.reused = 0
        # Steps computed ahead for trackers not stepped on this frame yet (step_trackers'
        # ``ahead``): id(tracker) -> (tracker, its plan), taken by the tracker's own step.
        self._ahead: dict[int, tuple[Tracker, _Plan]] = {}
        self._stepped: dict[int, Tracker] = {}  # by step_trackers: not to compute ahead again

    def get(self, key: tuple) -> tuple[Tensor | None, QueryFeatures | None]:
        image, query = self._made.get(key, (None, None))
        self.reused += query is not None
        return image, query

    def put(self, key: tuple, image: Tensor, query: QueryFeatures | None) -> None:
        if query is not None or key not in self._made:
            self._made[key] = (image, query)

    def query(self, key: tuple, image: Tensor, runtime: Runtime) -> QueryFeatures:
        """The query features of this frame under ``key``, encoded by ``runtime`` once."""
        _, query = self.get(key)
        if query is None:
            with runtime.precision():
                query = runtime.encode_query(image)
            self.put(key, image, query)
        return query

    @property
    def ahead(self) -> int:
        """How many trackers have a step computed on this frame that they have not taken."""
        return len(self._ahead)


@dataclass
class FrameResult:
    """One segmented frame. ``probs`` is computed on first access."""

    t: int
    labels: np.ndarray
    is_reference: bool
    _probs: Tensor | np.ndarray = field(repr=False)
    _geo: Geometry | None = field(default=None, repr=False)
    #: object id -> expected Jaccard index of its mask in [0, 1], higher is surer
    #: (:func:`napari_stm.core.quality.object_confidence`), for the objects the pass tracks
    #: on this frame
    confidence: dict[int, float] = field(default_factory=dict)
    #: object id -> "" | "lost" (area collapsed, :class:`~napari_stm.core.quality.LostWatch`)
    #: | "reference" (a person drew this frame)
    flags: dict[int, str] = field(default_factory=dict)
    #: object id -> pixels of its label at the frame's full size
    area: dict[int, int] = field(default_factory=dict)

    @property
    def probs(self) -> np.ndarray:
        """float32 [N+1, H, W]: background, then objects by ascending id."""
        if isinstance(self._probs, Tensor):
            assert self._geo is not None
            p = from_network(self._probs[None].float(), self._geo)[0]
            self._probs = p.cpu().numpy()
        return self._probs


def working_geometry(
    size: tuple[int, int],
    model: VOSNetwork,
    config: AlgorithmConfig,
    references: Iterable[np.ndarray] = (),
) -> Geometry:
    """How frames of ``size`` map to the network: the configured side, else the network's
    working side, shrunk further when the network has an object size and the ``references``'
    objects are larger than it (see :func:`napari_stm.core.frames.fit_side`)."""
    side = model.working_side if config.max_side is None else config.max_side
    if config.max_side is None and model.object_side:
        diameters = [object_diameters(lab) for lab in references]
        if diameters:
            side = fit_side(size, side, model.object_side, np.concatenate(diameters))
    return make_geometry(size, model.pad_multiple, side or None)


def one_hot(labels: Tensor, ids: list[int]) -> Tensor:
    """[H, W] integer labels -> [len(ids), H, W] float masks (unknown ids are background)."""
    return (
        torch.stack([(labels == i) for i in ids]).float()
        if ids
        else labels.new_zeros((0, *labels.shape), dtype=torch.float32)
    )


def from_labels(labels: Tensor, ids: list[int], geo: Geometry | None) -> Tensor:
    """Reference labels [H, W] -> object probabilities [N, Hp, Wp] at network size."""
    masks = one_hot(labels, ids)[None]
    if geo is not None:
        masks = to_network(masks, geo, mode="area")
    return masks[0]


def frame_confidence(
    probs: Tensor,
    geo: Geometry,
    top: tuple[Tensor, Tensor] | None = None,
    within: tuple[slice, slice] | None = None,
    won: Tensor | None = None,
) -> Tensor:
    """Each object's confidence [N] on a frame's network-size probabilities [N+1, Hp, Wp],
    padding left out; ``top``: their ``max(0)`` (values, indices) when already known;
    ``within``: the unpadded part's :func:`~napari_stm.core.frames.foreground_box`; ``won``:
    ``top``'s indices alone (with ``within``), whose values are then formed there only (the
    confidence reads none elsewhere: the same values, summed in the same order)."""
    inner = crop_padding(probs, geo)
    if top is None and won is not None and within is not None:
        rows, cols = within
        there = (class_max(inner[:, rows, cols])[0], crop_padding(won, geo)[rows, cols])
        return object_confidence(inner, there)
    cropped = None if top is None else (crop_padding(top[0], geo), crop_padding(top[1], geo))
    return object_confidence(inner, cropped, within)


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
        geometry: Geometry | None = None,
    ) -> None:
        self.model = model
        self.config = config or PropagationConfig()
        self.runtime = prepare(model, self.config)
        self.device = self.runtime.device
        self.policy = make_policy(self.config, model)
        self.bank = self.policy.bank(half_precision(self.device, self.config.amp))
        self.object_ids: list[int] = sorted(object_ids or [])
        self.active = torch.zeros(len(self.object_ids), dtype=torch.bool)
        #: how frames map to the network; None: set by the first frame :meth:`step` sees
        self.geo: Geometry | None = geometry
        self.steps = 0  # frames seen since the pass started
        #: changes whenever what this tracker's next step computes may change (a frame
        #: visited, objects added, memory loaded): a step computed ahead is valid while it holds
        self.revision = 0
        self._pending: tuple[int, Tensor, Tensor, QueryFeatures | None, bool] | None = None
        self._sources: dict[int, tuple[Tensor, Tensor]] = {}
        # What each memory entry was made from, so objects that appear later can be added to
        # it. A caller that knows every object up front (Propagator) saves that memory.
        self._keep_sources = keep_sources
        self._intensity: tuple[np.ndarray, np.ndarray] | None = None
        self._last_t: int | None = None
        self._referenced = False
        self.motion = MotionEstimate()
        #: what stm-lite derived from each (object, memory entry) of this tracker's reads,
        #: kept across calls (:class:`ObjectPriors` ``entries``); pruned to the bank's entries
        self._derived: dict[tuple[int, int], Any] = {}
        self.lost = LostWatch()
        #: each object's probability mass at network size on the references (the largest)
        self._reference_mass: dict[int, float] = {}
        #: each object's probability mass on the last frame memorised (reference or segmented)
        self._memorised_mass: dict[int, float] = {}

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
            "reference_mass": dict(self._reference_mass),
            "memorised_mass": dict(self._memorised_mass),
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
        self.revision += 1
        self.bank.load_state_dict(state["bank"], self.device)
        # Absent from states saved before the vanish rule: such a session never leaves a frame out.
        mass = state.get("reference_mass", {})
        self._reference_mass = {int(i): float(m) for i, m in mass.items()}
        # Absent from states saved before the spill rule: growth is then measured from the
        # references' mass.
        mass = state.get("memorised_mass", {})
        self._memorised_mass = {int(i): float(m) for i, m in mass.items()}
        self.motion = MotionEstimate()
        if "motion" in state:  # absent from states saved before the motion prior
            self.motion.load_state_dict(state["motion"])

    def snapshot(self) -> dict[str, Any]:
        """What this tracker holds on reaching a reference, for a later walk to go on from
        there (:meth:`resume`). The frame waiting to enter memory is dropped first, as
        :meth:`add_reference` drops it: the frame before a reference never enters memory."""
        self._pending = None
        self.revision += 1
        return {
            "tracker": self.state_dict(),
            "lost": (dict(self.lost.reference), dict(self.lost.previous)),
        }

    def resume(self, snapshot: dict[str, Any]) -> None:
        """Go on from a :meth:`snapshot`: memory, bookkeeping and the lost-object watch."""
        self.load_state_dict(snapshot["tracker"])
        self.lost.reference, self.lost.previous = (dict(d) for d in snapshot["lost"])

    # -- introspection ------------------------------------------------------------------------

    @property
    def many_objects(self) -> bool:
        """Whether a frame takes the engine's many-object shortcuts (:data:`MANY_OBJECTS`)."""
        return len(self.object_ids) >= stepping.MANY_OBJECTS

    @property
    def memory_frames(self) -> int:
        # A pending frame takes the place of the previous-frame entry when it is written.
        replaces = "previous" in self.bank.kinds()
        return len(self.bank) + (self._pending is not None and not replaces)

    @property
    def memory_nbytes(self) -> int:
        """Bytes held between steps: the memory bank, the frames kept to re-encode it, the
        frame waiting to enter memory (its image, masks and query features) and what the
        network keeps per memory entry (each kept tensor once: objects share them)."""
        held = [t for pair in self._sources.values() for t in pair]
        held += list({id(t): t for kept in self._derived.values() for t in kept}.values())
        if self._pending is not None:
            _, image, probs, query, _ = self._pending
            held += [image, probs]
            if query is not None:
                held += [query.key, query.value, *query.skips, *query.extra.values()]
        return self.bank.nbytes + sum(t.element_size() * t.numel() for t in held if t is not None)

    @property
    def top_k(self) -> int | None:
        return self.policy.top_k

    @property
    def motion_sigma(self) -> float | None:
        """Spread per frame of the read's motion prior (None: no prior)."""
        if self.policy.measures_motion:
            return self.motion.sigma
        return self.policy.fixed_motion_sigma

    # -- streaming API ------------------------------------------------------------------------
    def step(self, frame: Any, labels: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Segment ``frame`` (H x W or H x W x C), or memorise it with ``labels`` as reference.

        ``frame`` may be a :class:`SharedFrame`: trackers stepping the same one convert and
        encode it once between them (results unchanged).
        Returns (labels H x W, uint8 for ids up to 255, probs float32 [N+1, H, W]).
        """
        shared = frame if isinstance(frame, SharedFrame) else None
        t, lab, reader = self._arrive(frame, labels)
        key = self._frame_key()
        image, query = shared.get(key) if shared else (None, None)
        with torch.inference_mode():
            if image is None:
                image = reader.tensor(0, self.geo, self.device)
            if lab is not None:
                if shared and self.model.memory_from_query and (self.object_ids or lab.any()):
                    # The objects of one request started on one frame: its query encoded once.
                    query = shared.query(key, image, self.runtime)
                self.add_reference(t, image, lab, query=query)
                result = self.reference_result(t, lab)
            else:
                self._check_referenced()
                out = self.segment(t, image, query)
                query = out.query if self.object_ids else query
                result = self._segmented(t, image, out)
        if shared:
            shared.put(key, image, query)
        return result.labels, result.probs

    def _arrive(self, frame: Any, labels: Any) -> tuple[int, np.ndarray | None, FrameReader]:
        """A streamed frame's index, checked labels and reader; the session's geometry and
        intensity range set by its first frame."""
        raw = frame.frame if isinstance(frame, SharedFrame) else frame
        reader = FrameReader([raw], self.config.normalize, self._intensity)
        if reader.needs_range:
            self._intensity = reader.intensity_range
        if self.geo is not None and reader.size != self.geo.size:
            raise InputError(
                f"image size changed inside a session: {reader.size[1]}x{reader.size[0]}, "
                f"the session started with {self.geo.size[1]}x{self.geo.size[0]}"
            )
        t = 0 if self._last_t is None else self._last_t + 1
        lab = None if labels is None else check_labels(labels, reader.size, f"frame {t}")
        if self.geo is None:
            # A session's first step is its reference: its objects may choose the size.
            refs = [] if lab is None else [lab]
            self.geo = working_geometry(reader.size, self.model, self.config, refs)
        return t, lab, reader

    def _check_referenced(self) -> None:
        if not self._referenced:
            raise InputError("no reference yet: the first frame needs a mask")

    def _segmented(self, t: int, image: Tensor, out: StepOutput) -> FrameResult:
        """Offer a segmented streamed frame to the memory; its result."""
        self.remember(t, image, out.probs, out.query)
        top = out.top() if self._shortcuts(out) and out.won is None else None
        return self.result(t, out.probs, top=top, box=out.box, won=out.won)

    def _shortcuts(self, out: StepOutput) -> bool:
        """Whether the frame takes the many-object shortcuts: this tracker's objects are many,
        or the network call that computed ``out`` held many (:func:`step_trackers`)."""
        return self.many_objects or out.many_objects

    def _frame_key(self) -> tuple:
        """What a frame's network input and query features depend on besides the frame."""
        assert self.geo is not None
        intensity = None if self._intensity is None else tuple(a.tobytes() for a in self._intensity)
        return (id(self.runtime), str(self.device), self.config.normalize, self.geo, intensity)

    # -- engine API ---------------------------------------------------------------------------
    def ensure_objects(self, ids: list[int]) -> None:
        """Add object ids; memory written before is re-encoded with the new objects absent."""
        new = sorted(set(ids) - set(self.object_ids))
        if not new:
            return
        self.revision += 1
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
        self,
        t: int,
        image: Tensor,
        labels: np.ndarray,
        entry: MemoryEntry | None = None,
        query: QueryFeatures | None = None,
    ) -> None:
        """Memorise frame ``t`` with a person's labels as permanent memory (``entry``: already
        encoded; ``query``: the frame's query features, for a network that reuses them)."""
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
        self.lost.see_reference(label_areas(labels, self.object_ids))
        for i, m in zip(self.object_ids, probs.sum((1, 2)).tolist(), strict=True):
            self._memorised_mass[i] = m
            if m > 0:
                self._reference_mass[i] = max(m, self._reference_mass.get(i, 0.0))
        if self.policy.measures_motion:
            self.motion.observe(t, probs, disjoint=self.many_objects)
        if entry is None:
            entry = self._encode(image, probs, query)
        self._store(t, image, probs, entry, "reference")
        self.active |= torch.tensor([i in ids for i in self.object_ids], dtype=torch.bool)

    def preload_reference(self, t: int, image: Tensor, probs: Tensor, entry: MemoryEntry) -> None:
        """A reference the pass has not reached yet: in memory, but its objects not yet active."""
        self.revision += 1
        self._store(t, image, probs, entry, "reference")

    def segment(
        self,
        t: int,
        image: Tensor,
        query: QueryFeatures | None = None,
        previous: bool = True,
    ) -> StepOutput:
        """Frame ``t`` from the memory: its probabilities ``probs`` [N+1, Hp, Wp] at padded
        network size, its query features and the read they came from. ``query``: the frame's
        query features when already computed (by another tracker on the same frame);
        ``previous``: whether the read sees the previous frame (the pass decides,
        :meth:`napari_stm.core.plan.Pass.reads_previous`)."""
        n = self._begin(t, previous)
        if n == 0:
            return self._nothing(image)
        out = step(
            self.runtime,
            image,
            lambda q: self._read(t, q),
            query=query,
            active=self.active,
            extra_slots=self.policy.extra_slots(n),
            precision=self.runtime.precision,
        )
        self._observe(t, out)
        return out

    def _begin(self, t: int, previous: bool = True) -> int:
        """Before frame ``t`` is read: the pending frame written (``previous`` False: only if
        the policy keeps it, and no previous-frame entry is read); how many objects to
        segment."""
        self._flush_pending(previous=previous)
        self._visit(t)
        return len(self.object_ids)

    @staticmethod
    def _nothing(image: Tensor) -> StepOutput:
        # Nothing to track (references without objects): every pixel is background.
        probs = image.new_ones((1, *image.shape[-2:]))
        none = image[:, :0]
        return StepOutput(probs.log(), probs, QueryFeatures(key=none), Read(none, none))

    def _observe(self, t: int, out: StepOutput) -> None:
        if self.policy.measures_motion:
            # After aggregation: one object's own map also lights up every look-alike, and its
            # centre then jumps to their mean (measured 0.15 of the frame on ctc-sim-01's nuclei).
            top = out.top() if self._shortcuts(out) and out.centres is None else None
            self.motion.observe(t, out.probs[1:], top=top, measured=out.centres)

    def remember(
        self, t: int, image: Tensor, probs: Tensor, query: QueryFeatures | None = None
    ) -> None:
        """Offer segmented frame ``t`` to the memory (written lazily, before the next read)."""
        if not self.object_ids:
            return
        ids = self.object_ids
        mass = probs[1:].sum((1, 2), dtype=torch.float32).cpu()
        reference = [self._reference_mass.get(i, 0.0) for i in ids]
        previous = [self._memorised_mass.get(i, r) for i, r in zip(ids, reference, strict=True)]
        ref = torch.tensor(reference)
        if not self.policy.admits(mass, ref, torch.tensor(previous)):
            self._pending = None  # the previous frame in memory stays the one before
            return
        self._memorised_mass.update(zip(ids, mass.tolist(), strict=True))
        keep = self.policy.keep(self.steps - 1, probs)
        self._pending = (t, image, self.policy.memorised(probs, self.geo), query, keep)

    def result(
        self,
        t: int,
        probs: Tensor,
        tracked: Tensor | None = None,
        top: tuple[Tensor, Tensor] | None = None,
        box: tuple[slice, slice] | None = None,
        won: Tensor | None = None,
    ) -> FrameResult:
        """Frame ``t``'s labels and probabilities, and the confidence, area and flag of the
        objects ``tracked`` ([N] bool; default: those active in this pass). ``top``:
        ``probs.max(0)``'s values and indices when already known (:meth:`StepOutput.top`);
        given, or with many objects, the labels come from the network size
        (:data:`~napari_stm.core.step.MANY_OBJECTS`'s shortcuts); ``box``: its
        :func:`~napari_stm.core.frames.foreground_box` when already known (with ``top``);
        ``won``: ``top``'s indices alone, in place of ``top`` (with ``box``)."""
        geo = self.geo
        assert geo is not None
        index = torch.uint8 if len(self.object_ids) < 256 else torch.int32
        if self.many_objects or top is not None or won is not None:
            # The shortcuts (step.MANY_OBJECTS): labels from the network size, and only in
            # the window holding the objects (a one-object tracker's: its object's box).
            if won is None:
                if top is None:
                    top = probs.max(0)
                    top = (top.values, top.indices)
                won = top[1]
            if box is None:
                box = foreground_box(crop_padding(won, geo))
            window, cls = labels_window(probs, geo, won, box)
        else:
            box = None
            full = from_network(probs[None], geo)[0]
            # max(0).indices, not argmax(0): the same first-maximum index, but argmax over a
            # short leading dimension took 80 ms of a 480p frame on CPU, max 7 ms.
            cls = full.max(0).indices
            window = (slice(None), slice(None))
        lut = np.array([0, *self.object_ids], dtype=label_dtype(max(self.object_ids, default=0)))
        inside = cls.to(index).cpu().numpy()
        labels = np.zeros(geo.size, dtype=lut.dtype)
        labels[window] = lut[inside]
        on = (self.active if tracked is None else tracked).tolist()
        conf = frame_confidence(probs, geo, top, box, None if top is not None else won).tolist()
        confidence = {i: c for i, c, o in zip(self.object_ids, conf, on, strict=True) if o}
        # The label image's counts, from the window (outside it every pixel is background).
        counts = np.bincount(inside.ravel(), minlength=len(self.object_ids) + 1)
        area = {i: int(counts[k + 1]) for k, i in enumerate(self.object_ids) if i in confidence}
        # Held off the accelerator: a caller keeping every result must not fill GPU memory.
        return FrameResult(
            t, labels, False, probs.cpu(), self.geo, confidence, self.lost.flags(area), area
        )

    def reference_result(self, t: int, labels: np.ndarray) -> FrameResult:
        lab = torch.from_numpy(labels)
        probs = torch.cat([(lab == 0)[None].float(), one_hot(lab, self.object_ids)])
        ids = self.object_ids
        return FrameResult(
            t,
            labels.copy(),
            True,
            probs.numpy(),
            confidence=dict.fromkeys(ids, 1.0),
            flags=dict.fromkeys(ids, FLAG_REFERENCE),
            area=label_areas(labels, ids),
        )

    # -- internals ----------------------------------------------------------------------------
    def _visit(self, t: int) -> None:
        self.revision += 1
        self.steps += 1
        self._last_t = t

    def _read(self, t: int, query: QueryFeatures) -> Read:
        keys, values = self.bank.tensors(t)
        times = self.bank.times(t)
        entries = self.bank.entries(t)
        if self._derived:
            # Forgotten or rewritten entries: what was derived from them is never asked again.
            live = {s.entry for s in self.bank.slots}
            for key in [key for key in self._derived if key[1] not in live]:
                del self._derived[key]
        prior = self._motion_prior(t, times, query)
        return Read(keys, values, self.policy.top_k, prior, times, entries)

    def _motion_prior(self, t: int, times: list[int], query: QueryFeatures) -> MotionPrior | None:
        sigma = self.motion_sigma
        if sigma is None:
            return None
        grid = query.key.shape[-2:]
        gaps = torch.tensor([abs(t - s) for s in times], device=query.key.device)
        return motion_prior(gaps, (grid[0], grid[1]), sigma)

    def _encode(
        self, image: Tensor, obj_probs: Tensor, query: QueryFeatures | None = None
    ) -> MemoryEntry:
        with self.runtime.precision():
            return self.runtime.encode_memory(image, obj_probs, query)

    def _store(self, t: int, image: Tensor, probs: Tensor, entry: MemoryEntry, kind: str) -> None:
        self.bank.add(t, entry, kind)  # type: ignore[arg-type]
        self._keep_source(t, image, probs)

    def _keep_source(self, t: int, image: Tensor, probs: Tensor) -> None:
        if self._keep_sources:
            self._sources[t] = (image, probs)
        live = set(self.bank.frames())
        for old in [s for s in self._sources if s not in live]:
            del self._sources[old]

    def _flush_pending(self, entry: MemoryEntry | None = None, previous: bool = True) -> None:
        """Write the frame waiting to enter memory (``entry``: already encoded). ``previous``
        False: the next read sees no previous-frame entry, so the waiting frame enters only if
        the policy keeps it, and an older previous-frame entry is forgotten."""
        if not previous:
            if self._pending is not None and not self._pending[4]:
                self._pending = None
            self.bank.discard(("previous",))
        if self._pending is None:
            return
        t, image, probs, query, keep = self._pending
        self._pending = None
        if entry is None:
            entry = self._encode(image, probs, query)
        self.bank.add(t, entry, "previous")
        if keep:
            self.bank.promote_previous(self.policy.kept_kind)
        self._keep_source(t, image, probs)


@dataclass
class _Plan:
    """A tracker's step on a frame, computed and not yet taken (see :func:`step_trackers`)."""

    revision: int  # the tracker's revision it was computed at
    t: int
    image: Tensor
    out: StepOutput
    segmented: bool = True  # False: no objects, nothing read


def step_trackers(
    trackers: Sequence[Tracker], frame: SharedFrame, ahead: Iterable[Tracker] = ()
) -> list[FrameResult]:
    """Segment ``frame`` with every tracker: ``[tr.step(frame) for tr in trackers]`` (the
    objects of one CVAT request, one tracker each), with the network calls shared; each
    result's probabilities are resized to the frame on first access only (CVAT wants labels).

    The frame is encoded once per runtime, geometry and intensity range (as through
    :class:`SharedFrame`). Trackers that then read their memory alike (the same memory keys,
    read settings and motion prior, as the trackers of one request started on one frame do)
    and hold equally many objects read and decode in ONE call of the one step function (or in
    as few as keep each within :data:`CALL_ELEMENTS`), their objects side by side (a network
    with windows around small objects, stm-lite, then decodes each only around itself); each
    tracker aggregates, memorises and reports its own objects.
    Each result equals the tracker's alone to float rounding, or, where the network's windows
    apply, within their tolerance (docs/performance.md). A tracker whose read matches no
    other's runs alone, exactly as :meth:`Tracker.step`.

    ``ahead``: trackers likely to be stepped on this frame later, each by a call of its own
    (cvat-sdk's agent asks for one shape at a time): their steps are computed in the same
    network calls and kept on ``frame``. A tracker stepped on ``frame`` later takes its step
    from there if nothing changed it in between (:attr:`Tracker.revision`), else computes it
    afresh. Computing ahead advances nothing: a tracker's memory, motion and bookkeeping change
    only when it is stepped (its frame waiting to enter memory is written, as its next step
    would write it), so a tracker never stepped on ``frame`` is as it was.
    """
    arrived = [tr._arrive(frame, None) for tr in trackers]
    for tr in trackers:
        tr._check_referenced()
    plans: list[_Plan | None] = []
    for tr in trackers:
        held = frame._ahead.pop(id(tr), None)
        fits = held is not None and held[0] is tr and held[1].revision == tr.revision
        plans.append(held[1] if fits else None)
    fresh = [i for i, plan in enumerate(plans) if plan is None]
    todo = [(trackers[i], arrived[i]) for i in fresh]
    asked = {id(tr) for tr in trackers}
    for tr in dict.fromkeys(ahead):
        held = frame._ahead.get(id(tr))
        fits = held is not None and held[1].revision == tr.revision
        if id(tr) in asked or id(tr) in frame._stepped or not tr._referenced or fits:
            continue
        try:
            todo.append((tr, tr._arrive(frame, None)))
        except InputError:  # not a frame of its session (another image size): not ahead
            continue
    with torch.inference_mode():
        made = _plan(
            [tr for tr, _ in todo], [a[0] for _, a in todo], [a[2] for _, a in todo], frame
        )
        for i, plan in zip(fresh, made, strict=False):
            plans[i] = plan
        for (tr, _), plan in list(zip(todo, made, strict=True))[len(fresh) :]:
            frame._ahead[id(tr)] = (tr, plan)
        results = []
        for tr, plan in zip(trackers, plans, strict=True):
            assert plan is not None
            frame._stepped[id(tr)] = tr
            tr._visit(plan.t)
            if plan.segmented:
                tr._observe(plan.t, plan.out)
            results.append(tr._segmented(plan.t, plan.image, plan.out))
    return results


def _plan(
    trackers: list[Tracker], times: list[int], readers: list[FrameReader], frame: SharedFrame
) -> list[_Plan]:
    """Each tracker's step on ``frame`` at its ``times``, not taken (see :func:`step_trackers`):
    the frame encoded once per frame key, trackers that read alike in one network call."""
    inputs = []
    for tr, reader in zip(trackers, readers, strict=True):
        key = tr._frame_key()
        image, query = frame.get(key)
        if image is None:
            image = reader.tensor(0, tr.geo, tr.device)
        if query is None and tr.object_ids:
            query = frame.query(key, image, tr.runtime)
        else:
            frame.put(key, image, query)
        inputs.append((key, image, query))
    flush_trackers(trackers)
    plans: list[_Plan | None] = [None] * len(trackers)
    # Trackers that read alike (one signature), by memory (equal keys): (index, read, gaps).
    groups: list[tuple[tuple, list[list[tuple[int, Read, tuple | None]]]]] = []
    for i, (tr, t) in enumerate(zip(trackers, times, strict=True)):
        key, image, query = inputs[i]
        tr._flush_pending()
        n = len(tr.object_ids)
        if n == 0:
            plans[i] = _Plan(tr.revision, t, image, tr._nothing(image), segmented=False)
            continue
        assert query is not None
        read = tr._read(t, query)
        sigma: float | str | None = None if read.prior is None else tr.motion_sigma
        if sigma is not None and getattr(tr.model, "object_priors", False):
            # The network takes each object's own prior (ObjectPriors): trackers of different
            # measured motion read in one call.
            sigma = "own"
        gaps = None if read.times is None else tuple(abs(t - s) for s in read.times)
        # A network taking ObjectPriors reads trackers over different memory frames in one
        # call too (their union, each object from its own frames): a request's trackers'
        # memories diverge as each tracker's policy admits and keeps frames by itself.
        union = getattr(tr.model, "object_priors", False)
        like = (key, n, tr.policy.extra_slots(n), read.top_k, sigma, None if union else gaps)
        member = (i, read, gaps)
        for signature, memories in groups:
            if signature != like:
                continue
            same = (m for m in memories if _same_keys(m[0][1].keys, read.keys))
            memory = next(same, None)
            if memory is not None:
                memory.append(member)
                break
            if union:
                memories.append([member])
                break
        else:
            groups.append((like, [[member]]))
    sigma_of: dict[int, float | None] = {}  # the spread each read's prior was made with
    for like, memories in groups:
        # The most held memory first: a bounded call then holds as few memories as it can.
        memories.sort(key=len, reverse=True)
        if like[4] == "own" and SHARED_PRIOR:
            for memory in memories:
                memory[:] = _shared_prior(trackers, memory, sigma_of)
        group = [(m, which) for which, memory in enumerate(memories) for m in memory]
        first = group[0][0][0]
        _, image, query = inputs[first]  # one frame key per group: one image and query
        for members in _chunks(group, len(trackers[first].object_ids), image):
            index = [i for (i, _, _), _ in members]
            reads = [r for (_, r, _), _ in members]
            alike = [(which, gaps) for (_, _, gaps), which in members]
            sigmas = [sigma_of.get(i, trackers[i].motion_sigma) for i in index]
            outs = _step_together([trackers[i] for i in index], reads, image, query, alike, sigmas)
            for i, out in zip(index, outs, strict=True):
                plans[i] = _Plan(trackers[i].revision, times[i], inputs[i][1], out)
    assert all(plan is not None for plan in plans)
    return plans  # type: ignore[return-value]


#: the one-object trackers of a request that read one memory (equal keys, equal gaps) read
#: it with ONE motion prior, of the lower median of their spreads, instead of each its own
#: (:func:`_shared_prior`); False: each tracker's own prior (each result then equals the
#: tracker's alone to float rounding and the windows' tolerance)
SHARED_PRIOR = True


def _shared_prior(
    trackers: list[Tracker],
    memory: list[tuple[int, Read, tuple | None]],
    sigma_of: dict[int, float | None],
) -> list[tuple[int, Read, tuple | None]]:
    """``memory``'s members (index, read, gaps) with one motion prior for each run of equal
    gaps: that of the lower median of its trackers' spreads (``sigma_of``: each index's
    spread, written here).

    Each one-object tracker of a CVAT request measures its own motion, so a request's reads
    of one memory differ only in their spread; read together, every distinct prior is a
    weight set of its own (a dense [P, M] softmax where its band is wide), rows, a
    background read and, per network call, a whole-frame background decode: 100 trackers
    cost 12x one tracker where 100 objects of one tracker cost 6.5x (docs/performance.md,
    eleventh and twelfth sessions). One prior a memory, as a tracker of many objects
    reads with one measured motion (the median object's, core/motion.py), keeps those
    costs per memory. An approximation for the trackers whose own spread differs from the
    median (the bench's and the cell data's figures are in docs/performance.md); a tracker
    alone (one shape) reads with its own, as ever. The lower median is one tracker's own
    spread, so that tracker reads as before."""
    runs: dict[tuple | None, list[int]] = {}
    for j, (_, read, gaps) in enumerate(memory):
        if read.prior is not None and not isinstance(read.prior, ObjectPriors):
            runs.setdefault(gaps, []).append(j)
    out = list(memory)
    for gaps, js in runs.items():
        sigmas = [trackers[memory[j][0]].motion_sigma for j in js]
        if len(js) < 2 or gaps is None or None in sigmas:
            continue
        shared = sorted(sigmas)[(len(sigmas) - 1) // 2]  # type: ignore[type-var]
        assert shared is not None
        owner = memory[js[sigmas.index(shared)]]
        prior = owner[1].prior
        for j in js:
            i, read, _ = memory[j]
            sigma_of[i] = shared
            if read.prior is not prior:
                out[j] = (i, replace(read, prior=prior), gaps)
    return out


def flush_trackers(trackers: Sequence[Tracker]) -> None:
    """Write each tracker's frame waiting to enter memory, as its next step (or
    :meth:`Tracker.state_dict`) would; those made from one frame (one image and query, as the
    trackers of one request) with equally many objects in ONE memory-encoder call
    (``encode_memory(..., groups=K)``: each tracker's objects see only each other), or in as
    few as keep each within :data:`CALL_ELEMENTS`."""
    batches: dict[tuple, list[Tracker]] = {}
    for tr in trackers:
        if tr._pending is None:
            continue
        _, image, probs, query, _ = tr._pending
        like = (id(tr.runtime), id(image), id(query), query is None, probs.shape)
        batches.setdefault(like, []).append(tr)
    chunks = []
    for batch in batches.values():
        first = batch[0]
        assert first._pending is not None
        chunks += _chunks(batch, len(first._pending[2]), first._pending[1])
    for members in chunks:
        if len(members) == 1:
            continue  # its own step writes it, as ever
        first = members[0]
        assert first._pending is not None
        _, image, _, query, _ = first._pending
        probs = torch.cat([tr._pending[2] for tr in members if tr._pending is not None])
        with first.runtime.precision():
            entry = first.runtime.encode_memory(image, probs, query, groups=len(members))
        n = len(probs) // len(members)
        per_object = entry.keys.shape[0] == len(probs)
        for k, tr in enumerate(members):
            own = slice(k * n, (k + 1) * n)
            keys = entry.keys[own] if per_object else entry.keys
            tr._flush_pending(MemoryEntry(keys=keys, values=entry.values[own]))


#: most per-object map elements (objects x network pixels) one shared network call holds: the
#: trackers of a larger request go in several calls, so its memory stays bounded (each such
#: float32 map at most 16 MB: 28 objects of a 480p frame at stm-lite's 512 x 288) and is
#: reused between calls (a fresh allocation of a map costs about as much as a pass over it)
CALL_ELEMENTS = 4 * 2**20


def _chunks(members: list, objects: int, image: Tensor) -> list[list]:
    """``members`` (trackers of ``objects`` objects each, or their entries) in as few nearly
    equal runs as keep each network call within :data:`CALL_ELEMENTS`."""
    pixels = image.shape[-2] * image.shape[-1]
    most = max(1, CALL_ELEMENTS // max(1, objects * pixels))
    parts = -(-len(members) // most)
    size, extra = divmod(len(members), parts)
    out, start = [], 0
    for k in range(parts):
        stop = start + size + (k < extra)
        out.append(members[start:stop])
        start = stop
    return out


def _same_keys(a: Tensor, b: Tensor) -> bool:
    return a is b or (a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b))


def _step_together(
    trackers: list[Tracker],
    reads: list[Read],
    image: Tensor,
    query: QueryFeatures,
    alike: list[tuple[int, tuple | None]] | None = None,
    sigmas: list[float | None] | None = None,
) -> list[StepOutput]:
    """One step for trackers with the same read settings (see :func:`step_trackers`): their
    memory values side by side, one network call. ``alike``: each tracker's memory (trackers
    of one memory hold equal keys) and gaps to its memory frames; over several memories (a
    network taking :class:`ObjectPriors`), the call reads the union of their frames.
    ``sigmas``: the spread each read's prior was made with (default: each tracker's own)."""
    first = trackers[0]
    n = len(first.object_ids)
    read = reads[0]
    if len(trackers) > 1 and alike is not None and len({m for m, _ in alike}) > 1:
        grid = query.key.shape[-2] * query.key.shape[-1]
        keys, values, frames = _union(reads, [m for m, _ in alike], grid)
        prior = _priors(trackers, reads, frames, [g for _, g in alike], sigmas)
        read = Read(keys, values, read.top_k, prior)
    elif len(trackers) > 1:
        values = torch.cat([r.values for r in reads], dim=0)
        prior = _priors(trackers, reads, sigmas=sigmas)
        read = Read(read.keys, values, read.top_k, prior, read.times)
    out = step(
        first.runtime,
        image,
        lambda q: read,
        query=query,
        active=torch.cat([tr.active for tr in trackers]),
        extra_slots=first.policy.extra_slots(n),
        precision=first.runtime.precision,
        groups=len(trackers),
    )
    if len(trackers) == 1:
        return [out]
    # The class maximum of every tracker's maps in one pass (many objects: their labels,
    # confidence and motion all start from it), each tracker's its slice. One object a
    # tracker: its indices alone; the values are read only inside each tracker's box (the
    # confidence, formed there by its result) and where its object wins (the motion), where
    # the maximum IS the object's probability (max returns the larger operand).
    top = out.top() if out.many_objects and n > 1 else None
    won = top[1] if top is not None else class_won(out.probs) if out.many_objects else None
    k_all = len(trackers)
    boxes: list[tuple[slice, slice] | None] = [None] * k_all
    centres: list[tuple[Tensor, Tensor] | None] = [None] * k_all
    if won is not None and first.geo is not None:
        # What each tracker's result and motion take from its maximum, for all from one
        # pass: the object pixels' positions, the boxes and centres from those.
        at = won.nonzero(as_tuple=True)
        boxes = boxes_at(at, k_all, won.shape[-2:], first.geo)
        if any(tr.policy.measures_motion for tr in trackers):
            values = out.probs[..., 1, :, :] if top is None else top[0]
            mass, middle = won_centres((values, won), n, at)
            centres = [(mass[k], middle[k]) for k in range(k_all)]
    return [
        StepOutput(
            None if out.logits is None else out.logits[k],
            out.probs[k],
            out.query,
            reads[k],
            None if top is None else (top[0][k], top[1][k]),
            out.many_objects,
            boxes[k],
            centres[k],
            None if won is None or top is not None else won[k],
        )
        for k in range(k_all)
    ]


def _union(
    reads: list[Read], memories: list[int], grid: int
) -> tuple[Tensor, Tensor, list[tuple[int, ...]]]:
    """Reads over different memory frames as one: the keys of their distinct memory frames
    [1, Ck, F * grid] (``grid``: positions a frame), each read's values at its frames' places
    [sum N, Cv, F * grid] (zero where it holds none; the network reads each object from its
    own frames only) and each read's frames, in its order. ``memories``: which reads hold
    equal keys (their frames are found once)."""
    blocks: list[Tensor] = []
    found: dict[int, tuple[int, ...]] = {}
    for read, memory in zip(reads, memories, strict=True):
        if memory in found:
            continue
        own = []
        for block in read.keys.split(grid, dim=-1):
            j = next((j for j, b in enumerate(blocks) if _same_keys(b, block)), len(blocks))
            if j == len(blocks):
                blocks.append(block)
            own.append(j)
        found[memory] = tuple(own)
    keys = torch.cat(blocks, dim=-1)
    frames = [found[m] for m in memories]
    n, cv = reads[0].values.shape[-3:-1]
    values = reads[0].values.new_zeros((len(reads) * n, cv, keys.shape[-1]))
    cells = torch.arange(grid, device=keys.device)
    for k, (read, own) in enumerate(zip(reads, frames, strict=True)):
        at = (torch.tensor(own, device=keys.device)[:, None] * grid + cells).flatten()
        values[k * n : (k + 1) * n].index_copy_(2, at, read.values)
    return keys, values, frames


def _priors(
    trackers: list[Tracker],
    reads: list[Read],
    frames: list[tuple[int, ...]] | None = None,
    gaps: list[tuple | None] | None = None,
    sigmas: list[float | None] | None = None,
) -> MotionPrior | ObjectPriors | None:
    """The motion prior of trackers read in one call: theirs, or where their measured motion
    differs (a network with ``object_priors``), each tracker's objects their own; over the
    union of different memories (``frames``: each read's, ``gaps``: to each of them), each
    tracker's objects their own prior over their own frames. ``sigmas``: the spread each
    read's prior was made with (default: each tracker's own)."""
    made = [tr.motion_sigma for tr in trackers] if sigmas is None else sigmas
    sigmas = [s if r.prior is not None else None for s, r in zip(made, reads, strict=True)]
    n = len(trackers[0].object_ids)
    if frames is not None:
        assert gaps is not None
        sets = [
            (own, None if r.prior is None else g, s)
            for own, r, g, s in zip(frames, reads, gaps, sigmas, strict=True)
        ]
        kinds = list(dict.fromkeys(sets))
        owner = tuple(kinds.index(s) for s in sets for _ in range(n))
        priors = tuple(reads[sets.index(s)].prior for s in kinds)
        entries = _entries(trackers, reads, frames)
        return ObjectPriors(priors, owner, tuple(s[0] for s in kinds), entries)
    distinct = list(dict.fromkeys(sigmas))
    # Only a network taking ObjectPriors gets them (trackers of one prior on another network
    # read it as it is).
    takes = getattr(trackers[0].model, "object_priors", False)
    entries = _entries(trackers, reads) if takes else None
    if len(distinct) == 1 and (entries is None or reads[0].prior is None):
        return reads[0].prior
    # One prior with entries (trackers of one memory, SHARED_PRIOR): ObjectPriors for the
    # entries' sake (stm-lite keeps what it derives from them), read as the one prior.
    priors = [reads[sigmas.index(s)].prior for s in distinct]
    assert all(p is not None for p in priors), "trackers with and without a prior"
    owner = tuple(distinct.index(s) for s in sigmas for _ in range(n))
    return ObjectPriors(tuple(p for p in priors if p is not None), owner, entries=entries)


def _entries(
    trackers: list[Tracker], reads: list[Read], frames: list[tuple[int, ...]] | None = None
) -> tuple[tuple[tuple[dict, tuple[int, int]] | None, ...], ...] | None:
    """:class:`ObjectPriors` ``entries`` of trackers read in one call: for each object (the
    trackers' objects in order), for each memory frame of the call (``frames``: where each
    read's frames are in the union; None: the reads' own, all alike), its tracker's cache
    and the key (object, bank entry) of its values there; None where it holds none."""
    if any(r.entries is None for r in reads):
        return None
    n = len(trackers[0].object_ids)
    count = len(reads[0].entries or ()) if frames is None else 1 + max(max(f) for f in frames)
    out = []
    for k, (tr, read) in enumerate(zip(trackers, reads, strict=True)):
        at = range(count) if frames is None else frames[k]
        for j in range(n):
            row: list[tuple[dict, tuple[int, int]] | None] = [None] * count
            for f, entry in zip(at, read.entries or (), strict=True):
                row[f] = (tr._derived, (j, entry))
            out.append(tuple(row))
    return tuple(out)
