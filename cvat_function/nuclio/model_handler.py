"""CVAT's tracker protocol on top of the propagation engine.

CVAT (lambda manager, trackers declaring ``supported_shape_types``) sends

- to start: ``{"image": <base64>, "shapes": [{"type", "points", ...}, ...], "states": []}``
- for each next frame: ``{"image": <base64>, "shapes": [null, ...], "states": [<state>, ...]}``

and expects ``{"shapes": [...], "states": [...]}`` back, one entry per object in the same order.
A shape given together with a state is a correction: it becomes one more reference of that
session. A shape that cannot be found on a frame comes back as ``null`` (its session goes on).

Every request is checked completely before any session changes, so a bad request changes
nothing; errors come back as ``(4xx, {"error": message})``.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import os
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image

from cvat_function.sessions import (
    Session,
    SessionNotFound,
    SessionStore,
    StoreSettings,
    StoreUnavailable,
    make_store,
    new_tracker,
)
from cvat_function.shapes import SUPPORTED_TYPES, ShapeError, mask_from_shape, shape_points
from napari_stm.core.engine import PropagationConfig, Tracker
from napari_stm.core.errors import InputError
from napari_stm.core.model import VOSNetwork

#: object id of the one object a session follows
OBJECT_ID = 1
#: version of the state layout this function hands to CVAT
STATE_VERSION = 1

BAD_REQUEST = 400
NOT_FOUND = 404
CONFLICT = 409
UNPROCESSABLE = 422
INTERNAL = 500
UNAVAILABLE = 503


class RequestError(Exception):
    """A request the function cannot serve; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


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
    session_id: str | None = None
    session: Session | None = None
    shape_type: str | None = None
    mask: np.ndarray | None = None
    shape: dict | None = None


class ModelHandler:
    """Owns the model and the sessions; turns CVAT tracker requests into Tracker steps."""

    def __init__(
        self,
        model: VOSNetwork,
        config: PropagationConfig | None = None,
        store: SessionStore | None = None,
        logger: Any = None,
    ) -> None:
        self.model = model
        self.config = config or PropagationConfig()
        self.store = store if store is not None else make_store(StoreSettings(), model, self.config)
        self.logger = logger or logging.getLogger(__name__)

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
        return cls(model, config, store, logger)

    # -- entry point ------------------------------------------------------------------------
    def handle(self, body: Any) -> tuple[int, dict]:
        """(status, JSON-able reply) for a request body (bytes, str or already-parsed JSON)."""
        try:
            return 200, self.infer(parse_body(body))
        except RequestError as e:
            return e.status, {"error": e.message}
        except StoreUnavailable as e:
            self.logger.error(str(e))
            return UNAVAILABLE, {"error": str(e)}
        except Exception as e:  # a bug must not take the worker and its sessions down
            self.logger.error(f"tracker failed: {traceback.format_exc()}")
            return INTERNAL, {"error": f"internal error while tracking: {type(e).__name__}: {e}"}

    def infer(self, payload: dict) -> dict:
        image = decode_image(payload.get("image"))
        ops = self._check(payload, image.shape[:2])
        created: list[str] = []
        shapes: list[dict | None] = []
        states: list[dict] = []
        try:
            for op in ops:
                shape, state = self._run(op, image, created)
                shapes.append(shape)
                states.append(state)
        except Exception:
            # Sessions this request started are not known to CVAT: do not leave them behind.
            for session_id in created:
                self.store.delete(session_id)
            raise
        return {"shapes": shapes, "states": states}

    # -- checking ---------------------------------------------------------------------------
    def _check(self, payload: dict, size: tuple[int, int]) -> list[_Op]:
        shapes = _list_field(payload, "shapes")
        states = _list_field(payload, "states")
        n = max(len(shapes), len(states))
        if n == 0:
            raise RequestError(BAD_REQUEST, "nothing to track: 'shapes' and 'states' are empty")
        ops = []
        seen: set[str] = set()
        for i in range(n):
            shape = shapes[i] if i < len(shapes) else None
            state = states[i] if i < len(states) else None
            if shape is None and state is None:
                raise RequestError(BAD_REQUEST, f"object {i}: neither a shape nor a state")
            session_id = None if state is None else _state_session_id(state, i)
            if session_id is not None:
                if session_id in seen:
                    raise RequestError(BAD_REQUEST, f"object {i}: the same session appears twice")
                seen.add(session_id)
            if shape is not None:
                ops.append(self._check_shape(shape, session_id, size, i))
            else:
                assert session_id is not None
                session = self._session(session_id, size, i)
                ops.append(_Op("track", session_id, session, session.shape_type))
        return ops

    def _check_shape(
        self, shape: Any, session_id: str | None, size: tuple[int, int], i: int
    ) -> _Op:
        if not isinstance(shape, dict):
            raise RequestError(
                BAD_REQUEST,
                f"object {i}: a shape must be an object with 'type' and 'points', "
                f"got {type(shape).__name__}",
            )
        shape_type = shape.get("type")
        if shape_type not in SUPPORTED_TYPES:
            raise RequestError(
                UNPROCESSABLE,
                f"object {i}: unsupported shape type {shape_type!r}; this tracker follows "
                f"{' and '.join(SUPPORTED_TYPES)} shapes",
            )
        if "points" not in shape:
            raise RequestError(BAD_REQUEST, f"object {i}: the {shape_type} has no 'points'")
        try:
            mask = mask_from_shape(shape_type, shape["points"], *size)
        except ShapeError as e:
            raise RequestError(BAD_REQUEST, f"object {i}: {e}") from None
        reply = {"type": shape_type, "points": shape["points"]}
        if session_id is None:
            return _Op("start", shape_type=shape_type, mask=mask, shape=reply)
        try:
            session = self._session(session_id, size, i)
        except RequestError as e:
            if e.status != NOT_FOUND:
                raise
            # The shape alone is enough to start over.
            return _Op("start", shape_type=shape_type, mask=mask, shape=reply)
        if session.shape_type != shape_type:
            raise RequestError(
                UNPROCESSABLE,
                f"object {i}: a {shape_type} given for a session that tracks a "
                f"{session.shape_type}",
            )
        return _Op("correct", session_id, session, shape_type, mask, reply)

    def _session(self, session_id: str, size: tuple[int, int], i: int) -> Session:
        try:
            session = self.store.get(session_id)
        except SessionNotFound as e:
            raise RequestError(NOT_FOUND, f"object {i}: {e}") from None
        if tuple(session.size) != tuple(size):
            raise RequestError(
                CONFLICT,
                f"object {i}: image size changed inside a session: the image is "
                f"{size[1]}x{size[0]}, the session started on a {session.size[1]}x"
                f"{session.size[0]} image",
            )
        return session

    # -- running ----------------------------------------------------------------------------
    def _run(self, op: _Op, image: np.ndarray, created: list[str]) -> tuple[dict | None, dict]:
        if op.kind == "start":
            assert op.mask is not None and op.shape_type is not None
            tracker = new_tracker(self.model, self.config)
            _step(tracker, image, op.mask)
            session = Session(tracker, op.shape_type, tuple(image.shape[:2]))
            session_id = self.store.add(session)
            created.append(session_id)
            return op.shape, make_state(session_id, session)
        assert op.session is not None and op.session_id is not None
        if op.kind == "correct":
            _step(op.session.tracker, image, op.mask)
            shape = op.shape
        else:
            labels = _step(op.session.tracker, image, None)
            points = shape_points(op.session.shape_type, labels == OBJECT_ID)
            shape = None if points is None else {"type": op.session.shape_type, "points": points}
        try:
            self.store.save(op.session_id, op.session)
        except SessionNotFound as e:
            raise RequestError(NOT_FOUND, str(e)) from None
        return shape, make_state(op.session_id, op.session)


def _step(tracker: Tracker, image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    labels = None if mask is None else mask.astype(np.uint8) * OBJECT_ID
    try:
        out, _ = tracker.step(image, labels)
    except InputError as e:
        raise RequestError(BAD_REQUEST, str(e)) from None
    return out


def make_state(session_id: str, session: Session) -> dict:
    """What CVAT keeps between calls: the session id and a few facts about it, never memory."""
    h, w = session.size
    return {
        "v": STATE_VERSION,
        "session": session_id,
        "type": session.shape_type,
        "width": w,
        "height": h,
    }


def _state_session_id(state: Any, i: int) -> str:
    if not isinstance(state, dict) or not isinstance(state.get("session"), str):
        raise RequestError(
            BAD_REQUEST,
            f"object {i}: malformed state: expected the object this function returned "
            "(with a 'session' id)",
        )
    return state["session"]


def _list_field(payload: dict, name: str) -> list:
    value = payload.get(name)
    if value is None:
        return []
    if not isinstance(value, list):
        raise RequestError(BAD_REQUEST, f"'{name}' must be a list, got {type(value).__name__}")
    return value


def parse_body(body: Any) -> dict:
    """The request as a dict; nuclio hands over bytes, text or an already-parsed object."""
    import json

    if isinstance(body, (bytes, bytearray)):
        try:
            body = body.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(
                BAD_REQUEST, "the request body is not JSON (not UTF-8 text)"
            ) from None
    if isinstance(body, str):
        if not body.strip():
            raise RequestError(BAD_REQUEST, "the request body is empty; expected a JSON object")
        try:
            body = json.loads(body)
        except json.JSONDecodeError as e:
            raise RequestError(BAD_REQUEST, f"the request body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise RequestError(
            BAD_REQUEST,
            f"the request body must be a JSON object with 'image', 'shapes' and 'states', "
            f"got {type(body).__name__}",
        )
    return body


def decode_image(data: Any) -> np.ndarray:
    """A base64 (or data: URL) encoded image -> H x W x 3 uint8 RGB."""
    if data is None:
        raise RequestError(BAD_REQUEST, "missing 'image': expected a base64-encoded frame")
    if not isinstance(data, str) or not data:
        raise RequestError(BAD_REQUEST, "'image' must be a non-empty base64 string")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(BAD_REQUEST, "'image' is not valid base64") from None
    try:
        with PIL.Image.open(io.BytesIO(raw)) as im:
            rgb = np.asarray(im.convert("RGB"))
    except PIL.UnidentifiedImageError:
        raise RequestError(
            BAD_REQUEST, "'image' cannot be decoded as an image (no image format recognised)"
        ) from None
    except PIL.Image.DecompressionBombError as e:
        raise RequestError(BAD_REQUEST, f"'image' is too large: {e}") from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt files
        raise RequestError(BAD_REQUEST, f"'image' is a damaged image file: {e}") from None
    return rgb


__all__ = [
    "HandlerSettings",
    "ModelHandler",
    "RequestError",
    "decode_image",
    "make_state",
    "parse_body",
]
