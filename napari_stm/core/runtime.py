"""A model prepared for a device: layout, compilation, precision, frames read ahead.

Everything here changes how fast the engine runs, never what it computes (up to float
rounding). :func:`prepare` does the preparation once per (model, device, options) and hands the
same :class:`Runtime` to every tracker, pass and CVAT session that asks again: the model's
weights are laid out channels-last and compiled once, not per session.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from napari_stm.core.config import RuntimeConfig
from napari_stm.core.model import MemoryEntry, QueryFeatures, VOSNetwork
from napari_stm.core.readout import MotionPrior, ObjectPriors

#: devices where ``RuntimeConfig.amp`` runs the networks under bfloat16 autocast and the bounded
#: memory is kept in float16. Not CPU: bfloat16 is 8-60x slower than float32 on CPUs without
#: native support (the tests add "cpu" to run the accelerator's arithmetic here).
AMP_DEVICES = frozenset({"cuda"})

#: where :func:`prepare` keeps a model's runtimes: on the model object, so that they (and the
#: compiled code, whose constants are the weights) live exactly as long as it
_CACHE_ATTR = "_napari_stm_runtimes"


def resolve_device(model: VOSNetwork, config: RuntimeConfig) -> torch.device:
    return torch.device(config.device) if config.device else model.device


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    if device.type in AMP_DEVICES and enabled:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def half_precision(device: torch.device, enabled: bool) -> bool:
    """Whether ``amp`` on ``device`` runs the networks in reduced precision."""
    return device.type in AMP_DEVICES and enabled


class Runtime:
    """The network as the engine calls it on one device: images in channels-last layout and
    the network compiled, when the options ask for them; ``precision()`` is the autocast
    context its calls run in. Made by :func:`prepare`."""

    def __init__(
        self, model: VOSNetwork, device: torch.device, channels_last: bool, compile: bool, amp: bool
    ) -> None:
        self.model = model
        self.device = device
        self.channels_last = channels_last
        self.compiled = compile
        self.amp = amp
        if channels_last:
            # The weights keep their values, only their layout changes (once per model).
            model.to(memory_format=torch.channels_last)
        calls = (model.encode_query, model.encode_memory, model.segment)
        if compile:
            # On CPU inductor's freezing folds batch norms into convolutions and prepacks their
            # weights: stm-lite's query encoder alone 80 against 117 ms at 480p, 2 threads (119
            # against 127 inside a pass). The weights become constants of the compiled code,
            # which is why it is kept per model object (loading weights makes a new one). Not
            # measured on CUDA, so not used there.
            options = {"freezing": True} if device.type == "cpu" else None
            compiled = tuple(torch.compile(f, options=options) for f in calls)
            calls = tuple(_or_eager(c, f) for c, f in zip(compiled, calls, strict=True))
        self._query, self._memory, self._segment = calls

    def precision(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.amp)

    def _layout(self, image: Tensor) -> Tensor:
        return image.contiguous(memory_format=torch.channels_last) if self.channels_last else image

    def encode_query(self, image: Tensor) -> QueryFeatures:
        return self._query(self._layout(image))

    def encode_memory(
        self, image: Tensor, masks: Tensor, query: QueryFeatures | None = None, groups: int = 1
    ) -> MemoryEntry:
        if groups > 1:
            return self._memory(self._layout(image), masks, query, groups=groups)
        return self._memory(self._layout(image), masks, query)

    def segment(
        self,
        query: QueryFeatures,
        keys: Tensor,
        values: Tensor,
        top_k: int | None,
        prior: MotionPrior | ObjectPriors | None,
        logits: bool = False,
    ) -> Tensor:
        if logits:
            return self._segment(query, keys, values, top_k, prior, logits=True)
        if prior is None:
            # Networks written before the motion prior take four arguments.
            return self._segment(query, keys, values, top_k)
        return self._segment(query, keys, values, top_k, prior)


def prepare(model: VOSNetwork, config: RuntimeConfig) -> Runtime:
    """``model`` prepared for ``config``'s device and options; the same object for the same
    model and options (the preparation runs once)."""
    device = resolve_device(model, config)
    cl = config.channels_last
    channels_last = device.type in ("cuda", "cpu") if cl is None else cl
    key = (str(device), channels_last, config.compile, config.amp)
    cache: dict[tuple, Runtime] | None = model.__dict__.get(_CACHE_ATTR)
    if cache is None:
        cache = {}
        object.__setattr__(model, _CACHE_ATTR, cache)
    runtime = cache.get(key)
    if runtime is None:
        runtime = cache[key] = Runtime(model, device, channels_last, config.compile, config.amp)
    return runtime


def _or_eager(compiled: Callable, eager: Callable) -> Callable:
    """``compiled``, or ``eager`` for good once compiling fails (on CPU inductor needs a C++
    compiler, which a laptop may lack): a slower run, not a failed one."""
    import torch._dynamo  # noqa: F401  (torch.compile loaded it; named for the except below)

    use = [compiled]

    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return use[0](*args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            if use[0] is eager:
                raise
            warnings.warn(
                f"torch.compile failed ({str(e).splitlines()[0][:200]}); running uncompiled",
                RuntimeWarning,
                stacklevel=2,
            )
            use[0] = eager
            return eager(*args, **kwargs)

    return call


# --------------------------------------------------------------------------- reading ahead


class Prefetcher:
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


class DirectReader:
    """What :class:`Prefetcher` does, without a thread (``prefetch=0``)."""

    def __init__(self, read: Callable[[int], Tensor]) -> None:
        self.get = read

    def close(self) -> None:
        pass


def frame_source(
    read: Callable[[int], Tensor], order: list[int], config: RuntimeConfig, device: torch.device
) -> Prefetcher | DirectReader:
    """Frames of ``order`` as a pass asks for them, read ahead when ``config.prefetch`` says."""
    depth = config.prefetch
    if depth is None:
        depth = 2 if device.type == "cuda" else 0
    if depth and len(order) > 1:
        return Prefetcher(read, order, depth)
    return DirectReader(read)
