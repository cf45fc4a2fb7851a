"""The training loop: learns, resumes bit for bit, logs, never overwrites a run, and trains the
very computation the engine runs at inference."""

from __future__ import annotations

import argparse
import csv

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from napari_stm.core.engine import PropagationConfig, Tracker
from napari_stm.core.errors import InputError
from napari_stm.core.stm_lite import STMLite
from napari_stm.core.weights import read_state_dict
from napari_stm.synthetic import make_clip
from napari_stm.train import cli
from napari_stm.train.datasets import ProceduralDataset
from napari_stm.train.loop import TrainConfig, Trainer, clip_logits, clip_loss

S = 64


@pytest.fixture(scope="module")
def dataset():
    return ProceduralDataset(crop=S, frames=3, objects=2, seed=0, clip_frames=5)


def _config(tmp_path, **kw):
    base = dict(
        out=str(tmp_path / "run"),
        iterations=6,
        batch_size=2,
        lr=1e-3,
        warmup=0,
        bootstrap=1.0,
        device="cpu",
        log_every=1,
        save_every=2,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(tmp_path, dataset):
    trainer = Trainer(_config(tmp_path), dataset)
    batch = default_collate([dataset[0], dataset[1]])

    def loss() -> float:
        with torch.no_grad():
            return float(clip_loss(trainer.model, batch["images"], batch["labels"], 2))

    before = loss()
    for _ in range(6):
        trainer.train_step(batch)
    assert loss() < 0.9 * before


def test_resume_gives_the_identical_next_step(tmp_path, dataset):
    a = Trainer(_config(tmp_path), dataset)
    stream = a.batches()
    for _ in range(2):
        a.train_step(next(stream))
    a.save()
    expected = a.train_step(next(stream))

    # Another seed: a different initial model, so equality proves the checkpoint was used.
    b = Trainer(_config(tmp_path, seed=1), dataset)
    b.load(tmp_path / "run" / "last.pth")
    assert b.step == 2
    assert b.train_step(next(b.batches())) == expected


def test_run_logs_plots_exports_and_never_overwrites(tmp_path, dataset):
    cfg = _config(tmp_path, iterations=3)
    weights = Trainer(cfg, dataset).run()
    out = tmp_path / "run"
    assert weights == out / "stm_lite.pth"
    assert (out / "loss.png").stat().st_size > 0
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert all(np.isfinite(float(r["loss"])) for r in rows)

    with pytest.raises(InputError, match="--resume"):
        Trainer(cfg, dataset).run()

    # Resuming with a longer schedule continues from step 3.
    Trainer(_config(tmp_path, iterations=4), dataset).run(resume=True)
    with open(out / "log.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4]
    # Both the weights file and the training checkpoint load strictly into a fresh model.
    for path in (weights, out / "last.pth"):
        STMLite().load_state_dict(read_state_dict(path), strict=True)


def test_training_runs_the_engines_computation(dataset):
    # Frame 0 with its labels into memory, segment frame 1, memorise it with its predicted
    # probabilities, segment frame 2: the tracker and the training forward must agree.
    torch.manual_seed(0)
    model = STMLite(pretrained=True).eval()
    frames, labels = make_clip(n_frames=3, height=S, width=S, n_objects=2, seed=5, occlusion=False)
    # The motion prior is the engine's addition at inference; training reads without it.
    config = PropagationConfig(device="cpu", mem_every=1, confidence_gate=0, motion_sigma=0)
    tracker = Tracker(model, config)
    tracker.step(frames[0], labels[0])
    engine = [tracker.step(frames[t])[1] for t in (1, 2)]

    images = torch.from_numpy(frames).permute(0, 3, 1, 2)[None].float() / 255
    with torch.no_grad():
        ours = clip_logits(model, images, torch.from_numpy(labels.astype(np.int64))[None], 2)
    for t in range(2):
        probs = torch.softmax(ours[t][0], dim=0).numpy()
        np.testing.assert_allclose(probs, engine[t], atol=1e-4)


def test_training_reads_through_the_engines_motion_prior(dataset):
    # Four frames with a fixed prior spread: the training forward (memory of the network's own
    # predictions, read through the prior) and the tracker agree frame by frame.
    torch.manual_seed(0)
    model = STMLite(pretrained=True).eval()
    frames, labels = make_clip(n_frames=4, height=S, width=S, n_objects=2, seed=5, occlusion=False)
    config = PropagationConfig(device="cpu", mem_every=1, confidence_gate=0, motion_sigma=0.1)
    tracker = Tracker(model, config)
    tracker.step(frames[0], labels[0])
    engine = [tracker.step(frames[t])[1] for t in (1, 2, 3)]

    images = torch.from_numpy(frames).permute(0, 3, 1, 2)[None].float() / 255
    lab = torch.from_numpy(labels.astype(np.int64))[None]
    with torch.no_grad():
        ours = clip_logits(model, images, lab, 2, motion_sigma=0.1)
        without = clip_logits(model, images, lab, 2)
    for t in range(3):
        probs = torch.softmax(ours[t][0], dim=0).numpy()
        np.testing.assert_allclose(probs, engine[t], atol=1e-4)
    assert not torch.allclose(ours[2], without[2], atol=1e-3), "the prior changes the read"


def test_motion_prior_draws_are_a_function_of_the_step(tmp_path, dataset):
    config = TrainConfig(out=str(tmp_path), motion_probability=0.5, motion_sigma=(0.05, 0.3))
    trainer = Trainer(config, dataset, model=STMLite(pretrained=False))
    draws = [trainer.motion_sigma_at(s) for s in range(40)]
    assert draws == [trainer.motion_sigma_at(s) for s in range(40)]
    used = [d for d in draws if d is not None]
    assert 5 < len(used) < 35
    assert all(0.05 <= d <= 0.3 for d in used)
    off = Trainer(TrainConfig(out=str(tmp_path)), dataset, model=STMLite(pretrained=False))
    assert off.motion_sigma_at(3) is None


def test_cli_trains_from_nothing(tmp_path):
    parser = cli.add_arguments(argparse.ArgumentParser())
    out = tmp_path / "cli_run"
    export = tmp_path / "exported" / "stm_lite.pth"
    args = parser.parse_args(
        [
            str(out),
            "--iterations",
            "2",
            "--batch-size",
            "1",
            "--crop",
            "64",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--quiet",
            "--export",
            str(export),
        ]
    )
    assert cli.run(args) == 0
    assert (out / "stm_lite.pth").is_file() and export.is_file()
    bad = parser.parse_args([str(tmp_path / "x"), "--stage", "2", "--device", "cpu"])
    with pytest.raises(InputError, match="--davis ROOT and/or --ctc"):
        cli.run(bad)
    bad = parser.parse_args([str(tmp_path / "y"), "--crop", "50", "--device", "cpu"])
    with pytest.raises(InputError, match="multiple of 16"):
        cli.run(bad)


def test_cli_trains_on_microscopy(tmp_path, ctc_root):
    parser = cli.add_arguments(argparse.ArgumentParser())
    out = tmp_path / "ctc_run"
    common = ["--device", "cpu", "--threads", "1", "--quiet", "--crop", "64", "--batch-size", "2"]
    args = parser.parse_args(
        [
            str(out),
            "--stage",
            "2",
            "--ctc",
            str(ctc_root),
            "--ctc-columns",
            "0:0.5",
            "--cells-weight",
            "1",
            "--frames",
            "4",
            "--iterations",
            "2",
            "--motion-prior",
            "1",
            *common,
        ]
    )
    dataset = cli.build_dataset(args, 64)
    assert [type(d).__name__ for d in dataset.datasets] == ["CtcDataset", "CellTimelapseDataset"]
    assert dataset.datasets[0].columns == (0.0, 0.5)
    assert cli.run(args) == 0
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert int(rows[-1]["step"]) == 2 and float(rows[-1]["loss"]) > 0
    bad = parser.parse_args(
        [str(tmp_path / "z"), "--ctc", str(ctc_root), "--ctc-columns", "half", *common]
    )
    with pytest.raises(InputError, match="--ctc-columns"):
        cli.run(bad)


def test_time_budget_stops_saved_and_resumable(tmp_path, dataset):
    import time

    cfg = _config(tmp_path, iterations=5, save_every=100)
    # A budget already spent: one step runs, then the run stops, saved and exported.
    weights = Trainer(cfg, dataset).run(stop_at=time.monotonic())
    out = tmp_path / "run"
    assert weights.is_file()
    state = torch.load(out / "last.pth", map_location="cpu", weights_only=True)
    assert state["step"] == 1
    Trainer(cfg, dataset).run(resume=True)
    with open(out / "log.csv") as f:
        assert int(list(csv.DictReader(f))[-1]["step"]) == 5


def test_cli_minutes_plans_the_iterations(tmp_path, davis_root, capsys):
    parser = cli.add_arguments(argparse.ArgumentParser())
    init = tmp_path / "init.pth"
    torch.save(STMLite().state_dict(), init)
    out = tmp_path / "timed"
    common = ["--device", "cpu", "--threads", "1", "--quiet", "--crop", "64", "--batch-size", "1"]
    args = parser.parse_args(
        [str(out), "--stage", "2", "--davis", str(davis_root), "--init", str(init)]
        + ["--frames", "2", "--minutes", "0.5", "--iterations", "4", *common]
    )
    assert cli.run(args) == 0
    # The measured steps fit many more than 4 in half a minute: --iterations caps the plan.
    assert "--iterations 4" in capsys.readouterr().out
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert int(rows[-1]["step"]) == 4
    resumed = parser.parse_args([str(out), "--resume", "--minutes", "1", *common])
    with pytest.raises(InputError, match="--minutes plans a new run"):
        cli.run(resumed)
