"""Regenerate docs/images/napari_widget.png (the viewer after a run on the sample data, with the
confidence strip), napari_unsure.png (after "next unsure frame") and napari_where_from.png (a
pixel's memory read as layers).

    python benchmarks/napari_screenshot.py [--model NAME] [--frame T] [--out PATH]

Opens napari with the sample time-lapse (first frame painted), docks the napari-stm widget,
propagates, shows a frame in the middle of the stack and saves a screenshot of the whole window;
then presses "next unsure frame" and asks where a pixel of a late frame read from.
Without a display it starts a virtual one (Xvfb, through pyvirtualdisplay). Prints the mean IoU
of the run against the sample's ground truth.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def mean_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    ious = []
    for t in range(1, len(gt)):
        for i in np.unique(gt[0])[1:]:
            a, b = pred[t] == i, gt[t] == i
            ious.append((a & b).sum() / max((a | b).sum(), 1))
    return float(np.mean(ious))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    from napari.qt import get_qapp
    from PIL import Image

    from napari_stm.napari._sample_data import sample_ground_truth

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    viewer = napari.Viewer(title="napari-stm", show=True)
    viewer.open_sample("napari-stm", "timelapse")
    _, widget = viewer.window.add_plugin_dock_widget("napari-stm", "Propagate labels")
    if args.model:
        widget._model.value = args.model
    viewer.window._qt_window.resize(*args.size)
    app = get_qapp()
    app.processEvents()

    start = time.perf_counter()
    if widget.run() is None:
        raise SystemExit("the widget did not start a run")
    while widget.running:
        app.processEvents()
        time.sleep(0.02)
    elapsed = time.perf_counter() - start

    labels = viewer.layers["cells"]
    _, gt = sample_ground_truth()
    n = labels.data.shape[0]
    frame = n // 2 if args.frame is None else args.frame
    viewer.dims.set_current_step(0, frame)
    viewer.reset_view()
    labels.selected_label = 1
    viewer.layers.selection.active = labels
    for _ in range(20):
        app.processEvents()
        time.sleep(0.02)
    # Pop-up notifications (the run's summary, napari's own notices) would cover the canvas.
    from napari._qt.dialogs.qt_notification import NapariQtNotification

    def settle() -> None:
        for _ in range(20):
            app.processEvents()
            time.sleep(0.02)
        for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
            toast.close()
        for _ in range(10):
            app.processEvents()
            time.sleep(0.02)

    def save(path: Path) -> None:
        shot = viewer.screenshot(canvas_only=False, flash=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        # A palette PNG keeps the picture sharp and small (a screenshot has few colours).
        Image.fromarray(shot[..., :3]).quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(
            path, optimize=True
        )
        print(f"saved {path} ({path.stat().st_size // 1024} KB, {shot.shape[1]}x{shot.shape[0]})")

    settle()
    save(args.out)
    print(
        f"model {widget._model.value}: {len(widget.last_written)} frames in {elapsed:.1f} s, "
        f"mean IoU {mean_iou(labels.data, gt):.3f}"
    )
    viewer.dims.set_current_step(0, 0)
    jumped = widget.next_unsure()
    print(f"next unsure frame from 0: {jumped}")
    settle()
    save(args.out.with_name("napari_unsure.png"))

    late = n - 2
    ys, xs = np.nonzero(labels.data[late])
    widget._where_from.value = True
    if widget.explain(late, int(ys[len(ys) // 2]), int(xs[len(xs) // 2])) is None:
        raise SystemExit("where from: nothing asked")
    while widget.last_explanation is None:
        app.processEvents()
        time.sleep(0.02)
    exp = widget.last_explanation
    print(f"where from frame {late}: frames {exp.frames}, weights {np.round(exp.weights, 3)}")
    settle()
    save(args.out.with_name("napari_where_from.png"))
    viewer.close()


if __name__ == "__main__":
    main()
