"""Wall time of `napari-stm batch` on the same videos with 1 and 2 workers, side by side.

Each configuration is a fresh `napari-stm batch` process (its own local Ray cluster, started and
stopped inside the timed run, as a user runs it) on the same synthetic videos, into a fresh
output folder; the outputs of all configurations are compared byte for byte at the end.

    flock /tmp/cpu.lock nice -n 10 python benchmarks/bench_batch.py --videos 8

Prints one table row per configuration: wall time of the command, the sum of the videos' own
seconds (from summary.csv), and videos per minute. OMP_NUM_THREADS is removed from the
commands' environment so that Ray gives each video as many torch threads as it has CPUs.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from napari_stm.io import write_palette_png
from napari_stm.synthetic import make_clip


def make_videos(root: Path, n: int, frames: int, height: int, width: int) -> Path:
    rows = []
    for i in range(n):
        clip, labels = make_clip(frames, height, width, n_objects=2, seed=100 + i)
        fdir, mdir = root / f"clip{i}" / "frames", root / f"clip{i}" / "masks"
        fdir.mkdir(parents=True)
        mdir.mkdir()
        for t, frame in enumerate(clip):
            Image.fromarray(frame).save(fdir / f"{t:05d}.jpg", quality=95)
        write_palette_png(mdir / "00000.png", labels[0])
        rows.append({"name": f"video{i}", "frames": str(fdir), "masks": str(mdir)})
    manifest = root / "videos.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["name", "frames", "masks"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--videos", type=int, default=8)
    p.add_argument("--frames", type=int, default=24)
    p.add_argument("--height", type=int, default=240)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--model", default="stm-lite")
    p.add_argument(
        "--configs",
        default="1x1,2x1",
        help="comma-separated WORKERSxCPUS_PER_VIDEO (default: %(default)s)",
    )
    args = p.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    with tempfile.TemporaryDirectory(prefix="bench_batch_") as tmp:
        root = Path(tmp)
        manifest = make_videos(root / "data", args.videos, args.frames, args.height, args.width)
        print(
            f"{args.videos} videos x {args.frames} frames, {args.width}x{args.height}, "
            f"{args.model}, {os.cpu_count()} cores; load average before: "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
        )
        print(f"{'workers':>7} {'cpus/video':>10} {'wall s':>8} {'video s (sum)':>13} "
              f"{'videos/min':>10} {'load avg':>8}")  # fmt: skip
        outputs = []
        for config in args.configs.split(","):
            workers, cpus = config.split("x")
            out = root / f"out_{config}"
            command = [
                sys.executable, "-m", "napari_stm.cli", "batch", str(manifest),
                "--out", str(out), "--model", args.model, "--quiet",
                "--workers", workers, "--cpus-per-video", cpus,
            ]  # fmt: skip
            started = time.perf_counter()
            subprocess.run(command, env=env, check=True)
            wall = time.perf_counter() - started
            with open(out / "summary.csv", newline="") as f:
                rows = list(csv.DictReader(f))
            assert all(r["status"] == "done" for r in rows), rows
            busy = sum(float(r["seconds"]) for r in rows)
            print(
                f"{workers:>7} {cpus:>10} {wall:8.1f} {busy:13.1f} "
                f"{60 * len(rows) / wall:10.2f} {os.getloadavg()[0]:8.2f}",
                flush=True,
            )
            outputs.append(out)
        same = all(
            (a / r["name"] / f.name).read_bytes() == f.read_bytes()
            for a in outputs[:1]
            for b in outputs[1:]
            for r in rows
            for f in sorted((b / r["name"]).iterdir())
        )
        print(f"outputs identical across configurations: {same}")


if __name__ == "__main__":
    main()
