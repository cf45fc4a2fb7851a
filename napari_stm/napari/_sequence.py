"""Which axis of an image layer is the sequence, and where each frame lives in the layers.

napari layers can be T x Y x X, T x Y x X x C (RGB), T x C x Y x X (one channel is used), or
T x Z x Y x X (propagate through time at one z, or through z at one time point). A
:class:`SequenceView` fixes that choice; :class:`LayerFrames` hands the engine one frame at a
time so that a dask-backed layer is never loaded whole. No napari imports here: these are
plain arrays and indices, tested without a viewer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from napari_stm.core.errors import InputError


@dataclass(frozen=True)
class SequenceView:
    """How frame ``t`` of the sequence is read from the image and written into the labels.

    Axes are the image data's axes. ``fixed`` holds the leading axes that are neither the
    sequence nor the channel axis, at the index the viewer shows.
    """

    image_shape: tuple[int, ...]
    rgb: bool
    seq_axis: int
    channel_axis: int | None = None
    channel: int = 0
    fixed: tuple[tuple[int, int], ...] = ()

    @property
    def n_leading(self) -> int:
        return len(self.image_shape) - (3 if self.rgb else 2)

    @property
    def n_frames(self) -> int:
        return self.image_shape[self.seq_axis]

    @property
    def frame_size(self) -> tuple[int, int]:
        ys = -3 if self.rgb else -2
        return self.image_shape[ys], self.image_shape[ys + 1]

    @property
    def labels_shape(self) -> tuple[int, ...]:
        """The shape a matching labels layer has: the image's without channel and RGB axes."""
        lead = [
            n for a, n in enumerate(self.image_shape[: self.n_leading]) if a != self.channel_axis
        ]
        return (*lead, *self.frame_size)

    def image_index(self, t: int) -> tuple[int, ...]:
        idx = dict(self.fixed)
        idx[self.seq_axis] = t
        if self.channel_axis is not None:
            idx[self.channel_axis] = self.channel
        return tuple(idx[a] for a in range(self.n_leading))

    def labels_index(self, t: int) -> tuple[int, ...]:
        full = self.image_index(t)
        return tuple(i for a, i in enumerate(full) if a != self.channel_axis)

    def frame_key(self, t: int) -> str:
        """A name for the labels frame, stable across runs (used as a JSON key)."""
        return ",".join(str(i) for i in self.labels_index(t))

    def context_key(self) -> str:
        """A name for the sequence itself (which axis, which fixed position)."""
        lab_axis = self._labels_axis(self.seq_axis)
        fixed = ",".join(f"{self._labels_axis(a)}={i}" for a, i in self.fixed)
        return f"axis={lab_axis};{fixed}"

    def _labels_axis(self, axis: int) -> int:
        if self.channel_axis is not None and axis > self.channel_axis:
            return axis - 1
        return axis


def make_view(
    image_shape: Sequence[int],
    rgb: bool,
    labels_shape: Sequence[int],
    along_z: bool = False,
    channel: int = 0,
    position: Sequence[float] | None = None,
) -> SequenceView:
    """Work out the sequence view of an image layer and a labels layer, or say what is wrong.

    The channel axis (if any) is the image axis the labels layer lacks. The sequence axis is
    the first axis (time), or with ``along_z`` the axis just before Y and X. Other leading axes
    are held at ``position`` (the viewer's current point, in image data coordinates).
    """
    image_shape = tuple(int(n) for n in image_shape)
    labels_shape = tuple(int(n) for n in labels_shape)
    spatial = 3 if rgb else 2
    n_lead = len(image_shape) - spatial
    size = image_shape[n_lead : n_lead + 2]
    if n_lead < 1:
        raise InputError(
            f"the image layer is a single {'RGB ' if rgb else ''}frame (shape {image_shape}): "
            "there is nothing to propagate through"
        )
    if labels_shape[-2:] != size:
        raise InputError(
            f"the labels layer's frames are {labels_shape[-1]}x{labels_shape[-2]} but the "
            f"image's are {size[1]}x{size[0]}: they must be the same size"
        )
    lead = image_shape[:n_lead]
    lab_lead = labels_shape[:-2]
    channel_axis: int | None = None
    if len(lab_lead) == n_lead:
        if lab_lead != lead:
            raise InputError(
                f"the labels layer has shape {labels_shape} but the image layer has shape "
                f"{image_shape}{' (RGB)' if rgb else ''}: they must match"
            )
    elif len(lab_lead) == n_lead - 1 and n_lead >= 2:
        # The extra image axis is a channel axis. When several fit (T == C) take the later one:
        # channels come after time in the usual TCYX / TZCYX orders.
        for a in reversed(range(n_lead)):
            if lead[:a] + lead[a + 1 :] == lab_lead:
                channel_axis = a
                break
        if channel_axis is None:
            raise InputError(
                f"the labels layer has shape {labels_shape}, which matches no channel of the "
                f"image layer of shape {image_shape}"
            )
        if not 0 <= channel < lead[channel_axis]:
            raise InputError(
                f"channel {channel} does not exist: the image has {lead[channel_axis]} channels"
            )
    else:
        raise InputError(
            f"the labels layer has shape {labels_shape} but the image layer has shape "
            f"{image_shape}{' (RGB)' if rgb else ''}: the labels need the image's frame axes"
        )

    seq_candidates = [a for a in range(n_lead) if a != channel_axis]
    if not seq_candidates:
        raise InputError("the image has no time or z axis to propagate through")
    seq_axis = seq_candidates[-1] if along_z else seq_candidates[0]

    pos = list(position or [])
    fixed = []
    for a in seq_candidates:
        if a == seq_axis:
            continue
        i = int(round(pos[a])) if a < len(pos) else 0
        fixed.append((a, min(max(i, 0), lead[a] - 1)))
    return SequenceView(
        image_shape=image_shape,
        rgb=rgb,
        seq_axis=seq_axis,
        channel_axis=channel_axis,
        channel=channel if channel_axis is not None else 0,
        fixed=tuple(fixed),
    )


class LayerFrames:
    """The engine's frame source: ``len()`` and ``[t]`` -> one H x W (x C) numpy frame.

    Only the requested frame is computed, so dask and zarr layers stay lazy.
    """

    def __init__(self, data: Any, view: SequenceView) -> None:
        self.data = data
        self.view = view

    def __len__(self) -> int:
        return self.view.n_frames

    def __getitem__(self, t: int) -> np.ndarray:
        t = int(t)
        if not 0 <= t < len(self):
            raise IndexError(t)
        return np.asarray(self.data[self.view.image_index(t)])
