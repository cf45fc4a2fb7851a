"""`napari-stm bench annotate` (the simulated annotator) and `propagate --report`, end to end on
tiny DAVIS- and Cell-Tracking-Challenge-layout sequences with the tiny matching network."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from tiny_network import TinyMatch

from napari_stm import annotate, cli
from napari_stm.core import weights as W
from napari_stm.core.engine import PropagationConfig
from napari_stm.core.errors import InputError
from napari_stm.io import write_palette_png
from napari_stm.synthetic import make_clip

MODEL = "tiny-annotate"
CPU = PropagationConfig(device="cpu")


@pytest.fixture(autouse=True)
def tiny_registered():
    W.register(W.ModelSpec(MODEL, lambda: TinyMatch(temperature=0.1), "test network"), replace=True)
    yield
    W.unregister(MODEL)


@pytest.fixture(scope="module")
def clip():
    return make_clip(n_frames=14, height=64, width=96, n_objects=2, seed=1)


@pytest.fixture()
def davis(tmp_path: Path, clip) -> Path:
    frames, labels = clip
    root = tmp_path / "bear"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "Annotations").mkdir()
    for t, f in enumerate(frames):
        Image.fromarray(f).save(root / "JPEGImages" / f"{t:05d}.png")
        write_palette_png(root / "Annotations" / f"{t:05d}.png", labels[t])
    return root


@pytest.fixture()
def ctc(tmp_path: Path, clip) -> Path:
    # The Cell Tracking Challenge's own format: 16-bit gray, LZW-compressed TIFF frames named
    # t000.tif, lineage masks named 00000.png; an id on a later frame that the first lacks.
    frames, labels = clip
    root = tmp_path / "sim"
    (root / "raw_tif").mkdir(parents=True)
    (root / "Annotations_lineage").mkdir()
    for t, f in enumerate(frames):
        gray = (f.mean(-1) * 250).astype(np.uint16)
        tifffile.imwrite(root / "raw_tif" / f"t{t:03d}.tif", gray, compression="lzw")
        lab = labels[t].copy()
        if t > 8:
            lab[:4, :4] = 9  # a cell entering: not tracked (not on the first frame)
        write_palette_png(root / "Annotations_lineage" / f"{t:05d}.png", lab)
    return root


def test_open_sequence_reads_both_layouts(davis, ctc, clip):
    _, labels = clip
    d = annotate.open_sequence(davis)
    c = annotate.open_sequence(ctc)
    assert (d.name, d.objects, len(d)) == ("bear", [1, 2], 14)
    assert c.objects == [1, 2] and len(c) == 14
    assert c.frames[0].dtype == np.uint16
    assert 9 not in np.unique(c.truth[10])  # only the first frame's objects are painted
    np.testing.assert_array_equal(d.truth[5], labels[5])
    part = annotate.open_sequence(davis, start=3, stop=9)
    assert (part.start, part.stop, len(part)) == (3, 9, 6)


def test_open_sequence_errors(tmp_path, davis):
    with pytest.raises(InputError, match="neither JPEGImages"):
        annotate.open_sequence(tmp_path)
    (davis / "Annotations" / "00004.png").unlink()
    with pytest.raises(InputError, match="no mask for 1 of frames"):
        annotate.open_sequence(davis)
    with pytest.raises(InputError, match="do not fit"):
        annotate.open_sequence(davis, start=5, stop=99)


def test_simulated_annotator_rounds(davis):
    seq = annotate.open_sequence(davis)
    frames: list[tuple] = []
    rows = annotate.simulate(
        TinyMatch(temperature=0.1), seq, annotate.PICKERS, 3, CPU, frames=frames
    )
    assert [(r.picker, r.round) for r in rows] == [
        (p, k) for p in annotate.PICKERS for k in range(4)
    ]
    for p in annotate.PICKERS:
        path = [r for r in rows if r.picker == p]
        picked = [r.frame for r in path[1:]]
        assert len(set(picked)) == 3 and 0 not in picked
        assert all(0 <= r.mean_j <= 1 and 0 <= r.good_share <= 1 for r in path)
        assert path[0].computed == 13  # round 0 computes every frame but the reference
        assert all(r.computed < 13 for r in path[1:])  # later rounds only what they reach
    even = [r.frame for r in rows if r.picker == "even"][1:]
    assert even == [13, 6, 3]  # the frame farthest from every reference
    oracle = [r for r in rows if r.picker == "oracle"]
    for a, b in zip(oracle, oracle[1:], strict=False):
        assert b.mean_j >= a.mean_j - 1e-9, "a perfect correction lowered mean J"
        assert b.reached_after >= b.reached_before - 0.01
    # every round's state, per frame and object, for the calibration
    assert len(frames) == (1 + 3 * 3) * 14 * 2
    text = annotate.format_table(rows)
    assert "oracle" in text and annotate.summary(rows).startswith("bear: gain after 3 rounds")


def test_bench_annotate_command(davis, ctc, tmp_path, capsys):
    out = tmp_path / "rounds.csv"
    code = cli.main(
        [
            "bench",
            "annotate",
            str(davis),
            str(ctc),
            "--rounds",
            "2",
            "--pickers",
            "oracle",
            "even",
            "--model",
            MODEL,
            "--device",
            "cpu",
            "--csv",
            str(out),
            "--frames-csv",
            str(tmp_path / "frames.csv"),
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "bear" in text and "sim" in text and "gain after" in text
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 3
    assert {r["sequence"] for r in rows} == {"bear", "sim"}


def test_propagate_report_has_a_row_per_frame_and_object(tmp_path, clip):
    frames, labels = clip
    fdir, mdir = tmp_path / "frames", tmp_path / "masks"
    fdir.mkdir()
    mdir.mkdir()
    for t, f in enumerate(frames):
        Image.fromarray(f).save(fdir / f"{t:05d}.png")
    write_palette_png(mdir / "00000.png", labels[0])
    write_palette_png(mdir / "00009.png", labels[9])
    report = tmp_path / "report.csv"
    args = ["propagate", fdir, "--masks", mdir, "--out", tmp_path / "out"]
    args += ["--model", MODEL, "--device", "cpu", "--quiet", "--report", report]
    assert cli.main([str(a) for a in args]) == 0
    with open(report) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["frame", "object", "confidence", "area", "flag"]
    assert [(int(r["frame"]), int(r["object"])) for r in rows] == [
        (t, k) for t in range(14) for k in (1, 2)
    ]
    for r in rows:
        t, k = int(r["frame"]), int(r["object"])
        out = np.array(Image.open(tmp_path / "out" / f"{t:05d}.png"))
        assert int(r["area"]) == int((out == k).sum())
        assert 0.0 <= float(r["confidence"]) <= 1.0
        assert r["flag"] == ("reference" if t in (0, 9) else r["flag"])
        assert r["flag"] in ("", "lost", "reference")
    # an existing report is never overwritten without --overwrite
    assert cli.main([str(a) for a in args[:-2] + ["--report", report]]) == 2


def test_a_run_split_by_budget_continues_from_its_state(davis, tmp_path):
    seq = annotate.open_sequence(davis)
    model = TinyMatch(temperature=0.1)
    whole = annotate.simulate(model, seq, ["oracle", "tool"], 3, CPU)
    state = tmp_path / "state"
    first = annotate.simulate(model, seq, ["oracle", "tool"], 3, CPU, state=state, budget=0)
    assert [r.round for r in first] == [0, 0]  # the budget was spent by round 0
    frames: list[tuple] = []
    rest = annotate.simulate(model, seq, ["oracle", "tool"], 3, CPU, state=state, frames=frames)
    assert [(r.picker, r.round, r.frame) for r in rest] == [
        (r.picker, r.round, r.frame) for r in whole
    ]
    np.testing.assert_allclose([r.mean_j for r in rest], [r.mean_j for r in whole])
    assert len(frames) == (1 + 2 * 3) * 14 * 2


def test_bench_annotate_measures_a_band_of_columns(ctc, tmp_path, clip):
    # The held-out band of a time-lapse, cut as benchmarks/heldout_eval.py cuts it: columns
    # 38.. of every frame and mask (0.4 of 96 pixels). The band's edge cuts object 1 to 25
    # pixels on the first frame: a sliver, left out unless --min-pixels lets it in.
    _, labels = clip
    whole = annotate.open_sequence(ctc)
    band = annotate.open_sequence(ctc, columns=(0.4, 1.0))
    assert band.name == "sim@0.4-1"
    assert band.frames.frame_shape == (64, 58) and len(band) == 14
    for t in (0, 7, 13):
        np.testing.assert_array_equal(band.frames[t], whole.frames[t][:, 38:])
    assert band.objects == [2] and int((labels[0][:, 38:] == 1).sum()) == 25
    np.testing.assert_array_equal(band.truth[5], np.where(labels[5][:, 38:] == 2, 2, 0))
    assert annotate.open_sequence(ctc, columns=(0.4, 1.0), min_pixels=25).objects == [1, 2]
    # The command, end to end.
    out = tmp_path / "band.csv"
    argv = ["bench", "annotate", str(ctc), "--rounds", "1", "--pickers", "even"]
    argv += ["--model", MODEL, "--device", "cpu", "--columns", "0.4:1", "--min-pixels", "25"]
    assert cli.main([*argv, "--csv", str(out)]) == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [(r["sequence"], r["round"]) for r in rows] == [("sim@0.4-1", "0"), ("sim@0.4-1", "1")]
    assert rows[0]["computed"] == "13"


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ("half", "--columns must be A:B"),
        ("0.5", "--columns must be A:B"),
        ("0.5:1:2", "--columns must be A:B"),
        ("1:0.5", "0 <= A < B <= 1"),
        ("0.5:1.5", "0 <= A < B <= 1"),
        ("0.5:0.505", "hold no whole pixel column"),
    ],
)
def test_bench_annotate_names_bad_columns(ctc, columns, message, capsys):
    argv = ["bench", "annotate", str(ctc), "--rounds", "0", "--model", MODEL]
    assert cli.main([*argv, "--device", "cpu", "--columns", columns]) != 0
    assert message in capsys.readouterr().err


def test_a_band_left_with_no_object_is_named(ctc):
    with pytest.raises(InputError, match="no object of at least 10000 pixels in columns 0.5:1"):
        annotate.open_sequence(ctc, columns=(0.5, 1.0), min_pixels=10_000)
