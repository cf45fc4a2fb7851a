"""`napari-stm batch`: fill many videos on a Ray cluster, one task per video.

A manifest (CSV) lists the videos: ``frames``, ``masks`` and ``name`` (the FRAMES and --masks of
`napari-stm propagate`, and the folder ``DIR/<name>/`` its masks go to), and any engine setting
of :class:`~napari_stm.core.engine.PropagationConfig` as a further column. Each video is one Ray
task that runs `propagate`'s own code (:func:`napari_stm.cli.propagate_files`), so
``DIR/<name>/`` holds exactly what ``propagate --out DIR/<name>`` writes.

Scheduling, retries and placement are Ray's: a task asks for ``--cpus-per-video`` CPUs and
``--gpus-per-video`` GPUs (a fraction lets small videos share one), and a task whose worker
process dies is run again (``max_retries``). What this module adds is what Ray cannot know:

- a video is written into ``DIR/.napari-stm/tmp/`` and renamed into place when complete, so a
  killed worker or driver never leaves a half-written ``DIR/<name>/``;
- beside it, ``DIR/.napari-stm/records/<name>.json`` records what produced it (inputs, settings,
  model) and the sha256 of every file; a later run skips a video whose folder still matches its
  record for the same inputs and settings (resuming), and leaves any other existing folder alone
  unless ``--overwrite`` is given;
- ``DIR/summary.csv``: one row per video (name, frames, seconds, status, error), rewritten as
  videos finish.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import fcntl
import hashlib
import io as _io
import json
import os
import shutil
import socket
import sys
import time
import types
import typing
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from napari_stm.core.atomic import atomic_path
from napari_stm.core.config import (
    AlgorithmConfig,
    PropagationConfig,
    RuntimeConfig,
    algorithm_settings,
)
from napari_stm.core.errors import CheckpointError, InputError

#: columns every manifest has
REQUIRED = ("name", "frames", "masks")
SUMMARY = "summary.csv"
SUMMARY_COLUMNS = ("name", "frames", "seconds", "status", "error")
#: the batch's own folder inside DIR (staging, records, lock)
STATE = ".napari-stm"
#: bumped when a record's layout changes; older records then verify as foreign
RECORD_VERSION = 1
#: Ray listens on the node's address; for a cluster on this machine alone, that is loopback.
#: Ray reads this switch once, when it is imported (ray._private.ray_constants).
_LOOPBACK_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


# --------------------------------------------------------------------------- the manifest


@dataclass(frozen=True)
class Video:
    """One manifest row, checked: absolute paths, the engine settings it runs with."""

    name: str
    frames: str
    masks: str
    config: PropagationConfig
    #: the manifest line, for messages
    line: int


def row_options() -> dict[str, Any]:
    """Engine settings a manifest column may set: {field name: type}: the settings that change
    a video's labels (:class:`AlgorithmConfig`, so a new setting is a new column with no change
    here). Runtime settings (device, compile ...) belong to the cluster and the command line."""
    hints = typing.get_type_hints(AlgorithmConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(AlgorithmConfig) if f.init}


def _convert(text: str, kind: Any) -> Any:
    """A manifest cell as a value of the config field's type (ValueError when it is not)."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(kind) if a is not type(None)]
        if text.lower() == "none":
            return None
        errors = []
        for member in members:
            try:
                return _convert(text, member)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError("; ".join(errors))
    if origin is typing.Literal:
        choices = typing.get_args(kind)
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(map(str, choices))}")
        return text
    if kind is bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected true or false")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError("expected a whole number") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError("expected a number") from None
    if kind is str:
        return text
    raise TypeError(f"no manifest conversion for a field of type {kind!r}")


def _check_name(name: str, where: str) -> None:
    if not name:
        raise InputError(f"{where}, column 'name': empty; every video needs a name")
    bad = (
        name in (".", "..", SUMMARY)
        or name.startswith(".")
        or any(c in name for c in "/\\\0")
        or name != name.strip()
    )
    if bad:
        raise InputError(
            f"{where}, column 'name': {name!r} cannot be a folder name inside the output "
            "folder (no slashes, no leading dot, not 'summary.csv')"
        )


def read_manifest(path: str | os.PathLike, defaults: PropagationConfig) -> list[Video]:
    """The videos of a manifest CSV; relative paths are relative to the manifest's folder.

    ``defaults`` are the settings a row's empty or absent columns keep. Any problem raises
    :class:`InputError` naming the line and the column.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"manifest '{path}' does not exist or is not a file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read manifest '{path}': {err}") from err
    reader = csv.DictReader(_io.StringIO(text))
    header = [h.strip() for h in (reader.fieldnames or [])]
    if not header:
        raise InputError(f"manifest '{path}' is empty; its first line names the columns")
    reader.fieldnames = header
    options = row_options()
    for column in header:
        if column in REQUIRED or column in options:
            continue
        runtime = {f.name for f in dataclasses.fields(RuntimeConfig)}
        why = (
            "a runtime setting: it is the command line's for every video (the device follows "
            "--gpus-per-video)"
            if column in runtime
            else "known columns: " + ", ".join([*REQUIRED, *options])
        )
        raise InputError(f"manifest '{path}', line 1: unknown column {column!r} ({why})")
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise InputError(
            f"manifest '{path}', line 1: missing column(s) {', '.join(map(repr, missing))}; "
            f"a manifest has at least the columns {', '.join(REQUIRED)}"
        )
    if len(set(header)) != len(header):
        raise InputError(f"manifest '{path}', line 1: a column is named twice")

    videos: list[Video] = []
    seen: dict[str, int] = {}
    for row in reader:
        where = f"manifest '{path}', line {reader.line_num}"
        if None in row:
            raise InputError(f"{where}: more cells than the {len(header)} columns")
        cells = {k: (v or "").strip() for k, v in row.items()}
        if not any(cells.values()):
            continue
        name = cells["name"]
        _check_name(name, where)
        if name in seen:
            raise InputError(
                f"{where}, column 'name': {name!r} is also the name on line {seen[name]}; "
                "names must be unique (each is an output folder)"
            )
        seen[name] = reader.line_num
        inputs = {}
        for column in ("frames", "masks"):
            if not cells[column]:
                raise InputError(f"{where}, column {column!r}: empty")
            target = (path.parent / Path(cells[column]).expanduser()).resolve()
            if not target.exists():
                raise InputError(f"{where}, column {column!r}: '{target}' does not exist")
            inputs[column] = str(target)
        values = {}
        for column, kind in options.items():
            text = cells.get(column, "")
            if not text:
                continue
            try:
                values[column] = _convert(text, kind)
            except ValueError as err:
                raise InputError(f"{where}, column {column!r}: {text!r}: {err}") from None
        try:
            config = dataclasses.replace(defaults, **values)
        except InputError as err:
            raise InputError(f"{where}: {err}") from None
        videos.append(Video(name, inputs["frames"], inputs["masks"], config, reader.line_num))
    if not videos:
        raise InputError(f"manifest '{path}' lists no videos")
    return videos


# --------------------------------------------------------------------------- the output folder


@dataclass(frozen=True)
class Job:
    """What one task needs: a video and the batch-wide settings; sent to the worker."""

    video: Video
    out: str
    model: str | None
    weights: str | None
    sha256: str | None
    device: str
    direction: str
    start: int | None
    stop: int | None
    overwrite: bool

    @property
    def dest(self) -> Path:
        return Path(self.out) / self.video.name

    def fingerprint(self) -> dict[str, Any]:
        """What the output of this job depends on (compared as JSON with a record's)."""
        settings = algorithm_settings(self.video.config)
        data = {
            "frames": self.video.frames,
            "masks": self.video.masks,
            "masks_sha256": _masks_digest(Path(self.video.masks)),
            "settings": settings,
            "model": self.model,
            "weights": self.weights,
            "direction": self.direction,
            "start": self.start,
            "stop": self.stop,
        }
        return json.loads(json.dumps(data))


def _masks_digest(path: Path) -> str:
    """sha256 over the reference masks (small files): a corrected mask makes a new result."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(file.name.encode() + b"\0" + _sha256(file).encode())
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _state(out: Path) -> Path:
    return out / STATE


def _record_path(out: Path, name: str) -> Path:
    return _state(out) / "records" / f"{name}.json"


def _staging(out: Path) -> Path:
    return _state(out) / "tmp"


def check_output(job: Job) -> tuple[str, dict[str, Any] | None]:
    """The state of ``DIR/<name>``: ("absent" | "complete" | "other", its record).

    "complete": the folder holds exactly the files its record lists, with their sha256, for the
    same fingerprint as ``job``. "other": anything else that exists (another run's results, a
    folder someone edited or made): never replaced without ``--overwrite``.
    """
    dest = job.dest
    if not dest.exists():
        return "absent", None
    try:
        record = json.loads(_record_path(Path(job.out), job.video.name).read_text())
    except (OSError, ValueError):
        return "other", None
    if record.get("version") != RECORD_VERSION or record.get("fingerprint") != job.fingerprint():
        return "other", record
    files = record.get("files", {})
    if not dest.is_dir() or {p.name for p in dest.iterdir()} != set(files):
        return "other", record
    for name, digest in files.items():
        if _sha256(dest / name) != digest:
            return "other", record
    return "complete", record


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(text)


# --------------------------------------------------------------------------- one video (worker)

_models: dict[tuple, Any] = {}


def _model(job: Job, source: Any) -> Any:
    """The job's model for its opened frames, loaded once per worker process (a worker runs
    many videos)."""
    from napari_stm.core.weights import default_model_name, load_model

    name = job.model or default_model_name(source.frame_shape, source.dtype)
    key = (name, job.weights, job.sha256, job.device)
    if key not in _models:
        _models[key] = load_model(
            name,
            weights=job.weights,
            device=job.device,
            sha256=job.sha256,
            progress=False,
        )
    return _models[key]


def fill_video(job: Job) -> dict[str, Any]:
    """Run one video as `propagate` would, into staging; publish it only when complete.

    Returns the summary row. Input and checkpoint problems become a "failed" row (running the
    video again would fail the same way); a dying process is Ray's to retry.
    """
    from napari_stm.cli import propagate_files
    from napari_stm.core.host_memory import reuse_freed_memory

    reuse_freed_memory()  # the worker process is ours, as the `napari-stm` process is
    out, name = Path(job.out), job.video.name
    staging = _staging(out)
    staging.mkdir(parents=True, exist_ok=True)
    # Only one attempt of a video runs at a time (Ray retries after a failure, and the driver
    # holds the folder's lock): what an earlier, killed attempt left is garbage.
    for stale in staging.glob(f"{name}.*"):
        shutil.rmtree(stale, ignore_errors=True)
    work = staging / f"{name}.{socket.gethostname()}.{os.getpid()}"
    work.mkdir()
    row: dict[str, Any] = {"name": name, "frames": "", "seconds": "", "status": "failed"}
    started = time.perf_counter()
    try:
        frames = propagate_files(
            job.video.frames,
            job.video.masks,
            work / name,
            job.video.config,
            lambda source: _model(job, source),
            direction=job.direction,
            start=job.start,
            stop=job.stop,
            quiet=True,
        )
        files = {p.name: _sha256(p) for p in sorted((work / name).iterdir())}
        record = {
            "version": RECORD_VERSION,
            "fingerprint": job.fingerprint(),
            "files": files,
            "frames": frames,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "seconds": round(time.perf_counter() - started, 3),
        }
        # The record first: a crash between the two leaves a folder that is not there yet (run
        # again) or an old folder that no longer matches the record (left alone).
        _write_atomic(_record_path(out, name), json.dumps(record, indent=1))
        _publish(work / name, job.dest, work, job.overwrite)
        row.update(frames=frames, status="done", error="")
    except (InputError, CheckpointError, FileExistsError) as err:
        row["error"] = str(err)
    except Exception as err:  # reported in the summary; the other videos go on
        row["error"] = f"{type(err).__name__}: {err}"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    row["seconds"] = f"{time.perf_counter() - started:.2f}"
    return row


def _publish(ready: Path, dest: Path, work: Path, overwrite: bool) -> None:
    """Move a complete output into place by renames on one file system."""
    if dest.exists() or dest.is_symlink():
        if not overwrite:
            raise FileExistsError(
                f"'{dest}' appeared while the video ran; not replacing it (--overwrite does)"
            )
        os.rename(dest, work / "replaced")
    os.rename(ready, dest)


# --------------------------------------------------------------------------- the driver


def add_arguments(p: argparse.ArgumentParser) -> None:
    from napari_stm.cli import _add_engine_arguments, _add_model_arguments

    p.add_argument(
        "manifest",
        help="CSV with the columns name, frames, masks (as for `propagate`), and optionally "
        "engine settings (memory, mem_every, max_memory, top_k, motion_sigma, "
        "confidence_gate, max_side, ...) per video",
    )
    p.add_argument("--out", required=True, help="output folder: OUT/<name>/ per video")
    p.add_argument(
        "--address",
        default=None,
        help="an existing Ray cluster (e.g. ray://head:10001 or head:6379; 'auto' for the one "
        "this machine belongs to); default: start one here on 127.0.0.1",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="local cluster only: videos run at once (default: the CPU cores over "
        "--cpus-per-video)",
    )
    p.add_argument(
        "--cpus-per-video",
        type=float,
        default=1,
        help="CPU cores each video takes (its torch threads; default: %(default)s)",
    )
    p.add_argument(
        "--gpus-per-video",
        type=float,
        default=0,
        help="GPUs each video takes; a fraction (0.25) lets several small videos share one "
        "GPU (default: %(default)s, run on CPU)",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=3,
        help="times a video is run again when its worker process dies (default: %(default)s)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="recompute every video and replace existing output folders",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_model_arguments(p)
    _add_engine_arguments(p)


def run(args: argparse.Namespace) -> int:
    from napari_stm.cli import engine_config

    if args.gpus_per_video < 0 or args.cpus_per_video <= 0:
        raise InputError("--gpus-per-video must be 0 or more and --cpus-per-video more than 0")
    if args.workers is not None and args.workers < 1:
        raise InputError(f"--workers must be at least 1, not {args.workers}")
    if args.retries < 0:
        raise InputError(f"--retries must be 0 or more, not {args.retries}")
    if args.gpus_per_video > 0 and args.device not in (None, "cuda"):
        raise InputError(f"--gpus-per-video runs on CUDA, not --device {args.device}")
    if args.gpus_per_video == 0 and args.device not in (None, "cpu"):
        raise InputError(f"--device {args.device} needs --gpus-per-video (e.g. 1 or 0.5)")
    device = "cuda" if args.gpus_per_video > 0 else "cpu"
    defaults = engine_config(args)
    videos = read_manifest(args.manifest, dataclasses.replace(defaults, device=None))
    out = Path(args.out).expanduser().resolve()
    inputs = {Path(p) for v in videos for p in (v.frames, v.masks)}
    for video in videos:
        if (out / video.name) in inputs or any(out / video.name in p.parents for p in inputs):
            raise InputError(
                f"manifest line {video.line}: output folder '{out / video.name}' holds inputs; "
                "choose another --out"
            )
    jobs = [
        Job(
            video=video,
            out=str(out),
            model=args.model,
            weights=args.weights,
            sha256=args.sha256,
            device=device,
            direction=args.direction,
            start=args.start,
            stop=args.stop,
            overwrite=args.overwrite,
        )
        for video in videos
    ]
    _check_model(args)
    out.mkdir(parents=True, exist_ok=True)
    with _lock(out):
        shutil.rmtree(_staging(out), ignore_errors=True)
        try:
            return _run_jobs(jobs, args, out)
        finally:
            shutil.rmtree(_staging(out), ignore_errors=True)


def _check_model(args: argparse.Namespace) -> None:
    """Fail before any task starts when the model or its weights are wrong (and fill the
    weights cache once, rather than in every worker at the same time)."""
    from napari_stm.core.weights import default_model_name, load_model

    load_model(
        args.model or default_model_name(),
        weights=args.weights,
        device="cpu",
        sha256=args.sha256,
        progress=not args.quiet,
    )


@contextmanager
def _lock(out: Path) -> Iterator[None]:
    state = _state(out)
    state.mkdir(exist_ok=True)
    with open(state / "lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(
                f"another `napari-stm batch` is writing into '{out}'; wait for it to finish"
            ) from None
        yield


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise InputError(
            "napari-stm batch runs on Ray: install it with pip install 'napari-stm[scale]'"
        ) from None
    return ray


def start_local_cluster(num_cpus: float) -> Any:
    """Start Ray on this machine alone: ``num_cpus`` CPUs, every server on 127.0.0.1."""
    if "ray" not in sys.modules:
        for key, value in _LOOPBACK_ONLY.items():
            os.environ.setdefault(key, value)
    ray = import_ray()
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        # The object store only carries the jobs and the summary rows.
        object_store_memory=128 << 20,
        log_to_driver=False,
        logging_level="WARNING",
    )
    address = ray.get_runtime_context().gcs_address
    if not address.startswith("127.0.0.1:"):
        ray.shutdown()
        raise RuntimeError(
            f"the local Ray cluster listens on {address}, not 127.0.0.1 only: ray was imported "
            "before napari-stm could ask it to stay local (set "
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before importing ray)"
        )
    return ray


def _run_jobs(jobs: list[Job], args: argparse.Namespace, out: Path) -> int:
    from tqdm import tqdm

    rows: dict[str, dict[str, Any]] = {}
    todo: list[Job] = []
    for job in jobs:
        state, record = check_output(job)
        if state == "complete" and not args.overwrite:
            assert record is not None
            rows[job.video.name] = _row(job, record.get("frames", ""), "", "skipped")
        elif state == "other" and not args.overwrite:
            rows[job.video.name] = _row(
                job,
                "",
                "",
                "failed",
                f"'{job.dest}' exists and is not this video's complete output (other inputs "
                "or settings, or changed since); not replacing it: pass --overwrite, or choose "
                "another --out or name",
            )
        else:
            todo.append(job)
    _write_summary(out, jobs, rows)

    bar = tqdm(total=len(jobs), initial=len(rows), unit="video", disable=args.quiet, desc="videos")
    try:
        if todo:
            _run_on_ray(todo, args, out, jobs, rows, bar)
    finally:
        bar.close()
    failed = [r for r in rows.values() if r["status"] == "failed"]
    done = sum(r["status"] == "done" for r in rows.values())
    skipped = sum(r["status"] == "skipped" for r in rows.values())
    print(
        f"{done} filled, {skipped} already complete, {len(failed)} failed; "
        f"summary: {out / SUMMARY}",
        file=sys.stderr,
    )
    for r in failed:
        print(f"  {r['name']}: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


def _run_on_ray(
    todo: list[Job],
    args: argparse.Namespace,
    out: Path,
    jobs: list[Job],
    rows: dict[str, dict[str, Any]],
    bar: Any,
) -> None:
    ray, started_here = _connect(args)
    pending: dict[Any, Job] = {}
    try:
        task = ray.remote(fill_video).options(
            num_cpus=args.cpus_per_video,
            num_gpus=args.gpus_per_video,
            max_retries=args.retries,
            retry_exceptions=False,
        )
        pending.update((task.remote(job), job) for job in todo)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(ready[0])
            try:
                rows[job.video.name] = ray.get(ready[0])
            except ray.exceptions.RayError as err:
                rows[job.video.name] = _row(
                    job, "", "", "failed", f"{type(err).__name__}: {_first_line(err)}"
                )
            _write_summary(out, jobs, rows)
            bar.update(1)
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        if started_here:
            ray.shutdown()


def _connect(args: argparse.Namespace) -> tuple[Any, bool]:
    """Ray, connected to the cluster the arguments name; True when started here."""
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        # A program (or a test) that connected to its cluster already.
        ray, started_here = sys.modules["ray"], False
    elif args.address:
        ray = import_ray()
        try:
            ray.init(address=args.address, logging_level="WARNING", log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError) as err:
            raise InputError(f"cannot connect to the Ray cluster at {args.address}: {err}") from err
        started_here = False
    else:
        # Not imported before this: Ray reads its loopback switch at import.
        workers = args.workers or max(1, int((os.cpu_count() or 1) // args.cpus_per_video))
        ray = start_local_cluster(workers * args.cpus_per_video)
        started_here = True
    gpus = ray.cluster_resources().get("GPU", 0)
    if args.gpus_per_video > gpus:
        if started_here:
            ray.shutdown()
        raise InputError(
            f"--gpus-per-video {args.gpus_per_video}, but the Ray cluster has {gpus:g} GPU(s)"
        )
    return ray, started_here


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else repr(err)


def _row(job: Job, frames: Any, seconds: Any, status: str, error: str = "") -> dict[str, Any]:
    return {
        "name": job.video.name,
        "frames": frames,
        "seconds": seconds,
        "status": status,
        "error": error,
    }


def _write_summary(out: Path, jobs: list[Job], rows: Mapping[str, Mapping[str, Any]]) -> None:
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for job in jobs:
        row = rows.get(job.video.name) or _row(job, "", "", "pending")
        writer.writerow({k: row.get(k, "") for k in SUMMARY_COLUMNS})
    _write_atomic(out / SUMMARY, buf.getvalue())
