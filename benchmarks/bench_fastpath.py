"""What each fast-path option of the engine is worth: time per frame, A/B, in one process.

    python benchmarks/bench_fastpath.py --model stm-lite --resolution 480p --threads 1

Variants run in turns (round 1: every variant, round 2: every variant, ...), each a fresh
propagation over the same synthetic frames, so a change in the machine's load hits all of them
alike; the best round's median is reported, of wall-clock time and of the process's CPU time
(which waiting for a core on a shared machine does not inflate; with one thread it is the
cleaner comparison, except for ``prefetch``, whose gain is overlap, seen in wall time only).
``argmax`` is the engine's result step as it was before (``argmax`` over the classes instead
of ``max``). Random weights: the time of a network does not depend on its weights.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from napari_stm.bench import SyntheticVideo, build_model, parse_resolution
from napari_stm.core.engine import FrameResult, PropagationConfig, Propagator, Tracker
from napari_stm.core.frames import from_network

VARIANTS = ("argmax", "baseline", "channels_last", "prefetch", "compile")


def _argmax_result(
    self: Tracker, t: int, probs: torch.Tensor, tracked: torch.Tensor | None = None
) -> FrameResult:
    full = from_network(probs[None], self.geo)[0]
    cls = full.argmax(0).to(torch.uint8).cpu().numpy()
    lut = np.array([0, *self.object_ids], dtype=np.uint8)
    return FrameResult(t, lut[cls], False, probs.cpu(), self.geo)


def time_variant(
    model, video: SyntheticVideo, variant: str, skip: int, device: str
) -> list[tuple[float, float]]:
    """(wall, process CPU) seconds of each frame after the first ``skip``."""
    options = {
        "channels_last": variant == "channels_last",
        "prefetch": 2 if variant == "prefetch" else 0,
        "compile": variant == "compile",
    }
    config = PropagationConfig(device=device, confidence_gate=0.0, **options)
    result = Tracker.result
    if variant == "argmax":
        Tracker.result = _argmax_result
    try:
        prop = Propagator(model, video, config)
        prop.add_reference(0, video.labels(0))
        times = []
        last, last_cpu = time.perf_counter(), time.process_time()
        for res in prop.propagate("forward"):
            now, now_cpu = time.perf_counter(), time.process_time()
            if not res.is_reference:
                times.append((now - last, now_cpu - last_cpu))
            last, last_cpu = time.perf_counter(), time.process_time()
    finally:
        Tracker.result = result
        # Channels-last converts the model in place: back to the default for the next variant.
        model.to(memory_format=torch.contiguous_format)
    return times[skip:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="stm-lite")
    p.add_argument("--resolution", default="480p")
    p.add_argument("--objects", type=int, default=1)
    p.add_argument("--frames", type=int, default=25, help="frames per propagation")
    p.add_argument("--skip", type=int, default=5, help="first frames not timed (warm-up)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    name, h, w = parse_resolution(args.resolution)
    model, weights = build_model(args.model, args.device)
    video = SyntheticVideo(args.frames, h, w, args.objects)
    print(
        f"{args.model} ({weights} weights), {name}, {args.objects} object(s), {args.device}, "
        f"{args.threads} thread(s); load average {os.getloadavg()[0]:.2f}"
    )
    best: dict[str, list[float]] = {}
    for r in range(args.rounds):
        for variant in args.variants:
            t0 = time.perf_counter()
            times = np.array(time_variant(model, video, variant, args.skip, args.device))
            wall, cpu = 1000 * np.median(times, axis=0)
            print(
                f"  round {r + 1} {variant:14s} {wall:8.1f} ms/frame, CPU {cpu:8.1f} ms "
                f"(run {time.perf_counter() - t0:.0f} s, load {os.getloadavg()[0]:.2f})",
                flush=True,
            )
            best.setdefault(variant, []).append((wall, cpu))
    print(f"{'variant':14s} {'wall ms':>9s} {'CPU ms':>9s} {'CPU vs baseline':>16s}")
    base = min(c for _, c in best["baseline"]) if "baseline" in best else None
    for variant, meds in best.items():
        wall, cpu = min(w for w, _ in meds), min(c for _, c in meds)
        rel = f"{cpu / base:.2f}x" if base else ""
        print(f"{variant:14s} {wall:9.1f} {cpu:9.1f} {rel:>16s}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
