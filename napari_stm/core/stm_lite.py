"""``stm-lite``: the STM design on an ImageNet EfficientNet-Lite0, small enough for a laptop CPU.

What differs from the paper's ResNet-50 STM, and why:

- One image encoder (Lite0 up to stride 16) serves query and memory frames. Keys come from its
  stride-16 features plus its stride-8 features pooled to stride 16 (STCN-style key sharing): a
  frame's memory key *is* its query key, so memorising a segmented frame costs no second pass
  through the image encoder and keys never depend on (possibly wrong) masks.
- Keys are unit vectors and the affinity is their cosine times a learned scale: the negative
  squared L2 distance of STCN on the unit sphere (``-|q - k|^2 = 2 q.k - 2``), so no memory
  key wins by its norm alone. The scale is bounded (at most :data:`MAX_SCALE`), which keeps the
  spread of affinities under 80: softmax weights then never fall into float32's denormal range,
  where CPU arithmetic runs 10-20x slower (unbounded L2 affinities did exactly that).
- A light value encoder: a few strided convolutions over the frame and the two masks (this object,
  the other objects), fused with the Lite0 stride-8 and stride-16 features. The last value channel
  is the object's coverage of each stride-16 cell, so the read-out carries a matched soft mask.
  Values are stored already multiplied by the decoder's first (1x1, linear) convolution, 129
  channels instead of 256: the read, which dominates a frame, moves half the data for the same
  result.
- The decoder is STM's (refinement modules with stride-8 and stride-4 skips) at lighter widths; the
  skip branches depend only on the frame, so they run once per frame, not once per object. Its
  output adds to the logit of the read-out's soft mask, so the decoder learns a refinement.

Many small objects: the per-object value encoder, read and decoder run on a window around each
object whose window is at most :attr:`STMLite.crop_share` of the frame, the rest of the frame
from a background shared by all objects (:meth:`STMLite._encode_cropped`,
:meth:`STMLite._segment_windows`, core/crops.py); ``crop_share = 0`` is the whole-frame network.

Batched use (training): ``encode_query`` takes [B, 3, H, W]; ``encode_memory`` masks [B, N, H, W];
``segment`` memory keys [B, Ck, M] and values [B, N, Cv, M] and returns [B, N, H, W]. With B = 1 and
the engine's 3-D shapes this is exactly the :class:`VOSNetwork` contract.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from napari_stm.core import crops, readout
from napari_stm.core.backbones import LITE0, efficientnet_lite, lite0_normalize, lite_variant
from napari_stm.core.model import MemoryEntry, QueryFeatures, VOSNetwork
from napari_stm.core.network import ResBlock
from napari_stm.core.readout import (
    CHUNK_ELEMENTS,
    MotionPrior,
    ObjectPriors,
    dense_weights,
    memory_read,
)

KEY_DIM = 64
VALUE_DIM = 256
#: channels of the decoder at strides 16, 8 and 4
DECODER_DIMS = (128, 64, 32)
#: bound of the affinity scale: cosines span 2, so affinities span at most 2 * MAX_SCALE < 87
MAX_SCALE = 40.0
#: initial affinity scale (lite0-match's cosine temperature of 0.05)
INITIAL_SCALE = 20.0
#: the read-out's soft mask is clamped to this before its logit is taken
PRIOR_EPS = 0.01
#: Windows of the per-object convolutions (core/crops.py), in stride-16 cells. Decoder: an
#: object is where its read-out's soft mask exceeds DECODE_THRESHOLD, the window's core is
#: that grown by DECODE_REACH, and the convolutions see DECODE_CONTEXT more cells. Value
#: encoder: an object is where its mask exceeds ENCODE_THRESHOLD (the faint edges of a
#: segmented frame's probabilities below it grew windows by a third), a mask pixel changes
#: values up to ENCODE_REACH cells away (receptive field 63 pixels) and ENCODE_CONTEXT cells
#: of context make the core's values those of the whole frame (to float rounding). Chosen by
#: measurement (docs/performance.md): DECODE_REACH 1 or DECODE_THRESHOLD 0.1 moved
#: probabilities by up to 0.25; a wider context changed nothing that counts.
DECODE_THRESHOLD = 0.02
DECODE_REACH = 2
DECODE_CONTEXT = 2
ENCODE_THRESHOLD = 0.1
ENCODE_REACH = 2
ENCODE_CONTEXT = 2
#: a memory cell an object covers more than this (a share of its pixels) is the object's own,
#: not background (see _background_values)
BACKGROUND_COVERAGE = 1e-3


class Bottleneck(nn.Module):
    """Pre-activation residual bottleneck (1x1 down, 3x3, 1x1 up): wide but cheap."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(dim, inner, 1)
        self.conv = nn.Conv2d(inner, inner, 3, padding=1)
        self.expand = nn.Conv2d(inner, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        r = self.reduce(F.relu(x))
        r = self.conv(F.relu(r))
        return x + self.expand(F.relu(r))


class ValueEncoder(nn.Module):
    """Frame + object mask + other objects' mask -> value map at stride 16.

    The frame's own pixels enter through one convolution computed once per frame; the masks
    through another computed per object; the sum is what a single convolution over the
    five-channel stack would give (as in the official STM memory encoder).
    """

    def __init__(
        self,
        value_dim: int = VALUE_DIM,
        channels: dict[int, int] = LITE0.feature_channels,
    ) -> None:
        super().__init__()
        c8, c16 = channels[8], channels[16]
        self.stem_image = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.stem_masks = nn.Conv2d(2, 16, 3, stride=2, padding=1, bias=False)
        self.down4 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.down8 = nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.down16 = nn.Conv2d(64 + c8, 128, 3, stride=2, padding=1)
        self.fuse = nn.Conv2d(128 + c16, value_dim - 1, 1)
        self.block = Bottleneck(value_dim - 1, 64)

    def forward(
        self,
        image: Tensor,
        masks: Tensor,
        others: Tensor,
        f8: Tensor,
        f16: Tensor,
        stem: Tensor | None = None,
    ) -> Tensor:
        """image [B, 3, H, W] (normalised), masks/others [B, N, H, W], f8/f16 [B, C, h, w]
        -> values [B, N, Cv, H/16, W/16]. ``stem``: ``stem_image(image)`` when already known
        (windows cut from the whole frame's)."""
        b, n = masks.shape[:2]
        stack = torch.stack([masks, others], dim=2).flatten(0, 1)  # [B*N, 2, H, W]
        if stem is None:
            stem = self.stem_image(image)
        x = self.stem_masks(stack) + stem.repeat_interleave(n, dim=0)
        x = F.relu(x)
        x = F.relu(self.down4(x))
        x = F.relu(self.down8(x))
        x = F.relu(self.down16(torch.cat([x, f8.repeat_interleave(n, dim=0)], dim=1)))
        x = self.fuse(torch.cat([x, f16.repeat_interleave(n, dim=0)], dim=1))
        x = self.block(x)
        # How much of each stride-16 cell the object covers: the read-out then carries a
        # matched soft mask the decoder can start from.
        coverage = F.avg_pool2d(masks.flatten(0, 1)[:, None], 16)
        values = torch.cat([x, coverage.to(x.dtype)], dim=1)
        return values.unflatten(0, (b, n))


class Refine(nn.Module):
    """STM's refinement module with separate skip and decoder widths."""

    def __init__(self, skip_dim: int, coarse_dim: int, dim: int) -> None:
        super().__init__()
        self.convFS = nn.Conv2d(skip_dim, dim, 3, padding=1)
        self.ResFS = ResBlock(dim, dim)
        self.compress = nn.Conv2d(coarse_dim, dim, 1)
        self.ResMM = ResBlock(dim, dim)

    def skip(self, f: Tensor) -> Tensor:
        """The part that depends on the frame only: computed once for all objects."""
        return self.ResFS(self.convFS(f))

    def forward(self, skip: Tensor, coarse: Tensor) -> Tensor:
        up = F.interpolate(
            self.compress(coarse), size=skip.shape[-2:], mode="bilinear", align_corners=False
        )
        return self.ResMM(skip + up)


class Decoder(nn.Module):
    """Read-out and query features at stride 16, skips at 8 and 4 -> one logit per pixel."""

    def __init__(
        self,
        value_dim: int = VALUE_DIM,
        dims: tuple[int, int, int] = DECODER_DIMS,
        channels: dict[int, int] = LITE0.feature_channels,
    ):
        super().__init__()
        d16, d8, d4 = dims
        #: the frame's stride-16 channels, the last input channels of convFM
        self.frame_dim = channels[16]
        self.convFM = nn.Conv2d(value_dim + self.frame_dim, d16, 1)
        self.ResMM = ResBlock(d16, d16)
        self.RF3 = Refine(channels[8], d16, d8)
        self.RF2 = Refine(channels[4], d8, d4)
        self.pred = nn.Conv2d(d4, 1, 3, padding=1)
        # Zero at the start: the model's first prediction is the read-out's matched mask.
        nn.init.zeros_(self.pred.weight)
        nn.init.zeros_(self.pred.bias)
        self.prior_gain = nn.Parameter(torch.ones(()))

    def project(self, values: Tensor) -> Tensor:
        """Memory values [B, N, Cv, h, w] -> [B, N, d16 + 1, h, w]: their share of ``convFM``
        and the coverage channel.

        ``convFM`` is a 1x1 convolution, linear in the read-out, and the read-out is an
        affinity-weighted average of memory values (weights summing to one), so projecting each
        memory value once when it is memorised equals projecting every read-out: the same
        network, but the read carries 129 channels instead of 256 (measured: 40% less read time).
        """
        cv = values.shape[2]
        weight = self.convFM.weight[:, :cv]
        projected = F.conv2d(values.flatten(0, 1), weight.to(values.dtype))
        coverage = values.flatten(0, 1)[:, -1:]
        return torch.cat([projected, coverage], dim=1).unflatten(0, values.shape[:2])

    def forward(self, read: Tensor, f16: Tensor, skip8: Tensor, skip4: Tensor, n: int) -> Tensor:
        """read [B*N, d16 + 1, h, w] (projected values, see :meth:`project`); f16, skip8,
        skip4 per frame [B, ...] -> logits [B*N, 1, 4h, 4w]."""
        return self.objects(
            read,
            self.frame(f16).repeat_interleave(n, dim=0),
            skip8.repeat_interleave(n, dim=0),
            skip4.repeat_interleave(n, dim=0),
        )

    def frame(self, f16: Tensor) -> Tensor:
        """The frame's share of convFM: once per frame, not once per object."""
        return F.conv2d(f16, self.convFM.weight[:, -self.frame_dim :], self.convFM.bias)

    def objects(self, read: Tensor, frame: Tensor, skip8: Tensor, skip4: Tensor) -> Tensor:
        """The per-object part: read [G, d16 + 1, h, w] with the frame's maps of the same
        windows (:meth:`frame`, the skips), one per object or one for all -> logits."""
        m16 = self.ResMM(read[:, :-1] + frame)
        m8 = self.RF3(skip8, m16)
        m4 = self.RF2(skip4, m8)
        return self.pred(F.relu(m4)) + self.prior_logit(read, m4.shape[-2:], m4.dtype)

    def prior_logit(self, read: Tensor, size: tuple[int, int], dtype: torch.dtype) -> Tensor:
        """The read-out's soft mask as a logit at ``size``, times its gain."""
        prior = read[:, -1:].float().clamp(PRIOR_EPS, 1 - PRIOR_EPS)
        prior = F.interpolate(
            torch.log(prior / (1 - prior)), size=size, mode="bilinear", align_corners=False
        )
        return self.prior_gain * prior.to(dtype)


class STMLite(VOSNetwork):
    """Space-time memory network on EfficientNet-Lite0 (see the module docstring).

    ``pretrained`` loads the ImageNet Lite weights into the image encoder (the start of
    training); a trained ``stm-lite`` checkpoint holds the encoder too, so loading one needs no
    ImageNet file. ``backbone="lite2"`` builds the same design on EfficientNet-Lite2 (wider
    features at every stride; the layers that read them widen to match).
    """

    name = "stm-lite"
    pad_multiple = 16
    default_top_k: int | None = None
    #: the read is position-aware (see core/motion.py): it keeps look-alike cells apart
    motion_prior = True
    #: Training saw frames shrunk 1.8-3x (160-pixel crops of 36-100% of a 480p frame's shorter
    #: side), so frames work best near that scale: J&F on 11 DAVIS training sequences (first 50
    #: frames) 92.4 at a longer side of 512, 92.1 at 640, 92.0 at 427, 91.4 at full size, and
    #: 512 is 3x faster than full 480p (docs/model_card.md).
    working_side = 512
    #: Per-object convolutions (value encoder, decoder) run on a window around each object
    #: whose window covers at most this share of the frame (core/crops.py): many small objects
    #: cost little more than one. 0: every object on the whole frame, the exact network.
    crop_share = 0.5
    memory_from_query = True
    object_priors = True
    segments_logits = True

    def __init__(
        self,
        pretrained: bool = False,
        key_dim: int = KEY_DIM,
        value_dim: int = VALUE_DIM,
        backbone: str = "lite0",
    ) -> None:
        super().__init__()
        variant = lite_variant(backbone)
        encoder = efficientnet_lite(variant, pretrained=pretrained, with_head=False)
        # Only the stages up to stride 16 are used: the stride-32 stage is neither run nor stored.
        encoder._blocks = encoder._blocks[: variant.feature_blocks[16] + 1]
        self.encoder = encoder
        self.backbone = variant.name
        self.key_dim = key_dim
        self.value_dim = value_dim
        channels = variant.feature_channels
        self.key_proj = nn.Conv2d(channels[16] + channels[8], key_dim, 3, padding=1)
        nn.init.orthogonal_(self.key_proj.weight.data)
        nn.init.zeros_(self.key_proj.bias)
        # scale = MAX_SCALE * sigmoid(scale_logit): smooth, learnable, bounded
        self.scale_logit = nn.Parameter(
            torch.tensor(math.log(INITIAL_SCALE / (MAX_SCALE - INITIAL_SCALE)))
        )
        self.value_encoder = ValueEncoder(value_dim, channels=channels)
        self.decoder = Decoder(value_dim, channels=channels)

    @property
    def read_dim(self) -> int:
        """Channels of a memory value as stored and read (see :meth:`Decoder.project`)."""
        return self.decoder.convFM.out_channels + 1

    @property
    def affinity_scale(self) -> Tensor:
        return MAX_SCALE * torch.sigmoid(self.scale_logit)

    def train(self, mode: bool = True) -> STMLite:
        # The encoder's batch-norm statistics stay ImageNet's: batches of 3-frame crops are far
        # too small and too alike to estimate new ones.
        super().train(mode)
        self.encoder.eval()
        return self

    # -- the VOSNetwork contract -----------------------------------------------------------
    def encode_query(self, image: Tensor) -> QueryFeatures:
        self._check_image(image)
        normalised = lite0_normalize(image)
        feats = self.encoder.features(normalised, strides=(4, 8, 16))
        f4, f8, f16 = feats[4], feats[8], feats[16]
        k = self.key_proj(torch.cat([f16, F.avg_pool2d(f8, 2)], dim=1))
        return QueryFeatures(
            key=F.normalize(k.float(), dim=1).to(k.dtype),
            skips=(f8, f4),
            extra={"f16": f16, "image": normalised},
        )

    def encode_memory(
        self, image: Tensor, masks: Tensor, query: QueryFeatures | None = None, groups: int = 1
    ) -> MemoryEntry:
        batched = masks.dim() == 4
        if masks.dim() not in (3, 4) or masks.shape[-2:] != image.shape[-2:]:
            raise ValueError(
                f"masks must be [N, H, W] matching the image {tuple(image.shape[-2:])}, "
                f"got {tuple(masks.shape)}"
            )
        if query is None:
            query = self.encode_query(image)
        b = query.key.shape[0]
        masks4 = masks if batched else masks[None]
        if masks4.shape[0] != b:
            raise ValueError(f"masks for {masks4.shape[0]} frames, images for {b}")
        masks4 = masks4.to(query.key.dtype)
        if groups > 1 and masks4.shape[1] % groups:
            raise ValueError(f"{masks4.shape[1]} objects in {groups} equal groups")
        # Away from its mask an object's "others" are all its group's objects: with one object
        # a group, nothing.
        alone = groups > 1 and masks4.shape[1] == groups
        if groups == 1:
            others = (masks4.sum(dim=1, keepdim=True) - masks4).clamp(0, 1)
        elif alone:
            # What the sum below gives, allocated nowhere: only windows of it are cut.
            others = masks4.new_zeros(()).expand_as(masks4)
        else:
            each = masks4.unflatten(1, (groups, -1))
            others = (each.sum(dim=2, keepdim=True) - each).clamp(0, 1).flatten(1, 2)
        f8, _ = query.skips
        image, f16 = query.extra["image"], query.extra["f16"]
        plan = None
        if self._crops_on(b):
            cells = F.max_pool2d(masks4[0][:, None], 16)[:, 0]
            plan = crops.plan_crops(
                cells, ENCODE_THRESHOLD, ENCODE_REACH, ENCODE_CONTEXT, self.crop_share
            )
        if plan is not None and plan.cropped and (groups == 1 or alone):
            values = self._encode_cropped(
                image, masks4[0], others[0], f8, f16, plan, outside_empty=alone, query=query
            )[None]
        else:
            values = self.decoder.project(self.value_encoder(image, masks4, others, f8, f16))
        return MemoryEntry(keys=query.key, values=values if batched else values[0])

    def segment(
        self,
        query: QueryFeatures,
        mem_keys: Tensor,
        mem_values: Tensor,
        top_k: int | None = None,
        prior: MotionPrior | ObjectPriors | None = None,
        logits: bool = False,
    ) -> Tensor:
        """Per-object probabilities (or, with ``logits``, logits) of the query frame.
        ``prior``: an :class:`ObjectPriors` reads each object with its own (one frame)."""
        if not {"f16", "image"} <= set(query.extra) or len(query.skips) != 2:
            raise TypeError("STMLite.segment needs query features made by STMLite.encode_query")
        batched = mem_values.dim() == 4
        values = mem_values if batched else mem_values[None]
        keys = mem_keys  # [B, Ck, M]: the contract's [1, Ck, M] is a batch of one
        b, n = values.shape[:2]
        if values.shape[2] != self.read_dim:
            raise ValueError(
                f"stm-lite memory values have {self.read_dim} channels (made by its "
                f"encode_memory), got {tuple(mem_values.shape)}"
            )
        if keys.dim() != 3 or keys.shape[0] != b or keys.shape[-1] != values.shape[-1]:
            raise ValueError(
                f"stm-lite memory keys are shared by all objects: expected [{b}, Ck, M] keys "
                f"for values {tuple(mem_values.shape)}, got {tuple(mem_keys.shape)}"
            )
        h, w = query.key.shape[-2:]
        if isinstance(prior, ObjectPriors) and (b != 1 or len(prior.owner) != n):
            raise ValueError(f"{len(prior.owner)} object priors for {b} frames of {n} objects")
        reader, _ = self.read_query(query)
        f8, f4 = query.skips
        skip8 = _per_frame(query, "skip8", lambda: self.decoder.RF3.skip(f8))
        skip4 = _per_frame(query, "skip4", lambda: self.decoder.RF2.skip(f4))
        out = None
        if (
            self._crops_on(b)
            and n > 1
            and top_k is None
            and h * w * keys.shape[-1] <= CHUNK_ELEMENTS
        ):
            out = self._segment_windows(query, keys, values[0], reader, prior, skip8, skip4)
        if out is None and isinstance(prior, ObjectPriors):
            read = reader.new_empty(1, n, values.shape[2], h * w)
            columns = prior.columns(h * w, keys.device)
            for k, (own, at) in enumerate(zip(prior.priors, columns, strict=True)):
                idx = prior.objects(k)
                k_own, v_own = keys, values[0, idx]
                if at is not None:  # its own memory frames only
                    k_own, v_own = keys[..., at], v_own[..., at]
                read[0, idx] = memory_read(k_own, v_own, reader, top_k, 1.0, own)
        elif out is None:
            read = torch.stack(
                [
                    memory_read(keys[i : i + 1], values[i], reader[i : i + 1], top_k, 1.0, prior)
                    for i in range(b)
                ]
            )  # [B, N, Cv, h*w]
        if out is None:
            out = self.decoder(read.reshape(b * n, -1, h, w), query.extra["f16"], skip8, skip4, n)
        out = F.interpolate(out, scale_factor=4, mode="bilinear", align_corners=False)
        out = out.reshape(b, n, *out.shape[-2:])
        if not logits:
            # In place outside autograd: a new map per object is a fresh allocation, whose
            # pages cost as much as the sigmoid (100 objects at 480p: 77 ms against 18).
            out = torch.sigmoid(out) if out.requires_grad else out.sigmoid_()
        return out if batched else out[0]

    # -- windows around small objects (core/crops.py) ----------------------------------------
    def _crops_on(self, batch: int) -> bool:
        # Inference only: training batches clips and differentiates the whole frame.
        return self.crop_share > 0 and batch == 1 and not self.training

    def _segment_windows(
        self,
        query: QueryFeatures,
        keys: Tensor,
        values: Tensor,
        reader: Tensor,
        prior: MotionPrior | ObjectPriors | None,
        skip8: Tensor,
        skip4: Tensor,
    ) -> Tensor:
        """The read and the decoder of :meth:`segment` (one frame; values [N, Cv, M]), each
        object read and decoded on a window around where its read-out's soft mask is -> logits
        [N, 1, 4h, 4w].

        Away from an object (outside its core) its memory values are those of an empty mask,
        the same for every object (see :meth:`_encode_cropped`), so its read-out there is the
        same "background" read for every object. That read, decoded once for the whole frame,
        gives every object's refinement outside its window; the read-out's soft mask (cheap:
        one channel per object) stays each object's own everywhere.

        :class:`ObjectPriors`: each object's soft mask, window and whole-frame read are read
        with its own prior's weights (over its own memory frames, ``ObjectPriors.frames``);
        the background read of each distinct memory, with the prior most of its objects have
        (one whole-frame decode a memory, not one per prior; with :data:`ONE_BACKGROUND`, of
        the most held memory only). For the others that is one more approximation outside
        their windows (docs/performance.md measures it).
        """
        dec = self.decoder
        f16 = query.extra["f16"]
        h, w = query.key.shape[-2:]
        n, cv, m = values.shape
        sets: readout.WeightSets | None = None
        # One prior over every frame (a request's trackers of one memory, tracker.SHARED_PRIOR,
        # which pass ObjectPriors for its entries only): the plain read.
        one = isinstance(prior, ObjectPriors) and len(prior.priors) == 1 and prior.frames is None
        if isinstance(prior, ObjectPriors) and not one:
            cols = prior.columns(h * w, keys.device)
            sets = readout.WeightSets(keys, reader, 1.0, prior.priors, cols)
            owners = prior.owner
        else:
            plain = prior.priors[0] if isinstance(prior, ObjectPriors) else prior
            cols, owners = [None], (0,) * n
            weights = dense_weights(keys, reader, 1.0, plain).to(values.dtype)  # [P, M]
        dense: dict[int, Tensor] = {}  # sets' whole weights, where needed ([P, M_k])

        def dense_of(k: int) -> Tensor:
            if sets is None:
                return weights
            if k not in dense:
                dense[k] = sets.dense(k).to(values.dtype)
            return dense[k]

        def own(k: int, v: Tensor) -> Tensor:  # [..., M] -> set k's memory positions
            return v if cols[k] is None else v.index_select(-1, cols[k])

        def read(idx: list[int]) -> Tensor:
            """Objects ``idx`` read everywhere, each with its own prior's weights."""
            out = None
            for k in dict.fromkeys(owners[i] for i in idx):
                at = [j for j, i in enumerate(idx) if owners[i] == k]
                v = values[[idx[j] for j in at]].reshape(len(at) * cv, m)
                part = (dense_of(k) @ own(k, v).T).T.reshape(len(at), cv, h, w)
                if out is None:
                    out = part.new_empty(len(idx), *part.shape[1:])
                out[at] = part
            assert out is not None
            return out

        # Each object's soft mask read everywhere (one channel each: cheap).
        if sets is None:
            coverage = (weights @ values[:, -1].T).T.reshape(n, 1, h, w)
        else:
            coverage = sets.read(list(owners), values[:, -1]).to(values.dtype)
            coverage = coverage.reshape(n, 1, h, w)
        plan = crops.plan_crops(
            coverage[:, 0], DECODE_THRESHOLD, DECODE_REACH, DECODE_CONTEXT, self.crop_share
        )
        if not plan.cropped:
            return dec(read(list(range(n))).to(reader.dtype), f16, skip8, skip4, n)
        frame = _per_frame(query, "frame16", lambda: dec.frame(f16))
        held = (
            prior.held(m // (h * w), h * w, keys.device)
            if isinstance(prior, ObjectPriors)
            else None
        )
        entries = prior.entries if isinstance(prior, ObjectPriors) else None
        bg_values, differs = _background_values(values, (h, w), held, entries)  # [Cv, M], [N, M]

        bg_own: dict[int, Tensor] = {}  # the background at each memory's positions

        def background_at(k: int) -> Tensor:
            at = cols[k]
            if id(at) not in bg_own:
                bg_own[id(at)] = own(k, bg_values)
            return bg_own[id(at)]

        # One background decode per distinct memory, read with its objects' main prior.
        memories = prior.memories() if isinstance(prior, ObjectPriors) else [(0, list(range(n)))]
        if ONE_BACKGROUND:  # every object outside its window: the most held memory's
            memories = [(memories[0][0], list(range(n)))]
        bg_read_of = {k: dense_of(k) @ background_at(k).T for k, _ in memories}  # [P, Cv]

        def refine(background: Tensor) -> Tensor:
            refined = dec.objects(background, frame, skip8, skip4)
            return refined - dec.prior_logit(background, refined.shape[-2:], refined.dtype)

        refined = _background_refined(
            query,
            [bg_read_of[k].T.reshape(1, cv, h, w).to(reader.dtype) for k, _ in memories],
            refine,
        )
        out = dec.prior_logit(coverage, (4 * h, 4 * w), frame.dtype)
        if len(memories) == 1:
            out += refined[0].to(frame.dtype)
        else:
            for (_, objects), part in zip(memories, refined, strict=True):
                index = torch.tensor(objects, device=out.device)
                out.index_add_(0, index, part.to(out.dtype).expand(len(objects), -1, -1, -1))
        if plan.full:
            full = read(plan.full).to(reader.dtype)
            out[plan.full] = dec.objects(full, frame, skip8, skip4).to(out.dtype)
        device = values.device
        if sets is None:
            stacked, columns, bg_reads = weights[None], None, bg_read_of[0][None]
            place = None
        else:
            # Each set's weights only at the rows its windows read ([X, max M_k], set k's
            # from offset[k]), and its background read there: a set's whole-frame read where
            # it is a memory's (decoded above), else only at its windows' rows (a fifth of the
            # frame, and most sets are one tracker's).
            rows_of: dict[int, list[Tensor]] = {}
            for group in plan.groups:
                for i, win in zip(group.objects, group.windows, strict=True):
                    rows_of.setdefault(owners[i], []).append(crops.positions(win, w))
            first = bg_read_of[memories[0][0]]
            bg_reads = first[None].repeat(len(sets.widths), 1, 1)
            for k, part in bg_read_of.items():
                bg_reads[k] = part
            at_of = {k: torch.cat(rows).unique().to(device) for k, rows in rows_of.items()}
            total = sum(len(at) for at in at_of.values())
            stacked = values.new_zeros(total, max(sets.widths))
            place = torch.zeros(len(sets.widths), h * w, dtype=torch.long, device=device)
            start = 0
            for k, at in at_of.items():
                part = dense[k][at] if k in dense else sets.rows(k, at).to(values.dtype)
                stacked[start : start + len(at), : part.shape[1]] = part
                place[k, at] = torch.arange(start, start + len(at), device=device)
                if k not in bg_read_of:
                    bg_reads[k, at] = part @ background_at(k).T
                start += len(at)
            columns = sets.columns
        for group in plan.groups:
            wins = group.windows
            wh, ww = wins[0].size
            rows = torch.stack([crops.positions(win, w) for win in wins]).to(device)
            owner = torch.tensor([owners[i] for i in group.objects], device=device)
            window_read = readout.window_read(
                stacked,
                owner,
                rows,
                values,
                torch.tensor(group.objects, device=device),
                bg_values,
                bg_reads,
                differs,
                columns,
                None if place is None else place[owner[:, None], rows],
            )  # [G, wh*ww, Cv]
            window_read = window_read.transpose(1, 2).reshape(len(wins), cv, wh, ww)
            logits = dec.objects(
                window_read.to(reader.dtype),
                crops.gather(frame, wins, 1),
                crops.gather(skip8, wins, 2),
                crops.gather(skip4, wins, 4),
            )
            crops.paste(out, group.objects, logits.to(out.dtype), group, 4)
        return out

    def _encode_cropped(
        self,
        image: Tensor,
        masks: Tensor,
        others: Tensor,
        f8: Tensor,
        f16: Tensor,
        plan: crops.CropPlan,
        outside_empty: bool = False,
        query: QueryFeatures | None = None,
    ) -> Tensor:
        """Projected values [N, Cv', h, w] of one frame (masks, others [N, H, W]), per object
        on its window.

        Away from its mask an object's values are those of an empty mask with every object as
        "others" (``outside_empty``: with no others, objects of independent one-object
        trackers): the same for all objects, so they are encoded once (the background) and
        each object's window is pasted over them. ``query``: the frame's query features, which
        keep the frame's parts (the stem, and the empty background of ``outside_empty``) for
        the frame's next calls (a large request's bounded calls).
        """
        enc, project = self.value_encoder, self.decoder.project

        def keep(name: str, make: Callable[[], Tensor]) -> Tensor:
            return make() if query is None else _per_frame(query, name, make)

        # the frame's part, once: windows are cut from it
        stem = keep("value_stem", lambda: enc.stem_image(image))

        def background_of(union: Tensor) -> Tensor:
            return project(enc(image, torch.zeros_like(union), union, f8, f16, stem))[0, 0]

        empty = masks.new_zeros((1, 1, *masks.shape[-2:]))
        if outside_empty:
            background = keep("value_background", lambda: background_of(empty))
        else:
            background = background_of(masks.sum(dim=0, keepdim=True).clamp(0, 1)[None])
        out = background.expand(masks.shape[0], -1, -1, -1).clone()
        if plan.full:
            idx = plan.full
            out[idx] = project(enc(image, masks[idx][None], others[idx][None], f8, f16, stem))[0]
        for group in plan.groups:
            wins, idx = group.windows, group.objects
            values = enc(
                crops.gather(image, wins, 16),
                crops.gather(masks[:, None], wins, 16, idx),
                crops.gather(others[:, None], wins, 16, idx),
                crops.gather(f8, wins, 2),
                crops.gather(f16, wins, 1),
                crops.gather(stem, wins, 8),
            )  # [G, 1, Cv, wh, ww]: G one-object frames
            crops.paste(out, idx, project(values)[:, 0], group, 1)
        return out

    def read_query(self, query: QueryFeatures) -> tuple[Tensor, float | None]:
        qk = query.key
        # The scale multiplies the query rather than going to memory_read as a float, so that
        # training gets its gradient.
        return (qk * self.affinity_scale.to(qk.dtype)).flatten(2), 1.0

    def _check_image(self, image: Tensor) -> None:
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"stm-lite expects images [B, 3, H, W], got {tuple(image.shape)}")
        h, w = image.shape[-2:]
        if h % self.pad_multiple or w % self.pad_multiple:
            raise ValueError(
                f"stm-lite needs image sides that are multiples of {self.pad_multiple}, got {h}x{w}"
            )


def _per_frame(query: QueryFeatures, name: str, make: Callable[[], Tensor]) -> Tensor:
    """``make()``, a map that depends on the query frame only (a decoder skip, the value
    encoder's stem), computed once per frame and kept on its query features: every network
    call on the frame after the first reuses it (the bounded calls of a large request, the
    trackers whose reads differ). Outside autograd only: training differentiates each call."""
    if torch.is_grad_enabled():
        return make()
    # One entry per precision: an autocast call and a float32 call compute different maps.
    key = f"stm_lite.{name}.{torch.is_autocast_enabled(query.key.device.type)}"
    kept = query.extra.get(key)
    if kept is None:
        kept = query.extra[key] = make()
    return kept


#: two background reads (:func:`_background_refined`) are taken as the same read when they
#: differ by at most this share of their largest magnitude: the background values of two
#: calls come from different objects' values, which away from the objects are the same
#: empty-mask values, pasted or computed on a window to float rounding (measured on the bench
#: video's 100 objects, when the background was still a mean over objects: up to 2.3e-5 of
#: the span between calls on the same memory, moving the refined logits by up to 3.2e-5; 0.23
#: and more where the memory differed). Since the background is one far object's copy and
#: the request's trackers of one memory read with one prior (tracker.SHARED_PRIOR), the
#: calls of one memory differed by 2.8e-4 - 3.2e-4 (at under 1% of the positions) from the
#: bench's frame 6 on, over 1e-4: every call decoded the same background again.
BACKGROUND_SAME = 1e-3
#: a call over several memories (:class:`ObjectPriors` ``frames``) decodes the background
#: read of its most held memory only, and every object takes it outside its window; False:
#: one whole-frame decode a memory (exact: each object as in its own memory's call). The
#: memories of a CVAT request diverge a frame or two apart (each tracker's policy admits
#: frames by itself), and the call holding them decoded 4-8 backgrounds a late 100-object
#: frame (docs/performance.md, twelfth session: what it changes)
ONE_BACKGROUND = True


def _background_refined(
    query: QueryFeatures, backgrounds: list[Tensor], make: Callable[[Tensor], Tensor]
) -> list[Tensor]:
    """``make(b)`` for each background read ``b`` [1, Cv, h, w] of a call (one a distinct
    memory): the decoder's refinement of it, which the call's objects of that memory share
    outside their windows (one whole-frame decode), reused by the frame's next call when one
    of its background reads is the same to float rounding.

    The calls of one CVAT request read the same memory frames with the same weights, and
    their objects' values outside the objects are the same empty mask's, so their background
    reads differ by float rounding only; without this each bounded call (five for 100
    objects) decoded the whole frame once more. Kept on the query features like
    :func:`_per_frame` (the last call's backgrounds only: a request's calls come one after
    the other, its trackers ordered by memory)."""
    if torch.is_grad_enabled():
        return [make(b) for b in backgrounds]
    name = f"stm_lite.background.{torch.is_autocast_enabled(query.key.device.type)}"
    kept = []
    while f"{name}.read.{len(kept)}" in query.extra:
        i = len(kept)
        kept.append((query.extra.pop(f"{name}.read.{i}"), query.extra.pop(f"{name}.refined.{i}")))
    out = []
    for background in backgrounds:
        same = (refined for read, refined in kept if _same_background(read, background))
        out.append(next(same, None))
        if out[-1] is None:
            out[-1] = make(background)
    for i, (background, refined) in enumerate(zip(backgrounds, out, strict=True)):
        query.extra[f"{name}.read.{i}"], query.extra[f"{name}.refined.{i}"] = background, refined
    return out


def _same_background(read: Tensor, background: Tensor) -> bool:
    return (
        read.shape == background.shape
        and read.dtype == background.dtype
        and float((read - background).abs().max()) <= BACKGROUND_SAME * float(read.abs().max())
    )


def _background_values(
    values: Tensor,
    grid: tuple[int, int],
    held: Tensor | None = None,
    entries: tuple[tuple[tuple[dict, tuple[int, int]] | None, ...], ...] | None = None,
) -> tuple[Tensor, Tensor]:
    """What an empty mask's memory values are, [Cv, M], from the objects' values [N, Cv, M],
    and where each object's values differ from them, [N, M] bool.

    At each memory position the background is the value of the first object not within
    ENCODE_REACH cells of it (its value there is the empty mask's: pasted by
    :meth:`STMLite._encode_cropped`, or computed on a window to float rounding); the mean
    over all objects where every object is near. ``held`` [N, M] bool: the positions each
    object's memory holds (objects over different memory frames, :class:`ObjectPriors`);
    only those count, and an object never differs where it holds nothing. ``entries``
    (:class:`ObjectPriors`): the memory entry of each object's values at each memory frame,
    and where to keep what is derived from them (see :func:`_kept_differs`)."""
    n, cv, m = values.shape
    h, w = grid
    cover = values[:, -1].reshape(-1, 1, h, w) > BACKGROUND_COVERAGE
    reach = 2 * ENCODE_REACH + 1
    near = F.max_pool2d(cover.to(values.dtype), reach, stride=1, padding=ENCODE_REACH)
    far = near.reshape(n, m) == 0
    if held is not None:
        far &= held
    # One object's copy, not a mean: copies of one value are then equal to it bit for bit,
    # and the mean's pass over every object's values (70 ms a 100-object frame) is saved.
    first = far.to(torch.uint8).argmax(dim=0)  # the first far object at each position
    background = values[first, :, torch.arange(m, device=values.device)].T  # [Cv, M]
    somewhere = far.any(dim=0)
    if not bool(somewhere.all()):
        at = (~somewhere).nonzero()[:, 0]  # where every object is near: their mean
        near = values.index_select(2, at)
        if held is None:
            background[:, at] = near.mean(dim=0)
        else:
            own = held[:, at]
            background[:, at] = (near * own[:, None]).sum(dim=0) / own.sum(dim=0).clamp(min=1)
    # Exactly: dropping only equal values keeps the read exact in real arithmetic, and on the
    # bench video's 100 objects a tolerance of 1e-6 of the values' magnitude dropped only
    # 0-3% more of the positions that differ (about 35 of a memory frame's 756 each).
    grad = values.requires_grad and torch.is_grad_enabled()
    if entries is not None and not grad:
        differs = _kept_differs(values, background, h * w, entries, held)
        if held is not None:
            differs &= held
        return background, differs
    differs = values.new_empty((n, m), dtype=torch.bool)
    # A few objects at a time, as the largest difference: `(values != background).any(1)`
    # took 16 ms for 20 objects of 3 memory frames, this 5 (a smaller temporary, in cache),
    # into one temporary for all (a fresh one a chunk: 6-8 against 6 ms, micro-benchmark).
    # With gradients on (training) a fresh difference: autograd takes no out= results.
    part = None if grad else values.new_empty((min(n, 4), cv, m))
    for start in range(0, n, 4):
        chunk = values[start : start + 4]
        if part is None:
            diff = chunk - background
        else:
            diff = torch.sub(chunk, background, out=part[: len(chunk)])
        differs[start : start + 4] = diff.abs_().amax(dim=1) > 0
    if held is not None:
        differs &= held
    return background, differs


def _kept_differs(
    values: Tensor,
    background: Tensor,
    grid: int,
    entries: tuple[tuple[tuple[dict, tuple[int, int]] | None, ...], ...],
    held: Tensor | None,
) -> Tensor:
    """:func:`_background_values`' ``differs`` [N, M], memory frame by memory frame, kept
    with each object's memory entry and reused while the background there stays the same.

    An entry's values never change once written, and a call's background at a memory frame
    is most often the same as the last call's (the first far object's value, the same
    objects in the same order), so comparing every object's values with it again (65 ms a
    late 100-object frame) mostly recomputed the same rows. A kept row is taken only where
    its entry is the object's at that frame and the background it was compared with equals
    this call's (``torch.equal``: one [Cv, grid] comparison for all the objects that share
    it): the same inputs, so the same row, bit for bit."""
    n, cv, m = values.shape
    differs = values.new_zeros((n, m), dtype=torch.bool)
    # Which memory frames each object holds: where it holds none, it never differs.
    holds = None if held is None else held[:, ::grid].tolist()
    diff: Tensor | None = None  # one object's difference at one frame, and its largest
    most: Tensor | None = None
    for f in range(m // grid):
        cols = slice(f * grid, (f + 1) * grid)
        bg = background[:, cols]
        # id of a kept background -> (it, whether it equals this call's); holding it keeps
        # its id from being reused by another tensor while this call runs
        same: dict[int, tuple[Tensor, bool]] = {}
        missing = []
        for i, row in enumerate(entries):
            entry = row[f]
            if entry is None:
                if holds is None or holds[i][f]:
                    missing.append(i)
                continue
            kept = entry[0].get(entry[1])
            if kept is not None:
                ref, mask = kept
                if id(ref) not in same:
                    equal = ref.dtype == bg.dtype and torch.equal(ref, bg)
                    same[id(ref)] = (ref, equal)
                if same[id(ref)][1]:
                    differs[i, cols] = mask
                    continue
            missing.append(i)
        if not missing:
            continue
        # The same elementwise difference and reduction as the uncached path (the same
        # bits), one object at a time on its view: gathering the missing objects' columns
        # first cost 3x as much (0.25 against 0.08 ms an object, micro-benchmark).
        if diff is None:
            diff, most = values.new_empty((cv, grid)), values.new_empty(grid)
        fresh = differs.new_empty((len(missing), grid))
        for r, i in enumerate(missing):
            torch.sub(values[i, :, cols], bg, out=diff)
            torch.amax(diff.abs_(), dim=0, out=most)
            torch.gt(most, 0, out=fresh[r])
        differs[torch.tensor(missing, device=values.device), cols] = fresh
        copy = bg.clone()  # one for all objects computed here (not a view of the whole map)
        for r, i in enumerate(missing):
            entry = entries[i][f]
            if entry is not None:
                entry[0][entry[1]] = (copy, fresh[r])
    return differs


def stm_lite2(pretrained: bool = False) -> STMLite:
    """stm-lite's design on the ImageNet EfficientNet-Lite2 (ImageNet top-1 77.6 against
    Lite0's 75.1, about twice the encoder's cost; docs/model_card.md compares the two)."""
    return STMLite(pretrained=pretrained, backbone="lite2")
