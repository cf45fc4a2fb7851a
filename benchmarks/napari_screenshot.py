"""Regenerate docs/images/napari_widget.png (the viewer after a run, with the confidence
strip), napari_unsure.png (after "next frame to correct") and napari_where_from.png (a pixel's
memory read as layers).

    python benchmarks/napari_screenshot.py [--data sample|crowded] [--seed S]
        [--shots widget unsure where] [--model NAME] [--frame T] [--out PATH]

Opens napari with a synthetic time-lapse (first frame painted from its ground truth), docks the
napari-stm widget, propagates, shows a frame in the middle of the stack and saves a screenshot
of the whole window; then, from frame 0, presses "next frame to correct" and asks where a pixel
read from. ``--data sample`` is napari's sample (File > Open Sample), on which no frame is
unsure; ``--data crowded`` a harder procedural one (``make_cell_timelapse``: crowded, touching,
dividing and entering cells, noise; fixed seed) where the run loses cells, so the jump has
somewhere to go. There the where-from pixel is the true centre of the least sure object on the
frame jumped to (where a person would click: the cell the labels miss).
Without a display it starts a virtual one (Xvfb, through pyvirtualdisplay). Prints the mean IoU
of the run against the ground truth, and the confidence and true IoU of each object on the
frame jumped to.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


#: the harder time-lapse: 10 touching cells of ~36 px in 192 x 192, 2 dividing, 1 entering;
#: slow enough (5 % of a diameter a frame) that few leave the field, so a lost one is a failure
CROWDED = {
    "n_frames": 24,
    "height": 192,
    "width": 192,
    "n_cells": 10,
    "diameter": 36.0,
    "speed": 0.05,
}
SHOTS = ("widget", "unsure", "where")


def iou(pred: np.ndarray, gt: np.ndarray, i: int) -> float:
    a, b = pred == i, gt == i
    return float((a & b).sum() / max((a | b).sum(), 1))


def mean_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    ids = np.unique(gt[0])[1:]
    return float(np.mean([iou(pred[t], gt[t], i) for t in range(1, len(gt)) for i in ids]))


def layers(data: str, seed: int | None) -> tuple[list[tuple], np.ndarray]:
    """(napari layer data tuples, ground truth) with frame 0 painted from the ground truth."""
    from napari_stm.napari._sample_data import SAMPLE, make_sample_data, sample_ground_truth

    if data == "sample":
        kw = {} if seed is None else {"seed": seed}
        return make_sample_data(**kw), sample_ground_truth(**{**SAMPLE, **kw})[1]
    from napari_stm.synthetic import make_cell_timelapse

    frames, gt = make_cell_timelapse(**CROWDED, seed=3 if seed is None else seed)
    painted = np.zeros_like(gt)
    painted[0] = gt[0]
    lo, hi = np.percentile(frames, (1, 99.8))
    image = {"name": "time-lapse", "colormap": "gray", "contrast_limits": (float(lo), float(hi))}
    return [(frames, image, "image"), (painted, {"name": "cells", "opacity": 0.6}, "labels")], gt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=("sample", "crowded"), default="sample")
    parser.add_argument("--seed", type=int, default=None, help="of the data (default: fixed)")
    parser.add_argument(
        "--shots", nargs="+", choices=SHOTS, default=list(SHOTS), help="which images to write"
    )
    parser.add_argument("--model", default=None, help="model name (default: the widget's)")
    parser.add_argument("--frame", type=int, default=None, help="frame shown (default: middle)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "napari_widget.png")
    parser.add_argument("--size", type=int, nargs=2, default=(1440, 800), metavar=("W", "H"))
    args = parser.parse_args()

    display = None
    if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        from pyvirtualdisplay import Display

        display = Display(visible=False, size=(args.size[0] + 100, args.size[1] + 100))
        display.start()
    try:
        shoot(args)
    finally:
        if display is not None:
            display.stop()


def shoot(args: argparse.Namespace) -> None:
    import napari
    import torch
    from napari._qt.dialogs.qt_notification import NapariQtNotification
    from napari.qt import get_qapp
    from PIL import Image

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    viewer = napari.Viewer(title="napari-stm", show=True)
    data, gt = layers(args.data, args.seed)
    for array, kwargs, kind in data:
        getattr(viewer, f"add_{kind}")(array, **kwargs)
    _, widget = viewer.window.add_plugin_dock_widget("napari-stm", "Propagate labels")
    if args.model:
        widget._model.value = args.model
    viewer.window._qt_window.resize(*args.size)
    app = get_qapp()

    def wait(done: Callable[[], bool]) -> None:
        while not done():
            app.processEvents()
            time.sleep(0.02)

    def settle() -> None:
        for _ in range(20):
            app.processEvents()
            time.sleep(0.02)
        # Pop-up notifications (the run's summary, napari's own notices) would cover the canvas.
        for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
            toast.close()
        for _ in range(10):
            app.processEvents()
            time.sleep(0.02)

    def save(name: str) -> None:
        path = args.out if name == "widget" else args.out.with_name(f"napari_{name}.png")
        shot = viewer.screenshot(canvas_only=False, flash=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        # A palette PNG keeps the picture sharp and small (a screenshot has few colours).
        Image.fromarray(shot[..., :3]).quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(
            path, optimize=True
        )
        print(f"saved {path} ({path.stat().st_size // 1024} KB, {shot.shape[1]}x{shot.shape[0]})")

    app.processEvents()
    start = time.perf_counter()
    if widget.run() is None:
        raise SystemExit("the widget did not start a run")
    wait(lambda: not widget.running)
    elapsed = time.perf_counter() - start

    labels = viewer.layers["cells"]
    n = labels.data.shape[0]
    view = widget._view(*widget._layers())
    scores = widget._scores[view.context_key()]
    print(
        f"{args.data}: model {widget._model.value}: {len(widget.last_written)} frames in "
        f"{elapsed:.1f} s, mean IoU {mean_iou(labels.data, gt):.3f}"
    )
    labels.selected_label = 1
    viewer.layers.selection.active = labels
    if "widget" in args.shots:
        viewer.dims.set_current_step(0, n // 2 if args.frame is None else args.frame)
        viewer.reset_view()
        settle()
        save("widget")

    viewer.dims.set_current_step(0, 0)
    jumped = widget.next_unsure()
    print(f"frame to correct (U): {jumped}; the widget says: {widget._unsure_text.value!r}")
    if jumped is not None:
        for i, c in sorted(scores.confidence[jumped].items(), key=lambda kv: kv[1]):
            flag = scores.flags.get(jumped, {}).get(i, "")
            true = iou(labels.data[jumped], gt[jumped], i)
            print(f"  frame {jumped} object {i}: confidence {c:.2f} {flag:4s} true IoU {true:.2f}")
    viewer.reset_view()
    settle()
    if "unsure" in args.shots:
        save("unsure")
    if "where" not in args.shots:
        viewer.close()
        return

    if jumped is None:
        # Nothing unsure: a pixel of a late frame, inside its labels.
        t = n - 2
        ys, xs = np.nonzero(labels.data[t])
    else:
        # Where a person would click: the true middle of the least sure object, which the
        # labels miss or misplace.
        t = jumped
        worst = min(scores.confidence[t], key=scores.confidence[t].get)
        ys, xs = np.nonzero(gt[t] == worst)
    y, x = int(np.median(ys)), int(np.median(xs))
    widget._where_from.value = True
    if widget.explain(t, y, x) is None:
        raise SystemExit("where from: nothing asked")
    wait(lambda: widget.last_explanation is not None)
    exp = widget.last_explanation
    print(
        f"where from pixel (y {y}, x {x}) of frame {t} (true label {int(gt[t][y, x])}, "
        f"run's label {int(labels.data[t][y, x])}): frames {exp.frames}, "
        f"weights {np.round(exp.weights, 3)}"
    )
    viewer.reset_view()
    settle()
    save("where_from")
    viewer.close()


if __name__ == "__main__":
    main()
