"""A band of columns of a sequence: a part of every frame kept apart from training.

Training on a Cell Tracking Challenge time-lapse may read only a band of its width
(`napari-stm train --ctc-columns 0:0.5`); the other band is then a held-out sequence of its own,
measured by `napari-stm bench annotate --columns 0.5:1` and by benchmarks/heldout_eval.py. All
of them cut the band with these functions, so "the right half" is the same pixels everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from napari_stm.core.errors import InputError
from napari_stm.io import FrameSource


def parse_columns(text: str, option: str = "--columns") -> tuple[float, float]:
    """``"A:B"`` -> (A, B), shares of the width with 0 <= A < B <= 1 (``"0.5:1"``: right half).

    Raises :class:`InputError` naming ``option`` and what is wrong.
    """
    try:
        a_text, b_text = str(text).split(":")
        a, b = float(a_text), float(b_text)
    except ValueError:
        raise InputError(
            f"{option} must be A:B, two shares of the frame width such as 0.5:1 (the right "
            f"half), not {text!r}"
        ) from None
    if not 0 <= a < b <= 1:
        raise InputError(f"{option} {text}: A and B are shares of the frame width, 0 <= A < B <= 1")
    return a, b


def band(width: int, columns: Sequence[float]) -> slice:
    """The pixel columns of a frame ``width`` wide that the shares ``columns`` name."""
    x0, x1 = int(columns[0] * width), int(columns[1] * width)
    if x1 <= x0:
        raise InputError(
            f"columns {columns[0]:g}:{columns[1]:g} of a frame {width} pixels wide hold no "
            "whole pixel column"
        )
    return slice(x0, x1)


def band_objects(labels: np.ndarray, min_pixels: int) -> list[int]:
    """The ids of a band's label image that keep at least ``min_pixels`` pixels in it: a cell
    the band's edge cuts to a sliver is left out, so no method is scored on slivers."""
    ids, counts = np.unique(labels, return_counts=True)
    return [int(i) for i, c in zip(ids, counts, strict=True) if i != 0 and c >= min_pixels]


class BandSource(FrameSource):
    """The band ``cols`` of every frame of ``source``, read one frame at a time."""

    kind = "band"

    def __init__(self, source: FrameSource, cols: slice) -> None:
        h, w, *rest = source.frame_shape
        super().__init__(
            source.path, list(source.stems), (h, len(range(w)[cols]), *rest), source.dtype
        )
        self.source, self.cols = source, cols

    def _read(self, t: int) -> np.ndarray:
        return np.ascontiguousarray(self.source[t][:, self.cols])

    def close(self) -> None:
        self.source.close()
