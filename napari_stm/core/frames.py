"""Turning user frames (any dtype, gray or multichannel, any size) into network input.

Frames come from numpy or dask arrays, or any object with ``len()`` and ``[t]`` returning one
H x W or H x W x C frame; they are read one at a time, so a long video is never loaded whole.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from napari_stm.core.errors import InputError

Normalize = Literal["auto", "percentile", "none"]

#: robust intensity range for microscopy: ignores hot pixels and dark background noise
PERCENTILES = (1.0, 99.8)
#: frames sampled to estimate the percentiles of a whole video
PERCENTILE_SAMPLES = 8


@dataclass(frozen=True)
class Geometry:
    """How a frame of ``size`` maps to the padded network input and back."""

    size: tuple[int, int]  # H, W of the user's frames
    inner: tuple[int, int]  # H, W after the optional max_side resize
    pad: tuple[int, int, int, int]  # left, right, top, bottom (official STM split)

    @property
    def padded(self) -> tuple[int, int]:
        return (
            self.inner[0] + self.pad[2] + self.pad[3],
            self.inner[1] + self.pad[0] + self.pad[1],
        )

    @property
    def resized(self) -> bool:
        return self.inner != self.size


def geometry(size: tuple[int, int], multiple: int, max_side: int | None = None) -> Geometry:
    h, w = size
    if max_side is not None and max(h, w) > max_side:
        s = max_side / max(h, w)
        inner = (max(1, round(h * s)), max(1, round(w * s)))
    else:
        inner = (h, w)
    ph = -inner[0] % multiple
    pw = -inner[1] % multiple
    # As the official code: the extra pixel of an odd padding goes to the bottom/right.
    return Geometry((h, w), inner, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


#: the fitted working side never goes below this: stride-16 features of a smaller frame are
#: too coarse for the decoder's borders whatever the objects' size
MIN_FIT_SIDE = 128
#: objects smaller than this (pixels) do not vote on the working size: slivers cut by the
#: frame's edge, specks
MIN_FIT_AREA = 64
#: objects that would be smaller than this share of a network's ``object_side`` at its usual
#: working side get a larger one (up to the frame's own size): stm-lite-cells' nuclei scored
#: J 0.81 at 30-40 pixels across and 0.71 at 20 (docs/model_card.md), and 70 nuclei 24
#: pixels across in a 1024-pixel frame, worked at 512 (12 pixels), mostly vanished
SMALL_OBJECT_SHARE = 0.6
#: the largest side a fit may choose: the memory read's cost grows with the square of the
#: frame's area. Measured (one process, 2 threads): 70 small nuclei at 1024 a side 3.6 s a
#: frame, 2.6 GB peak; 40 at 2048 about 2 minutes a frame, 13.7 GB. Larger fields of small
#: objects: crop them, or pass a working size
MAX_FIT_SIDE = 1024


def object_diameters(labels: Any) -> np.ndarray:
    """Diameter (pixels) of the disc with each object's area, for every id > 0 of a label
    image."""
    ids, counts = np.unique(np.asarray(labels), return_counts=True)
    return np.sqrt(4.0 * counts[ids > 0] / np.pi)


def fit_side(
    size: tuple[int, int], side: int | None, object_side: float, diameters: np.ndarray
) -> int | None:
    """The longer side to work at so that the objects' median diameter lands near
    ``object_side`` pixels, the size a network was trained to see: a 120-pixel cell is
    shrunk, and a frame is never enlarged. Not above ``side``, the network's usual working
    side (None: full size), unless the objects would be smaller than
    :data:`SMALL_OBJECT_SHARE` of ``object_side`` there: then as large as that takes, up to
    the frame's own size and :data:`MAX_FIT_SIDE`. Below :data:`MIN_FIT_SIDE` the frame's
    own side wins."""
    longer = max(size)
    cap = longer if not side else min(side, longer)
    big = diameters[diameters >= np.sqrt(4.0 * MIN_FIT_AREA / np.pi)]
    if big.size == 0:
        return side
    median = float(np.median(big))
    fitted = round(longer * object_side / median)
    if fitted >= cap and median * cap / longer < SMALL_OBJECT_SHARE * object_side:
        # MAX_FIT_SIDE bounds the enlargement, never below the side the frame had anyway.
        needed = round(longer * SMALL_OBJECT_SHARE * object_side / median)
        fitted = min(needed, max(MAX_FIT_SIDE, cap))
    else:
        fitted = max(min(fitted, cap), min(MIN_FIT_SIDE, cap))
    if fitted < longer:
        return fitted
    return None if side and side < longer else side  # the frame as it is


def to_network(x: Tensor, geo: Geometry, mode: str = "bilinear") -> Tensor:
    """[B, C, H, W] at user size -> resized and zero-padded network input."""
    if geo.resized:
        if mode == "bilinear":
            x = F.interpolate(
                x, size=geo.inner, mode="bilinear", align_corners=False, antialias=True
            )
        else:
            x = F.interpolate(x, size=geo.inner, mode="area")
    if any(geo.pad):
        x = F.pad(x, geo.pad)
    return x


def from_network(x: Tensor, geo: Geometry) -> Tensor:
    """[B, C, Hp, Wp] network output -> cropped and resized back to the user's frame size."""
    left, right, top, bottom = geo.pad
    x = x[..., top : x.shape[-2] - bottom, left : x.shape[-1] - right]
    if geo.resized:
        x = F.interpolate(x, size=geo.size, mode="bilinear", align_corners=False)
    return x


def labels_from_network(probs: Tensor, geo: Geometry, cls: Tensor | None = None) -> Tensor:
    """The most probable class [H, W] (int64) at each pixel of the user's frame, from
    network-size class probabilities [C, Hp, Wp]: ``from_network(probs).max(0).indices`` to
    float rounding, without resizing every class map to the frame's size
    (:func:`labels_window`, the rest of the frame background). ``cls``:
    ``probs.max(0).indices`` [Hp, Wp] when already known.
    """
    box, inside = labels_window(probs, geo, cls)
    out = inside.new_zeros(geo.size)
    out[box] = inside
    return out


def foreground_box(cls: Tensor) -> tuple[slice, slice]:
    """The rows and columns of class map ``cls`` [H, W] that hold every non-background (non-0)
    class: their bounding box (empty slices when there is none)."""
    fg = cls != 0
    rows = fg.any(1).nonzero()
    if not rows.numel():
        return slice(0, 0), slice(0, 0)
    cols = fg.any(0).nonzero()
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def boxes_at(
    at: tuple[Tensor, Tensor, Tensor], batch: int, size: tuple[int, int], geo: Geometry
) -> list[tuple[slice, slice]]:
    """:func:`foreground_box` of each unpadded part of class maps [``batch``, *``size``] at
    network size, from their non-background pixels' positions ``at`` (map, row, column), as
    ``nonzero(as_tuple=True)`` gives them: the trackers of one network call find those
    positions anyway (:func:`~napari_stm.core.motion.won_centres`), and boxes from them cost
    no further pass over the maps (100 maps of a 480p frame: 36 ms on CPU). The same integers."""
    left, right, top, bottom = geo.pad
    h, w = size[0] - top - bottom, size[1] - left - right
    b, ys, xs = at
    if any(geo.pad):  # object pixels in the padding are no part of the frame's box
        inside = (ys >= top) & (ys < top + h) & (xs >= left) & (xs < left + w)
        b, ys, xs = b[inside], ys[inside] - top, xs[inside] - left
    where = torch.stack([ys, xs], dim=1)
    index = b[:, None].expand(-1, 2)
    lo = where.new_full((batch, 2), max(h, w)).scatter_reduce_(0, index, where, "amin")
    hi = where.new_full((batch, 2), -1).scatter_reduce_(0, index, where, "amax")
    empty = (slice(0, 0), slice(0, 0))
    ends = torch.cat([lo, hi + 1], dim=1).tolist()
    return [(slice(r0, r1), slice(c0, c1)) if r1 > 0 else empty for r0, c0, r1, c1 in ends]


def labels_window(
    probs: Tensor,
    geo: Geometry,
    cls: Tensor | None = None,
    box: tuple[slice, slice] | None = None,
) -> tuple[tuple[slice, slice], Tensor]:
    """:func:`labels_from_network` on the window of the user's frame that holds every object:
    (its rows and columns, its classes in ``cls``'s dtype, int64 when not given); the rest of
    the frame is background exactly.

    Bilinear resizing is linear: where one class is the most probable at all four network
    pixels a frame pixel is interpolated from, it is the most probable there too. Only the
    other pixels (along object boundaries, a few percent of a frame) interpolate every class,
    and only frame pixels with a network pixel of some object among their four can be an object.
    With 100 objects at 480p this took 0.15 s instead of 0.4 s on CPU; one small object costs
    its window, not the frame. ``cls``: ``probs.max(0).indices`` [Hp, Wp] when already known;
    ``box``: :func:`foreground_box` of its unpadded part when already known.
    """
    inner = crop_padding(probs, geo)
    cls = inner.max(0).indices if cls is None else crop_padding(cls, geo)
    if box is None:
        box = foreground_box(cls)
    rows, cols = box
    if not geo.resized or rows.start == rows.stop:
        return box, cls[box]
    c, hi, wi = inner.shape
    h, w = geo.size
    y0, y1, ly = _bilinear_taps(hi, h, inner.device)
    x0, x1, lx = _bilinear_taps(wi, w, inner.device)
    # The frame rows (columns) with a tap inside the box: both taps rise with the row.
    ya, yb = _tapping(y0, y1, rows)
    xa, xb = _tapping(x0, x1, cols)
    y0, y1, ly = y0[ya:yb], y1[ya:yb], ly[ya:yb]
    x0, x1, lx = x0[xa:xb], x1[xa:xb], lx[xa:xb]
    rows0, rows1 = cls[y0], cls[y1]  # [h', wi]
    out = rows0[:, x0]
    mixed = (out != rows0[:, x1]) | (out != rows1[:, x0]) | (out != rows1[:, x1])
    ys, xs = mixed.nonzero(as_tuple=True)
    window = (slice(ya, yb), slice(xa, xb))
    if not ys.numel():
        return window, out
    # Indices into the padded maps: a view, where the cropped ones would be copied whole.
    left, _, top_pad, _ = geo.pad
    hp, wp = probs.shape[-2:]
    flat = probs.reshape(c, hp * wp)
    taps = [
        (y * wp + x).reshape(-1)
        for y in ((y0[ys] + top_pad), (y1[ys] + top_pad))
        for x in ((x0[xs] + left), (x1[xs] + left))
    ]
    v = [torch.gather(flat, 1, tap[None].expand(c, -1)) for tap in taps]  # [C, K] each
    b, a = lx[xs], ly[ys]
    # Three lerps over [C, K]: a third of the time of the ten products and sums written out.
    mixed_values = torch.lerp(torch.lerp(v[0], v[1], b), torch.lerp(v[2], v[3], b), a)
    out[ys, xs] = mixed_values.max(0).indices.to(out.dtype)
    return window, out


def _tapping(i0: Tensor, i1: Tensor, inside: slice) -> tuple[int, int]:
    """The output positions [a, b) whose taps ``i0`` or ``i1`` (both non-decreasing) fall in
    ``inside``."""
    a = int(torch.searchsorted(i1, inside.start))
    b = int(torch.searchsorted(i0, inside.stop))
    return a, max(a, b)


@functools.lru_cache(maxsize=16)
def _bilinear_taps(n_in: int, n_out: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """For each of ``n_out`` positions resized from ``n_in`` (bilinear, align_corners=False):
    its two source positions and the second one's weight, as ``F.interpolate`` computes them.
    Kept per size (never written to): 100 one-object trackers' results made them 200 times a
    480p frame (6 ms on CPU). Plain tensors even when first asked in inference mode."""
    scale = n_in / n_out
    with torch.inference_mode(False):
        src = (torch.arange(n_out, device=device, dtype=torch.float32) + 0.5) * scale - 0.5
        src = src.clamp(min=0)
        i0 = src.long()
        i1 = (i0 + 1).clamp(max=n_in - 1)
        return i0, i1, src - i0


def crop_padding(x: Tensor, geo: Geometry) -> Tensor:
    """[..., Hp, Wp] at network size -> the frame's part, without padding (not resized)."""
    left, right, top, bottom = geo.pad
    return x[..., top : x.shape[-2] - bottom, left : x.shape[-1] - right]


def clear_padding(x: Tensor, geo: Geometry) -> Tensor:
    """``x`` [..., Hp, Wp] at network size with zeros in the padding around the frame.

    The official code crops its probabilities to the frame before storing them and pads them
    again with zeros when it memorises the frame, so its memory never sees what the network
    predicted inside the padding.
    """
    left, right, top, bottom = geo.pad
    if not any(geo.pad):
        return x
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    out[..., top : h - bottom, left : w - right] = x[..., top : h - bottom, left : w - right]
    return out


class FrameReader:
    """Lazy access to user frames as float32 RGB in [0, 1]."""

    def __init__(
        self,
        frames: Any,
        normalize: Normalize = "auto",
        intensity_range: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        if isinstance(frames, (str, bytes)) or not hasattr(frames, "__getitem__"):
            raise InputError(
                "frames must be an array (T x H x W or T x H x W x C) or a sequence of frames, "
                f"not {type(frames).__name__}"
            )
        try:
            n = len(frames)
        except TypeError as err:
            raise InputError("frames must have a length (number of frames)") from err
        if n == 0:
            raise InputError("there are no frames (the video is empty)")
        if normalize not in ("auto", "percentile", "none"):
            raise InputError(f"normalize must be 'auto', 'percentile' or 'none', not {normalize!r}")
        self.frames = frames
        self.normalize = normalize
        first = self._raw(0)
        self.size: tuple[int, int] = first.shape[:2]
        self.channels = 1 if first.ndim == 2 else first.shape[2]
        self.dtype = first.dtype
        self._n = n
        self._range = intensity_range

    def __len__(self) -> int:
        return self._n

    def _raw(self, t: int) -> np.ndarray:
        try:
            frame = np.asarray(self.frames[t])
        except InputError:
            raise
        except (IndexError, KeyError) as err:
            raise InputError(f"frame {t} is missing") from err
        except (OSError, ValueError, RuntimeError) as err:
            # Readers report a corrupt file or failed decode through any of these.
            raise InputError(f"frame {t} could not be read: {type(err).__name__}: {err}") from err
        if frame.ndim == 3 and frame.shape[2] > 4 and frame.shape[0] <= 4:
            raise InputError(
                f"frame {t} has shape {frame.shape}: channels must be last (H x W x C)"
            )
        if frame.ndim not in (2, 3) or (frame.ndim == 3 and not 1 <= frame.shape[2] <= 4):
            raise InputError(
                f"frame {t} has shape {frame.shape}: expected H x W (gray) or H x W x C with "
                "1 to 4 channels"
            )
        if frame.dtype.kind not in "uifb":
            raise InputError(f"frame {t} has unsupported dtype {frame.dtype}")
        if hasattr(self, "size") and frame.shape[:2] != self.size:
            raise InputError(
                f"frame {t} is {frame.shape[1]}x{frame.shape[0]} but frame 0 is "
                f"{self.size[1]}x{self.size[0]}: all frames must have the same size"
            )
        return frame

    @property
    def needs_range(self) -> bool:
        """Whether frames are scaled by percentiles rather than by their dtype's range."""
        return self.normalize == "percentile" or (
            self.normalize == "auto" and self.dtype not in (np.uint8, np.bool_)
        )

    @property
    def intensity_range(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel (low, high) mapped to 0 and 1, from percentiles of sampled frames."""
        if self._range is None:
            idx = np.unique(np.linspace(0, self._n - 1, min(self._n, PERCENTILE_SAMPLES)).round())
            samples = [_as_hwc(self._raw(int(t))).astype(np.float32) for t in idx]
            stack = np.stack(samples).reshape(-1, samples[0].shape[-1])
            lo, hi = np.percentile(stack, PERCENTILES, axis=0)
            hi = np.where(hi > lo, hi, lo + 1)
            self._range = (lo.astype(np.float32), hi.astype(np.float32))
        return self._range

    def _frame(self, t: int) -> np.ndarray:
        if not 0 <= t < self._n:
            raise InputError(f"frame {t} is outside the video (0..{self._n - 1})")
        frame = _as_hwc(self._raw(t))
        if frame.shape[-1] == 4:
            frame = frame[..., :3]  # alpha carries no appearance
        return frame

    def read(self, t: int) -> np.ndarray:
        """Frame ``t`` as H x W x 3 float32 in [0, 1]."""
        frame = self._frame(t)
        kind = frame.dtype
        if self.needs_range:
            lo, hi = self.intensity_range
            lo, hi = lo[: frame.shape[-1]], hi[: frame.shape[-1]]
            out = (frame.astype(np.float32) - lo) / (hi - lo)
        elif kind == np.bool_:
            out = frame.astype(np.float32)
        elif kind.kind == "f":
            out = frame.astype(np.float32)
        else:
            out = frame.astype(np.float32) / float(np.iinfo(kind).max)
        out = np.clip(out, 0.0, 1.0, out=out)
        return _to_three(out)

    def tensor(self, t: int, geo: Geometry, device: torch.device) -> Tensor:
        """Frame ``t`` as network input [1, 3, Hp, Wp] on ``device``."""
        frame = self._frame(t)
        if frame.dtype == np.uint8 and not self.needs_range and frame.shape[-1] in (1, 3):
            # Bytes to the device, floats there: a quarter of the data crosses to a GPU, and
            # the conversion runs beside the network (480p on CPU: 4 against 6 ms a frame).
            # The same float32 division as ``read``, so the same numbers.
            frame = np.ascontiguousarray(frame)
            if not frame.flags.writeable:
                # Decoded request bytes are read-only; torch wants memory it may write.
                frame = frame.copy()
            x = torch.from_numpy(frame).to(device)
            x = x.permute(2, 0, 1).float().div_(255.0).expand(3, -1, -1)
        else:
            x = torch.from_numpy(np.ascontiguousarray(self.read(t).transpose(2, 0, 1)))
            x = x.to(device)
        return to_network(x.unsqueeze(0), geo)


def _as_hwc(frame: np.ndarray) -> np.ndarray:
    return frame[..., None] if frame.ndim == 2 else frame


def _to_three(frame: np.ndarray) -> np.ndarray:
    c = frame.shape[-1]
    if c == 3:
        return frame
    if c == 1:
        return np.repeat(frame, 3, axis=-1)
    # Two channels (e.g. two fluorescence markers) shown as red and green, as a viewer would.
    return np.concatenate([frame, np.zeros_like(frame[..., :1])], axis=-1)


def check_labels(labels: Any, size: tuple[int, int], where: str) -> np.ndarray:
    """Validate a label image (0 = background, any positive integer an object id) of the
    frames' size; returned as the smallest unsigned dtype holding its ids (uint8 for 0..255,
    which is what palette PNGs can store, uint16 or uint32 above: Cell Tracking Challenge
    masks number their cells past 255)."""
    arr = np.asarray(labels)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise InputError(f"{where}: labels must be a 2-D label image, got shape {arr.shape}")
    if arr.shape != tuple(size):
        raise InputError(
            f"{where}: mask is {arr.shape[1]}x{arr.shape[0]} but the frames are {size[1]}x{size[0]}"
        )
    if arr.dtype.kind == "b":
        arr = arr.astype(np.uint8)
    if arr.dtype.kind == "f":
        if not np.all(np.mod(arr, 1) == 0):
            raise InputError(f"{where}: labels must be whole numbers (object ids)")
    elif arr.dtype.kind not in "ui":
        raise InputError(f"{where}: labels have unsupported dtype {arr.dtype}")
    low, high = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
    if low < 0:
        raise InputError(f"{where}: object id {low} is negative (0 is background, ids are > 0)")
    if high > MAX_OBJECT_ID:
        raise InputError(f"{where}: object id {high} is above {MAX_OBJECT_ID}")
    return arr.astype(label_dtype(high), copy=False)


#: largest object id (the largest uint32: label images are at most 32-bit)
MAX_OBJECT_ID = 2**32 - 1


def label_dtype(max_id: int) -> np.dtype:
    """The smallest unsigned integer dtype that holds object ids up to ``max_id``."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if max_id <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise InputError(f"object id {max_id} is above {MAX_OBJECT_ID}")
