"""`napari-stm propagate | batch | evaluate | demo | models | cvat fill-task`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from napari_stm.core.atomic import atomic_path
from napari_stm.core.errors import CheckpointError, InputError

if TYPE_CHECKING:
    from napari_stm.core.engine import PropagationConfig
    from napari_stm.core.model import VOSNetwork
    from napari_stm.io import FrameSource

SAMPLE = files("napari_stm") / "data" / "sample_clip"
OVERLAY_FRAMES = 6


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default=None,
        help="model name (default: stm-lite-cells, bundled, for single-channel or 16-bit frames "
        "(microscopy), else stm-lite, bundled); see `napari-stm models`",
    )
    g.add_argument("--weights", default=None, help="checkpoint path or http(s) URL")
    g.add_argument("--sha256", default=None, help="expected sha256 of the weights file")
    g.add_argument(
        "--device",
        default=None,
        choices=["cpu", "cuda", "mps"],
        help="default: cuda when available, else cpu",
    )


def _add_engine_arguments(p: argparse.ArgumentParser) -> None:
    from napari_stm.core.engine import PropagationConfig

    d = PropagationConfig()
    g = p.add_argument_group("propagation")
    g.add_argument(
        "--memory",
        choices=["bounded", "official"],
        default=d.memory,
        help="bounded: flat time and memory per frame; official: the paper's procedure",
    )
    g.add_argument(
        "--direction",
        choices=["forward", "backward", "both"],
        default="both",
        help="default: %(default)s",
    )
    g.add_argument("--mem-every", type=int, default=d.mem_every, help="default: %(default)s")
    g.add_argument(
        "--max-memory",
        type=int,
        default=d.max_memory,
        help="most memory frames per read in bounded mode, with two references; each further "
        "one is read beside them (default: %(default)s)",
    )
    g.add_argument(
        "--top-k", type=int, default=None, help="top-k memory read (0: dense; default: the model's)"
    )
    g.add_argument(
        "--motion-sigma",
        type=float,
        default=None,
        help="motion prior of the memory read: how far an object moves per frame, a share of "
        "the frame's longer side (0: off; default: measured from the tracked objects, for "
        "models that use the prior)",
    )
    g.add_argument(
        "--confidence-gate",
        type=float,
        default=d.confidence_gate,
        help="least confidence for a frame to enter long-lived memory (0: always)",
    )
    g.add_argument(
        "--max-side",
        type=int,
        default=None,
        help="resize internally so the longer side is at most this (0: full size; default: "
        "the model's working size, see `napari-stm models`)",
    )
    g.add_argument(
        "--compile",
        action="store_true",
        help="run the network through torch.compile: about 30%% faster per frame on CPU, "
        "after a first frame that waits for the compilation (seconds to minutes)",
    )
    g.add_argument("--start", type=int, default=None, help="first frame (default: 0)")
    g.add_argument("--stop", type=int, default=None, help="frame after the last (default: all)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napari-stm",
        description="Space-Time Memory video object segmentation: paint a mask, fill the video.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("propagate", help="fill masks through a video from annotated frames")
    p.add_argument("frames", help="folder of frames, a video file, or a TIFF stack")
    p.add_argument(
        "--masks",
        required=True,
        help="folder of label images named like the frames, or one label image for the first frame",
    )
    p.add_argument(
        "--out",
        required=True,
        help="output folder (one palette PNG per frame) or a .tif label stack",
    )
    p.add_argument("--probs", default=None, help="also save probabilities to this .npz")
    p.add_argument("--overlay", default=None, help="also save a picture of masks over frames")
    p.add_argument(
        "--report",
        default=None,
        metavar="FILE.csv",
        help="also write one row per frame and object: frame (0-based), object (id), "
        "confidence (0..1, higher is surer), area (pixels), flag (reference, lost or empty)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_model_arguments(p)
    _add_engine_arguments(p)

    from napari_stm import batch

    batch.add_arguments(
        sub.add_parser("batch", help="fill many videos listed in a CSV, on a Ray cluster")
    )

    p = sub.add_parser("demo", help="propagate the bundled sample clip with the default model")
    p.add_argument("--out", default="stm_demo", help="output folder (default: %(default)s)")
    _add_model_arguments(p)

    p = sub.add_parser("evaluate", help="J and F of predicted masks, as the DAVIS benchmark")
    from napari_stm import evaluation

    evaluation.add_arguments(p)

    sub.add_parser("models", help="list the models")

    from napari_stm.train import cli as train_cli

    train_cli.add_arguments(
        sub.add_parser("train", help="train stm-lite (two stages, as the paper)")
    )

    from napari_stm import bench

    bench_parser = sub.add_parser("bench", help="time and memory per frame (synthetic)")
    bench.add_arguments(bench_parser)
    from napari_stm import annotate

    annotate.add_arguments(
        bench_parser.add_subparsers(dest="bench_command", metavar="annotate").add_parser(
            "annotate",
            help="simulated annotator: what K corrections buy (mean J after each round)",
        )
    )

    cvat = sub.add_parser("cvat", help="CVAT tools")
    cvat_sub = cvat.add_subparsers(dest="cvat_command", required=True)
    fill = cvat_sub.add_parser("fill-task", help="fill masks across a whole CVAT task")
    try:
        from cvat_function import task
    except ImportError as err:
        fill.set_defaults(_missing=f"{err}: install the CVAT extra: pip install 'napari-stm[cvat]'")
    else:
        task.add_arguments(fill)
    return parser


def console() -> None:
    """The ``napari-stm`` command: this process is ours, so its malloc is tuned first."""
    from napari_stm.core.host_memory import reuse_freed_memory

    reuse_freed_memory()
    sys.exit(main())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "propagate":
            return propagate(args)
        if args.command == "batch":
            from napari_stm import batch

            return batch.run(args)
        if args.command == "demo":
            return demo(args)
        if args.command == "evaluate":
            from napari_stm import evaluation

            return evaluation.run(args)
        if args.command == "train":
            from napari_stm.train import cli as train_cli

            return train_cli.run(args)
        if args.command == "bench" and getattr(args, "bench_command", None) == "annotate":
            from napari_stm import annotate

            return annotate.run(args)
        if args.command == "bench":
            from napari_stm import bench

            return bench.run(args)
        if args.command == "models":
            from napari_stm.core.weights import available_models

            for name, text in available_models().items():
                print(f"{name:14s} {text}")
            return 0
        if args.command == "cvat":
            if getattr(args, "_missing", None):
                raise InputError(args._missing)
            from cvat_function import task

            return task.run(args)
    except (InputError, CheckpointError) as err:
        print(f"napari-stm: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("napari-stm: interrupted; every mask written so far is complete", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command}")
    return 2


def demo(args: argparse.Namespace) -> int:
    sample = Path(str(SAMPLE))
    out = Path(args.out)
    argv = [
        str(sample / "frames"),
        "--masks",
        str(sample / "masks"),
        "--out",
        str(out / "masks"),
        "--overlay",
        str(out / "overlay.png"),
        "--overwrite",
    ]
    for flag in ("model", "weights", "sha256", "device"):
        value = getattr(args, flag)
        if value is not None:
            argv += [f"--{flag}", value]
    code = main(["propagate", *argv])
    if code == 0:
        print(f"masks: {out / 'masks'}\noverlay: {out / 'overlay.png'}")
    return code


def propagate(args: argparse.Namespace) -> int:
    from napari_stm.core.weights import default_model_name, load_model

    config = engine_config(args)

    def load(source: FrameSource) -> VOSNetwork:
        name = args.model or default_model_name(source.frame_shape, source.dtype)
        if not args.model and not args.quiet:
            print(f"napari-stm: model {name} ({_kind(source)}; --model names another)")
        return load_model(
            name,
            weights=args.weights,
            device=args.device,
            sha256=args.sha256,
            progress=not args.quiet,
        )

    propagate_files(
        args.frames,
        args.masks,
        args.out,
        config,
        load,
        direction=args.direction,
        start=args.start,
        stop=args.stop,
        probs=args.probs,
        overlay=args.overlay,
        report=args.report,
        overwrite=args.overwrite,
        quiet=args.quiet,
    )
    return 0


def _kind(source: FrameSource) -> str:
    """How the frames read, in the words of the model rule (core/weights/registry.py)."""
    shape = source.frame_shape
    channels = "single-channel" if len(shape) == 2 or shape[-1] == 1 else f"{shape[-1]}-channel"
    return f"{channels} {source.dtype} frames"


def engine_config(args: argparse.Namespace) -> PropagationConfig:
    """The engine settings the propagation arguments (``_add_engine_arguments``) give."""
    from napari_stm.core.engine import PropagationConfig

    # Every option the parser defines under a PropagationConfig field's name.
    return PropagationConfig.from_options(args)


def propagate_files(
    frames: str | os.PathLike,
    masks: str | os.PathLike,
    out: str | os.PathLike,
    config: PropagationConfig,
    load: Callable[[FrameSource], VOSNetwork],
    *,
    direction: str = "both",
    start: int | None = None,
    stop: int | None = None,
    probs: str | os.PathLike | None = None,
    overlay: str | os.PathLike | None = None,
    report: str | os.PathLike | None = None,
    overwrite: bool = False,
    quiet: bool = False,
) -> int:
    """What `napari-stm propagate` writes, from files to files; returns the frames written.

    ``load`` gives the model for the opened frames once the inputs and outputs have been
    checked, so a bad input fails before any weights are read. `napari-stm batch` runs each
    video through here.
    """
    from tqdm import tqdm

    from napari_stm import io
    from napari_stm.core.engine import Propagator

    source = io.open_frames(frames)
    refs = io.read_masks(masks, source.stems, source.frame_shape)
    if not refs:
        raise InputError(f"no masks found in '{masks}'")
    out = Path(out)
    as_tiff = out.suffix.lower() in (".tif", ".tiff")
    _check_outputs(frames, masks, out, as_tiff, probs, overlay, overwrite, report)
    top = max(int(m.max()) for m in refs.values())
    if not as_tiff and top > io.MAX_LABEL_ID:
        raise InputError(
            f"the masks hold object id {top}: palette PNGs hold ids up to {io.MAX_LABEL_ID}; "
            f"write a label TIFF instead (--out {out.with_suffix('.tif')})"
        )

    prop = Propagator(load(source), source, config)
    for t, labels in refs.items():
        prop.add_reference(t, labels)

    n = len(source)
    start = 0 if start is None else start
    stop = n if stop is None else stop
    reached = prop.reach(direction, start, stop)  # also checks the range and references
    ids = prop.object_ids
    h, w = source.frame_shape[:2]
    shown = set(np.linspace(start, stop - 1, min(OVERLAY_FRAMES, stop - start)).round().astype(int))
    kept: dict[int, np.ndarray] = {}
    prob_stack = (
        np.lib.format.open_memmap(
            _temp_npy(probs),
            mode="w+",
            dtype=np.float32,
            shape=(stop - start, len(ids) + 1, h, w),
        )
        if probs
        else None
    )
    if prob_stack is not None:
        prob_stack[:] = 0
    rows: list[tuple[int, int, float, int, str]] = []
    bar = tqdm(total=len(reached), unit="frame", disable=quiet, desc="propagating")
    tiff = (
        _OrderedTiff(out, start, stop, reached, (h, w), overwrite, max(ids, default=0))
        if as_tiff
        else None
    )
    if not as_tiff:
        out.mkdir(parents=True, exist_ok=True)
    try:
        for res in prop.propagate(direction, start, stop):
            if tiff is not None:
                tiff.put(res.t, res.labels)
            else:
                io.write_palette_png(out / f"{source.stems[res.t]}.png", res.labels)
            if prob_stack is not None:
                prob_stack[res.t - start] = res.probs
            if res.t in shown:
                kept[res.t] = res.labels
            if report:
                rows.extend(
                    (res.t, i, c, res.area.get(i, 0), res.flags.get(i, ""))
                    for i, c in res.confidence.items()
                )
            bar.update(1)
        if tiff is not None:
            tiff.close()
    except BaseException:
        if tiff is not None:
            tiff.abort()
        raise
    finally:
        bar.close()
        if report:
            # Also when interrupted: the rows of every frame written so far.
            write_report(report, rows)
    if prob_stack is not None:
        prob_stack.flush()
        _save_probs(probs, prob_stack, ids, [source.stems[t] for t in range(start, stop)])
    if overlay and kept:
        io.save_overlay_grid(overlay, source, kept, n=len(kept))
    unreached = (stop - start) - len(reached)
    if unreached:
        print(
            f"note: {unreached} frames lie before the first (or after the last) reference in "
            f"direction '{direction}' and were not segmented",
            file=sys.stderr,
        )
    return len(reached)


def _check_outputs(
    frames: str | os.PathLike,
    masks: str | os.PathLike,
    out: Path,
    as_tiff: bool,
    probs: str | os.PathLike | None,
    overlay: str | os.PathLike | None,
    overwrite: bool,
    report: str | os.PathLike | None = None,
) -> None:
    # Never write over the user's inputs, and never over earlier results unless asked to.
    inputs = {Path(frames).resolve(), Path(masks).resolve()}
    if out.resolve() in inputs:
        raise InputError(f"--out '{out}' is one of the inputs; choose another folder")
    if report and Path(report).resolve() in inputs:
        raise InputError(f"--report '{report}' is one of the inputs; choose another file")
    if not overwrite:
        if as_tiff and out.exists():
            raise InputError(f"'{out}' exists; pass --overwrite to replace it")
        if not as_tiff and out.is_dir() and any(out.iterdir()):
            raise InputError(f"output folder '{out}' is not empty; pass --overwrite to reuse it")
        for extra in (probs, overlay, report):
            if extra and Path(extra).exists():
                raise InputError(f"'{extra}' exists; pass --overwrite to replace it")
    if out.exists() and not as_tiff and not out.is_dir():
        raise InputError(f"--out '{out}' is a file; give a folder or a .tif path")


REPORT_COLUMNS = ("frame", "object", "confidence", "area", "flag")


def write_report(path: str | os.PathLike, rows: list[tuple[int, int, float, int, str]]) -> Path:
    """The ``--report`` CSV: one row per frame and object, in frame then object order."""
    import csv

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(REPORT_COLUMNS)
        for t, obj, conf, area, flag in sorted(rows, key=lambda r: (r[0], r[1])):
            writer.writerow((t, obj, f"{conf:.4f}", area, flag))
    return target


def _temp_npy(path: str | os.PathLike) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    return target.with_name(f".{target.name}.probs.npy")


def _save_probs(
    path: str | os.PathLike, probs: np.memmap, ids: list[int], stems: list[str]
) -> None:
    try:
        # numpy.savez appends .npz to a name without it
        with atomic_path(path, suffix=".part.npz") as tmp:
            np.savez(tmp, probs=probs, ids=np.array(ids, dtype=np.int32), stems=np.array(stems))
    finally:
        Path(probs.filename).unlink(missing_ok=True)


class _OrderedTiff:
    """A label TIFF over [start, stop) written in frame order while results arrive in any order.

    Frames no pass reaches are written empty.
    """

    def __init__(
        self,
        path: Path,
        start: int,
        stop: int,
        reached: set[int],
        size: tuple[int, int],
        overwrite: bool,
        max_id: int = 0,
    ) -> None:
        from napari_stm.io import LabelTiffWriter, label_dtype

        self.writer = LabelTiffWriter(
            path, dtype=label_dtype(max_id), overwrite=overwrite, bigtiff=True
        )
        self.writer.__enter__()
        self.next, self.stop, self.reached = start, stop, reached
        self.empty = np.zeros(size, np.uint8)
        self.pending: dict[int, np.ndarray] = {}

    def put(self, t: int, labels: np.ndarray) -> None:
        self.pending[t] = labels
        while self.next < self.stop and (
            self.next in self.pending or self.next not in self.reached
        ):
            self.writer.write(self.pending.pop(self.next, self.empty))
            self.next += 1

    def close(self) -> None:
        self.put(self.stop, self.empty)  # flushes frames after the last one reached
        self.pending.clear()
        self.writer.__exit__(None, None, None)

    def abort(self) -> None:
        self.writer.__exit__(RuntimeError, None, None)


if __name__ == "__main__":
    console()
