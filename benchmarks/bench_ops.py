"""The operations a frame spends its time on, one by one, at a given resolution.

    python benchmarks/bench_ops.py --resolution 480p --threads 1

- label step: the class of every pixel from probabilities [N+1, H, W], as ``argmax(0)`` (the
  engine before) and ``max(0).indices`` (the engine now);
- memory read at the bounded cap (``--memory-frames``), for stm-lite's sizes (keys 64, values 256
  per object at stride 16) and stm-resnet50's (128 / 512), dense through
  ``scaled_dot_product_attention`` and top-k through ``memory_read``;
- reading and normalising one frame (what prefetching can hide).

Each is timed ``--repeat`` times; the minimum and median are printed (milliseconds). The minimum
is the better estimate on a shared machine: other processes only ever add time.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import numpy as np
import torch

from napari_stm.bench import SyntheticVideo, parse_resolution
from napari_stm.core.frames import FrameReader, geometry
from napari_stm.core.readout import memory_read


def timed(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    fn()
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        runs.append(1000 * (time.perf_counter() - t0))
    return min(runs), float(np.median(runs))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resolution", default="480p")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--memory-frames", type=int, default=10)
    p.add_argument("--objects", type=int, nargs="+", default=[1, 5])
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    name, h, w = parse_resolution(args.resolution)
    geo = geometry((h, w), 16)
    hp, wp = geo.padded
    print(
        f"{name} ({w}x{h}, network {wp}x{hp}), {args.threads} thread(s), "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(f"{'operation':58s} {'min ms':>8s} {'median':>8s}")

    def show(label: str, fn: Callable[[], object]) -> None:
        lo, med = timed(fn, args.repeat)
        print(f"{label:58s} {lo:8.1f} {med:8.1f}", flush=True)

    for n in args.objects:
        probs = torch.rand(n + 1, hp, wp)
        view = probs[:, geo.pad[2] : hp - geo.pad[3], geo.pad[0] : wp - geo.pad[1]]
        show(f"labels of {n} object(s): argmax(0)", lambda v=view: v.argmax(0))
        show(f"labels of {n} object(s): max(0).indices", lambda v=view: v.max(0).indices)

    p16 = (hp // 16) * (wp // 16)
    m = args.memory_frames * p16
    for model, ck, cv in (("stm-lite", 64, 256), ("stm-resnet50", 128, 512)):
        for n in args.objects:
            keys = torch.randn(1, ck, m) / ck**0.5
            values = torch.randn(n, cv, m)
            query = torch.randn(1, ck, p16) / ck**0.5
            label = f"{model} read, {args.memory_frames} frames, {n} obj"
            show(f"{label}: dense (SDPA)", lambda k=keys, v=values, q=query: memory_read(k, v, q))
            show(
                f"{label}: top-20",
                lambda k=keys, v=values, q=query: memory_read(k, v, q, top_k=20),
            )

    video = SyntheticVideo(10, h, w, 1)
    reader = FrameReader(video)
    device = torch.device("cpu")
    show("synthetic frame drawn", lambda: video[3])
    show(
        "frame read + normalised + padded (FrameReader.tensor)",
        lambda: reader.tensor(3, geo, device),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
