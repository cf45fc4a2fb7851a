"""Tracking sessions held by the function between CVAT calls.

CVAT signs the tracker's states and round-trips them through the browser, so a memory bank
cannot travel in the state: the state holds only an unguessable session id, and the session (a
:class:`~napari_stm.core.engine.Tracker` with its memory bank) stays here.

Two stores:

- :class:`MemorySessionStore` (default): live trackers in this process, with a time to live,
  a session count cap and a total byte cap (everything a tracker holds: ``memory_nbytes``).
  Nuclio runs one process per worker, so use it with ``numWorkers: 1``.
- :class:`RedisSessionStore` (when ``CVAT_FUNCTIONS_REDIS_HOST`` is set): sessions serialised
  into Redis (or kvrocks, as in CVAT's serverless setup), so any worker or replica can serve
  any call. Expiry is Redis's (``EX`` on every write); memory is the server's business.

Fairness. CVAT does not tell a function who calls it, so the sessions one request starts
(the shapes a person sent tracking together) form a *group*, the closest thing to a user the
function can see. When the in-process store is full, room is made from sessions unused for
``idle_grace`` (10 min; least recently used first), else from groups holding at least as
much as the group asking, else from the asking group itself: a request with many objects
cannot push out a person tracking one, and when its own objects do not fit it is refused
(507) rather than answered with states that are already dead. An evicted session's id is
remembered (bounded), so its next call says it was evicted, not "unknown".

Replays. Each session counts its steps and the state CVAT keeps carries the count, so a
state used twice (a replayed or duplicated request) is refused with 409. Each session has a
lock held while it steps (in Redis: ``SET NX PX`` with a token, through redis-py's ``Lock``,
expiring after the lock timeout), so two requests for one session at once cannot both step it.

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

import contextlib
import io
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from napari_stm.core.engine import PropagationConfig, Tracker
from napari_stm.core.model import VOSNetwork

#: bits of randomness in a session id (secrets.token_urlsafe(32): 256 bits)
SESSION_ID_BYTES = 32
#: bumped when the serialised layout changes; older sessions then read as expired
FORMAT_VERSION = 2
#: CVAT accepts a tracker state for 8 hours after it signed it
#: (cvat/apps/lambda_manager/views.py: TRACKER_STATE_MAX_AGE), so a session lives as long idle
DEFAULT_TTL = 8 * 3600.0
#: evicted ids remembered to say so on their next call
TOMBSTONES = 4096


class StoreUnavailable(RuntimeError):
    """The session store cannot be reached (Redis down, network split)."""


class SessionNotFound(KeyError):
    """The session id is unknown here, or the session expired or was evicted."""

    def __str__(self) -> str:  # KeyError quotes its argument; the message should read plainly
        return str(self.args[0]) if self.args else "unknown session"


class SessionBusy(RuntimeError):
    """Another request is stepping this session right now."""


@dataclass
class Session:
    """One tracked shape: its tracker and what the replies need to know about it."""

    tracker: Tracker
    shape_type: str
    #: image height, width the session started with
    size: tuple[int, int]
    #: the sessions one request started together (see the module's "Fairness")
    group: str = ""
    #: frames stepped so far; the state CVAT keeps carries it, to refuse replays
    step: int = 0
    #: a rectangle tracked in CVAT's bare-box protocol (answers are [xtl, ytl, xbr, ybr])
    bare: bool = False
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
        """Record a session changed by a step; SessionNotFound if it was evicted meanwhile."""
        ...

    def delete(self, session_id: str) -> None: ...

    def locked(self, session_ids: Sequence[str]) -> contextlib.AbstractContextManager:
        """Hold the lock of every session in ``session_ids``, or raise SessionBusy naming the
        first one another request holds."""
        ...


class MemorySessionStore:
    """Live sessions in this process: a TTL, a count cap and a byte cap. Room is made from
    idle sessions first, then from the groups at least as large as the one asking (see the
    module's "Fairness").

    ``clock`` (seconds, monotonic) is injectable so expiry can be tested without waiting.
    A session larger than the byte cap on its own is still kept (alone): refusing it would
    break a running annotation for a limit meant to protect against many sessions.
    """

    def __init__(
        self,
        max_sessions: int = 64,
        max_bytes: int = 4 << 30,
        ttl: float = DEFAULT_TTL,
        clock: Callable[[], float] = time.monotonic,
        idle_grace: float = 600.0,
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
        #: seconds unused after which a session may be evicted for anybody's request
        self.idle_grace = idle_grace
        self._clock = clock
        self._lock = threading.RLock()
        # id -> (session, last use, bytes at last save), least recently used first
        self._sessions: OrderedDict[str, tuple[Session, float, int]] = OrderedDict()
        self._busy: set[str] = set()
        # id -> why it is gone, for the error its next call gets
        self._gone: OrderedDict[str, str] = OrderedDict()

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
                raise SessionNotFound(self._why_gone(session_id))
            self._sessions[session_id] = (item[0], self._clock(), item[2])
            self._sessions.move_to_end(session_id)
            return item[0]

    def save(self, session_id: str, session: Session) -> None:
        with self._lock:
            if session_id not in self._sessions:
                # Evicted while it was stepping (other sessions grew): it is gone for good.
                raise SessionNotFound(self._why_gone(session_id))
            self._sessions[session_id] = (session, self._clock(), session.nbytes)
            self._sessions.move_to_end(session_id)
            self._evict(keep=session_id)

    def delete(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)

    @contextlib.contextmanager
    def locked(self, session_ids: Sequence[str]) -> Iterator[None]:
        with self._lock:
            for session_id in session_ids:
                if session_id in self._busy:
                    raise SessionBusy(session_id)
            self._busy.update(session_ids)
        try:
            yield
        finally:
            with self._lock:
                self._busy.difference_update(session_ids)

    def _why_gone(self, session_id: str) -> str:
        return self._gone.get(session_id) or _not_found(session_id)

    def _forget(self, session_id: str, why: str) -> None:
        del self._sessions[session_id]
        self._gone[session_id] = why
        while len(self._gone) > TOMBSTONES:
            self._gone.popitem(last=False)

    def _expire(self) -> None:
        cutoff = self._clock() - self.ttl
        for session_id, (_, last, _) in list(self._sessions.items()):
            if last <= cutoff:
                self._forget(
                    session_id,
                    f"tracking session {session_id[:8]}... expired after {self.ttl:.0f} s "
                    "unused; start tracking again from an annotated frame",
                )

    def _evict(self, keep: str) -> None:
        while True:
            sizes = [b for _, _, b in self._sessions.values()]
            full = len(self._sessions) > self.max_sessions
            if not full and sum(sizes) <= self.max_bytes:
                return
            victim = self._victim(keep, by_count=full)
            if victim is None:
                return
            what = "sessions" if full else "bytes of memory"
            cap = self.max_sessions if full else self.max_bytes
            self._forget(
                victim,
                f"tracking session {victim[:8]}... was evicted: the function holds at most {cap} "
                f"{what} for tracking, and this one was idle or its request held more; start "
                "tracking again from an annotated frame",
            )

    def _victim(self, keep: str, by_count: bool) -> str | None:
        """Who goes to make room for ``keep``: a session idle for ``idle_grace`` s (least
        recently used first); else one of a group at least as large as ``keep``'s (so a
        request cannot push out smaller users); else one of ``keep``'s own group."""
        now = self._clock()
        own = self._sessions[keep][0].group
        usage: dict[str, int] = {}
        for session, _, b in self._sessions.values():
            usage[session.group] = usage.get(session.group, 0) + (1 if by_count else b)
        others = [
            (k, session.group, last)
            for k, (session, last, _) in self._sessions.items()
            if k != keep
        ]  # least recently used first
        for k, _, last in others:
            if now - last >= self.idle_grace:
                return k
        for k, group, _ in others:
            if group != own and usage[group] >= usage[own]:
                return k
        return next((k for k, group, _ in others if group == own), None)


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
            "group": session.group,
            "step": int(session.step),
            "bare": bool(session.bare),
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
        group=obj["group"],
        step=int(obj["step"]),
        bare=bool(obj["bare"]),
        created=obj["created"],
    )


def _restore_tracker(model: VOSNetwork, config: PropagationConfig, state: dict) -> Tracker:
    tracker = new_tracker(model, config)
    tracker.load_state_dict(state)
    return tracker


class RedisSessionStore:
    """Sessions serialised into Redis under ``<prefix><id>``, expiring ``ttl`` s after last use.

    ``lock_timeout`` (s) bounds how long a session stays locked by a worker that died while
    stepping it; it should exceed the event timeout, so a live step is never overtaken.
    """

    def __init__(
        self,
        client: Any,
        model: VOSNetwork,
        config: PropagationConfig,
        ttl: float = DEFAULT_TTL,
        prefix: str = "napari-stm:tracker:",
        lock_timeout: float = 180.0,
    ) -> None:
        self.client = client
        self.model = model
        self.config = config
        self.ttl = max(1, int(ttl))
        self.prefix = prefix
        self.lock_timeout = lock_timeout

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        import redis

        try:
            return getattr(self.client, method)(*args, **kwargs)
        except redis.RedisError as e:
            raise StoreUnavailable(self._unavailable(e)) from None

    def _unavailable(self, e: Exception) -> str:
        where = self.client.connection_pool.connection_kwargs
        return (
            f"the session store (Redis at {where.get('host')}:{where.get('port')}) "
            f"is unavailable: {type(e).__name__}: {str(e)[:120]}"
        )

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
        # xx: only over an entry that is still there (it may have expired meanwhile).
        done = self._call(
            "set", self.prefix + session_id, dumps_session(session), ex=self.ttl, xx=True
        )
        if not done:
            raise SessionNotFound(_not_found(session_id))

    def delete(self, session_id: str) -> None:
        self._call("delete", self.prefix + session_id)

    @contextlib.contextmanager
    def locked(self, session_ids: Sequence[str]) -> Iterator[None]:
        import redis

        held = []
        try:
            for session_id in session_ids:
                lock = self.client.lock(
                    self.prefix + session_id + ":lock",
                    timeout=self.lock_timeout,
                    blocking=False,
                )
                try:
                    acquired = lock.acquire()
                except redis.RedisError as e:
                    raise StoreUnavailable(self._unavailable(e)) from None
                if not acquired:
                    raise SessionBusy(session_id)
                held.append(lock)
            yield
        finally:
            for lock in held:
                # Expired (the step outlived lock_timeout) or Redis gone: nothing to release.
                with contextlib.suppress(redis.RedisError):
                    lock.release()


@dataclass
class StoreSettings:
    """Session limits, from the environment of the function (``from_env``)."""

    ttl: float = DEFAULT_TTL
    max_sessions: int = 64
    max_bytes: int = 4 << 30
    redis_host: str | None = None
    redis_port: int = 6379
    redis_password: str | None = None
    redis_db: int = 0
    #: seconds a Redis command may take before the request fails with 503; well inside
    #: CVAT's 120 s invocation timeout and the function's event timeout
    redis_timeout: float = 5.0
    #: seconds a session stays locked by a worker that died while stepping it
    lock_timeout: float = 180.0

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
            redis_timeout=number("NAPARI_STM_REDIS_TIMEOUT", cls.redis_timeout, float),
            lock_timeout=number("NAPARI_STM_LOCK_TIMEOUT", cls.lock_timeout, float),
        )


def redis_client(settings: StoreSettings) -> Any:
    """A Redis client that fails fast: no retries, socket timeouts of ``redis_timeout``."""
    try:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry
    except ImportError:
        raise ImportError(
            "CVAT_FUNCTIONS_REDIS_HOST is set but the redis package is missing: "
            "pip install 'napari-stm[cvat]'"
        ) from None
    return redis.Redis(
        host=settings.redis_host,
        port=settings.redis_port,
        password=settings.redis_password,
        db=settings.redis_db,
        socket_connect_timeout=min(2.0, settings.redis_timeout),
        socket_timeout=settings.redis_timeout,
        # redis-py 6 retries 3 times with backoff by default: a hung server would hold the
        # request for minutes. One try, then 503.
        retry=Retry(NoBackoff(), 0),
    )


def make_store(
    settings: StoreSettings, model: VOSNetwork, config: PropagationConfig
) -> SessionStore:
    """Redis when a host is configured, else the in-process store."""
    if settings.redis_host:
        return RedisSessionStore(
            redis_client(settings),
            model,
            config,
            ttl=settings.ttl,
            lock_timeout=settings.lock_timeout,
        )
    return MemorySessionStore(
        max_sessions=settings.max_sessions, max_bytes=settings.max_bytes, ttl=settings.ttl
    )
