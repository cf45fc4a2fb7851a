"""Frame ownership and run planning (no viewer needed)."""

import numpy as np
import pytest

from napari_stm.core.errors import InputError
from napari_stm.napari import _ledger as L
from napari_stm.napari._ledger import Overwrite, State

SIG = L.signature(model="m", direction="forward")


def _frames(n=8):
    return np.zeros((n, 6, 6), np.uint8)


def _plan(
    labels, ledger, direction="forward", lo=0, hi=None, overwrite=Overwrite.OUTDATED, sig=SIG
):
    keys = [str(t) for t in range(len(labels))]
    infos = L.classify(labels, keys, ledger)
    hi = len(labels) - 1 if hi is None else hi
    return L.plan_run(infos, keys, ledger, direction, lo, hi + 1, overwrite, sig), infos, keys


def _simulate_run(labels, ledger, plan, infos, keys, value=9, sig=SIG):
    """What the widget does: record the run, write each planned frame, record the write."""
    L.prune(ledger, keys, infos)
    run = L.record_run(ledger, sig, {keys[t]: infos[t].hash for t in plan.references})
    for t in plan.write:
        labels[t] = value
        L.record_write(ledger, keys[t], L.frame_hash(labels[t]), run)


def test_painted_predicted_and_empty_frames():
    labels, ledger = _frames(4), {"written": {}, "runs": {}}
    labels[0, 1, 1] = 1
    labels[2] = 3
    L.record_write(ledger, "2", L.frame_hash(labels[2]), "0")
    labels[3] = 3
    L.record_write(ledger, "3", L.frame_hash(labels[3]), "0")
    labels[3, 0, 0] = 5  # a person touched a predicted frame: it is theirs now
    states = [i.state for i in L.classify(labels, list("0123"), ledger)]
    assert states == [State.PAINTED, State.EMPTY, State.PREDICTED, State.PAINTED]


def test_ledger_lives_in_metadata_and_survives_bad_content():
    meta = {"napari_stm": "garbage"}
    led = L.get_ledger(meta)
    assert meta["napari_stm"] is led and led["written"] == {}


def test_first_run_writes_every_unpainted_frame_reachable():
    labels, ledger = _frames(), {"written": {}, "runs": {}}
    labels[3] = 1
    plan, *_ = _plan(labels, ledger, "forward")
    assert plan.references == [3] and plan.write == [4, 5, 6, 7]
    assert plan.unreachable == [0, 1, 2]
    assert plan.calls == [(3, 8)]
    plan, *_ = _plan(labels, ledger, "both")
    assert plan.write == [0, 1, 2, 4, 5, 6, 7]
    assert plan.calls == [(0, 4), (3, 8)]


def test_no_painted_frame_is_an_error():
    with pytest.raises(InputError, match="no painted frame"):
        _plan(_frames(), {"written": {}, "runs": {}})


def test_correction_recomputes_only_up_to_the_next_reference():
    labels, ledger = _frames(10), {"written": {}, "runs": {}}
    labels[0] = 1
    labels[7] = 1
    plan, infos, keys = _plan(labels, ledger, "forward")
    _simulate_run(labels, ledger, plan, infos, keys)
    assert plan.write == [1, 2, 3, 4, 5, 6, 8, 9]

    nothing, *_ = _plan(labels, ledger, "forward")
    assert nothing.write == [] and nothing.kept == [1, 2, 3, 4, 5, 6, 8, 9]

    labels[3] = 2  # correction on a predicted frame
    plan, *_ = _plan(labels, ledger, "forward")
    assert plan.write == [4, 5, 6] and plan.changed == [3]
    assert plan.calls == [(3, 7)]


def test_correction_with_both_directions_recomputes_from_the_previous_reference_on():
    # the forward side of "both" walks on through every later stretch: frame 11, after the last
    # reference, read frame 5's old prediction through it
    sig = L.signature(model="m", direction="both")
    labels, ledger = _frames(12), {"written": {}, "runs": {}}
    labels[0] = 1
    labels[10] = 1
    plan, infos, keys = _plan(labels, ledger, "both", sig=sig)
    _simulate_run(labels, ledger, plan, infos, keys, sig=sig)
    labels[5] = 2
    plan, *_ = _plan(labels, ledger, "both", sig=sig)
    assert plan.write == [1, 2, 3, 4, 6, 7, 8, 9, 11]
    assert plan.calls == [(0, 6), (5, 11), (10, 12)]


def test_erased_reference_and_other_settings():
    labels, ledger = _frames(8), {"written": {}, "runs": {}}
    labels[0] = 1
    labels[4] = 1
    plan, infos, keys = _plan(labels, ledger, "forward")
    _simulate_run(labels, ledger, plan, infos, keys)
    labels[4] = 0  # the person erased a painted frame
    plan, *_ = _plan(labels, ledger, "forward")
    assert plan.write == [4, 5, 6, 7] and plan.kept == [1, 2, 3]

    other = L.signature(model="other", direction="forward")
    plan, *_ = _plan(labels, ledger, "forward", sig=other)
    assert plan.write == [1, 2, 3, 4, 5, 6, 7]


def test_overwrite_modes_and_range():
    labels, ledger = _frames(8), {"written": {}, "runs": {}}
    labels[0] = 1
    plan, infos, keys = _plan(labels, ledger, "forward", hi=3)
    _simulate_run(labels, ledger, plan, infos, keys)
    assert plan.write == [1, 2, 3]
    plan, *_ = _plan(labels, ledger, "forward", overwrite=Overwrite.EMPTY)
    assert plan.write == [4, 5, 6, 7]
    plan, *_ = _plan(labels, ledger, "forward", lo=2, hi=5, overwrite=Overwrite.ALL)
    assert plan.write == [2, 3, 4, 5]
    assert plan.calls == [(0, 6)]


def test_prune_forgets_frames_people_changed_and_unused_runs():
    labels, ledger = _frames(4), {"written": {}, "runs": {}}
    labels[0] = 1
    plan, infos, keys = _plan(labels, ledger, "forward")
    _simulate_run(labels, ledger, plan, infos, keys)
    labels[1:] = 2  # every prediction repainted by hand
    infos = L.classify(labels, keys, ledger)
    L.prune(ledger, keys, infos)
    assert ledger["written"] == {} and ledger["runs"] == {}
