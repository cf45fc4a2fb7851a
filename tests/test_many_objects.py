"""The engine's many-object shortcuts (core/step.py ``MANY_OBJECTS``): the aggregation straight
to probabilities, labels resized only along boundaries, motion centres from one maximum. Each
must give the plain arithmetic's answer to float rounding, and fewer objects than the threshold
must run the plain arithmetic bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_network import TinyMatchWithPrior

from napari_stm.bench import SyntheticVideo
from napari_stm.core import step as stepping
from napari_stm.core.engine import PropagationConfig, Propagator
from napari_stm.core.frames import from_network, geometry, labels_from_network
from napari_stm.core.motion import MotionEstimate
from napari_stm.core.readout import aggregate_probs, one_object_probs, soft_aggregate


def _smooth_probs(classes: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Class probabilities [classes, h, w] with regions and soft boundaries, like a network's."""
    g = torch.Generator().manual_seed(seed)
    coarse = 6 * torch.randn(1, classes, h // 8, w // 8, generator=g)
    return F.interpolate(coarse, size=(h, w), mode="bilinear")[0].softmax(0)


@pytest.mark.parametrize("extra", [0, 3])
@pytest.mark.parametrize("n", [12, 1])  # 1: a batch of one-object trackers (its own arithmetic)
def test_aggregate_probs_is_the_softmax_of_the_soft_aggregation(extra, n):
    g = torch.Generator().manual_seed(0)
    objects = torch.rand(2, n, 9, 11, generator=g) ** 4  # batched, mostly small
    objects[0, 0, :2] = 1.0  # saturated and empty pixels hit the clamps
    objects[1, :, 3] = 0.0
    plain = torch.softmax(soft_aggregate(objects, extra_slots=extra), dim=-3)[:, : n + 1]
    fast = aggregate_probs(objects, extra_slots=extra)
    assert fast.shape == plain.shape
    assert torch.allclose(fast, plain, atol=2e-6, rtol=1e-5)


def test_one_object_probs_are_the_aggregation_of_the_sigmoid():
    # Many one-object trackers stepped together (a CVAT request on stm-lite) form their
    # probabilities from the network's logits: the soft aggregation's softmax of the sigmoid.
    g = torch.Generator().manual_seed(1)
    logits = 8 * torch.randn(3, 1, 9, 11, generator=g)
    logits[0, 0, :2] = 40.0  # beyond the clamps both ways, and undecided
    logits[1, 0, 3] = -40.0
    logits[2, 0, 4] = 0.0
    plain = torch.softmax(soft_aggregate(torch.sigmoid(logits)), dim=-3)
    direct = one_object_probs(logits.clone())
    assert direct.shape == plain.shape == (3, 2, 9, 11)
    assert torch.allclose(direct, plain, atol=2e-6, rtol=1e-5)
    assert torch.equal(direct.argmax(-3), plain.argmax(-3))


@pytest.mark.parametrize("size", [(75, 133), (96, 160)])
def test_labels_from_network_are_the_full_size_maximum(size):
    geo = geometry(size, 16, 64)  # resized and padded
    assert geo.resized
    probs = _smooth_probs(12, *geo.padded, seed=1)
    plain = from_network(probs[None], geo)[0].max(0).indices
    fast = labels_from_network(probs, geo)
    assert fast.shape == size
    assert (fast == plain).float().mean() > 0.999
    # not the trivial case: several classes and many boundary pixels
    assert len(plain.unique()) > 5


def test_labels_from_network_without_resizing_is_the_maximum():
    geo = geometry((64, 80), 16, None)
    probs = _smooth_probs(5, *geo.padded, seed=2)
    assert torch.equal(labels_from_network(probs, geo), from_network(probs[None], geo)[0].max(0)[1])


def test_motion_from_the_class_maximum_equals_the_plain_centres():
    probs = [_smooth_probs(11, 48, 64, seed=s) for s in (3, 4)]
    speeds = []
    for mode in ("plain", "disjoint", "top"):
        motion = MotionEstimate()
        for t, p in enumerate(probs):
            if mode == "plain":
                motion.observe(t, p[1:])
            elif mode == "disjoint":
                motion.observe(t, p[1:], disjoint=True)
            else:
                top = p.max(0)
                motion.observe(t, p[1:], top=(top.values, top.indices))
        assert motion._last is not None
        speeds.append((motion.speed, motion._last[1], motion._last[2]))
    (s0, c0, p0), *others = speeds
    assert s0 is not None
    for s, c, p in others:
        assert s == pytest.approx(s0, rel=1e-5)
        assert torch.allclose(c, c0, atol=1e-6)
        assert torch.equal(p, p0)


def _propagate(objects: int, many: int, monkeypatch) -> dict:
    monkeypatch.setattr(stepping, "MANY_OBJECTS", many)
    video = SyntheticVideo(4, 120, 200, objects, seed=2)
    net = TinyMatchWithPrior()
    # max_side: frames are resized, so the labels come through labels_from_network
    prop = Propagator(net, [video[t] for t in range(4)], PropagationConfig(max_side=128))
    prop.add_reference(0, video.labels(0))
    return {r.t: (r.labels.copy(), r.probs.copy()) for r in prop.propagate("forward")}


def test_many_objects_give_the_plain_arithmetic_answer(monkeypatch):
    plain = _propagate(10, 10**9, monkeypatch)
    fast = _propagate(10, stepping.MANY_OBJECTS, monkeypatch)
    for t in plain:
        assert np.abs(plain[t][1] - fast[t][1]).max() < 1e-5
        assert (plain[t][0] == fast[t][0]).mean() > 0.999
    assert len(np.unique(fast[3][0])) > 5  # the objects are still tracked


def test_one_object_runs_the_plain_arithmetic_bit_for_bit(monkeypatch):
    plain = _propagate(1, 10**9, monkeypatch)
    default = _propagate(1, stepping.MANY_OBJECTS, monkeypatch)
    for t in plain:
        assert np.array_equal(plain[t][0], default[t][0])
        assert np.array_equal(plain[t][1], default[t][1])
