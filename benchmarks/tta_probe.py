"""Does test-time adaptation pay? Fine-tune light parts of stm-lite on the reference frame,
then propagate, against propagating with the weights as they are (issue #15, item 5).

    python benchmarks/tta_probe.py ../shared/data/davis2016-dev dance-jump hockey \\
        --limit 40 --steps 30 --lr 1e-4 --parts decoder,value_encoder

For each sequence: frame 0's true mask is the reference; a copy of the network has the named
parts trained for ``--steps`` steps on 3-frame pseudo-clips of that one frame (frame 0 itself,
then two random affine warps of it with a brightness change, the warped mask as the target),
through the same engine step and clip as training (`clip_logits`), plain cross-entropy,
AdamW. Both networks then propagate forward from frame 0 (bounded memory, the model's working
size) and the mean J of frames 1.. is printed with the seconds the adaptation took.

Measured results are in docs/model_card.md ("Test-time adaptation"); the engine does not adapt.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from napari_stm.core.engine import PropagationConfig, Propagator
from napari_stm.core.model import VOSNetwork
from napari_stm.core.tracker import from_labels
from napari_stm.core.weights import load_model
from napari_stm.io import open_frames, read_masks
from napari_stm.metrics import db_eval_iou
from napari_stm.train.loop import clip_logits


def warp(image: torch.Tensor, mask: torch.Tensor, g: torch.Generator) -> tuple:
    """One random affine warp (rotation, zoom, shear, shift) of an image and its mask."""

    def draw(lo: float, hi: float) -> float:
        return float(torch.empty(1).uniform_(lo, hi, generator=g))

    h, w = image.shape[-2:]
    kw = {
        "angle": draw(-15, 15),
        "translate": [int(draw(-0.1, 0.1) * w), int(draw(-0.1, 0.1) * h)],
        "scale": draw(0.9, 1.1),
        "shear": [draw(-8, 8), 0.0],
    }
    out = TF.affine(image, interpolation=TF.InterpolationMode.BILINEAR, **kw)
    lab = TF.affine(mask[None], interpolation=TF.InterpolationMode.NEAREST, **kw)[0]
    return (out * draw(0.85, 1.15)).clamp(0, 1), lab


def adapt(
    model: VOSNetwork,
    image: torch.Tensor,
    mask: torch.Tensor,
    steps: int,
    lr: float,
    parts: list[str],
) -> VOSNetwork:
    """A copy of ``model`` with ``parts`` fine-tuned on pseudo-clips of one annotated frame."""
    net = copy.deepcopy(model)
    net.requires_grad_(False)
    params = []
    for part in parts:
        getattr(net, part).requires_grad_(True)
        params += list(getattr(net, part).parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    net.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        clip = [(image, mask)] + [warp(image, mask, g) for _ in range(2)]
        images = torch.stack([c[0] for c in clip])[None]
        labels = torch.stack([c[1] for c in clip])[None].long()
        logits = clip_logits(net, images, labels, 1)
        loss = torch.stack(
            [F.cross_entropy(lg, labels[:, i + 1]) for i, lg in enumerate(logits)]
        ).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    net.requires_grad_(False)
    return net


def mean_j(model: VOSNetwork, frames: np.ndarray, truth: list[np.ndarray]) -> float:
    prop = Propagator(model, frames, PropagationConfig())
    prop.add_reference(0, truth[0])
    return float(
        np.mean([db_eval_iou(truth[r.t], r.labels > 0) for r in prop.propagate("forward") if r.t])
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path, help="DAVIS-layout folder")
    p.add_argument("sequences", nargs="+")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--parts", default="decoder,value_encoder")
    p.add_argument("--limit", type=int, default=0, help="first N frames only (0: all)")
    p.add_argument("--weights", default=None)
    a = p.parse_args()
    torch.manual_seed(0)
    model = load_model("stm-lite", weights=a.weights, device="cpu").eval()
    for seq in a.sequences:
        source = open_frames(a.root / seq / "JPEGImages")
        n = len(source) if not a.limit else min(a.limit, len(source))
        frames = np.stack([np.asarray(source[t]) for t in range(n)])
        masks = read_masks(a.root / seq / "Annotations", source.stems, source.shape)
        truth = [(masks[t] > 0).astype(np.uint8) for t in range(n)]
        t0 = time.perf_counter()
        base = mean_j(model, frames, truth)
        t_base = time.perf_counter() - t0
        prop = Propagator(model, frames, PropagationConfig())
        prop.add_reference(0, truth[0])
        geo = prop.geo
        image = prop.reader.tensor(0, geo, torch.device("cpu"))[0]
        mask = from_labels(torch.from_numpy(truth[0].astype(np.int64)), [1], geo)[0] > 0.5
        t0 = time.perf_counter()
        tuned = adapt(model, image, mask.long(), a.steps, a.lr, a.parts.split(","))
        t_adapt = time.perf_counter() - t0
        adapted = mean_j(tuned, frames, truth)
        print(
            f"{seq}: J {base:.4f} -> {adapted:.4f} ({adapted - base:+.4f}); adaptation "
            f"{t_adapt:.1f} s ({a.steps} steps), propagation {t_base:.1f} s, {n} frames",
            flush=True,
        )


if __name__ == "__main__":
    main()
