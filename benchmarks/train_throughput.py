"""Training speed of stm-lite: seconds per iteration (data + forward + backward + step).

    python benchmarks/train_throughput.py --crop 192 --batch-size 4 --threads 1

Uses procedural clips (no data files). Prints one line per configuration. Load from other
processes on the machine slows it down: quote the machine's state with the numbers.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from torch.utils.data import default_collate

from napari_stm.train.datasets import ProceduralDataset
from napari_stm.train.loop import TrainConfig, Trainer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--crop", type=int, nargs="+", default=[192])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--finetune-encoder", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"device {args.device}, {args.threads} thread(s), batch {args.batch_size}")
    for crop in args.crop:
        ds = ProceduralDataset(crop=crop, seed=0)
        with tempfile.TemporaryDirectory() as out:
            cfg = TrainConfig(
                out=out, warmup=1, device=args.device, finetune_encoder=args.finetune_encoder
            )
            trainer = Trainer(cfg, ds)
            n = args.batch_size
            trainer.train_step(default_collate([ds[i] for i in range(n)]))  # warm-up
            data = step = 0.0
            for s in range(args.steps):
                t0 = time.perf_counter()
                batch = default_collate([ds[(s + 1) * n + i] for i in range(n)])
                t1 = time.perf_counter()
                trainer.train_step(batch)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                t2 = time.perf_counter()
                data += t1 - t0
                step += t2 - t1
        k = args.steps
        print(
            f"crop {crop}: data {data / k:.3f} s/it, train {step / k:.3f} s/it, "
            f"{k / (data + step):.3f} it/s ({k * n / (data + step):.2f} clips/s)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
