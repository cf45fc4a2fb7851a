"""`napari-stm bench annotate`: a simulated annotator, to measure what corrections buy.

From the first frame's true mask, the video is propagated both ways; then, for K rounds, one
frame is picked, given its true mask as a reference (as a person correcting it would), and the
frames that correction reaches are propagated again. Pickers:

- ``tool``: the frame whose correction would reach the most unsureness (mean object
  confidence, ``FrameResult.confidence``, of the frames around it that it would become the
  nearest reference of), among those at least two frames from every reference
  (``core.quality.frame_to_correct``);
- ``oracle``: the frame of lowest true J (what a person who checks every frame would fix);
- ``even``: the frame farthest from every reference (the last frame, then the middle, ...).

After each round it prints mean J (over every frame of the range, references included, each
frame the mean over the objects of the first frame), the share of frames at J >= 0.9, the
frames computed and the seconds they took. The objects are those of the first frame's truth; a
correction paints only them (with Annotations_lineage of a Cell Tracking Challenge sequence,
daughter cells carry their mother's id).

Layouts: a DAVIS sequence folder (``JPEGImages/`` and ``Annotations/``), a Cell Tracking
Challenge sequence as in ../shared/data (``raw_tif/`` and ``Annotations*/``), or any frames
folder with ``--annotations``. ``--columns A:B`` measures only a band of every frame (shares of
the width, :mod:`napari_stm.bands`): the half of a time-lapse that training never read.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, astuple, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from napari_stm.core.atomic import atomic_path
from napari_stm.core.errors import InputError
from napari_stm.core.quality import frame_to_correct, mean_confidence
from napari_stm.metrics import db_eval_iou

PICKERS = ("tool", "oracle", "even")
#: a frame counts as good at this J
GOOD_J = 0.9
#: frame folders of the layouts, in the order they are looked for
FRAME_FOLDERS = ("JPEGImages", "raw_tif")
#: with ``--columns``: objects the band's edge cuts below this many pixels on the first frame are
#: left out (as benchmarks/heldout_eval.py's --min-pixels)
MIN_PIXELS = 100
#: annotation folders, in the order they are looked for (lineage: daughters keep the root's id)
ANNOTATION_FOLDERS = ("Annotations_lineage", "Annotations")


@dataclass
class AnnotatedSequence:
    """Frames and their true labels, restricted to ``objects`` (the first frame's ids)."""

    name: str
    frames: Any
    truth: dict[int, np.ndarray]
    objects: list[int]
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start

    def reference(self, t: int) -> np.ndarray:
        """What a person correcting frame ``t`` paints: its truth."""
        return self.truth[t]


def open_sequence(
    path: str | os.PathLike,
    annotations: str | None = None,
    start: int = 0,
    stop: int | None = None,
    columns: tuple[float, float] | None = None,
    min_pixels: int = MIN_PIXELS,
) -> AnnotatedSequence:
    """A DAVIS or Cell Tracking Challenge sequence folder, frames [start, stop).

    ``columns`` (shares of the width): only that band of every frame and mask, and of the first
    frame's objects only those with at least ``min_pixels`` pixels in it."""
    from napari_stm import io
    from napari_stm.bands import BandSource, band, band_objects

    root = Path(path).expanduser()
    if not root.is_dir():
        raise InputError(f"sequence '{root}' is not a folder")
    frames_dir = next((root / d for d in FRAME_FOLDERS if (root / d).is_dir()), None)
    if frames_dir is None:
        raise InputError(
            f"'{root}' holds neither JPEGImages/ (DAVIS) nor raw_tif/ (Cell Tracking Challenge)"
        )
    if annotations is not None:
        ann = Path(annotations).expanduser()
        ann = ann if ann.is_absolute() else root / ann
    else:
        ann = next((root / d for d in ANNOTATION_FOLDERS if (root / d).is_dir()), root / "-")
    if not ann.is_dir():
        raise InputError(f"no annotation folder '{ann.name}' in '{root}'")
    source = io.open_frames(frames_dir)
    n = len(source)
    stop = n if stop is None else stop
    if not 0 <= start < stop <= n:
        raise InputError(f"frames {start}..{stop} do not fit '{root.name}' ({n} frames)")
    masks = io.read_masks(ann, source.stems, source.frame_shape)
    name = root.name
    if columns is not None:
        cols = band(source.frame_shape[1], columns)
        source = BandSource(source, cols)
        masks = {t: np.ascontiguousarray(m[:, cols]) for t, m in masks.items()}
        name = f"{root.name}@{columns[0]:g}-{columns[1]:g}"
    missing = [t for t in range(start, stop) if t not in masks]
    if missing:
        raise InputError(
            f"'{ann}' has no mask for {len(missing)} of frames {start}..{stop - 1} (first: "
            f"{source.stems[missing[0]]}); the simulated annotator needs every frame's truth"
        )
    if columns is None:
        objects = [int(i) for i in np.unique(masks[start]) if i != 0]
        if not objects:
            raise InputError(f"the first frame's mask ({source.stems[start]}) holds no object")
    else:
        objects = band_objects(masks[start], min_pixels)
        if not objects:
            raise InputError(
                f"the first frame's mask ({source.stems[start]}) holds no object of at least "
                f"{min_pixels} pixels in columns {columns[0]:g}:{columns[1]:g}"
            )
    truth = {
        t: np.where(np.isin(masks[t], objects), masks[t], 0).astype(masks[t].dtype)
        for t in range(start, stop)
    }
    return AnnotatedSequence(name, source, truth, objects, start, stop)


def object_j(truth: np.ndarray, labels: np.ndarray, objects: list[int]) -> np.ndarray:
    """J of each object in one frame (an object absent from both counts 1)."""
    return np.array([db_eval_iou(truth == i, labels == i) for i in objects], dtype=np.float64)


@dataclass
class Round:
    """The state after one round of the simulated annotator."""

    sequence: str
    picker: str
    round: int
    #: the frame corrected this round (None in round 0)
    frame: int | None
    mean_j: float
    good_share: float
    computed: int
    seconds: float
    #: mean J, before and after this round, over the frames this round computed again
    reached_before: float
    reached_after: float


class Annotator:
    """Predictions of a whole sequence and the references given so far."""

    def __init__(self, model: Any, seq: AnnotatedSequence, config: Any) -> None:
        from napari_stm.core.engine import Propagator

        self.seq = seq
        self.prop = Propagator(model, seq.frames, config)
        self.labels: dict[int, np.ndarray] = {}
        #: mean object confidence and mean object J of each frame
        self.confidence: dict[int, float] = {}
        self.j: dict[int, float] = {}
        #: per frame, per object of ``seq.objects``: (confidence, J, flag)
        self.objects: dict[int, list[tuple[float, float, str]]] = {}

    def correct(self, t: int) -> tuple[int, float, float, float]:
        """Give frame ``t`` its truth and propagate what it reaches: (frames, seconds,
        mean J of those frames before, after)."""
        self.prop.add_reference(t, self.seq.reference(t))
        lo, hi = self.prop.affected(t, self.seq.start, self.seq.stop)
        before = [self.j[u] for u in range(lo, hi) if u in self.j]
        began = time.perf_counter()
        computed = 0
        for res in self.prop.propagate("both", lo, hi):
            self._take(res)
            computed += not res.is_reference
        seconds = time.perf_counter() - began
        after = [self.j[u] for u in range(lo, hi)]
        return (
            computed,
            seconds,
            float(np.mean(before)) if before else float("nan"),
            float(np.mean(after)),
        )

    def _take(self, res: Any) -> None:
        seq = self.seq
        self.labels[res.t] = res.labels
        conf = [res.confidence.get(i, 0.0) for i in seq.objects]
        js = object_j(seq.truth[res.t], res.labels, seq.objects)
        self.confidence[res.t] = mean_confidence(res.confidence, seq.objects)
        self.j[res.t] = float(js.mean())
        self.objects[res.t] = [
            (c, float(j), res.flags.get(i, ""))
            for c, j, i in zip(conf, js, seq.objects, strict=True)
        ]

    def save(self, path: Path, rows: list[Round], frame_rows: list[tuple]) -> None:
        """This state (references, every frame's labels and scores) and the rows so far."""
        ts = list(range(self.seq.start, self.seq.stop))
        picked = [r.frame for r in rows if r.frame is not None]
        # numpy appends .npz to a name without it
        with atomic_path(path, suffix=".part.npz") as tmp:
            np.savez_compressed(
                tmp,
                picked=np.array(picked, dtype=np.int64),
                labels=np.stack([self.labels[t] for t in ts]),
                confidence=np.array([[c for c, _, _ in self.objects[t]] for t in ts]),
                j=np.array([[j for _, j, _ in self.objects[t]] for t in ts]),
                flags=np.array([[f for _, _, f in self.objects[t]] for t in ts], dtype=str),
                rows=np.array(json.dumps([asdict(r) for r in rows])),
                frame_rows=np.array(json.dumps(frame_rows)),
            )

    def load(self, path: Path) -> tuple[list[Round], list[tuple]]:
        """Continue from :meth:`save`: references given again, scores as saved."""
        with np.load(path) as z:
            for t in z["picked"].tolist():
                self.prop.add_reference(int(t), self.seq.reference(int(t)))
            for i, t in enumerate(range(self.seq.start, self.seq.stop)):
                self.labels[t] = z["labels"][i]
                self.objects[t] = [
                    (float(c), float(j), str(f))
                    for c, j, f in zip(z["confidence"][i], z["j"][i], z["flags"][i], strict=True)
                ]
                self.confidence[t] = float(np.mean(z["confidence"][i]))
                self.j[t] = float(np.mean(z["j"][i]))
            rows = [Round(**r) for r in json.loads(str(z["rows"]))]
            frame_rows = [tuple(r) for r in json.loads(str(z["frame_rows"]))]
        return rows, frame_rows

    def frame_rows(self, picker: str, round_: int) -> list[tuple]:
        """(sequence, picker, round, frame, object, confidence, J, flag) of every frame."""
        return [
            (self.seq.name, picker, round_, t, i, c, j, flag)
            for t in range(self.seq.start, self.seq.stop)
            for i, (c, j, flag) in zip(self.seq.objects, self.objects[t], strict=True)
        ]

    def pick(self, picker: str) -> int | None:
        """The next frame to correct, or None when every frame is a reference."""
        refs = self.prop.references
        free = [t for t in range(self.seq.start, self.seq.stop) if t not in refs]
        if not free:
            return None
        if picker == "tool":
            conf = {t: self.confidence[t] for t in range(self.seq.start, self.seq.stop)}
            return frame_to_correct(conf, refs)
        if picker == "oracle":
            return min(free, key=lambda t: (self.j[t], t))
        if picker == "even":
            return max(free, key=lambda t: (min(abs(t - r) for r in refs), -t))
        raise InputError(f"picker must be one of {', '.join(PICKERS)}, not {picker!r}")

    def scores(self) -> tuple[float, float]:
        js = np.array([self.j[t] for t in range(self.seq.start, self.seq.stop)])
        return float(js.mean()), float((js >= GOOD_J).mean())


def simulate(
    model: Any,
    seq: AnnotatedSequence,
    pickers: Sequence[str],
    rounds: int,
    config: Any = None,
    log: Any = None,
    frames: list[tuple] | None = None,
    state: str | os.PathLike | None = None,
    budget: float | None = None,
) -> list[Round]:
    """Rounds 0..``rounds`` of every picker on one sequence (round 0 computed once).

    ``frames``, when given, receives every round's per frame and object rows
    (:meth:`Annotator.frame_rows`): what the confidence calibration reads. With a ``state``
    folder every round is saved there and a later call continues where this one stopped; with
    a ``budget`` (seconds) no new round starts once it is spent (the rows then stop short)."""
    for p in pickers:
        if p not in PICKERS:
            raise InputError(f"picker must be one of {', '.join(PICKERS)}, not {p!r}")
    began = time.perf_counter()
    folder = None if state is None else Path(state)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)

    def spent() -> bool:
        return budget is not None and time.perf_counter() - began > budget

    first = Annotator(model, seq, config)
    first.prop.add_reference(seq.start, seq.reference(seq.start))
    saved = None if folder is None else folder / f"{seq.name}__round0.npz"
    if saved is not None and saved.exists():
        start_rows, first_frames = first.load(saved)
        start = start_rows[0]
    else:
        t0 = time.perf_counter()
        computed = 0
        for res in first.prop.propagate("both", seq.start, seq.stop):
            first._take(res)
            computed += not res.is_reference
        seconds = time.perf_counter() - t0
        mean_j, good = first.scores()
        start = Round(seq.name, "-", 0, None, mean_j, good, computed, seconds, mean_j, mean_j)
        first_frames = first.frame_rows("-", 0)
        if saved is not None:
            first.save(saved, [start], first_frames)
    if frames is not None:
        frames.extend(first_frames)
    rows: list[Round] = []
    for picker in pickers:
        ann = Annotator(model, seq, config)
        ann.prop.add_reference(seq.start, seq.reference(seq.start))
        path = None if folder is None else folder / f"{seq.name}__{picker}.npz"
        if path is not None and path.exists():
            mine, mine_frames = ann.load(path)
        else:
            ann.labels, ann.j = dict(first.labels), dict(first.j)
            ann.confidence, ann.objects = dict(first.confidence), dict(first.objects)
            mine, mine_frames = [replace(start, picker=picker)], []
        for row in mine:
            _log(row, log)
        for r in range(len(mine), rounds + 1):
            t = ann.pick(picker)
            if t is None or spent():
                break
            computed, seconds, before, after = ann.correct(t)
            mean_j, good = ann.scores()
            mine.append(
                Round(seq.name, picker, r, t, mean_j, good, computed, seconds, before, after)
            )
            _log(mine[-1], log)
            mine_frames.extend(ann.frame_rows(picker, r))
            if path is not None:
                ann.save(path, mine, mine_frames)
        rows.extend(mine)
        if frames is not None:
            frames.extend(mine_frames)
    return rows


def _log(row: Round, log: Any) -> None:
    if log is not None:
        print(format_table([row], header=False), file=log, flush=True)


COLUMNS = (
    ("sequence", "{:<16}"),
    ("picker", "{:<7}"),
    ("round", "{:>5}"),
    ("frame", "{:>5}"),
    ("mean_j", "{:>7.3f}"),
    ("good_share", "{:>7.1%}"),
    ("computed", "{:>8}"),
    ("seconds", "{:>8.1f}"),
    ("reached_before", "{:>8.3f}"),
    ("reached_after", "{:>8.3f}"),
)
HEADERS = (
    "sequence",
    "picker",
    "round",
    "frame",
    "mean J",
    "J>=0.9",
    "computed",
    "seconds",
    "reach J0",
    "reach J1",
)


def format_table(rows: list[Round], header: bool = True) -> str:
    lines = []
    if header:
        widths = [len(f.format(0 if n not in ("sequence", "picker") else "")) for n, f in COLUMNS]
        lines.append(
            " ".join(
                h.rjust(w) if i > 1 else h.ljust(w)
                for i, (h, w) in enumerate(zip(HEADERS, widths, strict=True))
            )
        )
    for row in rows:
        d = asdict(row)
        cells = []
        for name, fmt in COLUMNS:
            v = d[name]
            if v is None:
                cells.append(fmt.replace(".3f", "").replace(".1f", "").format("-"))
            else:
                cells.append(fmt.format(v))
        lines.append(" ".join(cells))
    return "\n".join(lines)


def summary(rows: list[Round], after: int = 3) -> str:
    """Per sequence: each picker's gain in mean J after ``after`` rounds, the tool's share of
    the oracle's, and whether an oracle correction ever lowered mean J."""
    lines = []
    for name in dict.fromkeys(r.sequence for r in rows):
        mine = [r for r in rows if r.sequence == name]
        gains: dict[str, float] = {}
        for picker in dict.fromkeys(r.picker for r in mine):
            path = sorted((r for r in mine if r.picker == picker), key=lambda r: r.round)
            at = [r for r in path if r.round == after]
            if at:
                gains[picker] = at[0].mean_j - path[0].mean_j
        text = ", ".join(f"{p} {g:+.3f}" for p, g in gains.items())
        if "tool" in gains and "oracle" in gains and gains["oracle"] > 0:
            text += f"; tool/oracle {gains['tool'] / gains['oracle']:.0%}"
        oracle = sorted((r for r in mine if r.picker == "oracle"), key=lambda r: r.round)
        drops = [
            f"round {b.round} ({a.mean_j:.3f} -> {b.mean_j:.3f})"
            for a, b in zip(oracle, oracle[1:], strict=False)
            if b.mean_j < a.mean_j
        ]
        if oracle:
            text += (
                "; oracle never lowered mean J"
                if not drops
                else ("; oracle LOWERED mean J: " + ", ".join(drops))
            )
        lines.append(f"{name}: gain after {after} rounds: {text}")
    return "\n".join(lines)


#: columns of ``--frames-csv``
FRAME_COLUMNS = ("sequence", "picker", "round", "frame", "object", "confidence", "j", "flag")


def write_csv(rows: list[Round], path: str | os.PathLike) -> Path:
    return _write_rows(path, [n for n, _ in COLUMNS], [astuple(r) for r in rows])


def _write_rows(path: str | os.PathLike, header: Sequence[str], rows: list[tuple]) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return target


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``napari-stm bench annotate``."""
    p.description = __doc__.split("\n\n")[0] if __doc__ else None
    p.add_argument("sequences", nargs="+", help="sequence folders (DAVIS or CTC layout)")
    p.add_argument("--rounds", type=int, default=4, help="corrections (default: %(default)s)")
    p.add_argument("--pickers", nargs="+", default=list(PICKERS), choices=PICKERS)
    p.add_argument(
        "--annotations",
        default=None,
        help="annotation folder inside each sequence (default: Annotations_lineage, else "
        "Annotations)",
    )
    p.add_argument("--start", type=int, default=0, help="first frame (default: 0)")
    p.add_argument("--stop", type=int, default=None, help="frame after the last (default: all)")
    p.add_argument(
        "--columns",
        default=None,
        metavar="A:B",
        help="only this band of every frame, as shares of the width (0.5:1 = right half, the "
        "half `train --ctc-columns 0:0.5` never read); default: the whole frame",
    )
    p.add_argument(
        "--min-pixels",
        type=int,
        default=MIN_PIXELS,
        help="with --columns: leave out objects the band cuts below this many pixels on the "
        "first frame (default: %(default)s)",
    )
    p.add_argument("--model", default=None, help="model name (default: as `propagate` chooses)")
    p.add_argument("--weights", default=None, help="checkpoint path or URL")
    p.add_argument("--device", default=None, choices=["cpu", "cuda", "mps"])
    p.add_argument(
        "--max-side",
        type=int,
        default=None,
        help="work at most this many pixels a side (0: full size; default: the model's)",
    )
    p.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    p.add_argument(
        "--state",
        default=None,
        help="folder that keeps every round: a later call with the same folder continues where "
        "this one stopped (split a long run into short ones)",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds: start no new round once they are spent (with --state, continue later)",
    )
    p.add_argument(
        "--frames-csv",
        default=None,
        help="also write every round's confidence, J and flag per frame and object (the input "
        "of benchmarks/calibrate_confidence.py)",
    )


def run(args: argparse.Namespace) -> int:
    from napari_stm.bands import parse_columns
    from napari_stm.core.engine import PropagationConfig
    from napari_stm.core.weights import default_model_name, load_model

    if args.rounds < 0:
        raise InputError(f"--rounds must be 0 or more, not {args.rounds}")
    columns = None if args.columns is None else parse_columns(args.columns)
    seqs = [
        open_sequence(s, args.annotations, args.start, args.stop, columns, args.min_pixels)
        for s in args.sequences
    ]
    # The rule `propagate` follows, on the first sequence's frames.
    first = seqs[0].frames
    name = args.model or default_model_name(first.frame_shape, first.dtype)
    model = load_model(name, weights=args.weights, device=args.device)
    config = PropagationConfig(max_side=args.max_side, device=args.device)
    print(format_table([], header=True), file=sys.stderr, flush=True)
    rows: list[Round] = []
    frames: list[tuple] = []
    for seq in seqs:
        rows.extend(
            simulate(
                model,
                seq,
                args.pickers,
                args.rounds,
                config,
                log=sys.stderr,
                frames=frames,
                state=args.state,
                budget=args.budget,
            )
        )
        # Written after every sequence: an interrupted run keeps what it measured.
        if args.csv:
            write_csv(rows, args.csv)
        if args.frames_csv:
            _write_rows(args.frames_csv, FRAME_COLUMNS, frames)
    print(format_table(rows))
    print(summary(rows))
    done = {(r.sequence, r.picker) for r in rows if r.round == args.rounds}
    short = {(r.sequence, r.picker) for r in rows} - done
    if short:
        print(
            f"stopped short of round {args.rounds} for {len(short)} sequence x picker(s): run "
            "again with the same --state to continue",
            file=sys.stderr,
        )
    return 0
