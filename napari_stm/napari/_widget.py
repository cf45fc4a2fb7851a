"""The dock widget: paint a few frames of a Labels layer, press Propagate, get every frame.

The widget translates layers into engine calls and nothing more: which frames are references
and which it may write is decided by :mod:`._ledger`, how a layer's axes become frames by
:mod:`._sequence`, and the segmentation by :class:`napari_stm.core.engine.Propagator`, run in a
napari ``thread_worker``. Results come back to the main thread one whole frame at a time and are
written there, so the GUI stays responsive and a cancelled run leaves only whole frames.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    Label,
    LineEdit,
    ProgressBar,
    PushButton,
    SpinBox,
    create_widget,
)
from napari.layers import Image, Labels
from napari.qt.threading import thread_worker
from napari.utils import progress
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QSizePolicy

from napari_stm.core.config import Direction, algorithm_settings
from napari_stm.core.engine import PropagationConfig, Propagator
from napari_stm.core.errors import CheckpointError, InputError
from napari_stm.core.frames import check_labels
from napari_stm.core.model import VOSNetwork
from napari_stm.core.weights import (
    MICROSCOPY_MODEL,
    available_models,
    default_model_name,
    get_spec,
    load_model,
)
from napari_stm.napari import _ledger as ledger_mod
from napari_stm.napari._gl_compat import import_triton_safely
from napari_stm.napari._ledger import FrameInfo, Overwrite, RunPlan, State
from napari_stm.napari._sequence import LayerFrames, SequenceView, make_view
from napari_stm.napari._strip import UNSURE_BELOW, ConfidenceStrip, Scores

if TYPE_CHECKING:
    import napari

logger = logging.getLogger(__name__)

WHOLE = "whole stack"
FROM_CURRENT = "from current frame"
START_STOP = "start..stop"
AUTO_DEVICE = "auto"
#: the model choice that follows `propagate`'s rule (core/weights/registry.py)
AUTO_MODEL = "auto"
MODEL_SIZE = "model default"
#: "work at" choices -> PropagationConfig.max_side
WORKING_SIZES: dict[str, int | None] = {
    MODEL_SIZE: None,
    "full size": 0,
    **{f"{n} px": n for n in (256, 384, 512, 768, 1024, 2048)},
}


def device_choices() -> list[str]:
    import torch

    choices = [AUTO_DEVICE, "cpu"]
    if torch.cuda.is_available():
        choices.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        choices.append("mps")
    return choices


@dataclass
class Job:
    """Everything a run needs, captured on the main thread before the worker starts."""

    labels_layer: Labels
    view: SequenceView
    frames: LayerFrames
    references: dict[int, np.ndarray]
    plan: RunPlan
    direction: Direction
    config: PropagationConfig
    model_key: tuple[str, str, str]
    run_id: str
    #: content hash of each frame to write, as planned: a frame that differs when its result
    #: arrives was painted during the run and is left alone
    planned_hash: dict[int, str]
    total: int
    #: the engine of the run, kept for "where from" questions about its frames and for the
    #: next run; set before the run when the widget's kept engine fits (:class:`Kept`)
    propagator: Propagator | None = None
    #: what the kept engine must match to be used again
    engine_key: tuple = ()


@dataclass
class Kept:
    """The engine of the last run, used again by the next one when nothing but references
    changed: it keeps the forward side's memory on reaching each reference, so a correction
    recomputes only the frames it affects and they come out as a fresh run from every
    reference would give them (core/propagator.py, ``Propagator.affected``)."""

    #: (image layer, labels layer, sequence, model, settings) it was made for
    key: tuple
    propagator: Propagator
    #: the image data it reads: a layer whose data was replaced is another video
    data: Any


@dataclass
class UndoRecord:
    """The frames one run changed, as they were before it, and the ledger before it."""

    layer: weakref.ReferenceType
    ledger_before: dict
    #: key -> (labels index, frame before the run)
    before: dict[str, tuple[tuple[int, ...], np.ndarray]] = field(default_factory=dict)
    #: key -> hash of what the run wrote (a frame changed since is not restored)
    written: dict[str, str] = field(default_factory=dict)


class PropagateWidget(Container):
    """Propagate the objects painted on some frames of a Labels layer to the other frames."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True)
        self._viewer = viewer
        self._image = create_widget(annotation=Image, label="image")
        self._labels_layer = create_widget(annotation=Labels, label="labels")
        self._channel = SpinBox(
            label="channel",
            min=0,
            max=0,
            visible=False,
            tooltip="The image has this axis and the labels layer does not: frames are read "
            "at this index of it.",
        )
        self._along_z = CheckBox(
            text="treat 3D stack as a sequence along z",
            tooltip="Propagate through z (the axis before Y, X) at the current time point, "
            "for volume annotation, instead of through time at the current z.",
        )
        models = available_models()
        self._model = ComboBox(
            label="model",
            choices=[AUTO_MODEL, *models],
            value=AUTO_MODEL,
            tooltip="\n".join(
                [
                    f"{AUTO_MODEL}: {MICROSCOPY_MODEL} for single-channel or 16-bit images "
                    f"(microscopy), {default_model_name()} for 8-bit colour",
                    *(f"{k}: {v}" for k, v in models.items()),
                ]
            ),
        )
        self._weights = LineEdit(
            label="weights",
            tooltip="Checkpoint path or http(s) URL (append #sha256=<hex> to pin a download). "
            "Empty: the model's own weights. stm-resnet50 needs the official STM_weights.pth.",
        )
        self._device = ComboBox(label="device", choices=device_choices(), value=AUTO_DEVICE)
        self._direction = ComboBox(
            label="direction", choices=["both", "forward", "backward"], value="both"
        )
        self._range = ComboBox(label="frames", choices=[WHOLE, FROM_CURRENT, START_STOP])
        self._start = SpinBox(label="start", min=0, max=0, visible=False)
        self._stop = SpinBox(label="stop", min=0, max=0, visible=False)
        self._mem_every = SpinBox(
            label="memory every",
            value=PropagationConfig.mem_every,
            min=1,
            max=1000,
            tooltip="Keep a predicted frame in memory every N frames.",
        )
        self._max_memory = SpinBox(
            label="memory cap",
            value=PropagationConfig.max_memory,
            min=2,
            max=1000,
            tooltip="Most frames the memory holds (the previous frame and two painted frames "
            "included; each further painted frame adds one): bounds time and memory per frame "
            "on long stacks.",
        )
        self._working_size = ComboBox(
            label="work at",
            choices=list(WORKING_SIZES),
            value=MODEL_SIZE,
            tooltip="Longer side the frames are resized to while propagating (masks come back "
            "full size). 'model default': the size the model works best at (stm-lite: 576; "
            "stm-lite-cells: 512 or less, chosen from the painted cells). "
            "Larger sizes follow small objects in large frames better, at more time.",
        )
        self._overwrite = ComboBox(
            label="overwrite",
            choices=[o.value for o in Overwrite],
            value=Overwrite.OUTDATED.value,
            tooltip="Painted frames are never overwritten. 'outdated predictions' are earlier "
            "results next to a painted frame that changed since (or made with other settings).",
        )
        self._run_button = PushButton(text="Propagate")
        self._cancel_button = PushButton(text="Cancel", enabled=False)
        self._undo_button = PushButton(text="Undo last run", enabled=False)
        self._status = Label(value="")
        self._progress = ProgressBar(value=0, min=0, max=1, visible=False, label="")
        self._eta = Label(value="", visible=False)
        self._next_button = PushButton(
            text="Next frame to correct (U)",
            tooltip="Show the frame worth correcting next: the least sure (mean confidence of "
            "its objects) of the frames at least 2 frames from every painted frame, as "
            "`napari-stm bench annotate --pickers tool` picks it. Nothing while no object "
            "is below 0.5 confidence or lost.",
        )
        self._unsure_text = Label(value="", visible=False)
        self._where_from = CheckBox(
            text="where from: click a pixel of a propagated frame",
            tooltip="Shows which memory frames the pixel's memory read looked at, and where, "
            "as layers ('where from' heat maps, the pixel as a point).",
        )
        self._where_text = Label(value="", visible=False)
        for line in (self._unsure_text, self._where_text):
            # Wrapped: a long line (ten lost objects) would widen the dock over the canvas.
            line.native.setWordWrap(True)
            line.native.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self._strip = ConfidenceStrip()
        self._scores: dict[str, Scores] = {}
        buttons = Container(
            widgets=[self._run_button, self._cancel_button, self._undo_button],
            layout="horizontal",
            labels=False,
        )
        self.extend(
            [
                self._image,
                self._labels_layer,
                self._channel,
                self._along_z,
                self._model,
                self._weights,
                self._device,
                self._direction,
                self._range,
                self._start,
                self._stop,
                self._mem_every,
                self._max_memory,
                self._working_size,
                self._overwrite,
                buttons,
                self._progress,
                self._eta,
                self._status,
                self._next_button,
                self._unsure_text,
                self._where_from,
                self._where_text,
            ]
        )
        # The strip is a plain Qt widget under the magicgui fields.
        self.native.layout().addWidget(self._strip)
        self._strip.frame_clicked.connect(self._show_frame)
        self._next_button.changed.connect(self.next_unsure)
        viewer.bind_key("u", lambda _viewer: self.next_unsure(), overwrite=True)
        viewer.mouse_drag_callbacks.append(self._on_click)
        self._run_button.changed.connect(self.run)
        self._cancel_button.changed.connect(self.cancel)
        self._undo_button.changed.connect(self.undo)
        self._range.changed.connect(self._on_range)
        for w in (self._image, self._labels_layer, self._along_z):
            w.changed.connect(self._update_layout)

        self._models: dict[tuple[str, str, str], VOSNetwork] = {}
        self._model_lock = threading.Lock()
        self._cancel = threading.Event()
        self._worker: Any = None
        self._job: Job | None = None
        self._pbar: progress | None = None
        self._undo: UndoRecord | None = None
        self._pending_undo: UndoRecord | None = None
        self._done = 0
        self._started = 0.0
        #: (sequence, engine, view) of the last run, which "where from" asks
        self._engine: tuple[str, Propagator, SequenceView] | None = None
        self._kept: Kept | None = None
        self._explaining: Any = None
        self._error: str | None = None
        self._inbox: deque[tuple] = deque()
        self._draining = False
        self._finish_pending = False
        #: frames the last run wrote, and those left alone because a person painted them mid-run
        self.last_written: list[int] = []
        self.last_skipped: list[int] = []
        self.last_explanation: Any = None
        #: set when the dock widget's Qt side is gone (viewer closed): a run still going must
        #: not touch a deleted button when it ends
        self._closed = False
        self._watched: Labels | None = None
        self._status_context: str | None = None
        # Classifying a stack hashes every frame: once per pause in painting, not per dab.
        self._status_timer = QTimer(self.native)
        self._status_timer.setSingleShot(True)
        self._status_timer.setInterval(200)
        self._status_timer.timeout.connect(lambda: self._closed or self._update_status())
        viewer.dims.events.current_step.connect(self._on_step)
        viewer.layers.events.removed.connect(self._on_layer_removed)
        self._labels_layer.changed.connect(self._watch_labels)
        self.native.destroyed.connect(self._on_destroyed)
        self.reset_choices()
        self._watch_labels(self._labels_layer.value)
        self._update_layout()

    # -- public API (buttons, tests) ----------------------------------------------------------
    @property
    def worker(self) -> Any:
        """The running worker, or None."""
        return self._worker

    @property
    def running(self) -> bool:
        return self._worker is not None

    def run(self) -> Any:
        """Start a propagation run; returns its worker, or None when nothing was started."""
        if self.running:
            show_warning("napari-stm: a propagation is already running")
            return None
        try:
            job = self._prepare()
        except InputError as e:
            show_error(f"napari-stm: {e}")
            return None
        if job is None:
            return None
        self._start_job(job)
        return self._worker

    def cancel(self) -> None:
        """Stop after the frame being computed; frames written so far stay (whole frames)."""
        if self.running:
            self._cancel.set()
            self._cancel_button.enabled = False
            self._status.value = "cancelling..."

    def undo(self) -> None:
        """Put back the labels as they were before the last run."""
        rec = self._undo
        if rec is None or self.running:
            return
        layer = rec.layer()
        if layer is None:
            show_error("napari-stm: the labels layer of the last run no longer exists")
            self._set_undo(None)
            return
        changed_since = []
        for key, (idx, old) in rec.before.items():
            if ledger_mod.frame_hash(layer.data[idx]) != rec.written.get(key):
                changed_since.append(key)
                continue
            layer.data[idx] = old
        layer.metadata[ledger_mod.METADATA_KEY] = ledger_mod.snapshot(rec.ledger_before)
        layer.refresh()
        self._set_undo(None)
        if changed_since:
            show_warning(
                f"napari-stm: {len(changed_since)} frame(s) painted after the run were kept "
                f"as they are: {', '.join(changed_since)}"
            )
        self._update_status()

    def _shown_view(self) -> tuple[Image, Labels, SequenceView] | None:
        """(image layer, labels layer, sequence view) chosen now, or None after showing the
        user why there is none."""
        try:
            image, labels = self._layers()
            return image, labels, self._view(image, labels)
        except InputError as e:
            show_error(f"napari-stm: {e}")
            return None

    def next_unsure(self) -> int | None:
        """Move the viewer to the frame to correct next: the one `bench annotate --pickers
        tool` would correct (:meth:`Scores.to_correct`); returns it, or None when no computed
        frame is unsure. The widget says where it went and which objects made it unsure."""
        shown = self._shown_view()
        if shown is None:
            return None
        _, _, view = shown
        scores = self._scores.get(view.context_key())
        t = None if scores is None else scores.to_correct()
        if t is None:
            # In the widget, not only as a notification: a toast is gone in seconds.
            self._unsure_text.value = (
                "no unsure frame: no computed object is below 0.5 confidence or lost"
                if scores and scores.confidence
                else "no unsure frame yet: propagate first, the confidence comes with the results"
            )
            self._unsure_text.visible = True
            show_info(f"napari-stm: {self._unsure_text.value}")
            return None
        self._show_frame(t)
        self._unsure_text.value = _why_unsure(t, scores)
        self._unsure_text.visible = True
        return t

    def _show_frame(self, t: int) -> None:
        image = self._image.value
        if image is None:
            return
        try:
            view = self._view(*self._layers())
        except InputError:
            return
        axis = self._viewer.dims.ndim - image.ndim + view.seq_axis
        self._viewer.dims.set_current_step(axis, int(t))

    # -- where from ---------------------------------------------------------------------------
    def _on_click(self, viewer: Any, event: Any) -> None:
        if not self._where_from.value or event.type != "mouse_press" or self._closed:
            return
        shown = self._shown_view()
        if shown is None:
            return
        image, _, view = shown
        pos = [float(p) for p in image.world_to_data(event.position)]
        t = int(round(pos[view.seq_axis]))
        y, x = int(np.floor(pos[-2] + 0.5)), int(np.floor(pos[-1] + 0.5))
        self.explain(t, y, x)

    def explain(self, t: int, y: int, x: int) -> Any:
        """Ask the last run's engine where pixel (y, x) of frame ``t`` read its memory; the
        answer arrives as layers. Returns the worker, or None when nothing was asked."""
        shown = self._shown_view()
        if shown is None:
            return None
        image, labels, view = shown
        if self.running:
            # The run's engine is the one asked (kept between runs): not while it computes.
            show_error("napari-stm: where from: wait until the run has finished")
            return None
        engine = self._engine
        if engine is None or engine[0] != view.context_key():
            show_error("napari-stm: where from: propagate this sequence first")
            return None
        _, prop, run_view = engine

        @thread_worker
        def ask() -> Any:
            return prop.explain(t, y, x)

        worker = ask()
        worker.returned.connect(lambda e: self._show_explanation(e, run_view, labels))
        worker.errored.connect(lambda e: show_error(f"napari-stm: where from: {e}"))
        worker.finished.connect(self._explained)
        self._explaining = worker
        worker.start()
        return worker

    def _explained(self) -> None:
        self._explaining = None

    def _show_explanation(self, exp: Any, view: SequenceView, labels: Labels) -> None:
        if self._closed:
            return
        # np.zeros: pages never written stay unallocated, so a long stack costs only the
        # frames that were read.
        heat = np.zeros(view.labels_shape, np.float32)
        for f, m in zip(exp.frames, exp.heatmaps, strict=True):
            heat[view.labels_index(f)] = m
        top = float(heat.max()) or 1.0
        name = "where from: read weights"
        if name in self._viewer.layers:
            layer = self._viewer.layers[name]
            layer.data = heat
            layer.contrast_limits = (0.0, top)
        else:
            layer = self._viewer.add_image(
                heat,
                name=name,
                colormap="inferno",
                blending="additive",
                opacity=0.8,
                contrast_limits=(0.0, top),
                scale=labels.scale,
                translate=labels.translate,
            )
        # The cross on every frame read too: the viewer moves to the strongest one, and the
        # heat map means something only next to the spot that asked.
        points = np.array(
            [[*view.labels_index(f), exp.y, exp.x] for f in (exp.t, *exp.frames)], float
        )
        pname = "where from: pixel"
        if pname in self._viewer.layers:
            self._viewer.layers[pname].data = points
        else:
            self._viewer.add_points(
                points,
                name=pname,
                symbol="cross",
                size=7,
                face_color="cyan",
                border_color="black",
                scale=labels.scale,
                translate=labels.translate,
            )
        self._viewer.layers.selection.active = labels
        order = np.argsort(exp.weights)[::-1]
        parts = [f"frame {exp.frames[i]} {100 * float(exp.weights[i]):.0f}%" for i in order[:6]]
        self._where_text.value = (
            f"pixel (y {exp.y}, x {exp.x}) of frame {exp.t} read:\n" + ", ".join(parts)
        )
        self._where_text.visible = True
        self.last_explanation = exp
        if len(order):
            self._show_frame(exp.frames[int(order[0])])

    # -- lifetime -----------------------------------------------------------------------------
    def _on_destroyed(self, *_: Any) -> None:
        self._closed = True
        self._cancel.set()
        self._watch_labels(None)
        with contextlib.suppress(TypeError, ValueError):
            self._viewer.dims.events.current_step.disconnect(self._on_step)
        with contextlib.suppress(TypeError, ValueError):
            self._viewer.layers.events.removed.disconnect(self._on_layer_removed)
        self._kept = None

    def _on_layer_removed(self, event: Any) -> None:
        # The kept engine holds the image's data: let it go with the layer.
        kept = self._kept
        if kept is not None and id(event.value) in kept.key[:2]:
            self._kept = None

    def _watch_labels(self, layer: Labels | None) -> None:
        """Follow painting on the chosen labels layer, so the status line stays true."""
        old = self._watched
        if old is not None:
            for event in (old.events.paint, old.events.data, old.events.labels_update):
                with contextlib.suppress(TypeError, ValueError):
                    event.disconnect(self._on_labels_changed)
        self._watched = layer if isinstance(layer, Labels) else None
        if self._watched is not None:
            self._watched.events.paint.connect(self._on_labels_changed)
            self._watched.events.data.connect(self._on_labels_changed)
            # Every brush dab: the status is recomputed once the painting pauses (timer).
            self._watched.events.labels_update.connect(self._on_labels_changed)

    def _on_labels_changed(self, *_: Any) -> None:
        if not self._closed and not self.running:
            self._status_timer.start()

    def _on_step(self, *_: Any) -> None:
        # A 4D stack's sequence depends on the other axis' position: the status follows it.
        if self._closed or self.running:
            return
        try:
            view = self._view(*self._layers())
        except InputError:
            return
        if view.context_key() != self._status_context:
            self._update_status()
        self._strip.set_current(self._current_frame(self._image.value, view))

    # -- preparing a run ----------------------------------------------------------------------
    def _layers(self) -> tuple[Image, Labels]:
        image, labels = self._image.value, self._labels_layer.value
        if image is None:
            raise InputError("choose an image layer (open an image or File > Open Sample)")
        if labels is None:
            raise InputError(
                "choose a labels layer: add one (the 'new labels layer' button) and paint the "
                "objects on at least one frame"
            )
        if labels.multiscale:
            raise InputError("multiscale labels layers are not supported: use a single array")
        if not isinstance(labels.data, np.ndarray):
            raise InputError(
                f"the labels layer holds a {type(labels.data).__name__}, not an in-memory "
                "numpy array: napari-stm writes its results into it (load it with np.asarray)"
            )
        return image, labels

    def _view(self, image: Image, labels: Labels) -> SequenceView:
        data = image.data[0] if image.multiscale else image.data
        position = image.world_to_data(self._viewer.dims.point)
        return make_view(
            data.shape,
            bool(image.rgb),
            labels.data.shape,
            along_z=bool(self._along_z.value),
            channel=int(self._channel.value),
            position=[float(p) for p in position],
        )

    def _current_frame(self, image: Image, view: SequenceView) -> int:
        position = image.world_to_data(self._viewer.dims.point)
        t = int(round(float(position[view.seq_axis])))
        return min(max(t, 0), view.n_frames - 1)

    def _frame_range(self, image: Image, view: SequenceView, direction: str) -> tuple[int, int]:
        """The ``[start, stop)`` frames the choice names (the spin boxes show first and last)."""
        n = view.n_frames
        if self._range.value == FROM_CURRENT:
            cur = self._current_frame(image, view)
            if direction == "forward":
                return cur, n
            if direction == "backward":
                return 0, cur + 1
            return 0, n
        if self._range.value == START_STOP:
            return int(self._start.value), int(self._stop.value) + 1
        return 0, n

    def _settings(self) -> tuple[str, str, str, PropagationConfig]:
        name = str(self._model.value)
        weights = str(self._weights.value or "").strip()
        device = str(self._device.value)
        config = PropagationConfig(
            mem_every=int(self._mem_every.value),
            max_memory=int(self._max_memory.value),
            max_side=WORKING_SIZES[str(self._working_size.value)],
            device=None if device == AUTO_DEVICE else device,
        )
        return name, weights, device, config

    def _prepare(self) -> Job | None:
        image, labels = self._layers()
        view = self._view(image, labels)
        direction: Direction = self._direction.value
        name, weights, device, config = self._settings()
        if name == AUTO_MODEL:
            name = default_model_name((1, 1, 3) if image.rgb else (1, 1), image.dtype)
        n = view.n_frames
        keys = [view.frame_key(t) for t in range(n)]
        frames = [labels.data[view.labels_index(t)] for t in range(n)]
        ledger = ledger_mod.get_ledger(labels.metadata)
        infos = ledger_mod.classify(frames, keys, ledger)
        if not any(f.state is State.PAINTED for f in infos):
            raise InputError(self._nothing_painted(labels, view))
        sig = ledger_mod.signature(
            model=name,
            weights=weights,
            direction=direction,
            context=view.context_key(),
            **algorithm_settings(config),
        )
        start, stop = self._frame_range(image, view, direction)
        data = image.data[0] if image.multiscale else image.data
        overwrite = Overwrite(self._overwrite.value)
        engine_key = (id(image), id(labels), view.context_key(), (name, weights, device), config)
        kept = self._kept_engine(engine_key, data)
        if kept is not None:
            painted = {t: frames[t] for t, f in enumerate(infos) if f.state is State.PAINTED}
            if not kept.set_references(painted) and overwrite is Overwrite.OUTDATED:
                # New object ids or another working size: the engine's every earlier result
                # is out of date, not only what the changed references reach.
                overwrite = Overwrite.ALL
        plan = ledger_mod.plan_run(infos, keys, ledger, direction, start, stop, overwrite, sig)
        if not plan.write:
            show_info(f"napari-stm: nothing to do in frames {start}..{stop - 1}: {_explain(plan)}")
            self._update_status(infos)
            return None
        for t in plan.references:
            # Any non-negative integer id: the engine keeps them (Cell Tracking Challenge ids
            # pass 255). Checked here so that a bad one is named before the model loads.
            check_labels(frames[t], view.frame_size, f"frame {t} of the labels layer")
        references = set(plan.references)

        before = ledger_mod.snapshot(ledger)
        ledger_mod.prune(ledger, keys, infos)
        run_id = ledger_mod.record_run(
            ledger, sig, {keys[t]: infos[t].hash for t in plan.references}
        )
        self._pending_undo = UndoRecord(weakref.ref(labels), before)
        return Job(
            labels_layer=labels,
            view=view,
            frames=LayerFrames(data, view),
            references={t: np.array(frames[t], copy=True) for t in plan.references},
            plan=plan,
            direction=direction,
            config=config,
            model_key=(name, weights, device),
            run_id=run_id,
            planned_hash={t: infos[t].hash for t in plan.write},
            total=sum(1 for a, b in plan.calls for t in range(a, b) if t not in references),
            propagator=kept,
            engine_key=engine_key,
        )

    def _kept_engine(self, key: tuple, data: Any) -> Propagator | None:
        """The last run's engine when it was made for these layers, sequence, model and
        settings and reads the same image data; otherwise it is dropped."""
        kept = self._kept
        if kept is None:
            return None
        if kept.key != key or kept.data is not data or self._explaining is not None:
            # (A "where from" question still being answered reads it: not changed under it.)
            self._kept = None
            return None
        return kept.propagator

    # -- running ------------------------------------------------------------------------------
    def _get_model(self, key: tuple[str, str, str]) -> VOSNetwork:
        # Called from the worker thread: loading can take seconds (or a download).
        with self._model_lock:
            if key not in self._models:
                name, weights, device = key
                self._models.clear()  # one model at a time: they can be large
                self._models[key] = load_model(
                    name, weights or None, None if device == AUTO_DEVICE else device
                )
            return self._models[key]

    def _start_job(self, job: Job) -> None:
        _import_model_code(job.model_key[0])
        self._job = job
        self._cancel = threading.Event()
        self._done = 0
        self._error = None
        self.last_written, self.last_skipped = [], []
        self._inbox.clear()
        self._finish_pending = False
        self._pbar = progress(total=job.total, desc="napari-stm: propagating")
        self._started = time.perf_counter()
        self._progress.max = max(job.total, 1)
        self._progress.value = 0
        self._progress.visible = self._eta.visible = True
        self._eta.value = f"0 of {job.total} frames"
        scores = self._scores.setdefault(job.view.context_key(), Scores(job.view.n_frames))
        scores.references = set(job.plan.references)
        scores.forget(set(job.plan.write))
        self._strip.set_scores(scores)
        worker = _propagate(self._get_model, job, self._cancel)
        worker.yielded.connect(self._on_yielded)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self._run_button.enabled = False
        self._undo_button.enabled = False
        self._cancel_button.enabled = True
        self._status.value = f"propagating {len(job.plan.write)} frame(s)..."
        self._unsure_text.visible = False  # it spoke of the frames this run recomputes
        worker.start()

    # napari's progress bar calls QApplication.processEvents() when it moves, so these slots can
    # be re-entered: the next result, or even `finished`, may arrive while one frame is being
    # handled. Results therefore go through a queue drained by one non-reentrant loop, and
    # `finished` waits until the queue is empty.
    def _on_yielded(self, item: tuple) -> None:
        self._inbox.append(item)
        if self._draining:
            return
        self._draining = True
        try:
            while self._inbox:
                self._handle(self._inbox.popleft())
        finally:
            self._draining = False
        if self._finish_pending:
            self._finish_pending = False
            self._finish()

    def _on_finished(self) -> None:
        if self._draining:
            self._finish_pending = True
        else:
            self._finish()

    def _handle(self, item: tuple) -> None:
        job = self._job
        if job is None or self._closed:
            return
        if item[0] == "error":
            self._error = item[1]
            return
        if item[0] == "engine":
            job.propagator = item[1]
            return
        _, t, result, confidence, flags = item
        self._write(job, t, result)
        if t in self.last_written:
            scores = self._scores[job.view.context_key()]
            scores.add(t, confidence, flags)
            self._strip.set_scores(scores)
        self._done += 1
        self._progress.value = min(self._done, self._progress.max)
        elapsed = time.perf_counter() - self._started
        left = elapsed / self._done * max(job.total - self._done, 0)
        self._eta.value = f"{self._done} of {job.total} frames, about {_duration(left)} left"
        if self._pbar is not None:
            self._pbar.update(1)

    def _write(self, job: Job, t: int, result: np.ndarray) -> None:
        if t not in job.planned_hash or t in self.last_written:
            return
        layer = job.labels_layer
        if getattr(layer.data, "shape", None) != job.view.labels_shape:
            # The layer's data was replaced during the run: its frames are not ours to write.
            self._error = "the labels layer's data changed shape during the run: stopped"
            self._cancel.set()
            return
        idx = job.view.labels_index(t)
        current = layer.data[idx]
        if ledger_mod.frame_hash(current) != job.planned_hash[t]:
            self.last_skipped.append(t)  # painted while the run was going: a person's frame
            return
        key = job.view.frame_key(t)
        rec = self._pending_undo
        if rec is not None and key not in rec.before:
            rec.before[key] = (idx, current.copy())
        layer.data[idx] = result
        written = ledger_mod.frame_hash(layer.data[idx])
        ledger_mod.record_write(ledger_mod.get_ledger(layer.metadata), key, written, job.run_id)
        if rec is not None:
            rec.written[key] = written
        self.last_written.append(t)
        if self._shows(layer, idx):
            layer.refresh()

    def _shows(self, layer: Labels, idx: tuple[int, ...]) -> bool:
        """Whether the frame at ``idx`` is on screen (re-slicing a big layer for a frame
        nobody sees would slow the run down); when unsure, yes."""
        dims = self._viewer.dims
        if dims.ndisplay != 2 or tuple(dims.displayed)[-2:] != (dims.ndim - 2, dims.ndim - 1):
            return True
        position = layer.world_to_data(dims.point)
        return all(int(round(float(p))) == i for p, i in zip(position, idx, strict=False))

    def _finish(self) -> None:
        job, self._job = self._job, None
        self._worker = None
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        if self._closed:
            # The viewer was closed during the run: its buttons are deleted C++ objects, and
            # touching one from this slot would abort Python.
            self._pending_undo = None
            return
        self._run_button.enabled = True
        self._cancel_button.enabled = False
        self._progress.visible = self._eta.visible = False
        if job is not None and job.propagator is not None:
            self._engine = (job.view.context_key(), job.propagator, job.view)
            # After an error the engine may be half-way through a pass: not kept.
            self._kept = (
                Kept(job.engine_key, job.propagator, job.frames.data)
                if self._error is None
                else None
            )
        if job is not None and self.last_written:
            job.labels_layer.refresh()  # the thumbnail and any frame not refreshed on the way
        rec, self._pending_undo = self._pending_undo, None
        if rec is not None and rec.before:
            self._set_undo(rec)
        else:
            self._set_undo(self._undo)
        if self._error is not None:
            show_error(f"napari-stm: {self._error}")
        elif job is not None:
            show_info(f"napari-stm: {self._summary(job)}")
        self._update_status()

    def _summary(self, job: Job) -> str:
        n = len(self.last_written)
        parts = [f"wrote {n} of {len(job.plan.write)} frame(s)"]
        if self._cancel.is_set():
            parts.append("cancelled (the frames written are complete)")
        if self.last_skipped:
            parts.append(f"left {len(self.last_skipped)} frame(s) painted during the run alone")
        if job.plan.unreachable:
            parts.append(
                f"{len(job.plan.unreachable)} frame(s) have no painted frame on the "
                f"{'left' if job.direction == 'forward' else 'right'} to start from"
            )
        return "; ".join(parts)

    def _set_undo(self, rec: UndoRecord | None) -> None:
        self._undo = rec
        self._undo_button.enabled = rec is not None and not self.running

    # -- layout and status --------------------------------------------------------------------
    def _on_range(self, value: str) -> None:
        self._start.visible = self._stop.visible = value == START_STOP

    def _update_layout(self, *_: Any) -> None:
        try:
            image, labels = self._layers()
            view = self._view(image, labels)
        except InputError:
            self._channel.visible = False
            self._status.value = ""
            return
        if view.channel_axis is not None:
            self._channel.max = view.image_shape[view.channel_axis] - 1
            self._channel.label = self._extra_axis_name(image, view.channel_axis)
            self._channel.visible = True
        else:
            self._channel.visible = False
        last = view.n_frames - 1
        self._start.max = self._stop.max = last
        if self._stop.value == 0:
            self._stop.value = last
        self._update_status()

    def _update_status(self, infos: list[FrameInfo] | None = None) -> None:
        if infos is None:
            try:
                image, labels = self._layers()
                view = self._view(image, labels)
            except InputError:
                return
            keys = [view.frame_key(t) for t in range(view.n_frames)]
            frames = (labels.data[view.labels_index(t)] for t in range(view.n_frames))
            infos = ledger_mod.classify(frames, keys, ledger_mod.get_ledger(labels.metadata))
            self._status_context = view.context_key()
            where = self._where(view)
            scores = self._scores.get(view.context_key()) or Scores(view.n_frames)
            # Frames painted since a run are references now; their old scores are void.
            now_painted = {t for t, f in enumerate(infos) if f.state is not State.PREDICTED}
            scores.forget(now_painted)
            scores.references = {t for t, f in enumerate(infos) if f.state is State.PAINTED}
            self._strip.set_scores(scores)
            self._strip.set_current(self._current_frame(image, view))
        else:
            where = ""
        painted = [t for t, f in enumerate(infos) if f.state is State.PAINTED]
        predicted = sum(f.state is State.PREDICTED for f in infos)
        empty = sum(f.state is State.EMPTY for f in infos)
        # "frame 0", not "frames: 0", which read as a count of none.
        shown = (
            "none yet: paint the objects on a frame"
            if not painted
            else f"frame{'s' if len(painted) > 1 else ''} {_short(painted)}"
        )
        self._status.value = (
            f"{where}painted: {shown}\npredicted {predicted}, empty {empty}, of {len(infos)} frames"
        )

    def _axis_names(self, layer: Image | Labels) -> list[str]:
        """The viewer's names of a layer's data axes (napari's default names are numbers)."""
        labels = list(self._viewer.dims.axis_labels)
        nd = layer.ndim
        names = labels[len(labels) - nd :] if len(labels) >= nd else [str(a) for a in range(nd)]
        return [n if not n.isdigit() else f"axis {n}" for n in names]

    def _extra_axis_name(self, image: Image, axis: int) -> str:
        """What to call the image axis the labels lack: only a named channel axis is one."""
        name = self._axis_names(image)[axis]
        return "channel" if name.lower() in ("c", "ch", "channel", "channels") else name

    def _where(self, view: SequenceView) -> str:
        """Which sequence of a 4D stack the status is about ("at z=1: ")."""
        image = self._image.value
        if not view.fixed or image is None:
            return ""
        names = self._axis_names(image)
        seq = names[view.seq_axis]
        fixed = ", ".join(f"{names[a]}={i}" for a, i in view.fixed)
        return f"along {seq} at {fixed}: "

    def _nothing_painted(self, labels: Labels, view: SequenceView) -> str:
        """No painted frame in this sequence: say where painted labels are, if anywhere."""
        data = labels.data
        lead = data.ndim - 2
        if lead == 0 or not np.any(data):
            return "no painted frame: paint the objects on at least one frame of the labels layer"
        where = self._where(view).removesuffix(": ")
        # Leading-axis positions of the labels layer that hold any label.
        found = np.argwhere(np.any(data, axis=(-2, -1)))
        names = self._axis_names(labels)
        shown = "; ".join(
            ", ".join(f"{names[a]}={int(i)}" for a, i in enumerate(pos)) for pos in found[:4]
        )
        more = f" and {len(found) - 4} more" if len(found) > 4 else ""
        return (
            f"no painted frame in this sequence ({where or 'the current one'}); the labels "
            f"layer has painted frames at {shown}{more}: move the viewer there"
            + ("" if self._along_z.value else " or tick 'treat 3D stack as a sequence along z'")
        )


def _import_model_code(name: str) -> None:
    """Import the network's modules on the main thread, Triton first (see _gl_compat), so
    the worker thread only builds the model."""
    import_triton_safely()
    try:
        factory = get_spec(name).factory
    except CheckpointError:
        return  # an unknown name: the worker reports it
    if isinstance(factory, str):
        try:
            importlib.import_module(factory.split(":")[0])
        except ImportError:
            return  # load_model names the missing module in its error


def _why_unsure(t: int, scores: Scores, limit: int = 4) -> str:
    """Where "next frame to correct" went and which objects made it unsure, least sure first;
    when none of them is below the bar (the picker takes the least sure frame on average, away
    from the painted ones), its least sure object."""
    lost = set(scores.lost(t))
    conf = {i: 0.0 for i in lost} | scores.confidence.get(t, {})
    unsure = sorted((i for i in conf if i in lost or conf[i] < UNSURE_BELOW), key=conf.get)
    parts = [f"object {i} {'lost' if i in lost else 'unsure'} ({conf[i]:.2f})" for i in unsure]
    if not parts:
        i = min(conf, key=conf.get)
        parts = [f"no object below {UNSURE_BELOW}, least sure object {i} ({conf[i]:.2f})"]
    parts[0] = parts[0].replace("(", "(confidence ", 1)
    more = f" and {len(parts) - limit} more" if len(parts) > limit else ""
    return f"frame {t}: {', '.join(parts[:limit])}{more}\ncorrect it, then Propagate again"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min"


def _short(frames: list[int], limit: int = 8) -> str:
    if not frames:
        return "none"
    shown = ", ".join(map(str, frames[:limit]))
    return shown + (f" ... ({len(frames)})" if len(frames) > limit else "")


def _explain(plan: RunPlan) -> str:
    if plan.unreachable:
        return f"no painted frame to propagate from towards frames {_short(plan.unreachable)}"
    if plan.kept:
        return (
            "every frame is painted or an up-to-date prediction (choose 'all predictions' "
            "under overwrite to recompute them)"
        )
    return "every frame is painted"


@thread_worker
def _propagate(
    get_model: Callable[[tuple[str, str, str]], VOSNetwork], job: Job, cancel: threading.Event
) -> Iterator[tuple]:
    """Runs in a worker thread: yields ("frame", t, labels) per computed frame, or
    ("error", message) and stops; never raises, so the GUI shows one clear message."""
    try:
        model = get_model(job.model_key)
        if cancel.is_set():
            return
        prop = job.propagator
        if prop is None:
            prop = Propagator(model, job.frames, job.config)
            prop.set_references(job.references)
        yield ("engine", prop)
        for start, stop in job.plan.calls:
            for res in prop.propagate(job.direction, start, stop, cancel=cancel):
                if not res.is_reference:
                    yield ("frame", res.t, res.labels, dict(res.confidence), dict(res.flags))
            if cancel.is_set():
                return
    except (InputError, CheckpointError) as e:
        yield ("error", str(e))
    except Exception as e:  # anything else is a bug: keep the traceback in the log
        logger.exception("napari-stm propagation failed")
        yield ("error", f"propagation failed: {type(e).__name__}: {e}")
