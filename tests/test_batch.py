"""`napari-stm batch` on a real local Ray cluster (2 CPUs, 127.0.0.1 only) against `propagate`.

One cluster serves the module (starting Ray takes seconds); the model is lite0-match, which
needs no trained weights and is fast at these sizes. Manifest checks need no cluster.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from napari_stm import batch, cli
from napari_stm.core.engine import PropagationConfig
from napari_stm.core.errors import InputError
from napari_stm.io import write_palette_png
from napari_stm.synthetic import make_clip

MODEL = "lite0-match"
needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="ray is not installed (napari-stm[scale])"
)


def write_video(root: Path, name: str, n_frames: int, seed: int) -> tuple[Path, Path]:
    frames, labels = make_clip(n_frames, 48, 64, n_objects=2, seed=seed, occlusion=False)
    fdir, mdir = root / name / "frames", root / name / "masks"
    fdir.mkdir(parents=True)
    mdir.mkdir()
    for t, frame in enumerate(frames):
        Image.fromarray(frame).save(fdir / f"{t:05d}.png")
    write_palette_png(mdir / "00000.png", labels[0])
    return fdir, mdir


def write_manifest(path: Path, rows: list[dict[str, str]]) -> Path:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def propagate(fdir: Path, mdir: Path, out: Path, *extra: str) -> None:
    argv = ["propagate", fdir, "--masks", mdir, "--out", out, "--model", MODEL]
    assert cli.main([str(a) for a in [*argv, "--device", "cpu", "--quiet", *extra]]) == 0


def assert_same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def summary(out: Path) -> dict[str, dict[str, str]]:
    with open(out / batch.SUMMARY, newline="") as f:
        return {row["name"]: row for row in csv.DictReader(f)}


def run_batch(manifest: Path, out: Path, *extra: str) -> int:
    return cli.main([str(a) for a in ["batch", manifest, "--out", out, "--model", MODEL, *extra]])


@pytest.fixture(scope="module")
def ray_cluster():
    if importlib.util.find_spec("ray") is None:
        pytest.skip("ray is not installed (napari-stm[scale])")
    ray = batch.start_local_cluster(num_cpus=2)
    try:
        yield ray
    finally:
        ray.shutdown()


# --------------------------------------------------------------------------- on the cluster


@needs_ray
def test_command_starts_its_own_local_cluster(tmp_path):
    """The command as a user runs it: a fresh process that starts (and stops) its own cluster,
    on 127.0.0.1 only (the command refuses to run otherwise). First in the module: before the
    shared cluster exists."""
    fdir, mdir = write_video(tmp_path / "data", "clip", n_frames=3, seed=2)
    manifest = write_manifest(
        tmp_path / "videos.csv", [{"name": "one", "frames": str(fdir), "masks": str(mdir)}]
    )
    out = tmp_path / "out"
    command = [sys.executable, "-m", "napari_stm.cli", "batch", str(manifest), "--out", str(out)]
    done = subprocess.run(
        [*command, "--model", MODEL, "--workers", "1", "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    propagate(fdir, mdir, tmp_path / "sequential")
    assert_same_files(out / "one", tmp_path / "sequential")
    assert summary(out)["one"]["status"] == "done"


@needs_ray
def test_cluster_listens_on_loopback_only(ray_cluster):
    assert ray_cluster.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    assert all(node["NodeManagerAddress"] == "127.0.0.1" for node in ray_cluster.nodes())
    assert ray_cluster.cluster_resources()["CPU"] == 2


@needs_ray
def test_batch_matches_sequential_propagate_and_resumes(ray_cluster, tmp_path):
    data = tmp_path / "data"
    rows, expected = [], {}
    for i in range(4):
        fdir, mdir = write_video(data, f"clip{i}", n_frames=6, seed=10 + i)
        row = {"name": f"v{i}", "frames": f"data/clip{i}/frames", "masks": f"data/clip{i}/masks"}
        # One row changes an engine setting through its column; the others keep the default.
        extra = ("--mem-every", "2") if i == 1 else ()
        row["mem_every"] = "2" if i == 1 else ""
        rows.append(row)
        expected[f"v{i}"] = tmp_path / "sequential" / f"v{i}"
        propagate(fdir, mdir, expected[f"v{i}"], *extra)
    manifest = write_manifest(tmp_path / "videos.csv", rows)
    out = tmp_path / "out"

    assert run_batch(manifest, out, "--quiet") == 0
    assert sorted(p.name for p in out.iterdir()) == [".napari-stm", "summary.csv", *expected]
    for name, reference in expected.items():
        assert_same_files(out / name, reference)  # byte for byte
    table = summary(out)
    assert {r["status"] for r in table.values()} == {"done"}
    assert {r["frames"] for r in table.values()} == {"6"}
    assert not (out / batch.STATE / "tmp").exists()

    # A second run finds every output complete and verified: nothing recomputed.
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("v*/*.png")}
    assert run_batch(manifest, out, "--quiet") == 0
    assert {r["status"] for r in summary(out).values()} == {"skipped"}
    assert stamps == {p: p.stat().st_mtime_ns for p in out.glob("v*/*.png")}

    # An output changed since is not this video's result any more: left alone, reported.
    edited = out / "v2" / "00003.png"
    edited.write_bytes(b"someone's edit")
    assert run_batch(manifest, out, "--quiet") == 1
    table = summary(out)
    assert table["v2"]["status"] == "failed" and "--overwrite" in table["v2"]["error"]
    assert edited.read_bytes() == b"someone's edit"
    assert table["v0"]["status"] == "skipped"
    assert run_batch(manifest, out, "--quiet", "--overwrite") == 0
    assert_same_files(out / "v2", expected["v2"])


@needs_ray
def test_killed_worker_video_is_retried_without_half_written_output(ray_cluster, tmp_path):
    fdir, mdir = write_video(tmp_path / "data", "long", n_frames=60, seed=4)
    reference = tmp_path / "sequential"
    propagate(fdir, mdir, reference)
    manifest = write_manifest(
        tmp_path / "videos.csv", [{"name": "long", "frames": str(fdir), "masks": str(mdir)}]
    )
    out = tmp_path / "out"
    code: list[int] = []
    runner = threading.Thread(target=lambda: code.append(run_batch(manifest, out, "--quiet")))
    runner.start()

    # The worker stages the video in <name>.<host>.<pid>/; kill it once frames are on disk.
    staging = out / batch.STATE / "tmp"
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and time.monotonic() < deadline and runner.is_alive():
        for work in staging.glob("long.*"):
            if len(list((work / "long").glob("*.png"))) >= 2:
                killed = int(work.name.rsplit(".", 1)[1])
                os.kill(killed, signal.SIGKILL)
                break
        else:
            time.sleep(0.005)
    runner.join(timeout=300)
    assert killed is not None, "the video finished before the test could kill its worker"
    assert code == [0]
    assert summary(out)["long"]["status"] == "done"
    record = json.loads((out / batch.STATE / "records" / "long.json").read_text())
    assert record["pid"] != killed  # another worker process wrote it
    assert_same_files(out / "long", reference)
    assert not staging.exists()


# --------------------------------------------------------------------------- the manifest


@pytest.fixture()
def inputs(tmp_path):
    return write_video(tmp_path, "clip", n_frames=2, seed=1)


def test_manifest_columns_come_from_the_config(tmp_path, inputs):
    fdir, mdir = inputs
    manifest = write_manifest(
        tmp_path / "m.csv",
        [
            {"name": "a", "frames": str(fdir), "masks": str(mdir), "top_k": "none",
             "max_side": "64", "memory": "official", "normalize": "none"},
            {"name": "b", "frames": "clip/frames", "masks": "clip/masks", "top_k": "",
             "max_side": "", "memory": "", "normalize": ""},
        ],
    )  # fmt: skip
    defaults = PropagationConfig(top_k=5, max_side=128)
    a, b = batch.read_manifest(manifest, defaults)
    assert (a.config.top_k, a.config.max_side, a.config.memory, a.config.normalize) == (
        None,
        64,
        "official",
        "none",
    )
    assert b.config == defaults and b.frames == str(fdir.resolve())
    assert not {"device", "compile", "prefetch"} & set(batch.row_options())
    assert set(batch.row_options()) >= {"memory", "mem_every", "max_memory", "confidence_gate"}


@pytest.mark.parametrize(
    "row, message",
    [
        ({"name": "a", "frames": "F", "masks": "M", "colour": "red"}, "unknown column 'colour'"),
        ({"name": "a", "frames": "F", "masks": "M", "device": "cuda"}, "--gpus-per-video"),
        ({"name": "a", "frames": "F", "masks": "M", "compile": "true"}, "a runtime setting"),
        ({"name": "a", "frames": "F"}, "missing column(s) 'masks'"),
        ({"name": "a", "frames": "F", "masks": "M", "max_side": "big"}, "column 'max_side'"),
        ({"name": "a", "frames": "F", "masks": "M", "memory": "all"}, "line 2, column 'memory'"),
        ({"name": "a", "frames": "F", "masks": "M", "max_memory": "1"}, "line 2: max_memory"),
        ({"name": "a", "frames": "nowhere", "masks": "M"}, "line 2, column 'frames'"),
        ({"name": "../up", "frames": "F", "masks": "M"}, "line 2, column 'name'"),
        ({"name": "", "frames": "F", "masks": "M"}, "line 2, column 'name': empty"),
    ],
)
def test_bad_manifest_names_the_line_and_column(tmp_path, inputs, row, message):
    fdir, mdir = inputs
    row = {k: {"F": str(fdir), "M": str(mdir)}.get(v, v) for k, v in row.items()}
    manifest = write_manifest(tmp_path / "m.csv", [row])
    with pytest.raises(InputError) as err:
        batch.read_manifest(manifest, PropagationConfig())
    assert message in str(err.value)


def test_duplicate_names_point_at_both_lines(tmp_path, inputs):
    fdir, mdir = inputs
    row = {"name": "same", "frames": str(fdir), "masks": str(mdir)}
    manifest = write_manifest(tmp_path / "m.csv", [row, row])
    with pytest.raises(InputError, match="line 3, column 'name'.*line 2"):
        batch.read_manifest(manifest, PropagationConfig())


def test_batch_without_videos_or_with_outputs_over_inputs_fails_clearly(tmp_path, inputs):
    fdir, mdir = inputs
    empty = tmp_path / "empty.csv"
    empty.write_text("name,frames,masks\n")
    with pytest.raises(InputError, match="lists no videos"):
        batch.read_manifest(empty, PropagationConfig())
    # DIR/<name> would be the frames folder itself: refused before anything runs.
    manifest = write_manifest(
        tmp_path / "m.csv", [{"name": "frames", "frames": str(fdir), "masks": str(mdir)}]
    )
    assert run_batch(manifest, fdir.parent, "--quiet") == 2
    assert len(list(fdir.iterdir())) == 2


def test_summary_lists_every_video_in_manifest_order(tmp_path):
    jobs = [
        batch.Job(batch.Video(n, "/f", "/m", PropagationConfig(), i), str(tmp_path), None, None,
                  None, "cpu", "both", None, None, False)
        for i, n in enumerate(["b", "a"])
    ]  # fmt: skip
    batch._write_summary(tmp_path, jobs, {"a": batch._row(jobs[1], 3, "1.50", "done")})
    text = (tmp_path / batch.SUMMARY).read_text().splitlines()
    assert text == ["name,frames,seconds,status,error", "b,,,pending,", "a,3,1.50,done,"]
