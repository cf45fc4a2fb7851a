"""stm-lite's windows around small objects against the whole-frame network on a real sequence.

    python benchmarks/crop_tolerance.py FRAMES MASKS --model stm-lite-cells --frames 20

One forward propagation from frame 0 with ``STMLite.crop_share = 0`` (every object on the
whole frame, the exact network) and one with the default windows; prints the largest
probability difference, the share of equal labels, the mean J of each against the ground truth
in MASKS (label images named like the frames) and the time of each (docs/performance.md).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("frames")
    parser.add_argument("masks", help="ground truth label images; frame 0's is the reference")
    parser.add_argument("--model", default="stm-lite")
    parser.add_argument("--frames", type=int, default=20, dest="n", help="frames propagated")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    from napari_stm import io
    from napari_stm.core.engine import PropagationConfig, Propagator
    from napari_stm.core.stm_lite import STMLite
    from napari_stm.core.weights import load_model
    from napari_stm.metrics import db_eval_iou

    torch.set_num_threads(args.threads)
    source = io.open_frames(args.frames)
    refs = io.read_masks(args.masks, source.stems, source.frame_shape)
    truth = sorted(Path(args.masks).glob("*.png"), key=lambda p: io.natural_key(p.name))
    n = min(args.n, len(source))
    net = load_model(args.model, device="cpu")
    runs = {}
    for share in (0.0, STMLite.crop_share):
        net.crop_share = share
        prop = Propagator(net, source, PropagationConfig())
        prop.add_reference(0, refs[0])
        start = time.perf_counter()
        frames = {r.t: (r.labels.copy(), r.probs.copy()) for r in prop.propagate("forward", 0, n)}
        runs[share] = (frames, time.perf_counter() - start)
    (full, t_full), (windows, t_windows) = runs.values()

    def mean_j(result: dict) -> float:
        scores = []
        for t in range(1, n):
            gt = io.read_label_image(truth[t])
            scores += [db_eval_iou(gt == i, result[t][0] == i) for i in np.unique(gt) if i]
        return float(np.mean(scores))

    dp = max(float(np.abs(full[t][1] - windows[t][1]).max()) for t in full)
    equal = np.mean([(full[t][0] == windows[t][0]).mean() for t in full])
    print(
        f"{args.frames}, {args.model}, {n} frames: max |prob diff| {dp:.4f}, labels equal "
        f"{100 * equal:.3f}%, mean J whole frame {mean_j(full):.4f} windows {mean_j(windows):.4f}, "
        f"seconds {t_full:.1f} / {t_windows:.1f}"
    )


if __name__ == "__main__":
    main()
