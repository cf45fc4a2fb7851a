"""CVAT's paths on a real sequence: mean J of one tracker per object, as the functions run them.

    python benchmarks/cvat_accuracy.py ../shared/data/ctc-sim-01 --columns 0:0.5 \\
        --model stm-lite-cells --modes together exact alone

CVAT keeps one state per shape, so its functions run one one-object tracker per object; each
request steps them all on one frame in shared network calls (``step_trackers``, as the Nuclio
handler does; the agent computes the same calls ahead). From the first frame's true masks
(one tracker per object, started as a request starts them) every later frame is one such
request; each frame's J is the mean over the first frame's objects (daughter cells carry their
mother's id in a Cell Tracking Challenge lineage), and the table gives its mean over frames 1
to the last. Modes:

- ``together``: the shared calls as they run (one motion prior a memory,
  ``tracker.SHARED_PRIOR``; one background decode a call, ``stm_lite.ONE_BACKGROUND``);
- ``exact``: the shared calls with those two off (each tracker its own prior, each memory its
  own background: each result equals its tracker alone within the windows' tolerance);
- ``alone``: each tracker stepped on its own (``Tracker.step``), what one shape a request gets.

Then, for each pair of modes, the share of equal object masks (mean over frames, and the
lowest frame). ``--columns A:B`` cuts a band of every frame (:mod:`napari_stm.bands`; the left
halves of the cell sequences are development data, their right halves held out).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

MODES = ("together", "exact", "alone")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sequence", help="a DAVIS or Cell Tracking Challenge sequence folder")
    parser.add_argument("--model", default=None)
    parser.add_argument("--columns", default=None, help="A:B, a band of the width")
    parser.add_argument("--stop", type=int, default=None, help="frame after the last")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["together", "alone"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    from napari_stm.annotate import open_sequence
    from napari_stm.bands import parse_columns
    from napari_stm.core.weights import default_model_name, load_model

    torch.set_num_threads(args.threads)
    columns = None if args.columns is None else parse_columns(args.columns)
    sequence = open_sequence(args.sequence, None, 0, args.stop, columns)
    name = args.model or default_model_name()
    model = load_model(name, device="cpu")
    print(
        f"model {name}, {sequence.name}: {len(sequence)} frames, {len(sequence.objects)} "
        f"objects, {args.threads} thread(s)"
    )
    print("| mode | mean J | last frame J | seconds |")
    print("|---|---|---|---|")
    masks: dict[str, list[np.ndarray]] = {}
    for mode in args.modes:
        t0 = time.perf_counter()
        js, masks[mode] = _run(model, sequence, mode)
        took = time.perf_counter() - t0
        print(f"| {mode} | {np.mean(js):.4f} | {js[-1]:.4f} | {took:.1f} |", flush=True)
    if len(masks) > 1:
        print("\nobject masks equal between modes (mean over frames, lowest frame):")
        print("| modes | equal, mean % | lowest % |")
        print("|---|---|---|")
        for i, a in enumerate(masks):
            for b in list(masks)[i + 1 :]:
                equal = [float((x == y).mean()) for x, y in zip(masks[a], masks[b], strict=True)]
                print(f"| {a} / {b} | {100 * np.mean(equal):.4f} | {100 * min(equal):.4f} |")


def _run(model, sequence, mode: str) -> tuple[list[float], list[np.ndarray]]:
    """Each frame's mean J and object masks [objects, H, W] from frame 1 on, in ``mode``."""
    from napari_stm.core import stm_lite
    from napari_stm.core import tracker as tracking
    from napari_stm.core.engine import PropagationConfig, SharedFrame, Tracker, step_trackers
    from napari_stm.metrics import db_eval_iou

    switches = (tracking.SHARED_PRIOR, stm_lite.ONE_BACKGROUND)
    if mode == "exact":
        tracking.SHARED_PRIOR, stm_lite.ONE_BACKGROUND = False, False
    try:
        objects = sequence.objects
        trackers = [Tracker(model, PropagationConfig(), keep_sources=False) for _ in objects]
        start = sequence.start
        first = SharedFrame(sequence.frames[start])
        for tr, k in zip(trackers, objects, strict=True):
            tr.step(first, (sequence.truth[start] == k).astype(np.uint8))
        js, masks = [], []
        for t in range(1, len(sequence)):
            frame = SharedFrame(sequence.frames[start + t])
            if mode == "alone":
                labels = [tr.step(frame)[0] for tr in trackers]
            else:
                labels = [r.labels for r in step_trackers(trackers, frame)]
            truth = sequence.truth[start + t]
            got = np.stack([lab != 0 for lab in labels])
            j = [db_eval_iou(truth == k, m) for k, m in zip(objects, got, strict=True)]
            js.append(float(np.mean(j)))
            masks.append(got)
    finally:
        tracking.SHARED_PRIOR, stm_lite.ONE_BACKGROUND = switches
    return js, masks


if __name__ == "__main__":
    sys.exit(main())
