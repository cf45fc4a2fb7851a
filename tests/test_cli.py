"""`napari-stm propagate | evaluate | models` end to end on files, with a tiny real network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from tiny_network import TinyMatch, iou

from napari_stm import cli
from napari_stm.core import weights as W
from napari_stm.io import read_label_image, write_palette_png
from napari_stm.synthetic import make_clip

MODEL = "tiny-cli"


@pytest.fixture(autouse=True)
def tiny_registered():
    W.register(W.ModelSpec(MODEL, TinyMatch, "test network"), replace=True)
    yield
    W.unregister(MODEL)


@pytest.fixture(scope="module")
def clip():
    return make_clip(n_frames=10, height=64, width=96, n_objects=2, seed=3, occlusion=False)


@pytest.fixture()
def files(tmp_path: Path, clip):
    frames, labels = clip
    fdir, mdir = tmp_path / "frames", tmp_path / "masks"
    fdir.mkdir()
    mdir.mkdir()
    for t, f in enumerate(frames):
        Image.fromarray(f).save(fdir / f"{t:05d}.png")
    write_palette_png(mdir / "00000.png", labels[0])
    return fdir, mdir


def run(*argv: str) -> int:
    return cli.main([str(a) for a in argv])


def test_propagate_writes_palette_pngs_probs_and_overlay(tmp_path, files, clip):
    fdir, mdir = files
    out, probs, picture = tmp_path / "out", tmp_path / "p.npz", tmp_path / "o.png"
    code = run(
        "propagate",
        fdir,
        "--masks",
        mdir,
        "--out",
        out,
        "--model",
        MODEL,
        "--device",
        "cpu",
        "--probs",
        probs,
        "--overlay",
        picture,
        "--quiet",
    )
    assert code == 0
    frames, gt = clip
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"{t:05d}.png" for t in range(len(frames))]
    first = Image.open(out / "00000.png")
    assert first.mode == "P"  # a palette PNG, ids kept as indices
    np.testing.assert_array_equal(read_label_image(out / "00000.png"), gt[0])
    ious = [
        iou(read_label_image(out / f"{t:05d}.png") == k, gt[t] == k)
        for t in range(1, len(frames))
        for k in (1, 2)
    ]
    assert np.mean(ious) > 0.7
    npz = np.load(probs)
    assert npz["probs"].shape == (len(frames), 3, 64, 96)
    assert npz["probs"].dtype == np.float32
    assert list(npz["ids"]) == [1, 2]
    np.testing.assert_allclose(npz["probs"].sum(1), 1, atol=1e-4)
    assert picture.stat().st_size > 1000
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_label_tiff_output_and_start_stop(tmp_path, files, clip):
    fdir, mdir = files
    out = tmp_path / "labels.tif"
    # Frames before the reference are not reached forward: they come out empty.
    assert (
        run(
            "propagate",
            fdir,
            "--masks",
            mdir,
            "--out",
            out,
            "--model",
            MODEL,
            "--direction",
            "forward",
            "--stop",
            6,
            "--quiet",
        )
        == 0
    )
    stack = tifffile.imread(out)
    assert stack.shape == (6, 64, 96)
    np.testing.assert_array_equal(stack[0], clip[1][0])
    assert all(stack[t].any() for t in range(6))


def test_backward_from_a_later_reference_fills_earlier_frames(tmp_path, files, clip):
    fdir, _ = files
    masks = tmp_path / "m5"
    masks.mkdir()
    write_palette_png(masks / "00005.png", clip[1][5])
    out = tmp_path / "o.tif"
    assert (
        run(
            "propagate",
            fdir,
            "--masks",
            masks,
            "--out",
            out,
            "--model",
            MODEL,
            "--direction",
            "forward",
            "--quiet",
        )
        == 0
    )
    stack = tifffile.imread(out)
    assert not stack[:5].any()
    assert all(stack[t].any() for t in range(5, 10))
    out2 = tmp_path / "both.tif"
    assert run("propagate", fdir, "--masks", masks, "--out", out2, "--model", MODEL, "--quiet") == 0
    stack = tifffile.imread(out2)
    assert all(stack[t].any() for t in range(10))
    np.testing.assert_array_equal(stack[5], clip[1][5])


def test_outputs_are_never_overwritten_without_asking(tmp_path, files, capsys):
    fdir, mdir = files
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert run("propagate", fdir, "--masks", mdir, "--out", out, "--model", MODEL, "--quiet") == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "user data"
    # --out may not be an input folder, even with --overwrite.
    assert (
        run(
            "propagate",
            fdir,
            "--masks",
            mdir,
            "--out",
            mdir,
            "--model",
            MODEL,
            "--overwrite",
            "--quiet",
        )
        == 2
    )
    assert "is one of the inputs" in capsys.readouterr().err
    assert (
        run(
            "propagate",
            fdir,
            "--masks",
            mdir,
            "--out",
            out,
            "--model",
            MODEL,
            "--overwrite",
            "--quiet",
        )
        == 0
    )
    assert (out / "keep.txt").read_text() == "user data"


def test_bad_input_is_one_clear_line(tmp_path, files, capsys):
    fdir, mdir = files
    empty = tmp_path / "empty"
    empty.mkdir()
    bad_mask = tmp_path / "bad.png"
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(bad_mask)
    cases = [
        ((empty, "--masks", mdir), "no image"),
        ((fdir, "--masks", bad_mask), "10x10"),
        ((fdir, "--masks", mdir, "--model", "nope"), "unknown model 'nope'"),
        ((fdir, "--masks", mdir, "--model", "stm-resnet50"), "needs weights"),
        (
            (
                fdir,
                "--masks",
                mdir,
                "--weights",
                tmp_path / "missing.pth",
                "--model",
                "stm-resnet50",
            ),
            "not found",
        ),
        ((fdir, "--masks", mdir, "--start", 20), "do not fit"),
    ]
    for i, (args, message) in enumerate(cases):
        model = [] if "--model" in args else ["--model", MODEL]
        code = run("propagate", *args, "--out", tmp_path / f"o{i}", *model, "--quiet")
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        assert message in err, (message, err)
        assert "Traceback" not in err


def test_ids_past_255_go_to_a_label_tiff_not_a_palette_png(tmp_path, files, clip, capsys):
    fdir, _ = files
    frames, gt = clip
    masks = tmp_path / "ctc_masks"
    masks.mkdir()
    lut = np.array([0, 300, 1041], np.uint16)  # Cell Tracking Challenge style ids
    tifffile.imwrite(masks / "00000.tif", lut[gt[0]])
    code = run("propagate", fdir, "--masks", masks, "--out", tmp_path / "pngs", "--model", MODEL)
    err = capsys.readouterr().err
    assert code == 2 and "object id 1041" in err and "label TIFF" in err, err
    assert not (tmp_path / "pngs").exists()
    out = tmp_path / "labels.tif"
    assert run("propagate", fdir, "--masks", masks, "--out", out, "--model", MODEL, "--quiet") == 0
    stack = tifffile.imread(out)
    assert stack.dtype == np.uint16
    np.testing.assert_array_equal(stack[0], lut[gt[0]])
    assert set(np.unique(stack[-1])) <= {0, 300, 1041} and {300, 1041} <= set(np.unique(stack))


def test_interrupted_run_leaves_only_whole_frames(tmp_path, files, monkeypatch):
    fdir, mdir = files
    from napari_stm.core import engine

    real = engine.Tracker.segment
    calls = {"n": 0}

    def interrupted(self, t, image, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(self, t, image, **kwargs)

    monkeypatch.setattr(engine.Tracker, "segment", interrupted)
    out = tmp_path / "out"
    assert run("propagate", fdir, "--masks", mdir, "--out", out, "--model", MODEL, "--quiet") == 130
    written = sorted(out.iterdir())
    assert [p.name for p in written] == [f"{t:05d}.png" for t in range(4)]
    for p in written:
        assert read_label_image(p).shape == (64, 96)
    tif = tmp_path / "o.tif"
    calls["n"] = 0
    assert run("propagate", fdir, "--masks", mdir, "--out", tif, "--model", MODEL, "--quiet") == 130
    assert not tif.exists() and not list(tmp_path.glob(".o.tif*"))


def test_evaluate_and_models_commands(tmp_path, files, clip, capsys):
    fdir, mdir = files
    out = tmp_path / "pred"
    assert run("propagate", fdir, "--masks", mdir, "--out", out, "--model", MODEL, "--quiet") == 0
    gt = tmp_path / "gt"
    gt.mkdir()
    for t, lab in enumerate(clip[1]):
        write_palette_png(gt / f"{t:05d}.png", lab)
    capsys.readouterr()
    assert run("evaluate", out, gt, "--csv", tmp_path / "csv") == 0
    text = capsys.readouterr().out
    assert "J&F" in text
    assert (tmp_path / "csv" / "global_results-val.csv").exists()
    assert run("models") == 0
    listing = capsys.readouterr().out
    assert "stm-resnet50" in listing and "lite0-match" in listing


@pytest.mark.parametrize(
    ("kind", "expected"),
    [("rgb8", "stm-lite"), ("grey16", "stm-lite-cells"), ("grey8", "stm-lite-cells")],
)
def test_without_model_the_frames_choose_the_bundled_model(
    tmp_path, clip, monkeypatch, capsys, kind, expected
):
    frames, labels = clip
    fdir, mdir = tmp_path / "frames", tmp_path / "masks"
    fdir.mkdir()
    mdir.mkdir()
    for t, f in enumerate(frames):
        if kind == "rgb8":
            Image.fromarray(f).save(fdir / f"{t:05d}.png")
        else:
            grey = f.mean(-1)
            grey = (grey * 257).astype(np.uint16) if kind == "grey16" else grey.astype(np.uint8)
            tifffile.imwrite(fdir / f"{t:05d}.tif", grey)
    write_palette_png(mdir / "00000.png", labels[0])
    loaded = []

    def load_model(name, **kwargs):
        loaded.append(name)
        return TinyMatch()

    monkeypatch.setattr(W, "load_model", load_model)
    assert run("propagate", fdir, "--masks", mdir, "--out", tmp_path / "out") == 0
    assert loaded == [expected]
    assert f"model {expected} (" in capsys.readouterr().out
    # A named model always wins.
    assert run("propagate", fdir, "--masks", mdir, "--out", tmp_path / "o2", "--model", MODEL) == 0
    assert loaded == [expected, MODEL]
