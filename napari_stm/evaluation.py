"""`napari-stm evaluate PRED GT`: DAVIS J&F of predicted label images against ground truth.

Protocol (semi-supervised DAVIS, davis2017-evaluation `evaluation.py` and
`evaluation_method.py`):

- Only frames that have a ground-truth file are scored; the first and the last of them are
  left out (the first is the given reference) unless `all_frames=True`.
- Every object id found in the sequence's ground truth is scored separately, on every scored
  frame from the first frame where it appears in the ground truth on. A frame where the object
  is absent from the ground truth counts 1 if the prediction is empty too, else 0 (J and F).
  For objects present in the first frame this is exactly the official procedure.
- Per object: Mean, Recall, Decay of J and F (`metrics.db_statistics`). Global numbers are
  means over all objects of all sequences (not over sequences); J&F-Mean = (J-Mean + F-Mean)/2.
- A scored frame without a prediction, a predicted id the ground truth never contains, or a
  size mismatch is an error, as in the official code.

Layouts: GT may be a DAVIS root (`GT/Annotations/480p/<seq>/*.png`), a folder of sequences
(`GT/<seq>/Annotations/*.png` or `GT/<seq>/*.png`), or one sequence (`GT/Annotations/*.png`
or `GT/*.png`). PRED holds `PRED/<seq>/*.png` (for one sequence, PNGs in PRED itself).
Label images are read as ids (palette indices), see `napari_stm.io.read_label_image`.
"""

from __future__ import annotations

import argparse
import csv
import io as _stdio
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from napari_stm.core.atomic import atomic_path
from napari_stm.core.errors import InputError
from napari_stm.io import LABEL_EXTENSIONS, natural_key, read_label_image
from napari_stm.metrics import db_eval_iou, db_statistics, f_measure

__all__ = [
    "GLOBAL_COLUMNS",
    "SEQUENCE_COLUMNS",
    "EvaluationResult",
    "ObjectScore",
    "add_arguments",
    "evaluate",
    "find_sequences",
    "main",
    "run",
]

# Column names and file names of davis2017-evaluation's evaluation_method.py.
GLOBAL_COLUMNS = ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")
SEQUENCE_COLUMNS = ("Sequence", "J-Mean", "F-Mean")
GLOBAL_CSV = "global_results-val.csv"
SEQUENCE_CSV = "per-sequence_results-val.csv"


@dataclass
class ObjectScore:
    """Per-frame J and F of one object of one sequence, and their statistics."""

    sequence: str
    object_id: int
    frames: list[str]
    j: np.ndarray
    f: np.ndarray
    j_mean: float = field(init=False)
    j_recall: float = field(init=False)
    j_decay: float = field(init=False)
    f_mean: float = field(init=False)
    f_recall: float = field(init=False)
    f_decay: float = field(init=False)

    def __post_init__(self) -> None:
        self.j_mean, self.j_recall, self.j_decay = db_statistics(self.j)
        self.f_mean, self.f_recall, self.f_decay = db_statistics(self.f)

    @property
    def name(self) -> str:
        """The row name of the official per-sequence CSV: `<sequence>_<id>`."""
        return f"{self.sequence}_{self.object_id}"


@dataclass
class EvaluationResult:
    """All scores of one evaluation; `global_scores` are the numbers papers report."""

    objects: list[ObjectScore]
    skipped: list[str] = field(default_factory=list)

    @property
    def sequences(self) -> dict[str, dict[str, float]]:
        """Per sequence (mean over its objects): J&F-Mean, J-Mean, F-Mean."""
        table: dict[str, dict[str, float]] = {}
        for name in dict.fromkeys(o.sequence for o in self.objects):
            objs = [o for o in self.objects if o.sequence == name]
            j = float(np.mean([o.j_mean for o in objs]))
            f = float(np.mean([o.f_mean for o in objs]))
            table[name] = {"J&F-Mean": (j + f) / 2, "J-Mean": j, "F-Mean": f}
        return table

    @property
    def global_scores(self) -> dict[str, float]:
        if not self.objects:
            return {name: float("nan") for name in GLOBAL_COLUMNS}

        def mean(attr: str) -> float:
            return float(np.mean([getattr(o, attr) for o in self.objects]))

        j_mean, f_mean = mean("j_mean"), mean("f_mean")
        return {
            "J&F-Mean": (j_mean + f_mean) / 2,
            "J-Mean": j_mean,
            "J-Recall": mean("j_recall"),
            "J-Decay": mean("j_decay"),
            "F-Mean": f_mean,
            "F-Recall": mean("f_recall"),
            "F-Decay": mean("f_decay"),
        }

    def format_table(self) -> str:
        """Human-readable per-sequence and global tables."""
        lines = []
        seqs = self.sequences
        width = max([len("Sequence"), *(len(s) for s in seqs)])
        lines.append(f"{'Sequence':<{width}}  J&F-Mean  J-Mean  F-Mean  objects")
        for name, row in seqs.items():
            n_obj = sum(o.sequence == name for o in self.objects)
            lines.append(
                f"{name:<{width}}  {row['J&F-Mean']:8.3f}  {row['J-Mean']:6.3f}  "
                f"{row['F-Mean']:6.3f}  {n_obj:7d}"
            )
        n_frames = sum(len(o.frames) for o in self.objects)
        lines.append("")
        lines.append(
            f"Global ({len(seqs)} sequences, {len(self.objects)} objects, "
            f"{n_frames} object-frames; means over objects)"
        )
        scores = self.global_scores
        lines.append("  ".join(f"{c:>8}" for c in GLOBAL_COLUMNS))
        lines.append("  ".join(f"{scores[c]:8.3f}" for c in GLOBAL_COLUMNS))
        lines.extend(f"note: {reason}" for reason in self.skipped)
        return "\n".join(lines)

    def write_csv(self, directory: str | os.PathLike) -> tuple[Path, Path]:
        """Write the two official CSV files (3 decimals) into `directory`; returns their paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        scores = self.global_scores
        global_rows = [list(GLOBAL_COLUMNS), [f"{scores[c]:.3f}" for c in GLOBAL_COLUMNS]]
        seq_rows = [list(SEQUENCE_COLUMNS)]
        seq_rows += [[o.name, f"{o.j_mean:.3f}", f"{o.f_mean:.3f}"] for o in self.objects]
        paths = directory / GLOBAL_CSV, directory / SEQUENCE_CSV
        for path, rows in zip(paths, (global_rows, seq_rows), strict=True):
            _write_csv_atomic(path, rows)
        return paths


def _write_csv_atomic(path: Path, rows: list[list[str]]) -> None:
    buffer = _stdio.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        handle.write(buffer.getvalue())


# --------------------------------------------------------------------------- layouts


def _label_files(folder: Path) -> list[Path]:
    files = [
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in LABEL_EXTENSIONS
    ]
    return sorted(files, key=lambda p: natural_key(p.name))


def _has_labels(folder: Path) -> bool:
    return folder.is_dir() and bool(_label_files(folder))


def _discover(gt_root: str | os.PathLike) -> tuple[dict[str, Path], bool]:
    """(sequence name -> ground-truth folder, whether GT is a single sequence folder)."""
    root = Path(gt_root).expanduser()
    if not root.exists():
        raise InputError(f"ground-truth folder '{root}' does not exist")
    if not root.is_dir():
        raise InputError(f"ground truth '{root}' must be a folder")

    def ordered(seqs: dict[str, Path]) -> dict[str, Path]:
        return dict(sorted(seqs.items(), key=lambda kv: natural_key(kv[0])))

    annotations = root / "Annotations"
    for base in (annotations / "480p", annotations):
        if base.is_dir():
            seqs = {d.name: d for d in base.iterdir() if _has_labels(d)}
            if seqs:
                return ordered(seqs), False
    if _has_labels(annotations):
        return {root.name: annotations}, True
    if _has_labels(root):
        return {root.name: root}, True
    seqs = {}
    for sub in (p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for candidate in (sub / "Annotations" / "480p", sub / "Annotations", sub):
            if _has_labels(candidate):
                seqs[sub.name] = candidate
                break
    if not seqs:
        raise InputError(
            f"no ground-truth label images found in '{root}': expected <root>/Annotations/480p/"
            "<seq>/*.png, <root>/<seq>/Annotations/*.png, <root>/<seq>/*.png or PNGs in <root>"
        )
    return ordered(seqs), False


def find_sequences(gt_root: str | os.PathLike) -> dict[str, Path]:
    """Map sequence name -> folder of its ground-truth label images, for any supported layout."""
    return _discover(gt_root)[0]


def _prediction_folder(pred_root: Path, sequence: str, single: bool) -> Path:
    nested = pred_root / sequence
    if nested.is_dir():
        return nested
    if single and _has_labels(pred_root):
        return pred_root
    expected = f"'{nested}'" + (f" or PNGs directly in '{pred_root}'" if single else "")
    raise InputError(
        f"no predictions for sequence '{sequence}': expected {expected}, "
        "with one PNG per annotated frame named like the ground truth"
    )


def _prediction_file(folder: Path, stem: str, sequence: str) -> Path:
    for suffix in (".png", *(s for s in LABEL_EXTENSIONS if s != ".png")):
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    raise InputError(
        f"sequence '{sequence}': no prediction for annotated frame '{stem}' "
        f"(expected '{folder / (stem + '.png')}')"
    )


# --------------------------------------------------------------------------- scoring


def _ids(labels: np.ndarray) -> list[int]:
    return np.flatnonzero(np.bincount(labels.ravel(), minlength=256)).tolist()


def _evaluate_sequence(
    name: str, gt_dir: Path, pred_dir: Path, all_frames: bool, skipped: list[str]
) -> list[ObjectScore]:
    gt_files = _label_files(gt_dir)
    gt = [read_label_image(p) for p in gt_files]
    first_seen: dict[int, int] = {}
    for k, labels in enumerate(gt):
        for obj in _ids(labels):
            first_seen.setdefault(obj, k)
    first_seen.pop(0, None)
    if not first_seen:
        skipped.append(f"sequence '{name}' has no objects in its ground truth; not scored")
        return []
    scored = range(len(gt)) if all_frames else range(1, len(gt) - 1)
    per_object: dict[int, tuple[list[str], list[float], list[float]]] = {
        obj: ([], [], []) for obj in sorted(first_seen)
    }
    for k in scored:
        stem = gt_files[k].stem
        pred_path = _prediction_file(pred_dir, stem, name)
        pred = read_label_image(pred_path)
        if pred.shape != gt[k].shape:
            raise InputError(
                f"sequence '{name}', frame '{stem}': prediction '{pred_path}' is "
                f"{pred.shape[1]}x{pred.shape[0]} but the ground truth is "
                f"{gt[k].shape[1]}x{gt[k].shape[0]}"
            )
        extra = sorted(set(_ids(pred)) - set(first_seen) - {0})
        if extra:
            raise InputError(
                f"sequence '{name}', frame '{stem}': the prediction contains object id(s) "
                f"{extra}, which the ground truth of this sequence never contains"
            )
        for obj, (frames, js, fs) in per_object.items():
            if k < first_seen[obj]:
                continue
            gt_mask, pred_mask = gt[k] == obj, pred == obj
            frames.append(stem)
            js.append(db_eval_iou(gt_mask, pred_mask))
            fs.append(f_measure(pred_mask, gt_mask))
    scores = []
    for obj, (frames, js, fs) in per_object.items():
        if not frames:
            skipped.append(
                f"object {obj} of sequence '{name}' appears on no scored frame; not scored"
            )
            continue
        scores.append(ObjectScore(name, obj, frames, np.array(js), np.array(fs)))
    return scores


def evaluate(
    pred_root: str | os.PathLike,
    gt_root: str | os.PathLike,
    csv_dir: str | os.PathLike | None = None,
    all_frames: bool = False,
    sequences: Sequence[str] | None = None,
    progress: bool = False,
) -> EvaluationResult:
    """Score predicted label images against ground truth with the DAVIS J and F measures.

    `sequences` restricts a multi-sequence ground truth to these names (e.g. a DAVIS
    `ImageSets/2017/val.txt` list). With `csv_dir`, the official CSV files are written there.
    """
    pred_root = Path(pred_root).expanduser()
    if not pred_root.is_dir():
        raise InputError(f"prediction folder '{pred_root}' does not exist")
    found, single = _discover(gt_root)
    if sequences is not None:
        unknown = [s for s in sequences if s not in found]
        if unknown:
            raise InputError(f"sequence(s) {unknown} not found in ground truth '{gt_root}'")
        found = {s: found[s] for s in sequences}
    items = list(found.items())
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc="evaluate", unit="seq")
    objects: list[ObjectScore] = []
    skipped: list[str] = []
    for name, gt_dir in items:
        pred_dir = _prediction_folder(pred_root, name, single)
        objects += _evaluate_sequence(name, gt_dir, pred_dir, all_frames, skipped)
    if not objects:
        raise InputError(
            f"nothing to score in '{gt_root}': no object appears on a scored frame"
            + ("" if all_frames else " (first and last annotated frames are skipped)")
        )
    result = EvaluationResult(objects, skipped)
    if csv_dir is not None:
        result.write_csv(csv_dir)
    return result


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `evaluate` arguments to `parser` (a sub-command parser of `napari-stm`)."""
    parser.add_argument("pred", metavar="PRED", help="folder of predictions: PRED/<seq>/*.png")
    parser.add_argument(
        "gt",
        metavar="GT",
        help="ground truth: a DAVIS root, a folder of sequences, or one sequence folder",
    )
    parser.add_argument(
        "--csv",
        metavar="DIR",
        help=f"write {GLOBAL_CSV} and {SEQUENCE_CSV} (DAVIS layout) into DIR",
    )
    parser.add_argument(
        "--all-frames",
        action="store_true",
        help="also score the first and last annotated frames (DAVIS leaves them out)",
    )
    parser.add_argument(
        "--sequences",
        metavar="NAMES|FILE",
        help="only these sequences: comma-separated names, or a text file with one per line",
    )
    return parser


def _parse_sequences(value: str | None) -> list[str] | None:
    if not value:
        return None
    path = Path(value).expanduser()
    if path.is_file():
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return [name.strip() for name in value.split(",") if name.strip()]


def run(args: argparse.Namespace) -> int:
    """Run `evaluate` from parsed arguments, print the tables; 0 on success, 2 on bad input."""
    try:
        result = evaluate(
            args.pred,
            args.gt,
            csv_dir=args.csv,
            all_frames=args.all_frames,
            sequences=_parse_sequences(getattr(args, "sequences", None)),
            progress=sys.stderr.isatty(),
        )
    except InputError as err:
        print(f"napari-stm evaluate: error: {err}", file=sys.stderr)
        return 2
    print(result.format_table())
    if args.csv:
        print(f"CSV files written to {Path(args.csv).resolve()}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry: `python -m napari_stm.evaluation PRED GT [--csv DIR] [--all-frames]`."""
    parser = argparse.ArgumentParser(
        prog="napari-stm evaluate", description="DAVIS J&F of predicted label images"
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
