"""The engine's measurement of object motion, which sets the width of the read's motion prior."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_network import TinyMatch, TinyMatchWithPrior, mean_iou

from napari_stm.core import motion
from napari_stm.core.engine import PropagationConfig, Propagator, Tracker
from napari_stm.core.motion import MotionEstimate
from napari_stm.synthetic import make_clip, make_timelapse


def square(y: int, x: int, size: int = 64, side: int = 8) -> torch.Tensor:
    m = torch.zeros(1, size, size)
    m[0, y : y + side, x : x + side] = 1
    return m


def test_speed_is_the_centre_displacement_per_frame_over_the_longer_side():
    est = MotionEstimate()
    assert est.sigma == motion.MIN_SIGMA  # nothing measured yet
    est.observe(0, square(10, 10))
    est.observe(2, square(10, 22))  # 12 pixels in 2 frames of a 64-pixel frame
    assert est.speed == pytest.approx(6 / 64)
    assert est.sigma == pytest.approx(min(motion.MAX_SIGMA, motion.GAIN * 6 / 64))


def test_speed_rises_at_once_and_falls_slowly():
    est = MotionEstimate()
    est.observe(0, square(10, 10))
    est.observe(1, square(10, 14))
    fast = est.speed
    est.observe(2, square(10, 14))  # still
    assert est.speed == pytest.approx(motion.DECAY * fast)
    est.observe(3, square(10, 30))
    assert est.speed == pytest.approx(16 / 64)


def test_slow_objects_get_the_narrowest_prior_and_tiny_ones_are_ignored():
    est = MotionEstimate()
    est.observe(0, square(10, 10))
    est.observe(1, square(10, 10))
    assert est.sigma == motion.MIN_SIGMA
    est.observe(2, square(40, 40, side=2))  # 4 pixels: no reliable centre
    assert est.speed == 0.0


def test_small_objects_get_a_prior_of_their_own_size():
    # 8-pixel squares in a 512 frame: 0.4 diameters (about 3.6 pixels) instead of 0.03 x 512.
    est = MotionEstimate()
    est.observe(0, square(100, 100, size=512))
    assert est.sigma == motion.MIN_SIGMA  # no motion measured yet: it may be fast
    est.observe(1, square(100, 100, size=512))
    diameter = np.sqrt(4 * 64 / np.pi) / 512
    assert est.size == pytest.approx(diameter)
    assert est.sigma == pytest.approx(motion.SIZE_GAIN * diameter)
    assert est.sigma < motion.MIN_SIGMA
    # Speed still widens it, and the size stays that of the first objects seen.
    est.observe(2, square(100, 120, size=512))
    assert est.sigma == pytest.approx(motion.GAIN * 20 / 512)
    est.observe(3, square(100, 120, size=512, side=40))
    assert est.size == pytest.approx(diameter)
    # Objects of 7.5% of the frame or more keep MIN_SIGMA (every DAVIS first mask).
    large = MotionEstimate()
    large.observe(0, square(10, 10, size=64, side=8))  # 9 pixels across in 64: 14%
    assert large.sigma == motion.MIN_SIGMA


def test_state_round_trip():
    est = MotionEstimate()
    est.observe(0, square(10, 10))
    est.observe(1, square(12, 10))
    again = MotionEstimate()
    again.load_state_dict(est.state_dict())
    assert again.size == est.size
    for e in (est, again):
        e.observe(2, square(20, 10))
    assert again.speed == est.speed
    # A state written before the size was kept (a CVAT session across an upgrade) still loads.
    old = {k: v for k, v in est.state_dict().items() if k != "size"}
    again.load_state_dict(old)
    assert again.size is None and again.speed == est.speed


def look_alike_cells_iou(model: TinyMatch, motion_sigma: float | None) -> float:
    """Mean IoU over the frames before cell 1 divides (frame 6) of identical-looking cells."""
    frames, labels = make_timelapse(12, 96, 96, n_cells=6, seed=3, dtype=np.uint8)
    ids = [i for i in range(1, 7) if (labels[0] == i).any()]
    prop = Propagator(model, frames, PropagationConfig(motion_sigma=motion_sigma))
    prop.add_reference(0, labels[0])
    pred = {r.t: r.labels for r in prop.propagate("forward") if not r.is_reference and r.t < 6}
    return mean_iou(pred, labels, ids)


@pytest.mark.parametrize(
    ("model", "motion_sigma"),
    [(TinyMatch(), 0.02), (TinyMatchWithPrior(), None)],
    ids=["fixed", "measured"],
)
def test_prior_keeps_look_alike_cells_apart(model, motion_sigma):
    # By appearance alone a query pixel matches every cell, and the identities mix; the prior
    # keeps each cell's label where that cell was.
    off = look_alike_cells_iou(TinyMatch(), 0.0)
    on = look_alike_cells_iou(model, motion_sigma)
    assert on > off + 0.1, (off, on)


def test_tracker_state_keeps_the_measured_motion():
    frames, labels = make_clip(n_frames=6, height=64, width=96, seed=0)
    tr = Tracker(TinyMatchWithPrior(), PropagationConfig())
    tr.step(frames[0], labels[0])
    for t in range(1, 4):
        tr.step(frames[t])
    state = tr.state_dict()
    assert state["motion"]["speed"] is not None
    again = Tracker(TinyMatchWithPrior(), PropagationConfig())
    again.load_state_dict(state)
    assert again.motion_sigma == tr.motion_sigma
    del state["motion"]  # a state saved before the motion prior still loads
    Tracker(TinyMatchWithPrior(), PropagationConfig()).load_state_dict(state)


def test_config_overrides_the_measurement():
    tr = Tracker(TinyMatchWithPrior(), PropagationConfig(motion_sigma=0.07))
    assert tr.motion_sigma == 0.07
    assert Tracker(TinyMatchWithPrior(), PropagationConfig(motion_sigma=0)).motion_sigma is None
    assert Tracker(TinyMatch(), PropagationConfig()).motion_sigma is None
    official = PropagationConfig(memory="official", motion_sigma=0.07)
    assert Tracker(TinyMatchWithPrior(), official).motion_sigma is None


class HazyMatch(TinyMatchWithPrior):
    """Also gives every object a faint probability everywhere, as a trained network does."""

    def segment(self, *args, **kwargs):
        return super().segment(*args, **kwargs).clamp(min=0.05)


def test_engine_measures_the_speed_of_the_segmented_objects():
    # Measured where each object wins after aggregation: its own map is faint but not zero
    # elsewhere and may cover look-alike cells, and its centre would move towards theirs and
    # the frame's (on ctc-sim-01 the prior widened to its maximum after one frame and lost a
    # third of the nuclei).
    frames, labels = make_timelapse(6, 96, 96, n_cells=6, seed=3, dtype=np.uint8)
    ids = [i for i in range(1, 7) if (labels[0] == i).any()]
    tr = Tracker(HazyMatch(), PropagationConfig())
    tr.step(frames[0], labels[0])
    speeds = []
    for t in range(1, 4):
        tr.step(frames[t])
        centres = [
            [np.argwhere(labels[s] == i).mean(0) for i in ids if (labels[s] == i).any()]
            for s in (t - 1, t)
        ]
        steps = [np.linalg.norm(b - a) / 96 for a, b in zip(*centres, strict=True)]
        speeds.append(float(np.median(steps)))
    assert tr.motion.speed is not None
    assert tr.motion.speed <= 2 * max(speeds) + 0.005, (tr.motion.speed, speeds)


def test_won_centres_from_given_positions_equal_their_own_pass():
    # The trackers of one call pass the object pixels' positions they found once (for their
    # boxes too): the same counts and centres, bit for bit.
    g = torch.Generator().manual_seed(0)
    value = torch.rand(5, 24, 40, generator=g)
    cls = (torch.rand(5, 24, 40, generator=g) > 0.6).to(torch.uint8)
    mass, centres = motion.won_centres((value, cls), 1)
    got = motion.won_centres((value, cls), 1, cls.nonzero(as_tuple=True))
    assert torch.equal(mass, got[0]) and torch.equal(centres, got[1])
    assert torch.equal(mass[:, 0], ((cls == 1) & (value > 0.5)).sum((1, 2)).float())
