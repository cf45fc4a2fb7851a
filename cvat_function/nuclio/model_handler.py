"""CVAT's tracker protocol on top of the propagation engine.

CVAT (lambda manager, trackers declaring ``supported_shape_types``) sends

- to start: ``{"image": <base64>, "shapes": [{"type", "points", ...}, ...], "states": []}``
- for each next frame: ``{"image": <base64>, "shapes": [null, ...], "states": [<state>, ...]}``

and expects ``{"shapes": [...], "states": [...]}`` back, one entry per object in the same order.
A shape given together with a state is a correction: it becomes one more reference of that
session. A shape that cannot be found on a frame comes back as ``null`` (its session goes on).

A request is handled in three passes, so that a bad request changes nothing: (1) everything
the client sent is checked (:mod:`cvat_function.payload`, :mod:`cvat_function.shapes`, the
limits of :mod:`cvat_function.limits`); (2) the sessions it names are locked, looked up and
their step counts compared with the states'; (3) the engine runs and the sessions are saved.
Errors come back as ``(4xx, {"error": message})``.
"""

from __future__ import annotations

import logging
import os
import secrets
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np

from cvat_function import tracking
from cvat_function.limits import Limits
from cvat_function.payload import (
    BAD_REQUEST,
    CONFLICT,
    INTERNAL,
    NOT_FOUND,
    TOO_LARGE,
    UNAVAILABLE,
    UNPROCESSABLE,
    RequestError,
    decode_image,
    parse_body,
    parse_state,
    quote,
)
from cvat_function.sessions import (
    MemorySessionStore,
    Session,
    SessionBusy,
    SessionNotFound,
    SessionStore,
    StoreSettings,
    StoreUnavailable,
    make_store,
)
from cvat_function.shapes import TRACKER_TYPES, ShapeError, ShapeTooLarge
from napari_stm.core.engine import PropagationConfig, SharedFrame, flush_trackers
from napari_stm.core.errors import InputError
from napari_stm.core.model import VOSNetwork

#: version of the state layout this function hands to CVAT (2: the step count)
STATE_VERSION = 2
#: a request's sessions did not fit in the function's session memory
INSUFFICIENT_STORAGE = 507


@dataclass
class HandlerSettings:
    """What the function runs; each field has a ``NAPARI_STM_*`` environment variable."""

    model: str | None = None  # NAPARI_STM_MODEL; None: default_model_name()
    weights: str | None = None  # NAPARI_STM_WEIGHTS: checkpoint path or URL
    device: str | None = None  # NAPARI_STM_DEVICE: "cpu", "cuda"; None: CUDA when present
    max_side: int | None = None  # NAPARI_STM_MAX_SIDE: work at most this many pixels a side

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> HandlerSettings:
        env = dict(os.environ if env is None else env)
        max_side = env.get("NAPARI_STM_MAX_SIDE") or None
        if max_side is not None and not max_side.isdigit():
            raise ValueError(f"NAPARI_STM_MAX_SIDE={max_side!r} is not a number of pixels")
        return cls(
            model=env.get("NAPARI_STM_MODEL") or None,
            weights=env.get("NAPARI_STM_WEIGHTS") or None,
            device=env.get("NAPARI_STM_DEVICE") or None,
            max_side=int(max_side) if max_side else None,
        )


@dataclass
class _Op:
    """One object of a request, checked and ready to run."""

    kind: str  # "start", "correct" or "track"
    shape_type: str
    session_id: str | None = None
    step: int | None = None  # the step count the client's state carries
    session: Session | None = None
    mask: np.ndarray | None = None
    shape: dict | list | None = None
    #: a rectangle given as a bare [xtl, ytl, xbr, ybr] (CVAT's rectangle tracker protocol)
    bare: bool = False


class ModelHandler:
    """Owns the model and the sessions; turns CVAT tracker requests into Tracker steps."""

    def __init__(
        self,
        model: VOSNetwork,
        config: PropagationConfig | None = None,
        store: SessionStore | None = None,
        logger: Any = None,
        limits: Limits | None = None,
    ) -> None:
        self.model = model
        self.config = config or PropagationConfig()
        self.store = store if store is not None else make_store(StoreSettings(), model, self.config)
        self.logger = logger or logging.getLogger(__name__)
        self.limits = limits or Limits()
        #: encode each frame once for all of a request's objects (off: once per object, as
        #: before; kept for benchmarks/cvat_objects.py's comparison)
        self.share_query = True

    @classmethod
    def from_env(cls, logger: Any = None) -> ModelHandler:
        """Load the model named by the environment once (``init_context`` calls this)."""
        from napari_stm.core.weights import default_model_name, load_model

        settings = HandlerSettings.from_env()
        name = settings.model or default_model_name()
        model = load_model(name, weights=settings.weights, device=settings.device)
        config = PropagationConfig(max_side=settings.max_side)
        store = make_store(StoreSettings.from_env(), model, config)
        if logger is not None:
            logger.info(
                f"napari-stm tracker: model {name} on {model.device}, {type(store).__name__}"
            )
        return cls(model, config, store, logger, Limits.from_env())

    # -- entry point ------------------------------------------------------------------------
    def handle(self, body: Any) -> tuple[int, dict]:
        """(status, JSON-able reply) for a request body (bytes, str or already-parsed JSON)."""
        try:
            return 200, self.infer(parse_body(body, self.limits))
        except RequestError as e:
            return e.status, {"error": e.message}
        except StoreUnavailable as e:
            self.logger.error(str(e))
            return UNAVAILABLE, {"error": str(e)}
        except Exception as e:  # a bug must not take the worker and its sessions down
            self.logger.error(f"tracker failed: {traceback.format_exc()}")
            message = f"internal error while tracking: {type(e).__name__}: {e}"
            return INTERNAL, {"error": message[:300]}

    def infer(self, payload: dict) -> dict:
        shapes = _list_field(payload, "shapes")
        states = _list_field(payload, "states")
        n = max(len(shapes), len(states))
        if n == 0:
            raise RequestError(BAD_REQUEST, "nothing to track: 'shapes' and 'states' are empty")
        if n > self.limits.max_objects:
            raise RequestError(
                TOO_LARGE,
                f"{n} objects in one request, over the limit of {self.limits.max_objects}",
            )
        image = decode_image(payload.get("image"), self.limits)
        size = image.shape[:2]
        ops = [self._parse(shapes, states, i, size) for i in range(n)]
        ids = [op.session_id for op in ops if op.session_id is not None]
        if len(set(ids)) != len(ids):
            raise RequestError(BAD_REQUEST, "the same session appears twice in one request")
        try:
            with self.store.locked(ids):
                for i, op in enumerate(ops):
                    self._attach(op, size, i)
                return self._run(ops, image)
        except SessionBusy as e:
            i = ids.index(e.args[0])
            raise RequestError(
                CONFLICT,
                f"object {i}: another request is stepping this tracking session right now "
                "(a duplicated request)",
            ) from None

    # -- pass 1: what the client sent -------------------------------------------------------
    def _parse(self, shapes: list, states: list, i: int, size: tuple[int, int]) -> _Op:
        shape = shapes[i] if i < len(shapes) else None
        state = states[i] if i < len(states) else None
        if shape is None and state is None:
            raise RequestError(BAD_REQUEST, f"object {i}: neither a shape nor a state")
        session_id, step = (None, None) if state is None else parse_state(state, i)
        if state is not None and step is None:
            raise RequestError(
                BAD_REQUEST, f"object {i}: malformed state: no 'step' (a state of an older version)"
            )
        if _is_box(shape):
            # CVAT's rectangle trackers (the ones CVAT Community's UI offers) get a bare
            # [xtl, ytl, xbr, ybr] and answer one; with a state, the box is the last answer
            # sent back (as CVAT's own TransT reads it), not a correction.
            if session_id is not None:
                return _Op("track", "", session_id, step)
            shape = {"type": "rectangle", "points": shape, "bare": True}
        if shape is None:
            return _Op("track", "", session_id, step)
        if not isinstance(shape, dict):
            raise RequestError(
                BAD_REQUEST,
                f"object {i}: a shape must be an object with 'type' and 'points', "
                f"got {type(shape).__name__}",
            )
        shape_type = shape.get("type")
        if shape_type not in TRACKER_TYPES:
            raise RequestError(
                UNPROCESSABLE,
                f"object {i}: unsupported shape type {quote(shape_type)}; this tracker follows "
                f"{', '.join(TRACKER_TYPES)} shapes",
            )
        if "points" not in shape:
            raise RequestError(BAD_REQUEST, f"object {i}: the {shape_type} has no 'points'")
        if shape_type == "rectangle" and shape.get("rotation") not in (None, 0, 0.0):
            raise RequestError(UNPROCESSABLE, f"object {i}: rotated rectangles are not tracked")
        try:
            mask = tracking.reference_mask(
                shape_type, shape["points"], size, self.limits.max_polygon_vertices
            )
        except ShapeTooLarge as e:
            raise RequestError(TOO_LARGE, f"object {i}: {e}") from None
        except ShapeError as e:
            raise RequestError(BAD_REQUEST, f"object {i}: {e}") from None
        bare = shape.get("bare") is True and shape_type == "rectangle"
        reply = shape["points"] if bare else {"type": shape_type, "points": shape["points"]}
        kind = "start" if session_id is None else "correct"
        return _Op(kind, shape_type, session_id, step, mask=mask, shape=reply, bare=bare)

    # -- pass 2: the sessions it names --------------------------------------------------------
    def _attach(self, op: _Op, size: tuple[int, int], i: int) -> None:
        if op.session_id is None:
            return
        try:
            session = self.store.get(op.session_id)
        except SessionNotFound as e:
            if op.kind == "correct":  # the shape alone is enough to start over
                op.kind, op.session_id = "start", None
                return
            raise RequestError(NOT_FOUND, f"object {i}: {e}") from None
        if op.step != session.step:
            raise RequestError(
                CONFLICT,
                f"object {i}: this state is of step {op.step} of its tracking session, which "
                f"is at step {session.step}: a replayed or duplicated request",
            )
        if tuple(session.size) != tuple(size):
            raise RequestError(
                CONFLICT,
                f"object {i}: image size changed inside a session: the image is "
                f"{size[1]}x{size[0]}, the session started on a {session.size[1]}x"
                f"{session.size[0]} image",
            )
        if op.kind == "correct" and session.shape_type != op.shape_type:
            raise RequestError(
                UNPROCESSABLE,
                f"object {i}: a {op.shape_type} given for a session that tracks a "
                f"{session.shape_type}",
            )
        op.session = session
        op.shape_type = session.shape_type
        op.bare = session.bare

    # -- pass 3: the engine -------------------------------------------------------------------
    def _run(self, ops: list[_Op], image: np.ndarray) -> dict:
        group = secrets.token_hex(8)
        # One conversion and query encoding of the frame for all the request's trackers.
        frame = SharedFrame(image)
        created: list[str] = []
        saved: list[str] = []
        shapes: list[dict | list | None] = [None] * len(ops)
        try:
            for i, op in enumerate(ops):
                if op.kind == "track":
                    continue
                assert op.mask is not None
                mask = _engine(tracking.object_mask, image, op.shape_type, op.mask)
                if op.kind == "start":
                    tracker = _engine(tracking.start, self.model, self.config, frame, mask)
                    op.session = Session(
                        tracker, op.shape_type, tuple(image.shape[:2]), group, bare=op.bare
                    )
                    op.session_id = self.store.add(op.session)
                    created.append(op.session_id)
                else:
                    assert op.session is not None
                    _engine(tracking.remember, op.session.tracker, frame, mask)
                shapes[i] = op.shape
            followed = [i for i, op in enumerate(ops) if op.kind == "track"]
            trackers = [ops[i].session.tracker for i in followed]
            masks = _engine(tracking.follow, trackers, frame, self.share_query)
            for i, mask in zip(followed, masks, strict=True):
                shape = tracking.shape_out(ops[i].shape_type, mask)
                shapes[i] = shape["points"] if shape is not None and ops[i].bare else shape
            if not isinstance(self.store, MemorySessionStore):
                # Saving writes each tracker's memory (state_dict): the frame they all just
                # memorise is encoded for all of them in one call first.
                _engine(flush_trackers, trackers)
            for op in ops:
                if op.kind != "start":
                    assert op.session is not None and op.session_id is not None
                    op.session.step += 1
                    self.store.save(op.session_id, op.session)
                    saved.append(op.session_id)
            # Adding later sessions may have evicted earlier ones of this same request (its
            # group held the most memory): its states would be dead on arrival.
            store = self.store
            evicts = isinstance(store, MemorySessionStore)
            lost = [i for i, op in enumerate(ops) if evicts and op.session_id not in store]
            if lost:
                raise RequestError(
                    INSUFFICIENT_STORAGE,
                    f"the {len(ops)} objects of this request do not fit in the function's "
                    f"session memory (object {lost[0]} was evicted); track fewer at once",
                )
        except SessionNotFound as e:
            self._drop(created)
            raise RequestError(NOT_FOUND, str(e)) from None
        except BaseException:
            # Sessions this request started are not known to CVAT: do not leave them behind.
            self._drop(created)
            raise
        return {"shapes": shapes, "states": [make_state(op.session_id, op.session) for op in ops]}

    def _drop(self, session_ids: list[str]) -> None:
        for session_id in session_ids:
            try:
                self.store.delete(session_id)
            except StoreUnavailable:
                pass  # they expire with the TTL


def _engine(fn: Any, *args: Any) -> Any:
    """Run an engine call; what the engine refuses about the input is the client's error."""
    try:
        return fn(*args)
    except InputError as e:
        raise RequestError(BAD_REQUEST, str(e)) from None


def _is_box(shape: Any) -> bool:
    return isinstance(shape, list) and len(shape) == 4


def make_state(session_id: str, session: Session) -> dict:
    """What CVAT keeps between calls: the session id, its step and a few facts, never memory."""
    h, w = session.size
    return {
        "v": STATE_VERSION,
        "session": session_id,
        "step": session.step,
        "type": session.shape_type,
        "width": w,
        "height": h,
    }


def _list_field(payload: dict, name: str) -> list:
    value = payload.get(name)
    if value is None:
        return []
    if not isinstance(value, list):
        raise RequestError(BAD_REQUEST, f"'{name}' must be a list, got {type(value).__name__}")
    return value


__all__ = [
    "HandlerSettings",
    "ModelHandler",
    "RequestError",
    "decode_image",
    "make_state",
    "parse_body",
]
