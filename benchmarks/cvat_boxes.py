"""Rectangles through the CVAT tracker: box IoU per frame against copying the first box.

    python benchmarks/cvat_boxes.py /work/shared/data/davis2016-dev \\
        --sequences dog-agility motorbike swing bmx-bumps breakdance-flare soccerball

The boxes are the ground truth masks' bounding boxes (DAVIS layout: ``JPEGImages/*.jpg``,
``Annotations/*.png``, object = non-zero). The first frame's box is given as a CVAT
rectangle; three ways to follow it are scored on every later frame by box IoU:

- ``copy``: the first box on every frame (what a person gets without a tracker);
- ``filled box``: the engine memorises the filled box as the object's mask;
- ``engine read-back``: the engine memorises the filled box, segments the first frame again
  from that memory and keeps what it finds inside the box;
- ``GrabCut``: what the tracker does (``cvat_function.tracking.box_seeded_mask``): OpenCV's
  GrabCut, initialised with the box, gives the memorised mask.

Each answer is the bounding box of the tracked mask, as the tracker returns it. The default
sequences are the ones the bundled model's training held out.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import PIL.Image

HELD_OUT = ["dog-agility", "motorbike", "swing", "bmx-bumps", "breakdance-flare", "soccerball"]


def box_of(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    from cvat_function.shapes import box_from_mask

    b = box_from_mask(mask)
    return None if b is None else tuple(b)


def box_iou(a: tuple | None, b: tuple | None) -> float:
    if a is None or b is None:
        return float(a is None and b is None)
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def read_back(model, config, image: np.ndarray, box: np.ndarray) -> np.ndarray:  # noqa: ANN001
    """The alternative first mask: the frame segmented from a memory holding the filled box."""
    from cvat_function import tracking

    probe = tracking.start(model, config, image, box)
    (inside,) = tracking.follow([probe], image)
    inside &= box
    return inside if inside.sum() >= tracking.BOX_MIN_FILL * box.sum() else box


def load(seq: Path, limit: int | None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    names = sorted(p.stem for p in (seq / "Annotations").glob("*.png"))[:limit]
    frames = [
        np.asarray(PIL.Image.open(seq / "JPEGImages" / f"{n}.jpg").convert("RGB")) for n in names
    ]
    masks = [np.asarray(PIL.Image.open(seq / "Annotations" / f"{n}.png")) > 0 for n in names]
    return frames, masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--sequences", nargs="+", default=HELD_OUT)
    parser.add_argument("--frames", type=int, default=None, help="first N frames of each")
    parser.add_argument("--model", default=None, help="default: the bundled default model")
    args = parser.parse_args()

    import torch

    from cvat_function import tracking
    from cvat_function.shapes import mask_from_rectangle
    from napari_stm.core.engine import PropagationConfig
    from napari_stm.core.weights import default_model_name, load_model

    torch.set_num_threads(1)
    name = args.model or default_model_name()
    model = load_model(name, device="cpu")
    config = PropagationConfig()
    methods = ["copy", "filled box", "engine read-back", "GrabCut"]
    print(f"model {name}; box IoU per frame (frames after the first), mean over each sequence")
    print(
        f"| sequence | frames | {' | '.join(methods)} | first mask IoU: box, read-back, GrabCut |"
    )
    print("|---|---|" + "---|" * (len(methods) + 1))
    all_scores: dict[str, list[float]] = {m: [] for m in methods}
    start = time.perf_counter()
    for seq_name in args.sequences:
        frames, masks = load(args.root / seq_name, args.frames)
        h, w = masks[0].shape
        first = box_of(masks[0])
        box = mask_from_rectangle(list(first), h, w)
        truth = [box_of(m) for m in masks[1:]]
        scores = {"copy": [box_iou(first, t) for t in truth]}
        seeds = {
            "filled box": box,
            "engine read-back": read_back(model, config, frames[0], box),
            "GrabCut": tracking.box_seeded_mask(frames[0], box),
        }
        for method, mask in seeds.items():
            tracker = tracking.start(model, config, frames[0], mask)
            got = [box_of(tracking.follow([tracker], f)[0]) for f in frames[1:]]
            scores[method] = [box_iou(g, t) for g, t in zip(got, truth, strict=True)]
        first_ious = ", ".join(f"{mask_iou(m, masks[0]):.3f}" for m in seeds.values())
        for m in methods:
            all_scores[m] += scores[m]
        row = " | ".join(f"{np.mean(scores[m]):.3f}" for m in methods)
        print(f"| {seq_name} | {len(frames)} | {row} | {first_ious} |", flush=True)
    n = len(all_scores["copy"])
    row = " | ".join(f"**{np.mean(all_scores[m]):.3f}**" for m in methods)
    print(f"| all (per frame) | {n} | {row} | |")
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
