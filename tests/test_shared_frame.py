"""Trackers stepping one SharedFrame encode it once and give each tracker's own results."""

from __future__ import annotations

import numpy as np
import torch

from napari_stm.core.engine import PropagationConfig, SharedFrame, Tracker
from napari_stm.core.weights import load_model
from napari_stm.synthetic import make_clip

CPU = PropagationConfig(device="cpu")


def test_shared_frame_encodes_once_and_changes_nothing():
    torch.manual_seed(0)
    model = load_model("lite0-match", device="cpu")
    frames, labels = make_clip(6, 64, 96, n_objects=3, seed=2, occlusion=False)
    alone = [Tracker(model, CPU, keep_sources=False) for _ in range(3)]
    together = [Tracker(model, CPU, keep_sources=False) for _ in range(3)]
    for k in range(3):
        mask = (labels[0] == k + 1).astype(np.uint8)
        alone[k].step(frames[0], mask)
        together[k].step(frames[0], mask)
    calls = []
    encode = together[0].runtime.encode_query

    def counted(image):
        calls.append(image.shape)
        return encode(image)

    for t in range(1, 6):
        want = [tr.step(frames[t]) for tr in alone]
        shared = SharedFrame(frames[t])
        calls.clear()
        together[0].runtime.encode_query = counted
        try:
            got = [tr.step(shared) for tr in together]
        finally:
            del together[0].runtime.encode_query
        assert len(calls) == 1 and shared.reused == 2
        for (wl, wp), (gl, gp) in zip(want, got, strict=True):
            assert np.array_equal(wl, gl)
            assert np.array_equal(wp, gp)
