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
- ``GrabCut``: OpenCV's GrabCut, initialised with the box, gives the memorised mask (needs
  ``opencv-python-headless``, not a dependency of the package).

The tracker memorises the filled box (``filled box``), the best of the three seeds here.

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
    return inside if inside.sum() >= 0.1 * box.sum() else box


def grabcut_mask(image: np.ndarray, box: np.ndarray) -> np.ndarray:
    """The object inside a filled box on ``image`` (H x W x 3 RGB uint8), by GrabCut.

    GrabCut runs on the box and a margin around it (the margin is its background sample),
    at most :data:`400` pixels a side, so its cost does not grow with the frame.
    """
    import cv2

    rows = np.flatnonzero(box.any(axis=1))
    cols = np.flatnonzero(box.any(axis=0))
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    h, w = box.shape
    margin = max(8, (max(y1 - y0, x1 - x0)) // 4)
    cy0, cy1 = max(0, y0 - margin), min(h, y1 + margin)
    cx0, cx1 = max(0, x0 - margin), min(w, x1 + margin)
    crop = np.ascontiguousarray(image[cy0:cy1, cx0:cx1, ::-1])  # RGB -> OpenCV's BGR
    scale = min(1.0, 400 / max(crop.shape[:2]))
    if scale < 1.0:
        size = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))
        crop = cv2.resize(crop, size, interpolation=cv2.INTER_AREA)
    rx0, ry0 = int((x0 - cx0) * scale), int((y0 - cy0) * scale)
    rx1 = max(rx0 + 1, int(round((x1 - cx0) * scale)))
    ry1 = max(ry0 + 1, int(round((y1 - cy0) * scale)))
    labels = np.zeros(crop.shape[:2], np.uint8)
    try:
        cv2.setRNGSeed(0)  # GrabCut's k-means start: the same box gives the same mask
        cv2.grabCut(
            crop,
            labels,
            (rx0, ry0, rx1 - rx0, ry1 - ry0),
            np.zeros((1, 65)),
            np.zeros((1, 65)),
            5,
            cv2.GC_INIT_WITH_RECT,
        )
    except cv2.error:  # a box without background around it (the whole frame) has no model
        return box
    fg = ((labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)).astype(np.uint8)
    if scale < 1.0:
        fg = cv2.resize(fg, (cx1 - cx0, cy1 - cy0), interpolation=cv2.INTER_NEAREST)
    inside = np.zeros_like(box)
    inside[cy0:cy1, cx0:cx1] = fg.astype(bool)
    inside &= box
    return inside if inside.sum() >= 0.1 * box.sum() else box


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
            "GrabCut": grabcut_mask(frames[0], box),
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
