"""`napari-stm bench` end to end at a tiny size, and the engine's fast-path options: frame prefetch
(same results, clean shutdown), channels-last and torch.compile (same results)."""

from __future__ import annotations

import csv
import threading

import numpy as np
import pytest
from tiny_network import TinyMatch

from napari_stm.bench import COLUMNS, Case, SyntheticVideo, measure, schedule
from napari_stm.cli import main
from napari_stm.core.engine import PropagationConfig, Propagator
from napari_stm.core.errors import InputError
from napari_stm.core.runtime import prepare
from napari_stm.synthetic import make_clip

T, H, W = 14, 64, 96


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "napari-stm-prefetch" and t.is_alive()]


# -- the command ----------------------------------------------------------------------------------
def test_bench_command_writes_table_csv_and_plot(tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["bench", "--out", str(out), "--models", "stm-lite", "--lengths", "5", "10"]
    args += ["--resolutions", "64x64", "--memory", "bounded", "--threads", "1", "--window", "3"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "ms/frame" in table and "RSS MB" in table and "load average" in table
    with open(out / "bench.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == COLUMNS
    assert [(r["frame"], r["ran"], r["status"]) for r in rows] == [
        ("5", "5", "ok"),
        ("10", "10", "ok"),
    ]
    for r in rows:
        assert (r["model"], r["memory"], r["resolution"], r["device"]) == (
            "stm-lite",
            "bounded",
            "64x64",
            "cpu",
        )
        assert (r["height"], r["width"], r["objects"], r["threads"]) == ("64", "64", "1", "1")
        assert float(r["ms_p90"]) >= float(r["ms_median"]) > 0
        assert float(r["rss_peak_mb"]) >= float(r["rss_model_mb"]) > 0
        assert 1 <= int(r["memory_frames"]) <= 10 and float(r["bank_mb"]) > 0
    assert int(rows[0]["window"]) == 3  # frames 2, 3, 4 (frame 0 is the reference)
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "bench.txt").read_text().startswith(table.splitlines()[0])
    # Earlier results are not overwritten unless asked.
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_bench_rejects_bad_choices(tmp_path, capsys):
    base = ["bench", "--out", str(tmp_path / "b")]
    assert main([*base, "--resolutions", "huge"]) == 2
    assert "unknown resolution 'huge'" in capsys.readouterr().err
    assert main([*base, "--models", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert main([*base, "--lengths", "1"]) == 2
    assert "at least 2 frames" in capsys.readouterr().err


# -- measurement ----------------------------------------------------------------------------------
def case(**kw) -> Case:
    base = dict(
        model="stm-lite",
        memory="bounded",
        objects=1,
        resolution="64x64",
        height=64,
        width=64,
        device="cpu",
        threads=1,
        lengths=[100, 1000, 5000],
        window=10,
        engine={"max_memory": 10, "mem_every": 5, "confidence_gate": 0.0},
    )
    return Case(**{**base, **kw})


def test_fast_forward_runs_until_memory_is_full_then_only_the_windows():
    order = schedule(case(fast_forward=True))
    assert order == [*range(100), *range(990, 1000), *range(4990, 5000)]
    # A short first length: real frames go on until the memory has surely filled up.
    order = schedule(case(fast_forward=True, lengths=[20, 500]))
    assert order == [*range(65), *range(490, 500)]
    # Official memory grows with every frame it sees: never fast-forwarded.
    assert schedule(case(fast_forward=True, memory="official")) == list(range(5000))
    assert schedule(case()) == list(range(5000))


def test_fast_forwarded_rows_say_how_many_frames_ran():
    engine = {"max_memory": 3, "mem_every": 2, "confidence_gate": 0.0}
    rows = list(measure(case(lengths=[12, 200], window=3, fast_forward=True, engine=engine)))
    assert [(r["frame"], r["ran"], r["window"], r["status"]) for r in rows] == [
        (12, 12, 3, "ok"),
        (200, 15, 3, "ok"),
    ]
    # Memory was full before the jump, as it would be after 200 real frames.
    assert [r["memory_frames"] for r in rows] == [3, 3]
    assert rows[0]["bank_mb"] == rows[1]["bank_mb"]


def test_lengths_past_the_time_limit_are_reported_not_reached():
    rows = list(measure(case(lengths=[5, 50], window=2, max_seconds=0.0)))
    assert [r["frame"] for r in rows] == [5, 50]
    assert all(r["status"].startswith("not reached: time limit") for r in rows)
    assert all("ms_median" not in r for r in rows)


def test_synthetic_video_is_drawn_on_request_and_repeatable():
    video = SyntheticVideo(100_000, 48, 80, n_objects=3)
    assert len(video) == 100_000
    a, b = video[99_999], video[99_999]
    assert a.shape == (48, 80, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(video[0], video[30])  # things move
    for t in (0, 5000, 99_999):
        assert set(np.unique(video.labels(t))) == {0, 1, 2, 3}  # every object stays in view
    with pytest.raises(IndexError):
        video[100_000]


# -- prefetch -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip():
    return make_clip(n_frames=T, height=H, width=W, seed=1)


def propagate(model, frames, refs, prefetch, compile=False, **kw):
    config = PropagationConfig(device="cpu", prefetch=prefetch, compile=compile)
    prop = Propagator(model, frames, config)
    for t, lab in refs.items():
        prop.add_reference(t, lab)
    return list(prop.propagate(**kw))


@pytest.mark.parametrize("direction", ["forward", "both"])
def test_prefetch_gives_the_same_results(tiny_model, clip, direction):
    video, gt = clip
    refs = {3: gt[3], 10: gt[10]}
    plain = propagate(tiny_model, video, refs, 0, direction=direction)
    ahead = propagate(tiny_model, video, refs, 2, direction=direction)
    assert [r.t for r in plain] == [r.t for r in ahead]
    for a, b in zip(plain, ahead, strict=True):
        assert np.array_equal(a.labels, b.labels)
        assert np.array_equal(a.probs, b.probs)
    assert not prefetch_threads()


class CountingFrames:
    """Frames that record which were read."""

    def __init__(self, video: np.ndarray, broken: int | None = None) -> None:
        self.video, self.broken, self.reads = video, broken, []

    def __len__(self) -> int:
        return len(self.video)

    def __getitem__(self, t: int) -> np.ndarray:
        self.reads.append(t)
        if t == self.broken:
            raise OSError("bad block")
        return self.video[t]


def test_prefetch_reads_a_bounded_number_of_frames_ahead(tiny_model, clip):
    video, gt = clip
    frames = CountingFrames(video)
    prop = Propagator(tiny_model, frames, PropagationConfig(device="cpu", prefetch=2))
    prop.add_reference(0, gt[0])
    for r in prop.propagate("forward"):
        # The frame being yielded, the one in the network, and at most two queued.
        assert max(frames.reads) <= r.t + 3
    assert sorted(set(frames.reads)) == list(range(T))


def test_prefetch_thread_stops_on_cancel_and_on_close(tiny_model, clip):
    video, gt = clip
    cancel = threading.Event()
    prop = Propagator(tiny_model, video, PropagationConfig(device="cpu", prefetch=2))
    prop.add_reference(0, gt[0])
    got = []
    for r in prop.propagate("forward", cancel=cancel):
        got.append(r.t)
        if r.t == 3:
            assert len(prefetch_threads()) == 1
            cancel.set()
    assert got == [0, 1, 2, 3]
    assert not prefetch_threads()
    # A caller that drops the generator mid-way (closing it) stops the thread too.
    gen = prop.propagate("forward")
    assert [next(gen).t for _ in range(3)] == [0, 1, 2]
    assert len(prefetch_threads()) == 1
    gen.close()
    assert not prefetch_threads()
    assert prop.memory_frames == 0  # the pass's memory is let go


def test_prefetch_read_error_arrives_at_its_frame(tiny_model, clip):
    video, gt = clip
    frames = CountingFrames(video, broken=6)
    prop = Propagator(tiny_model, frames, PropagationConfig(device="cpu", prefetch=2))
    prop.add_reference(0, gt[0])
    got = []
    with pytest.raises(InputError, match="frame 6 could not be read: OSError: bad block"):
        for r in prop.propagate("forward"):
            got.append(r.t)
    assert got == [0, 1, 2, 3, 4, 5]
    assert not prefetch_threads()


# -- channels-last and torch.compile --------------------------------------------------------------
@pytest.mark.parametrize("option", [{"channels_last": True}, {"prefetch": 3}])
def test_fast_path_options_keep_results(clip, option):
    video, gt = clip
    model = TinyMatch()  # its own: channels-last converts the model's weights in place
    results = []
    plain_config = PropagationConfig(device="cpu", channels_last=False)
    for config in (plain_config, PropagationConfig(device="cpu", **option)):
        prop = Propagator(model, video, config)
        prop.add_reference(0, gt[0])
        results.append(list(prop.propagate("forward")))
    plain, fast = results
    for a, b in zip(plain, fast, strict=True):
        np.testing.assert_allclose(a.probs, b.probs, atol=1e-5)
        assert (a.labels != b.labels).mean() < 1e-3


@pytest.mark.slow
def test_compiled_network_runs_and_matches(clip):
    video, gt = clip
    video, gt = video[:6], gt[:6]
    model = TinyMatch()
    eager = propagate(model, video, {0: gt[0]}, 0)
    compiled = propagate(model, video, {0: gt[0]}, 0, compile=True)
    # Prepared (and compiled) once, kept for the next video.
    kept = prepare(model, PropagationConfig(device="cpu", compile=True))
    assert kept.compiled and kept is prepare(model, PropagationConfig(device="cpu", compile=True))
    for a, b in zip(eager, compiled, strict=True):
        np.testing.assert_allclose(a.probs, b.probs, atol=1e-4)
        assert (a.labels != b.labels).mean() < 1e-3


def test_failed_compilation_falls_back_to_eager(clip, monkeypatch):
    # Without a working C++ compiler inductor fails at the first call: the pass must still run.
    import torch._dynamo

    def broken_compile(fn, **options):
        def call(*args):
            raise torch._dynamo.exc.BackendCompilerFailed(
                "inductor", RuntimeError("no working C++ compiler found"), None
            )

        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    video, gt = clip
    video, gt = video[:4], gt[:4]
    model = TinyMatch()
    eager = propagate(model, video, {0: gt[0]}, 0)
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        fallback = propagate(model, video, {0: gt[0]}, 0, compile=True)
    for a, b in zip(eager, fallback, strict=True):
        np.testing.assert_array_equal(a.labels, b.labels)
