"""Tracking sessions held by the function between CVAT calls.

CVAT signs the tracker's states and round-trips them through the browser, so a memory bank
cannot travel in the state: the state holds only an unguessable session id, and the session (a
:class:`~napari_stm.core.engine.Tracker` with its memory bank) stays here.

Two stores:

- :class:`MemorySessionStore` (default): live trackers in this process, least recently used
  first out, with a time to live, a session count cap and a total byte cap (the trackers'
  ``memory_nbytes``). Nuclio runs one process per worker, so use it with ``numWorkers: 1``.
- :class:`RedisSessionStore` (when ``CVAT_FUNCTIONS_REDIS_HOST`` is set): sessions serialised
  into Redis (or kvrocks, as in CVAT's serverless setup), so any worker or replica can serve
  any call. Expiry is Redis's (``EX`` on every write); memory is the server's business.

What a Redis session holds: the tracker's memory bank tensors themselves (``torch.save`` of
plain tensors, numbers and strings, read back with ``weights_only=True``), not the frames and
masks to rebuild it. Rebuilding would re-encode up to ``max_memory`` frames on every call
(several times the work of one step) and lose the confidence-gated choice of working-memory
frames; the tensors give the masks of an in-process session, at the cost of moving the bank (a
few MB for a large frame) per call. The frame waiting to be written into memory is written
before saving (the engine would write it at the start of the next read), so no query features
are stored; the one difference this makes: when the next call is a correction, the frame before
it stays in memory, where an in-process session would have dropped it.
"""

from __future__ import annotations

import io
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from napari_stm.core.engine import PropagationConfig, Tracker
from napari_stm.core.model import VOSNetwork

#: bits of randomness in a session id (secrets.token_urlsafe(32): 256 bits)
SESSION_ID_BYTES = 32
#: bumped when the serialised layout changes; older sessions then read as expired
FORMAT_VERSION = 1


class StoreUnavailable(RuntimeError):
    """The session store cannot be reached (Redis down, network split)."""


class SessionNotFound(KeyError):
    """The session id is unknown here, or the session expired or was evicted."""

    def __str__(self) -> str:  # KeyError quotes its argument; the message should read plainly
        return str(self.args[0]) if self.args else "unknown session"


@dataclass
class Session:
    """One tracked shape: its tracker and what the replies need to know about it."""

    tracker: Tracker
    shape_type: str
    #: image height, width the session started with
    size: tuple[int, int]
    created: float = field(default_factory=time.time)

    @property
    def nbytes(self) -> int:
        return int(self.tracker.memory_nbytes)


def new_session_id() -> str:
    return secrets.token_urlsafe(SESSION_ID_BYTES)


class SessionStore(Protocol):
    def add(self, session: Session) -> str:
        """Keep ``session``; return its new id."""
        ...

    def get(self, session_id: str) -> Session:
        """The session, or SessionNotFound."""
        ...

    def save(self, session_id: str, session: Session) -> None:
        """Record a session changed by a step."""
        ...

    def delete(self, session_id: str) -> None: ...


class MemorySessionStore:
    """Live sessions in this process: LRU with a TTL, a count cap and a byte cap.

    ``clock`` (seconds, monotonic) is injectable so expiry can be tested without waiting.
    A session larger than the byte cap on its own is still kept (alone): refusing it would
    break a running annotation for a limit meant to protect against many sessions.
    """

    def __init__(
        self,
        max_sessions: int = 64,
        max_bytes: int = 4 << 30,
        ttl: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be at least 1, got {max_sessions}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        if ttl <= 0:
            raise ValueError(f"ttl must be positive, got {ttl}")
        self.max_sessions = max_sessions
        self.max_bytes = max_bytes
        self.ttl = ttl
        self._clock = clock
        self._lock = threading.RLock()
        # id -> (session, last use, bytes at last save), least recently used first
        self._sessions: OrderedDict[str, tuple[Session, float, int]] = OrderedDict()

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._sessions)

    def __contains__(self, session_id: object) -> bool:
        with self._lock:
            self._expire()
            return session_id in self._sessions

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(b for _, _, b in self._sessions.values())

    def add(self, session: Session) -> str:
        session_id = new_session_id()
        with self._lock:
            self._expire()
            self._sessions[session_id] = (session, self._clock(), session.nbytes)
            self._evict(keep=session_id)
        return session_id

    def get(self, session_id: str) -> Session:
        with self._lock:
            self._expire()
            item = self._sessions.get(session_id)
            if item is None:
                raise SessionNotFound(_not_found(session_id))
            self._sessions[session_id] = (item[0], self._clock(), item[2])
            self._sessions.move_to_end(session_id)
            return item[0]

    def save(self, session_id: str, session: Session) -> None:
        with self._lock:
            if session_id not in self._sessions:
                # Evicted while it was stepping (other sessions grew): it is gone for good.
                raise SessionNotFound(_not_found(session_id))
            self._sessions[session_id] = (session, self._clock(), session.nbytes)
            self._sessions.move_to_end(session_id)
            self._evict(keep=session_id)

    def delete(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)

    def _expire(self) -> None:
        cutoff = self._clock() - self.ttl
        while self._sessions:
            oldest = next(iter(self._sessions))
            if self._sessions[oldest][1] > cutoff:
                break
            del self._sessions[oldest]

    def _evict(self, keep: str) -> None:
        def over() -> bool:
            total = sum(b for _, _, b in self._sessions.values())
            return len(self._sessions) > self.max_sessions or total > self.max_bytes

        while over():
            victim = next((k for k in self._sessions if k != keep), None)
            if victim is None:
                return
            del self._sessions[victim]


def _not_found(session_id: str) -> str:
    return (
        f"unknown or expired tracking session {session_id[:8]}...: sessions live "
        "in the function for a limited time (and may be evicted when many are open); start "
        "tracking again from an annotated frame"
    )


# --------------------------------------------------------------------------- serialisation


def new_tracker(model: VOSNetwork, config: PropagationConfig) -> Tracker:
    """A tracker for one CVAT shape: its object is known from the start, so the engine need not
    keep the frames it memorised (for adding objects later) next to the memory itself."""
    return Tracker(model, config, keep_sources=False)


def dumps_session(session: Session) -> bytes:
    buf = io.BytesIO()
    torch.save(
        {
            "version": FORMAT_VERSION,
            "tracker": session.tracker.state_dict(),
            "shape_type": session.shape_type,
            "size": list(session.size),
            "created": float(session.created),
        },
        buf,
    )
    return buf.getvalue()


def loads_session(data: bytes, model: VOSNetwork, config: PropagationConfig) -> Session:
    device = config.device or model.device
    obj = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    if obj.get("version") != FORMAT_VERSION:
        raise ValueError(f"session format {obj.get('version')!r}, expected {FORMAT_VERSION}")
    return Session(
        tracker=_restore_tracker(model, config, obj["tracker"]),
        shape_type=obj["shape_type"],
        size=tuple(obj["size"]),
        created=obj["created"],
    )


def _restore_tracker(model: VOSNetwork, config: PropagationConfig, state: dict) -> Tracker:
    tracker = new_tracker(model, config)
    tracker.load_state_dict(state)
    return tracker


class RedisSessionStore:
    """Sessions serialised into Redis under ``<prefix><id>``, expiring ``ttl`` s after last use."""

    def __init__(
        self,
        client: Any,
        model: VOSNetwork,
        config: PropagationConfig,
        ttl: float = 3600.0,
        prefix: str = "napari-stm:tracker:",
    ) -> None:
        self.client = client
        self.model = model
        self.config = config
        self.ttl = max(1, int(ttl))
        self.prefix = prefix

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        import redis

        try:
            return getattr(self.client, method)(*args, **kwargs)
        except redis.RedisError as e:
            where = self.client.connection_pool.connection_kwargs
            raise StoreUnavailable(
                f"the session store (Redis at {where.get('host')}:{where.get('port')}) "
                f"is unavailable: {e}"
            ) from None

    def add(self, session: Session) -> str:
        session_id = new_session_id()
        self._call("set", self.prefix + session_id, dumps_session(session), ex=self.ttl)
        return session_id

    def get(self, session_id: str) -> Session:
        data = self._call("get", self.prefix + session_id)
        if data is None:
            raise SessionNotFound(_not_found(session_id))
        try:
            return loads_session(data, self.model, self.config)
        except Exception:  # an older layout, another model, a damaged entry: unusable
            raise SessionNotFound(_not_found(session_id)) from None

    def save(self, session_id: str, session: Session) -> None:
        self._call("set", self.prefix + session_id, dumps_session(session), ex=self.ttl)

    def delete(self, session_id: str) -> None:
        self._call("delete", self.prefix + session_id)


@dataclass
class StoreSettings:
    """Session limits, from the environment of the function (``from_env``)."""

    ttl: float = 3600.0
    max_sessions: int = 64
    max_bytes: int = 4 << 30
    redis_host: str | None = None
    redis_port: int = 6379
    redis_password: str | None = None
    redis_db: int = 0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> StoreSettings:
        env = dict(os.environ if env is None else env)

        def number(name: str, default: float, kind: type = int) -> Any:
            raw = env.get(name)
            if raw is None or raw == "":
                return default
            try:
                return kind(raw)
            except ValueError:
                raise ValueError(f"{name}={raw!r} is not a valid {kind.__name__}") from None

        return cls(
            ttl=number("NAPARI_STM_SESSION_TTL", cls.ttl, float),
            max_sessions=number("NAPARI_STM_MAX_SESSIONS", cls.max_sessions),
            max_bytes=number("NAPARI_STM_SESSION_BYTES", cls.max_bytes),
            redis_host=env.get("CVAT_FUNCTIONS_REDIS_HOST") or None,
            redis_port=number("CVAT_FUNCTIONS_REDIS_PORT", cls.redis_port),
            redis_password=env.get("CVAT_FUNCTIONS_REDIS_PASSWORD") or None,
            redis_db=number("CVAT_FUNCTIONS_REDIS_DB", cls.redis_db),
        )


def make_store(
    settings: StoreSettings, model: VOSNetwork, config: PropagationConfig
) -> SessionStore:
    """Redis when a host is configured, else the in-process store."""
    if settings.redis_host:
        try:
            import redis
        except ImportError:
            raise ImportError(
                "CVAT_FUNCTIONS_REDIS_HOST is set but the redis package is missing: "
                "pip install 'napari-stm[cvat]'"
            ) from None

        client = redis.Redis(
            host=settings.redis_host,
            port=settings.redis_port,
            password=settings.redis_password,
            db=settings.redis_db,
            socket_connect_timeout=5,
            socket_timeout=30,
        )
        return RedisSessionStore(client, model, config, ttl=settings.ttl)
    return MemorySessionStore(
        max_sessions=settings.max_sessions, max_bytes=settings.max_bytes, ttl=settings.ttl
    )
