"""One step: encode the query frame, read the memory, decode, aggregate the objects.

The tracker (CVAT sessions, napari and CLI passes through the propagator) and training call this
same function; what differs between them is a parameter: where the memory comes from (a
memory bank read under a policy, or a training clip's frames so far), whether the network's
logits are wanted (training differentiates the aggregation in log space) and which objects are
active yet. What the frame is memorised with is the caller's policy
(:meth:`napari_stm.core.policy.MemoryPolicy.memorised`); :attr:`StepOutput.objects` is the
step's own answer to it.

The output keeps the query features and the read's attention inputs, so a caller can reuse
them: memorising the frame with its own query features (networks whose memory keys are their
query keys skip a second encoder pass), or asking the read again where a pixel's answer came
from.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from napari_stm.core.model import QueryFeatures
from napari_stm.core.readout import (
    MotionPrior,
    ObjectPriors,
    aggregate_probs,
    one_object_probs,
    soft_aggregate,
)

#: From this many objects in one network call a frame takes the engine's many-object shortcuts:
#: the aggregation straight to probabilities (:func:`~napari_stm.core.readout.aggregate_probs`),
#: labels resized only along object boundaries and only around the objects
#: (:func:`~napari_stm.core.frames.labels_window`) and the motion centres from one maximum over
#: objects. Each equals the plain arithmetic to float rounding; below this count the plain
#: arithmetic runs, bit for bit (it costs little there). The objects of trackers stepped in one
#: call (``groups``) count together: 100 one-object trackers cost what 100 objects cost.
MANY_OBJECTS = 8


class StepNetwork(Protocol):
    """What a step calls: a :class:`~napari_stm.core.runtime.Runtime`, or a network itself."""

    def encode_query(self, image: Tensor) -> QueryFeatures: ...

    def segment(
        self, query: QueryFeatures, keys: Tensor, values: Tensor, *args: Any, **kwargs: Any
    ) -> Tensor: ...


@dataclass
class Read:
    """The attention inputs of one memory read (``VOSNetwork.segment``'s memory arguments)."""

    #: [Nk, Ck, M] (or [B, Ck, M] batched): every memory frame's keys, flattened, concatenated
    keys: Tensor
    #: [N, Cv, M] (or [B, N, Cv, M])
    values: Tensor
    top_k: int | None = None
    #: an :class:`ObjectPriors` when trackers of different motion read in one call
    prior: MotionPrior | ObjectPriors | None = None
    #: the frame of each memory frame, in the order of ``keys`` (None: not tracked)
    times: list[int] | None = None
    #: the bank's entry number of each memory frame (``MemoryBank.entries``; None: unknown)
    entries: tuple[int, ...] | None = None


@dataclass
class StepOutput:
    """What one step computed for a frame."""

    #: class logits [(B,) 1 + N + extra, H, W] after soft aggregation (background first); None
    #: when not formed (inference with :data:`MANY_OBJECTS` or more objects)
    logits: Tensor | None
    #: class probabilities [(B,) 1 + N, H, W]: the softmax of ``logits`` over its real classes
    probs: Tensor
    query: QueryFeatures
    read: Read
    _top: tuple[Tensor, Tensor] | None = field(default=None, repr=False)
    #: whether the step took the :data:`MANY_OBJECTS` shortcuts (its users take them too)
    many_objects: bool = False
    #: what the users of :meth:`top` derive from it, when computed for the trackers of one
    #: call at once: the objects' box in the unpadded frame
    #: (:func:`~napari_stm.core.frames.foreground_box`) and their won pixels' count and centres
    #: (:func:`~napari_stm.core.motion.won_centres`)
    box: tuple[slice, slice] | None = None
    centres: tuple[Tensor, Tensor] | None = None
    #: :meth:`top`'s class indices alone, when computed for the trackers of one call at once:
    #: their users need the values only inside ``box`` (the confidence), where they are formed
    won: Tensor | None = None

    def top(self) -> tuple[Tensor, Tensor]:
        """The most probable class at each pixel: (its probability, its index) [(B,) H, W].

        Computed once and shared by the frame's users (labels, confidence, motion, the read
        record): over 101 maps one maximum is 80 ms of a 480p frame on CPU.
        """
        if self._top is None:
            self._top = class_max(self.probs)
        return self._top

    @property
    def objects(self) -> Tensor:
        """Object probabilities [(B,) N, H, W]: what the frame is memorised with by default."""
        return self.probs[..., 1:, :, :].contiguous()


def class_max(probs: Tensor) -> tuple[Tensor, Tensor]:
    """``probs.max(dim=-3)``'s values and indices (the first of equal maxima). Two classes
    (one-object trackers' background and object) are compared directly: on CPU a maximum
    over a dimension of two took 300 ms over 96 such 480p maps, the comparison 33 ms; their
    indices are then uint8 (int64 cost another 90 ms a 100-object frame in page faults)."""
    if probs.shape[-3] == 2:
        background, obj = probs[..., 0, :, :], probs[..., 1, :, :]
        return torch.maximum(background, obj), class_won(probs)
    top = probs.max(dim=-3)
    return top.values, top.indices


def class_won(probs: Tensor) -> Tensor:
    """:func:`class_max`'s indices alone (the same dtype), without a map of its values."""
    if probs.shape[-3] == 2:
        return (probs[..., 1, :, :] > probs[..., 0, :, :]).to(torch.uint8)
    return probs.max(dim=-3).indices


def step(
    net: StepNetwork,
    image: Tensor | None,
    memory: Callable[[QueryFeatures], Read],
    *,
    query: QueryFeatures | None = None,
    active: Tensor | None = None,
    extra_slots: int = 0,
    logits: bool = False,
    precision: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    groups: int = 1,
) -> StepOutput:
    """Segment one frame (or a batch of frames) from memory.

    ``image`` [B, 3, H, W] is encoded unless its ``query`` features are given. ``memory`` gives
    the read for these query features (a motion prior depends on their grid). ``active`` [N]
    bool zeroes the objects not tracked yet (probabilities only). ``extra_slots`` empty object
    slots take part in the aggregation's softmax. The network calls run inside ``precision()``
    (an autocast context); the aggregation in float32 after them.

    ``groups`` > 1: the read's objects are the objects of that many trackers side by side,
    equally many each (:func:`napari_stm.core.tracker.step_trackers`): one network call, and
    each tracker's objects aggregated on their own, probabilities [groups, 1 + N / groups, H, W].
    """
    with precision():
        if query is None:
            assert image is not None, "a step needs an image or its query features"
            query = net.encode_query(image)
        read = memory(query)
        # Many one-object trackers (a CVAT request): probabilities straight from the logits.
        direct = (
            not logits
            and groups >= MANY_OBJECTS
            and read.values.shape[-3] == groups
            and not extra_slots
            and (active is None or bool(active.all()))
            and getattr(getattr(net, "model", net), "segments_logits", False)
        )
        # The memory goes in as stored: the read converts it (readout.memory_read).
        if logits or direct:
            obj = net.segment(query, read.keys, read.values, read.top_k, read.prior, logits=True)
        else:
            obj = net.segment(query, read.keys, read.values, read.top_k, read.prior)
    obj = obj.float()
    if direct:
        probs = one_object_probs(obj.unflatten(-3, (groups, 1)))
        return StepOutput(None, probs, query, read, many_objects=True)
    n = obj.shape[-3]
    if active is not None:
        assert not logits, "inactive objects are zeroed as probabilities, not logits"
        # All active (the usual case): skipping the product changes no bit and saves a pass.
        if not bool(active.all()):
            obj = obj * active.to(obj.device, torch.float32)[:, None, None]
    many = n >= MANY_OBJECTS and not logits
    if groups > 1:
        assert image is None or image.shape[0] == 1, "groups of objects on one frame only"
        obj = obj.unflatten(-3, (groups, n // groups))
        n //= groups
    if many:
        return StepOutput(None, aggregate_probs(obj, extra_slots), query, read, many_objects=True)
    agg = soft_aggregate(obj, extra_slots=extra_slots, logits=logits)
    probs = torch.softmax(agg, dim=-3)[..., : n + 1, :, :]
    return StepOutput(agg, probs, query, read)
