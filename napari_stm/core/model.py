"""The contract between the propagation engine and every segmentation network.

A network is a pure function of tensors. The engine owns all policy: which frames are memory,
how objects are aggregated, padding and resizing. Images given to a network are float32
[B, 3, H, W] RGB in [0, 1], with H and W multiples of ``pad_multiple``.

The engine guarantees these shapes, so a network that receives others was called wrongly: every
network raises ``ValueError`` (a shape) or ``TypeError`` (features from another network) then,
never :class:`~napari_stm.core.errors.InputError`, which is for what a user gave.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from napari_stm.core.readout import MotionPrior, ObjectPriors


@dataclass
class QueryFeatures:
    """What a network computes once per frame and shares between all objects.

    ``key`` is [1, Ck, h, w]; ``value`` the query's own value embedding or None; ``skips`` the
    higher-resolution features the decoder needs; ``extra`` any other per-frame tensors (e.g.
    backbone features the memory encoder can reuse).
    """

    key: Tensor
    value: Tensor | None = None
    skips: tuple[Tensor, ...] = ()
    extra: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class MemoryEntry:
    """One memorised frame.

    ``keys`` is [Nk, Ck, h, w] with Nk == 1 when keys do not depend on the masks (shared by all
    objects) or Nk == N when they do (the official STM memory encoder sees the mask);
    ``values`` is [N, Cv, h, w], one value map per object.
    """

    keys: Tensor
    values: Tensor


class VOSNetwork(nn.Module):
    """Base class of the networks the engine drives."""

    #: name in the model registry
    name: str = ""
    #: frames are padded to a multiple of this
    pad_multiple: int = 16
    #: top-k used by default in the memory read (None = dense softmax over all memory)
    default_top_k: int | None = None
    #: whether the engine gives the memory read its measured motion prior by default
    motion_prior: bool = False
    #: longer side frames are resized to at most by default (None: full resolution): the scale
    #: the network was trained at
    working_side: int | None = None
    #: median object diameter (pixels of the network's input) the network was trained to see;
    #: when set and no max_side is configured, frames whose reference objects are larger are
    #: shrunk so they land there (core/frames.py: fit_side). None: working_side alone
    object_side: int | None = None
    #: whether :meth:`encode_memory` reuses the frame's query features when it is given them
    #: (its memory keys are its query keys): trackers sharing a frame then hand them over
    memory_from_query: bool = False
    #: whether :meth:`segment` takes a :class:`~napari_stm.core.readout.ObjectPriors` (each
    #: object its own motion prior, one frame): trackers whose measured motion differs then
    #: read in one call
    object_priors: bool = False
    #: whether :meth:`segment` also takes ``logits=True`` (each object's logit instead of its
    #: probability; what training differentiates): many one-object trackers stepped together
    #: then form their probabilities straight from the logits
    #: (:func:`~napari_stm.core.readout.one_object_probs`)
    segments_logits: bool = False

    def encode_query(self, image: Tensor) -> QueryFeatures:
        """Encode a query frame [1, 3, H, W]."""
        raise NotImplementedError

    def encode_memory(
        self, image: Tensor, masks: Tensor, query: QueryFeatures | None = None, groups: int = 1
    ) -> MemoryEntry:
        """Encode a frame [1, 3, H, W] with per-object probabilities ``masks`` [N, H, W].

        ``query`` is that frame's own query features when the engine already computed them,
        so networks whose memory keys equal their query keys can skip the work.
        ``groups`` > 1: the objects of that many independent trackers side by side, equally
        many each (the trackers of one CVAT request): an object's "other objects" are those
        of its own group only. Keys are then per object ([N, ...]) or shared ([1, ...]).
        """
        raise NotImplementedError

    def segment(
        self,
        query: QueryFeatures,
        mem_keys: Tensor,
        mem_values: Tensor,
        top_k: int | None = None,
        prior: MotionPrior | ObjectPriors | None = None,
    ) -> Tensor:
        """Per-object foreground probabilities [N, H, W] of the query frame.

        ``mem_keys`` is [Nk, Ck, M] and ``mem_values`` [N, Cv, M]: every memory frame's entries
        flattened and concatenated along M = sum over frames of h * w. ``prior`` is the engine's
        motion prior (:func:`napari_stm.core.readout.motion_prior`), handed on to the memory
        read; an :class:`~napari_stm.core.readout.ObjectPriors` only where
        :attr:`object_priors`.
        """
        raise NotImplementedError

    def read_query(self, query: QueryFeatures) -> tuple[Tensor, float | None]:
        """The query key [1, Ck, h*w] and scale its memory read uses (None: 1 / sqrt(Ck)), for
        the where-from view (:func:`napari_stm.core.readout.read_weights`)."""
        return query.key.flatten(2), None

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
