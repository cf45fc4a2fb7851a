"""Trackers stepping one SharedFrame encode it once and give each tracker's own results."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from napari_stm.core.engine import PropagationConfig, SharedFrame, Tracker, step_trackers
from napari_stm.core.frames import crop_padding, foreground_box
from napari_stm.core.motion import MotionEstimate, won_centres
from napari_stm.core.readout import MotionPrior
from napari_stm.core.runtime import Runtime
from napari_stm.core.step import MANY_OBJECTS
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


def _trackers(model, frames, labels, k: int, config=CPU) -> list[Tracker]:
    trackers = [Tracker(model, config, keep_sources=False) for _ in range(k)]
    shared = SharedFrame(frames[0])
    for i, tr in enumerate(trackers):
        tr.step(shared, (labels[0] == i + 1).astype(np.uint8))
    return trackers


def _pairs(results) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(r.labels, r.probs) for r in results]


def _count_segments(runtime, calls: list) -> None:
    segment = runtime.segment

    def counted(query, keys, values, *args, **kwargs):
        calls.append(values.shape[0])
        return segment(query, keys, values, *args, **kwargs)

    runtime.segment = counted


def _three_twice(
    model_name: str = "lite0-match", n_frames: int = 5
) -> tuple[np.ndarray, list[Tracker], list[Tracker], list]:
    """A clip's three objects started twice, one tracker each: a set to step alone and a set
    to step together, whose network calls (objects per call) are counted in the list."""
    model = load_model(model_name, device="cpu")
    frames, labels = make_clip(n_frames, 64, 96, n_objects=3, seed=2, occlusion=False)
    alone = _trackers(model, frames, labels, 3)
    together = _trackers(model, frames, labels, 3)
    calls: list = []
    _count_segments(together[0].runtime, calls)
    return frames, alone, together, calls


def _record_encodes(runtime: Runtime) -> list:
    """Record the keyword arguments of each of ``runtime``'s memory-encoder calls (undone by
    ``del runtime.encode_memory``)."""
    encode = runtime.encode_memory
    memorised: list = []
    runtime.encode_memory = lambda *a, **kw: memorised.append(kw) or encode(*a, **kw)
    return memorised


def _step_both(frame: np.ndarray, alone: list, together: list, *recorders: list) -> tuple:
    """Step ``alone`` one by one and ``together`` in shared calls on ``frame``, the
    ``recorders`` emptied in between: what each set gave, as (labels, probs) pairs."""
    want = [tr.step(frame) for tr in alone]
    for recorded in recorders:
        recorded.clear()
    return want, _pairs(step_trackers(together, SharedFrame(frame)))


def _assert_as_alone(want: list, got: list) -> None:
    """Trackers stepped together give each its (labels, probs) alone, to float rounding."""
    for (wl, wp), (gl, gp) in zip(want, got, strict=True):
        assert np.abs(wp - gp).max() < 1e-5
        assert (wl == gl).mean() > 0.999


def test_step_trackers_reads_and_decodes_once_and_equals_each_tracker_alone():
    frames, alone, together, calls = _three_twice()
    runtime = together[0].runtime
    memorised = _record_encodes(runtime)
    try:
        for t in range(1, 5):
            want, got = _step_both(frames[t], alone, together, calls, memorised)
            assert calls == [3]  # one network call, the three trackers' objects side by side
            # the frame before written to the three memories by one memory-encoder call
            assert memorised == ([] if t == 1 else [{"groups": 3}])
            _assert_as_alone(want, got)
    finally:
        del runtime.segment, runtime.encode_memory
    for a, b in zip(alone, together, strict=True):  # the states too
        assert a.bank.frames() == b.bank.frames() and a.steps == b.steps
        ka, va = a.bank.tensors(5)
        kb, vb = b.bank.tensors(5)
        assert torch.allclose(ka, kb) and torch.allclose(va.float(), vb.float(), atol=1e-5)


def test_step_trackers_with_one_tracker_is_its_step_bit_for_bit():
    model = load_model("lite0-match", device="cpu")
    frames, labels = make_clip(3, 64, 96, n_objects=1, seed=3, occlusion=False)
    (alone,) = _trackers(model, frames, labels, 1)
    (together,) = _trackers(model, frames, labels, 1)
    for t in range(1, 3):
        wl, wp = alone.step(frames[t])
        ((gl, gp),) = _pairs(step_trackers([together], SharedFrame(frames[t])))
        assert np.array_equal(wl, gl) and np.array_equal(wp, gp)


def test_step_trackers_keeps_trackers_with_other_memories_apart():
    # A tracker started a frame later holds other memory keys: it must read its own memory.
    model = load_model("lite0-match", device="cpu")
    frames, labels = make_clip(4, 64, 96, n_objects=2, seed=4, occlusion=False)
    early = _trackers(model, frames, labels, 2)
    late = Tracker(model, CPU, keep_sources=False)
    late.step(frames[1], (labels[1] == 2).astype(np.uint8))
    early_alone = _trackers(model, frames, labels, 2)
    late_alone = Tracker(model, CPU, keep_sources=False)
    late_alone.step(frames[1], (labels[1] == 2).astype(np.uint8))
    for tr in (*early, *early_alone):
        tr.step(frames[1])
    calls: list = []
    _count_segments(late.runtime, calls)
    try:
        got = _pairs(step_trackers([*early, late], SharedFrame(frames[2])))
    finally:
        del late.runtime.segment
    assert sorted(calls) == [1, 2]
    want = [tr.step(frames[2]) for tr in (*early_alone, late_alone)]
    for (wl, wp), (gl, gp) in zip(want, got, strict=True):
        assert np.abs(wp - gp).max() < 1e-5 and (wl == gl).mean() > 0.999


def test_trackers_started_on_one_frame_encode_it_once():
    model = load_model("lite0-match", device="cpu")
    frames, labels = make_clip(2, 64, 96, n_objects=3, seed=2, occlusion=False)
    alone = [Tracker(model, CPU, keep_sources=False) for _ in range(3)]
    for i, tr in enumerate(alone):
        tr.step(frames[0], (labels[0] == i + 1).astype(np.uint8))
    runtime = alone[0].runtime
    calls: list = []
    encode = runtime.encode_query
    runtime.encode_query = lambda image: calls.append(1) or encode(image)
    try:
        together = _trackers(model, frames, labels, 3)
    finally:
        del runtime.encode_query
    assert len(calls) == 1
    for a, b in zip(alone, together, strict=True):
        (ka, va), (kb, vb) = a.bank.tensors(1), b.bank.tensors(1)
        assert torch.equal(ka, kb) and torch.equal(va, vb)


def test_steps_computed_ahead_are_taken_and_leave_unasked_trackers_as_they_were():
    frames, alone, together, calls = _three_twice()

    def same(want, got):
        (wl, wp), (gl, gp) = want, got
        assert np.abs(wp - gp).max() < 1e-5 and (wl == gl).mean() > 0.999

    try:
        # Frame 1: tracker 0 asked first computes all three; 2 takes its step; 1 is never asked.
        # (alone and together share the runtime: alone's steps run first, then calls cleared)
        want = [alone[0].step(frames[1]), alone[2].step(frames[1])]
        shared = SharedFrame(frames[1])
        calls.clear()
        (got0,) = _pairs(step_trackers([together[0]], shared, ahead=together))
        assert calls == [3] and shared.ahead == 2
        (got2,) = _pairs(step_trackers([together[2]], shared, ahead=together))
        assert calls == [3] and shared.ahead == 1
        same(want[0], got0)
        same(want[1], got2)
        assert together[1].steps == alone[1].steps == 1
        # Frame 2: all three; tracker 1 reads as one that never saw frame 1, apart from the rest.
        want = [a.step(frames[2]) for a in alone]
        calls.clear()
        got = _pairs(step_trackers(together, SharedFrame(frames[2])))
        assert sorted(calls) == [1, 2]
        for w, g in zip(want, got, strict=True):
            same(w, g)
        # Frame 3: a step computed ahead goes stale when its tracker steps by another route.
        shared = SharedFrame(frames[3])
        step_trackers([together[0]], shared, ahead=together[1:])
        together[1].step(frames[3])
        (got,) = _pairs(step_trackers([together[1]], shared))
        alone[1].step(frames[3])
        same(alone[1].step(frames[3]), got)
    finally:
        del together[0].runtime.segment


def test_a_large_cohort_goes_in_bounded_calls_and_equals_each_tracker_alone(monkeypatch):
    from napari_stm.core import tracker as tracking

    frames, alone, together, calls = _three_twice()
    runtime = together[0].runtime
    geo = together[0].geo
    pixels = (geo.inner[0] + geo.pad[2] + geo.pad[3]) * (geo.inner[1] + geo.pad[0] + geo.pad[1])
    monkeypatch.setattr(tracking, "CALL_ELEMENTS", 2 * pixels)  # two one-object trackers a call
    memorised = _record_encodes(runtime)
    try:
        for t in range(1, 4):
            want, got = _step_both(frames[t], alone, together, calls, memorised)
            assert calls == [2, 1]
            # the frame before: two memories in one call, the third by its own step
            assert memorised == ([] if t == 1 else [{"groups": 2}, {}])
            _assert_as_alone(want, got)
    finally:
        del runtime.segment, runtime.encode_memory


def test_trackers_of_different_motion_read_in_one_call_and_equal_each_alone(monkeypatch):
    # stm-lite takes each object's own motion prior (ObjectPriors): one-object trackers
    # whose measured motion differs still read in one call (at this size the windows do not
    # pay, so the exact network: each equals its tracker alone to float rounding).
    from napari_stm.core import tracker as tracking

    monkeypatch.setattr(tracking, "SHARED_PRIOR", False)
    frames, alone, together, calls = _three_twice("stm-lite", n_frames=4)
    try:
        for t in range(1, 4):
            for trackers in (alone, together):
                trackers[1].motion.speed = 0.05  # a faster object: its own, wider prior
            assert len({tr.motion_sigma for tr in together}) > 1
            want, got = _step_both(frames[t], alone, together, calls)
            assert calls == [3]
            _assert_as_alone(want, got)
    finally:
        del together[0].runtime.segment


class _Spread(MotionEstimate):
    """A motion estimate of a fixed spread (as measured, or not, it stays)."""

    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.fixed = sigma

    @property
    def sigma(self) -> float:
        return self.fixed


def test_trackers_of_one_memory_read_with_the_median_spread_in_one_call():
    # SHARED_PRIOR: one-object trackers of one memory whose spreads differ read with ONE
    # prior, the lower median of their spreads (one weight set, one background read): each
    # equals its tracker alone with that spread, to float rounding; the trackers' own
    # motion estimates are not touched. (A request of one shape reads with its own spread:
    # test_step_trackers_with_one_tracker_is_its_step_bit_for_bit.)
    frames, alone, together, calls = _three_twice("stm-lite", n_frames=4)
    for tr, sigma in zip(together, (0.03, 0.12, 0.06), strict=True):
        tr.motion = _Spread(sigma)
    for tr in alone:
        tr.motion = _Spread(0.06)  # the lower median of 0.03, 0.06, 0.12
    read = together[0].runtime.segment
    priors: list = []
    together[0].runtime.segment = lambda *a, **kw: priors.append(a[4]) or read(*a, **kw)
    try:
        for t in range(1, 4):
            want, got = _step_both(frames[t], alone, together, priors)
            assert len(priors) == 1  # one call, with one prior (ObjectPriors for entries)
            assert isinstance(priors[0], MotionPrior) or len(priors[0].priors) == 1
            _assert_as_alone(want, got)
    finally:
        del together[0].runtime.segment
    assert [tr.motion_sigma for tr in together] == [0.03, 0.12, 0.06]


def test_trackers_of_a_fixed_prior_on_a_network_without_object_priors_equal_each_alone():
    # A network that takes no ObjectPriors (lite0-match) with a fixed motion prior: the
    # trackers share it and read in one call with it as it is, never as ObjectPriors.
    model = load_model("lite0-match", device="cpu")
    frames, labels = make_clip(4, 64, 96, n_objects=3, seed=2, occlusion=False)
    config = replace(CPU, motion_sigma=0.05)
    alone, together = (_trackers(model, frames, labels, 3, config) for _ in range(2))
    assert together[0].motion_sigma == 0.05 and not model.object_priors
    calls: list = []
    _count_segments(together[0].runtime, calls)
    try:
        for t in range(1, 4):
            want, got = _step_both(frames[t], alone, together, calls)
            assert calls == [3]
            _assert_as_alone(want, got)
    finally:
        del together[0].runtime.segment


def test_many_one_object_trackers_take_probabilities_from_logits_and_equal_each_alone(
    monkeypatch,
):
    # From MANY_OBJECTS one-object trackers a call on stm-lite asks the network for logits
    # and forms the probabilities from them (readout.one_object_probs): each tracker still
    # gets what it gets alone (each with its own prior: without SHARED_PRIOR).
    from napari_stm.core import tracker as tracking

    monkeypatch.setattr(tracking, "SHARED_PRIOR", False)
    model = load_model("stm-lite", device="cpu")
    k = MANY_OBJECTS
    frames, labels = make_clip(3, 96, 128, n_objects=k, seed=4, occlusion=False)
    assert len(np.unique(labels[0])) == k + 1
    alone = _trackers(model, frames, labels, k)
    together = _trackers(model, frames, labels, k)
    runtime = together[0].runtime
    segment, asked = runtime.segment, []

    def recorded(*args, **kwargs):
        asked.append(kwargs.get("logits", False))
        return segment(*args, **kwargs)

    runtime.segment = recorded
    try:
        for t in range(1, 3):
            want, got = _step_both(frames[t], alone, together, asked)
            assert asked == [True]
            _assert_as_alone(want, got)
    finally:
        del runtime.segment


def test_trackers_over_other_memories_read_in_one_call_on_stm_lite(monkeypatch):
    # stm-lite takes ObjectPriors over different memory frames: trackers whose memories
    # differ (here one started a frame later; in a CVAT request, memories the bounded
    # policy's gate let diverge) read in one call over the union of their frames, each from
    # its own frames with its own prior, and each equals its tracker alone (without the
    # approximations SHARED_PRIOR and ONE_BACKGROUND, tested on their own).
    from napari_stm.core import stm_lite
    from napari_stm.core import tracker as tracking

    monkeypatch.setattr(tracking, "SHARED_PRIOR", False)
    monkeypatch.setattr(stm_lite, "ONE_BACKGROUND", False)
    model = load_model("stm-lite", device="cpu")
    frames, labels = make_clip(5, 64, 96, n_objects=3, seed=4, occlusion=False)

    def started() -> list[Tracker]:
        early = _trackers(model, frames, labels, 2)
        late = Tracker(model, CPU, keep_sources=False)
        late.step(frames[1], (labels[1] == 3).astype(np.uint8))
        for tr in early:
            tr.step(frames[1])
        return [*early, late]

    alone, together = started(), started()
    calls: list = []
    _count_segments(together[0].runtime, calls)
    try:
        for t in range(2, 5):
            want, got = _step_both(frames[t], alone, together, calls)
            (early, _), (late, _) = together[0].bank.tensors(), together[2].bank.tensors()
            assert early.shape != late.shape or not torch.equal(early, late)
            assert calls == [3]  # one call, not one per memory
            _assert_as_alone(want, got)
    finally:
        del together[0].runtime.segment


def test_many_trackers_results_and_motion_from_one_pass_equal_each_trackers_own():
    # With many objects in a call, each tracker's labels box and motion centres come from ONE
    # pass over every tracker's class maximum (its nonzero positions: frames.boxes_at,
    # motion.won_centres); they equal what each tracker computes from its own maximum, bit
    # for bit.
    from napari_stm.core import tracker as tracking

    model = load_model("stm-lite", device="cpu")
    k = MANY_OBJECTS + 2
    frames, labels = make_clip(4, 96, 128, n_objects=k, seed=5, occlusion=False)
    own = _trackers(model, frames, labels, k)
    batched = _trackers(model, frames, labels, k)
    assert all(tr.policy.measures_motion for tr in batched)
    step_together, seen = tracking._step_together, []

    def per_tracker(*args, **kwargs):
        outs = step_together(*args, **kwargs)
        seen.append([(out.box, out.centres) for out in outs])
        geo = args[0][0].geo
        for out in outs:  # the one pass's, against each tracker's own maximum alone
            assert out.box == foreground_box(crop_padding(out.top()[1], geo))
            assert all(map(torch.equal, out.centres, won_centres(out.top(), 1)))
        return [replace(out, box=None, centres=None) for out in outs]

    for t in range(1, 4):
        tracking._step_together = per_tracker
        try:
            want = step_trackers(own, SharedFrame(frames[t]))
        finally:
            tracking._step_together = step_together
        got = step_trackers(batched, SharedFrame(frames[t]))
        ((box, centres), *_) = seen[-1]
        assert box is not None and centres is not None  # the one pass ran
        for w, g in zip(want, got, strict=True):
            assert np.array_equal(w.labels, g.labels) and np.array_equal(w.probs, g.probs)
            assert (w.confidence, w.area, w.flags) == (g.confidence, g.area, g.flags)
    assert any(tr.motion.speed is not None for tr in batched)  # motion was measured
    for a, b in zip(own, batched, strict=True):
        assert (a.motion.speed, a.motion.size) == (b.motion.speed, b.motion.size)
        (_, centres_a, present_a), (_, centres_b, present_b) = a.motion._last, b.motion._last
        assert torch.equal(centres_a, centres_b) and torch.equal(present_a, present_b)


def test_one_object_confidence_and_centres_from_won_indices_equal_the_whole_maximum():
    # The trackers of one call form only the class maximum's indices (step.class_won): the
    # confidence forms the values inside the box, the motion reads the object's probability
    # where it wins. Both equal what the whole maximum gives, bit for bit (padding included).
    from napari_stm.core.frames import Geometry
    from napari_stm.core.readout import one_object_probs
    from napari_stm.core.step import class_max, class_won
    from napari_stm.core.tracker import frame_confidence

    g = torch.Generator().manual_seed(2)
    geo = Geometry((40, 60), (40, 60), (2, 6, 4, 4))
    logits = torch.randn(6, 1, 48, 68, generator=g) * 4 - 3
    probs = one_object_probs(logits)
    top = class_max(probs)
    won = class_won(probs)
    assert torch.equal(won, top[1])
    mass, centres = won_centres(top, 1)
    got = won_centres((probs[:, 1], won), 1, won.nonzero(as_tuple=True))
    assert torch.equal(mass, got[0]) and torch.equal(centres, got[1])
    for k in range(len(probs)):
        box = foreground_box(crop_padding(won[k], geo))
        want = frame_confidence(probs[k], geo, (top[0][k], top[1][k]), box)
        assert torch.equal(frame_confidence(probs[k], geo, None, box, won[k]), want)
