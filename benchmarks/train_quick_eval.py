"""Quick validation while training: J&F of models on a few DAVIS-layout sequences, downscaled.

    python benchmarks/train_quick_eval.py ../shared/data/davis2016-dev \
        --sequences boat,dog-agility,hockey --max-side 432 \
        --models copy lite0-match stm-lite=runs/stage2/stm_lite.pth

First-frame initialisation, forward propagation, J and F from napari_stm.metrics
(first and last frames not scored), all objects pooled. Downscaling (--max-side) makes it a proxy
to choose checkpoints; the scores to report come from `napari-stm evaluate` at full size.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from napari_stm.core.engine import PropagationConfig, Propagator
from napari_stm.core.stm_lite import STMLite
from napari_stm.core.weights import load_model, load_state_dict, read_state_dict
from napari_stm.metrics import db_eval_boundary, db_eval_iou


def load_sequence(root: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    frames = sorted((root / name / "JPEGImages").glob("*.jpg"))
    video = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in frames])
    labels = np.stack(
        [np.asarray(Image.open(root / name / "Annotations" / f"{p.stem}.png")) for p in frames]
    )
    return video, labels


def build(spec: str):  # noqa: ANN201 - a VOSNetwork, or None for the copy baseline
    if spec == "copy":
        return None
    if "=" in spec:
        name, path = spec.split("=", 1)
        if name != "stm-lite":
            raise SystemExit(f"only stm-lite=PATH takes a path, got {spec}")
        model = STMLite()
        load_state_dict(model, read_state_dict(path), path)
        return model.eval().requires_grad_(False)
    return load_model(spec, device="cpu")


def predict(model, video: np.ndarray, labels0: np.ndarray, cfg: PropagationConfig) -> np.ndarray:
    if model is None:
        return np.repeat(labels0[None], len(video), axis=0)
    prop = Propagator(model, video, cfg)
    prop.add_reference(0, labels0)
    out = np.zeros((len(video), *labels0.shape), np.uint8)
    for res in prop.propagate("forward"):
        out[res.t] = res.labels
    return out


def score(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    ids = [i for i in np.unique(gt[0]) if i != 0]
    js, fs = [], []
    for i in ids:
        g, p = gt[1:-1] == i, pred[1:-1] == i
        js.append(np.mean(db_eval_iou(g, p)))
        fs.append(np.mean(db_eval_boundary(g, p)))
    return float(np.mean(js)), float(np.mean(fs))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path)
    p.add_argument("--sequences", required=True, help="comma-separated")
    p.add_argument("--models", nargs="+", default=["copy", "lite0-match"])
    p.add_argument("--max-side", type=int, default=432)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = PropagationConfig(device="cpu", max_side=args.max_side, top_k=args.top_k)
    names = [s.strip() for s in args.sequences.split(",") if s.strip()]
    data = {n: load_sequence(args.root, n) for n in names}
    print(
        f"{'model':40s} "
        + " ".join(f"{n[:14]:>14s}" for n in names)
        + "   J&F    J     F   s/frame"
    )
    for spec in args.models:
        model = build(spec)
        cells, js, fs, frames = [], [], [], 0
        t0 = time.perf_counter()
        for n in names:
            video, gt = data[n]
            j, f = score(predict(model, video, gt[0], cfg), gt)
            cells.append(f"{(j + f) / 2 * 100:14.1f}")
            js.append(j)
            fs.append(f)
            frames += len(video) - 1
        dt = (time.perf_counter() - t0) / frames
        j, f = np.mean(js), np.mean(fs)
        print(
            f"{spec[:40]:40s} "
            + " ".join(cells)
            + f" {(j + f) / 2 * 100:6.1f} {j * 100:5.1f} {f * 100:5.1f} {dt:6.3f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
