"""napari sample data: a synthetic fluorescence time-lapse with the first frame labelled.

Generated on the fly (no download), deterministic for a seed. The full ground truth is
available from :func:`sample_ground_truth` so tests and benchmarks can score a propagation.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from napari_stm.synthetic import make_timelapse

#: size of the sample napari's File > Open Sample shows
SAMPLE = {"n_frames": 24, "height": 160, "width": 160, "n_cells": 6, "seed": 3}


def sample_ground_truth(
    n_frames: int = SAMPLE["n_frames"],
    height: int = SAMPLE["height"],
    width: int = SAMPLE["width"],
    n_cells: int = SAMPLE["n_cells"],
    seed: int = SAMPLE["seed"],
) -> tuple[np.ndarray, np.ndarray]:
    """(frames [T, H, W] uint16, labels [T, H, W] uint8) of the sample time-lapse.

    The cell that divides gives both daughters its own id (the lineage), because a run
    started from the first frame follows "this cell and its progeny": the generator's new
    daughter id is merged back into its parent's.
    """
    frames, labels = make_timelapse(n_frames, height, width, n_cells, seed, dtype=np.uint16)
    labels = labels.copy()
    labels[labels == n_cells + 1] = 1  # the generator's second daughter of cell 1
    return frames, labels


def make_sample_data(**kwargs: Any) -> list[tuple[np.ndarray, dict, str]]:
    """The time-lapse as an Image layer and a Labels layer painted on frame 0 only."""
    frames, labels = sample_ground_truth(**kwargs)
    painted = np.zeros_like(labels)
    painted[0] = labels[0]
    lo, hi = np.percentile(frames, (1, 99.8))
    return [
        (
            frames,
            {"name": "time-lapse", "colormap": "gray", "contrast_limits": (float(lo), float(hi))},
            "image",
        ),
        (painted, {"name": "cells", "opacity": 0.6}, "labels"),
    ]
