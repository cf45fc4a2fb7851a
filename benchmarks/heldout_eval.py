"""Held-out evaluation as a user runs it: `napari-stm propagate` + `napari-stm evaluate`.

Reproduces the numbers of docs/model_card.md. Three kinds of held-out data:

- DAVIS sequences left out of training (``--davis ROOT --davis-sequences a,b,c``): J&F by the
  DAVIS protocol (first-frame initialisation, first and last frames not scored).
- Microscopy time-lapses in the Cell Tracking Challenge layout (``--ctc DIR ...``) of which
  training saw only a band of columns (``napari-stm train --ctc-columns 0:0.5``): the other
  band (``--columns 0.5:1``) is cut out of every frame and of the lineage labels
  (``Annotations_lineage``) into a sequence of its own, initialised with its frame 0's cells
  (cells cut to fewer than ``--min-pixels`` by the band's edge are left out of the labels of
  every frame, so no method is scored on slivers). Reported: J&F of `napari-stm evaluate`, and
  per frame the mean J over frame 0's cells (and their progeny) and the predicted / true
  foreground of those cells.

Methods: ``copy`` (the first mask copied to every frame), ``NAME=WEIGHTS`` (stm-lite with those
weights), ``NAME=`` (the bundled default), optionally ``NAME=WEIGHTS@--flag value ...`` for
extra `napari-stm propagate` options.

    python benchmarks/heldout_eval.py /tmp/heldout --davis ../shared/data/davis2016-dev \\
        --davis-sequences dog-agility,motorbike,swing,bmx-bumps,breakdance-flare,soccerball \\
        --ctc ../shared/data/ctc-sim-01 ../shared/data/dic-hela-01 --columns 0.5:1 \\
        --methods copy old=/tmp/stm_lite_old.pth new=

Each propagation runs as its own `napari-stm propagate` process (``python -m napari_stm.cli``,
so the checkout on ``PYTHONPATH`` is the one measured); outputs under WORK, never in the data.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from napari_stm.bands import band, band_objects, parse_columns
from napari_stm.io import natural_key, read_label_image, write_palette_png

FRAMES_REPORTED = (10, 30, 60)


def _cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "napari_stm.cli", *args], check=True)


def prepare_ctc(
    root: Path,
    work: Path,
    columns: tuple[float, float],
    min_pixels: int,
    max_frames: int | None = None,
) -> Path:
    """Cut the held-out band of a CTC sequence into WORK/ctc/<name>/{frames,Annotations}."""
    import tifffile

    name = root.name
    out = work / "ctc" / name
    frames_dir, gt_dir = out / "frames", out / "Annotations"
    if (out / "done").is_file():
        return out
    frames_dir.mkdir(parents=True, exist_ok=True)
    gt_dir.mkdir(parents=True, exist_ok=True)
    ann = root / "Annotations_lineage"
    if not ann.is_dir():
        ann = root / "Annotations"
    raws = sorted((root / "raw_tif").glob("t*.tif"), key=lambda p: natural_key(p.name))
    raws = raws[:max_frames]
    labels = [read_label_image(ann / f"{int(p.stem[1:]):05d}.png") for p in raws]
    cols = band(labels[0].shape[1], columns)
    keep = set(band_objects(labels[0][:, cols], min_pixels))
    lut = np.array([i if i in keep else 0 for i in range(256)], np.uint8)
    for t, (raw, lab) in enumerate(zip(raws, labels, strict=True)):
        frame = tifffile.imread(raw)[:, cols]
        tifffile.imwrite(frames_dir / f"{t:05d}.tif", np.ascontiguousarray(frame))
        write_palette_png(gt_dir / f"{t:05d}.png", lut[lab[:, cols]])
    done = {"columns": [cols.start, cols.stop], "cells": sorted(keep)}
    (out / "done").write_text(json.dumps(done))
    return out


def per_frame(pred_dir: Path, gt_dir: Path) -> tuple[list[float], list[float]]:
    """Mean J over frame 0's objects, and predicted / true foreground of them, per frame."""
    gts = sorted(gt_dir.glob("*.png"), key=lambda p: natural_key(p.name))
    ids = [int(i) for i in np.unique(read_label_image(gts[0])) if i != 0]
    js, ratios = [], []
    for g in gts:
        gt = read_label_image(g)
        pred = read_label_image(pred_dir / g.name)
        scores = []
        for i in ids:
            a, b = gt == i, pred == i
            union = (a | b).sum()
            scores.append(1.0 if union == 0 else (a & b).sum() / union)
        js.append(float(np.mean(scores)))
        true_fg = np.isin(gt, ids).sum()
        ratios.append(float(np.isin(pred, ids).sum() / max(true_fg, 1)))
    return js, ratios


def evaluate(pred_root: Path, gt_root: Path, csv_dir: Path, sequences: list[str]) -> dict:
    """Per sequence: J and F means over its objects, and their number (evaluate's CSV)."""
    _cli(
        "evaluate", str(pred_root), str(gt_root), "--csv", str(csv_dir),
        "--sequences", ",".join(sequences),
    )  # fmt: skip
    with open(csv_dir / "per-sequence_results-val.csv") as f:
        rows = list(csv.DictReader(f))  # one row per object: <sequence>_<id>
    out = {}
    for seq in sequences:
        mine = [r for r in rows if r["Sequence"].rsplit("_", 1)[0] == seq]
        out[seq] = {
            "J": float(np.mean([float(r["J-Mean"]) for r in mine])),
            "F": float(np.mean([float(r["F-Mean"]) for r in mine])),
            "objects": len(mine),
        }
    return out


def report(results: dict) -> None:
    """J&F per group (means over objects, as `napari-stm evaluate`) and per sequence; per-frame
    J and foreground ratio of the microscopy sequences."""
    print("\nJ&F (J, F), DAVIS rules, means over objects:")
    for name, r in results.items():
        for group, g in r.items():
            n = sum(v["objects"] for v in g.values())
            j = sum(v["J"] * v["objects"] for v in g.values()) / n
            f = sum(v["F"] * v["objects"] for v in g.values()) / n
            print(f"  {name:12s} {group:6s} J&F {(j + f) / 2:.3f} (J {j:.3f}, F {f:.3f})")
            for seq, v in g.items():
                print(
                    f"      {seq:20s} J&F {(v['J'] + v['F']) / 2:.3f} "
                    f"({v['objects']} objects, {v['seconds']:.0f} s)"
                )
    header = False
    for name, r in results.items():
        for seq, v in r.get("ctc", {}).items():
            if not header:
                print("\nheld-out microscopy: mean J over frame 0's cells / predicted:true fg")
                header = True
            js, ratios = v["per_frame_J"], v["fg_ratio"]
            last = len(js) - 1
            at = [t for t in FRAMES_REPORTED if t < last] + [last]
            cells = " ".join(f"f{t}: {js[t]:.3f}/{ratios[t]:.2f}" for t in at)
            print(f"  {seq:12s} {name:12s} mean J (frames 1..last) {np.mean(js[1:]):.3f}  {cells}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("work", type=Path, help="folder for prepared data, predictions and results")
    p.add_argument("--davis", type=Path, default=None)
    p.add_argument("--davis-sequences", default="")
    p.add_argument("--ctc", type=Path, nargs="*", default=[])
    p.add_argument("--columns", default="0.5:1", help="held-out band of the CTC frames (A:B)")
    p.add_argument("--min-pixels", type=int, default=100)
    p.add_argument(
        "--max-frames", type=int, default=None, help="CTC: only the first N frames (diagnostics)"
    )
    p.add_argument("--methods", nargs="*", default=[], help="none: print the results so far")
    p.add_argument("--threads", type=int, default=1, help="OMP threads of each propagation")
    args = p.parse_args(argv)
    work = args.work.resolve()
    a, b = parse_columns(args.columns)
    env_threads = {"OMP_NUM_THREADS": str(args.threads)}
    os.environ.update(env_threads)

    groups: dict[str, dict[str, tuple[Path, Path, str | None]]] = {}
    # group -> sequence -> (frames, ground-truth folder, first-frame mask)
    if args.davis and args.davis_sequences:
        davis = {}
        for s in args.davis_sequences.split(","):
            d = args.davis.resolve() / s
            davis[s] = (d / "JPEGImages", d / "Annotations", None)
        groups["davis"] = davis
    for root in args.ctc:
        out = prepare_ctc(root.resolve(), work, (a, b), args.min_pixels, args.max_frames)
        groups.setdefault("ctc", {})[root.name] = (out / "frames", out / "Annotations", None)

    results_file = work / "results.json"
    results: dict = json.loads(results_file.read_text()) if results_file.is_file() else {}
    for method in args.methods:
        name, _, spec = method.partition("=")
        weights, _, extra = spec.partition("@")
        for group, seqs in groups.items():
            pred_root = work / "pred" / name / group
            gt_root = work / "gt" / group
            gt_root.mkdir(parents=True, exist_ok=True)
            seconds = {}
            for seq, (frames, gt, _) in seqs.items():
                link = gt_root / seq
                if not link.exists():
                    link.symlink_to(gt, target_is_directory=True)
                target = pred_root / seq
                first = min(gt.glob("*.png"), key=lambda q: natural_key(q.name))
                t0 = time.perf_counter()
                if name == "copy":
                    target.mkdir(parents=True, exist_ok=True)
                    mask = read_label_image(first)
                    for f in sorted(gt.glob("*.png")):
                        write_palette_png(target / f.name, mask)
                else:
                    cmd = [
                        "propagate", str(frames), "--masks", str(first), "--out", str(target),
                        "--direction", "forward", "--device", "cpu", "--quiet", "--overwrite",
                    ]  # fmt: skip
                    if weights:
                        cmd += ["--weights", weights]
                    cmd += extra.split()
                    _cli(*cmd)
                seconds[seq] = time.perf_counter() - t0
                print(f"{name} {group}/{seq}: {seconds[seq]:.1f} s", flush=True)
            scores = evaluate(pred_root, gt_root, work / "csv" / name / group, list(seqs))
            for seq in seqs:
                entry = {**scores[seq], "seconds": seconds[seq], "options": spec}
                if group == "ctc":
                    js, ratios = per_frame(pred_root / seq, seqs[seq][1])
                    entry["per_frame_J"], entry["fg_ratio"] = js, ratios
                results.setdefault(name, {}).setdefault(group, {})[seq] = entry
            # Merged after every group: a run split into pieces builds one table.
            results_file.write_text(json.dumps(results, indent=1))
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
