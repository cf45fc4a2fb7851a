"""`napari-stm bench`: time per frame and peak memory against video length, objects, resolution,
model, memory mode and device.

Every configuration runs in its own subprocess, so one configuration's peak memory never hides
another's. Inside it, one propagation walks a synthetic video drawn on the fly (never stored) and
at each requested length L the frames just before L are timed: "time at frame 5000" and "time at
frame 100" come from the same run. Peak resident memory (and CUDA peak allocation) is read when
frame L is reached.

``--fast-forward`` (bounded memory only) runs the first frames for real, until the memory is
full and the first length is reached, then jumps to the timing window before each longer length:
bounded memory holds at most ``max_memory`` frames, so its state after the jump is as large as
after the real frames. The rows say so: ``ran`` is the number of frames actually computed. It
cannot reveal a slow leak over thousands of frames; only a full run can.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_stm.core.errors import InputError

#: named resolutions as (height, width)
RESOLUTIONS = {
    "240p": (240, 426),
    "360p": (360, 640),
    "480p": (480, 854),
    "720p": (720, 1280),
    "1080p": (1080, 1920),
}
MODELS = ("stm-resnet50", "stm-lite", "stm-lite2", "lite0-match")
ROW_MARK = "BENCHROW "

#: CSV columns, in order
COLUMNS = (
    "model",
    "weights",
    "memory",
    "objects",
    "resolution",
    "height",
    "width",
    "worked",
    "device",
    "threads",
    "frame",
    "ran",
    "window",
    "ms_median",
    "ms_p90",
    "fps",
    "cpu_ms_median",
    "first_ms",
    "read_ms",
    "memory_frames",
    "bank_mb",
    "rss_model_mb",
    "rss_peak_mb",
    "cuda_peak_mb",
    "load1",
    "options",
    "status",
)


# --------------------------------------------------------------------------- synthetic video


class SyntheticVideo:
    """A video of any length drawn frame by frame on request: textured ellipses moving over a
    textured background, each object on its own never-ending path inside the frame.

    ``video[t]`` is an H x W x 3 uint8 frame, ``video.labels(t)`` its H x W label image (objects
    1..n). Drawing a 480p frame takes about a millisecond; nothing is stored but the background.
    """

    def __init__(
        self, length: int, height: int, width: int, n_objects: int = 1, seed: int = 0
    ) -> None:
        if length < 1 or height < 16 or width < 16 or not 1 <= n_objects <= 255:
            raise InputError(
                f"synthetic video: need length >= 1, size >= 16x16 and 1..255 objects, got "
                f"{length} frames of {width}x{height} with {n_objects} objects"
            )
        self.length, self.height, self.width = length, height, width
        rng = np.random.default_rng(seed)
        # Smooth colour blotches (upsampled coarse noise) plus fixed fine grain: texture at
        # several scales, as the encoders would see in a real scene.
        coarse = rng.uniform(60, 190, (max(2, height // 32), max(2, width // 32), 3))
        yi = np.linspace(0, coarse.shape[0] - 1, height)
        xi = np.linspace(0, coarse.shape[1] - 1, width)
        y0 = np.floor(yi).astype(int).clip(0, coarse.shape[0] - 2)
        x0 = np.floor(xi).astype(int).clip(0, coarse.shape[1] - 2)
        fy, fx = (yi - y0)[:, None, None], (xi - x0)[None, :, None]
        c = coarse
        bg = (
            c[y0][:, x0] * (1 - fy) * (1 - fx)
            + c[y0 + 1][:, x0] * fy * (1 - fx)
            + c[y0][:, x0 + 1] * (1 - fy) * fx
            + c[y0 + 1][:, x0 + 1] * fy * fx
        )
        bg += rng.normal(0, 12, (height, width, 3))
        self.background = bg.clip(0, 255).astype(np.uint8)
        side = min(height, width)
        # Past 30 objects they shrink (area per object ~ 1/n), so that all of them show on the
        # first frame; up to 30, sizes are those of earlier measurements.
        shrink = min(1.0, (30 / n_objects) ** 0.5)
        self.radius = np.maximum(4.0, side * shrink * rng.uniform(0.08, 0.14, (n_objects, 2)))
        reach = self.radius.max(1)
        # Paths: independent sines in y and x (never leaving the frame, whatever t).
        self.centre = np.stack(
            [rng.uniform(reach, height - reach), rng.uniform(reach, width - reach)], axis=1
        )
        room = np.stack([self.centre[:, 0] - reach, self.centre[:, 1] - reach], axis=1)
        room = np.minimum(room, np.stack([height - reach, width - reach], 1) - self.centre)
        self.amplitude = np.maximum(room, 0) * rng.uniform(0.5, 1.0, (n_objects, 2))
        self.frequency = rng.uniform(0.01, 0.05, (n_objects, 2))
        self.phase = rng.uniform(0, 2 * np.pi, (n_objects, 2))
        self.spin = rng.uniform(-0.05, 0.05, n_objects)
        self.colours = rng.uniform(0, 255, (n_objects, 2, 3))
        self.stripe = side * rng.uniform(0.02, 0.05, n_objects)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, t: int) -> np.ndarray:
        if not 0 <= t < self.length:
            raise IndexError(f"frame {t} of a {self.length}-frame video")
        frame = self.background.copy()
        self._draw(t, frame, None)
        return frame

    def labels(self, t: int) -> np.ndarray:
        out = np.zeros((self.height, self.width), np.uint8)
        self._draw(t, None, out)
        return out

    def _draw(self, t: int, frame: np.ndarray | None, labels: np.ndarray | None) -> None:
        for k in range(len(self.radius)):
            cy, cx = self.centre[k] + self.amplitude[k] * np.sin(
                self.frequency[k] * t + self.phase[k]
            )
            ry, rx = self.radius[k]
            r = max(ry, rx)
            y0, y1 = max(0, int(cy - r)), min(self.height, int(cy + r) + 2)
            x0, x1 = max(0, int(cx - r)), min(self.width, int(cx + r) + 2)
            yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
            a = self.spin[k] * t
            u = (xx - cx) * np.cos(a) + (yy - cy) * np.sin(a)
            v = -(xx - cx) * np.sin(a) + (yy - cy) * np.cos(a)
            inside = (u / rx) ** 2 + (v / ry) ** 2 <= 1.0
            if labels is not None:
                labels[y0:y1, x0:x1][inside] = k + 1
            if frame is not None:
                stripes = (np.sin(u / self.stripe[k]) > 0)[..., None]
                colour = np.where(stripes, self.colours[k, 0], self.colours[k, 1])
                frame[y0:y1, x0:x1][inside] = colour[inside].astype(np.uint8)


class Schedule:
    """Frames ``indices`` of ``video``, in that order: what a fast-forwarded run walks."""

    def __init__(self, video: SyntheticVideo, indices: Sequence[int]) -> None:
        self.video = video
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.video[self.indices[i]]


# --------------------------------------------------------------------------- configurations


@dataclass
class Case:
    """One configuration: one subprocess, one propagation, a row per length."""

    model: str
    memory: str
    objects: int
    resolution: str
    height: int
    width: int
    device: str
    threads: int
    lengths: list[int]
    window: int = 10
    fast_forward: bool = False
    max_seconds: float = 1800.0
    stm_weights: str | None = None
    seed: int = 0
    engine: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        dev = f"{self.device}x{self.threads}" if self.device == "cpu" else self.device
        return f"{self.model} {self.memory} {self.objects}obj {self.resolution} {dev}"


def parse_resolution(text: str) -> tuple[str, int, int]:
    """ "480p" or "WIDTHxHEIGHT" -> (name, height, width)."""
    if text in RESOLUTIONS:
        return (text, *RESOLUTIONS[text])
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise InputError(
            f"unknown resolution {text!r}: use {', '.join(RESOLUTIONS)} or WIDTHxHEIGHT"
        ) from None
    if w < 16 or h < 16:
        raise InputError(f"resolution {text!r} is below 16x16 pixels")
    return (text, h, w)


def cases(args: argparse.Namespace) -> list[Case]:
    lengths = sorted(set(args.lengths))
    if lengths[0] < 2:
        raise InputError("lengths must be at least 2 frames (a reference and a frame to segment)")
    if args.window < 1:
        raise InputError(f"--window must be at least 1 frame, not {args.window}")
    for m in args.models:
        if m not in MODELS:
            from napari_stm.core.weights import available_models

            if m not in available_models():
                raise InputError(f"unknown model {m!r}: choose from {', '.join(MODELS)}")
    devices = args.device or [_default_device()]
    if "cuda" in devices:
        import torch

        if not torch.cuda.is_available():
            raise InputError("--device cuda was requested but CUDA is not available here")
    engine = {
        "max_memory": args.max_memory,
        "max_side": args.max_side,
        "mem_every": args.mem_every,
        "confidence_gate": args.confidence_gate,
        "top_k": args.top_k,
        "amp": not args.no_amp,
        "prefetch": args.prefetch,
        "channels_last": {"auto": None, "on": True, "off": False}[args.channels_last],
        "compile": args.compile,
    }
    out = []
    for model in args.models:
        for res in args.resolutions:
            name, h, w = parse_resolution(res)
            for memory in args.memory:
                for objects in args.objects:
                    for device in devices:
                        for threads in args.threads if device == "cpu" else [args.threads[0]]:
                            out.append(
                                Case(
                                    model=model,
                                    memory=memory,
                                    objects=objects,
                                    resolution=name,
                                    height=h,
                                    width=w,
                                    device=device,
                                    threads=threads,
                                    lengths=lengths,
                                    window=args.window,
                                    fast_forward=args.fast_forward,
                                    max_seconds=args.max_seconds,
                                    stm_weights=args.stm_weights,
                                    seed=args.seed,
                                    engine=engine,
                                )
                            )
    return out


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------- one configuration


def build_model(name: str, device: str, stm_weights: str | None = None) -> tuple[Any, str]:
    """The network to time and where its weights come from (random weights time the same)."""
    from napari_stm.core.weights import get_spec, load_model

    if name == "stm-resnet50":
        if stm_weights is None:
            from napari_stm.core.network import STM

            return STM().eval().requires_grad_(False).to(device), "random"
        if stm_weights.endswith(".py"):
            return _stm_from_recipe(Path(stm_weights), device), "make_weights.py"
        return load_model(name, weights=stm_weights, device=device, progress=False), "checkpoint"
    if name == "stm-lite":
        # Its weights ship in the package: a load failure is a broken install, said as such
        # (timing a random network instead would hide it).
        return load_model(name, device=device, progress=False), "trained"
    spec = get_spec(name)
    if spec.weights_required and spec.weights is None:
        # Nothing ships (stm-lite2: trained by the user): random weights time the same.
        return spec.build().eval().requires_grad_(False).to(device), "random"
    model = load_model(name, device=device, progress=False)
    return model, "imagenet" if name == "lite0-match" else "default"


def _stm_from_recipe(path: Path, device: str) -> Any:
    """STM with the official reference's deterministic test weights (``make_weights.py``)."""
    from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

    from napari_stm.core.network import STM
    from napari_stm.core.weights import load_state_dict

    if not path.is_file():
        raise InputError(f"--stm-weights: {path} not found")
    spec = importlib.util.spec_from_file_location("stm_make_weights", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    state = module.make_state_dict(salt="")
    consume_prefix_in_state_dict_if_present(state, "module.")
    model = STM()
    load_state_dict(model, state, str(path))
    return model.eval().requires_grad_(False).to(device)


def schedule(case: Case) -> list[int]:
    """Video frames the run computes, in order (all of them unless fast-forwarding)."""
    last = case.lengths[-1]
    if not (case.fast_forward and case.memory == "bounded"):
        return list(range(last))
    # Real frames until the memory is surely full (a working frame every mem_every frames)
    # and the first length is passed; then only the timing window before each longer length.
    fill = case.engine.get("mem_every", 5) * (case.engine.get("max_memory", 10) + 1)
    warm = min(last, max(case.lengths[0], fill + case.window))
    keep = set(range(warm))
    for length in case.lengths:
        keep.update(range(max(warm, length - case.window), length))
    return sorted(keep)


def _peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


def measure(case: Case) -> Iterator[dict[str, Any]]:
    """Run one configuration here; yield a row per length (or why it was not reached)."""
    import torch

    from napari_stm.core.engine import PropagationConfig, Propagator

    torch.set_num_threads(case.threads)
    device = torch.device(case.device)
    cuda = device.type == "cuda"
    model, weights = build_model(case.model, case.device, case.stm_weights)
    options = {k: v for k, v in case.engine.items() if v is not None}
    config = PropagationConfig(memory=case.memory, device=case.device, **options)
    video = SyntheticVideo(case.lengths[-1], case.height, case.width, case.objects, case.seed)
    order = schedule(case)
    prop = Propagator(model, Schedule(video, order), config)
    reference = video.labels(0)
    missing = case.objects - (len(np.unique(reference)) - 1)
    if missing:
        raise InputError(f"{missing} synthetic objects are hidden in frame 0: use a larger frame")
    prop.add_reference(0, reference)
    # What reading and normalising a frame costs: the part prefetching can hide.
    reads = []
    for t in range(1, min(6, len(order))):
        t0 = time.perf_counter()
        prop.reader.tensor(t, prop.geo, device)
        reads.append(time.perf_counter() - t0)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_model = _peak_rss_mb()
    base = {
        "model": case.model,
        "weights": weights,
        "memory": case.memory,
        "objects": case.objects,
        "resolution": case.resolution,
        "height": case.height,
        "width": case.width,
        # The size the network saw: frames are resized to the model's working size (or
        # --max-side) inside the engine.
        "worked": f"{prop.geo.inner[1]}x{prop.geo.inner[0]}",
        "device": case.device,
        "threads": case.threads if not cuda else "",
        "read_ms": round(1000 * float(np.median(reads)), 2) if reads else "",
        "rss_model_mb": round(rss_model, 1),
        "options": _options_text(options),
    }
    lengths = list(case.lengths)
    times: dict[int, float] = {}
    # Processor time of the whole process (all its threads): on a shared machine it says what
    # a frame costs when wall-clock time also counts waiting for a free core.
    cpu: dict[int, float] = {}
    first_ms = None
    start = time.perf_counter()
    last, last_cpu = start, time.process_time()
    for i, res in enumerate(prop.propagate("forward")):
        now, now_cpu = time.perf_counter(), time.process_time()
        t = order[i]
        if res.is_reference:
            last, last_cpu = time.perf_counter(), time.process_time()
            continue
        times[t] = now - last
        cpu[t] = now_cpu - last_cpu
        if first_ms is None:
            first_ms = 1000 * times[t]
        if t + 1 in lengths:
            length = t + 1
            lengths.remove(length)
            frames = [f for f in range(max(1, length - case.window), length) if f in times]
            ms = 1000 * np.array([times[f] for f in frames])
            cpu_ms = 1000 * np.array([cpu[f] for f in frames])
            yield {
                **base,
                "frame": length,
                "ran": i + 1,
                "window": len(frames),
                "ms_median": round(float(np.median(ms)), 2),
                "ms_p90": round(float(np.percentile(ms, 90)), 2),
                "fps": round(1000 / float(np.median(ms)), 3),
                "cpu_ms_median": round(float(np.median(cpu_ms)), 2),
                "first_ms": round(first_ms, 1),
                "memory_frames": prop.memory_frames,
                "bank_mb": round(prop.memory_nbytes / 2**20, 2),
                "rss_peak_mb": round(_peak_rss_mb(), 1),
                "cuda_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else "",
                "load1": round(os.getloadavg()[0], 2),
                "status": "ok",
            }
        if lengths and now - start > case.max_seconds:
            for length in lengths:
                yield {
                    **base,
                    "frame": length,
                    "ran": i + 1,
                    "load1": round(os.getloadavg()[0], 2),
                    "status": f"not reached: time limit {case.max_seconds:.0f} s at frame {t}",
                }
            return
        last, last_cpu = time.perf_counter(), time.process_time()


def _options_text(options: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(options.items()))


def child_main() -> None:
    """Subprocess entry: a Case as JSON on stdin, rows as marked JSON lines on stdout."""
    from napari_stm.core.host_memory import reuse_freed_memory

    reuse_freed_memory()  # as the napari-stm command runs: the numbers are what users get
    case = Case(**json.loads(sys.stdin.read()))
    try:
        for row in measure(case):
            print(ROW_MARK + json.dumps(row), flush=True)
    except Exception as err:  # reported as the configuration's status, the run goes on
        print(ROW_MARK + json.dumps({"status": f"error: {type(err).__name__}: {err}"}), flush=True)


def run_case(case: Case, log: Any = None) -> list[dict[str, Any]]:
    """Run one configuration in a fresh subprocess (its own peak memory)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(case.threads), MKL_NUM_THREADS=str(case.threads))
    cmd = [sys.executable, "-c", "from napari_stm.bench import child_main; child_main()"]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, env=env
        )
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(asdict(case)))
        proc.stdin.close()
        # The child keeps its own time limit; this one only catches a hang (e.g. in a compile).
        deadline = time.monotonic() + case.max_seconds + 900
        try:
            for line in proc.stdout:
                if line.startswith(ROW_MARK):
                    row = json.loads(line[len(ROW_MARK) :])
                    rows.append(row)
                    if log is not None:
                        _log_row(case, row, log)
                if time.monotonic() > deadline:
                    break
        finally:
            if proc.poll() is None:
                try:
                    proc.wait(timeout=max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if proc.returncode and not rows:
            err.seek(0)
            tail = err.read().strip().splitlines()[-3:]
            rows.append({"status": f"error: exit {proc.returncode}: {' | '.join(tail)}"})
    return [_complete(case, row) for row in rows]


def _complete(case: Case, row: dict[str, Any]) -> dict[str, Any]:
    """A row with every column, its configuration filled in even for an error."""
    filled = {
        "model": case.model,
        "memory": case.memory,
        "objects": case.objects,
        "resolution": case.resolution,
        "height": case.height,
        "width": case.width,
        "device": case.device,
        "threads": case.threads if case.device == "cpu" else "",
    }
    return {c: row.get(c, filled.get(c, "")) for c in COLUMNS}


def _log_row(case: Case, row: dict[str, Any], log: Any) -> None:
    if row.get("status") == "ok":
        print(
            f"  {case.label}: frame {row['frame']}: {row['ms_median']:.0f} ms/frame "
            f"(p90 {row['ms_p90']:.0f}), peak RSS {row['rss_peak_mb']:.0f} MB, "
            f"{row['memory_frames']} memory frames",
            file=log,
            flush=True,
        )
    else:
        print(f"  {case.label}: {row.get('status')}", file=log, flush=True)


# --------------------------------------------------------------------------- reporting

_TABLE = (
    ("model", "model", 12),
    ("memory", "memory", 8),
    ("objects", "obj", 3),
    ("resolution", "res", 7),
    ("worked", "worked", 9),
    ("device", "dev", 4),
    ("threads", "thr", 3),
    ("frame", "frame", 6),
    ("ran", "ran", 6),
    ("ms_median", "ms/frame", 9),
    ("ms_p90", "p90 ms", 9),
    ("fps", "fps", 7),
    ("cpu_ms_median", "cpu ms", 8),
    ("memory_frames", "mem fr", 6),
    ("bank_mb", "bank MB", 8),
    ("rss_peak_mb", "RSS MB", 8),
    ("cuda_peak_mb", "CUDA MB", 8),
    ("load1", "load", 5),
)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width text table of the rows (errors and unreached lengths as notes)."""
    head = " ".join(f"{title:>{w}}" for _, title, w in _TABLE)
    lines = [head, "-" * len(head)]
    notes = []
    for row in rows:
        if row.get("status") != "ok":
            notes.append(
                f"{row.get('model')} {row.get('memory')} {row.get('objects')}obj "
                f"{row.get('resolution')} frame {row.get('frame') or '-'}: {row.get('status')}"
            )
            continue
        cells = []
        for key, _, w in _TABLE:
            v = row.get(key, "")
            if isinstance(v, float):
                v = f"{v:.3g}" if key == "fps" else f"{v:.1f}" if key != "load1" else f"{v:.2f}"
            cells.append(f"{str(v):>{w}}")
        lines.append(" ".join(cells))
    return "\n".join(lines + notes)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in COLUMNS})


def write_plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Two panels against frame index: time per frame (median, p90 bars) and peak RSS."""
    # A Figure of its own, not pyplot: no global backend switch in a process that has one.
    from matplotlib.figure import Figure
    from matplotlib.ticker import ScalarFormatter

    fig = Figure(figsize=(12, 4.5))
    ax_t, ax_m = fig.subplots(1, 2)
    series: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("status") == "ok":
            dev = row["device"] + (f"x{row['threads']}" if row["threads"] != "" else "")
            label = f"{row['model']} {row['memory']} {row['objects']}obj {row['resolution']} {dev}"
            series.setdefault(label, []).append(row)
    for label, pts in series.items():
        pts.sort(key=lambda r: int(r["frame"]))
        x = [int(r["frame"]) for r in pts]
        med = np.array([float(r["ms_median"]) for r in pts])
        p90 = np.array([float(r["ms_p90"]) for r in pts])
        style = "--" if pts[0]["memory"] == "official" else "-"
        line = ax_t.errorbar(
            x, med, yerr=[np.zeros_like(med), p90 - med], fmt=style + "o", capsize=3, label=label
        )
        ax_m.plot(x, [float(r["rss_peak_mb"]) for r in pts], style + "o", color=line[0].get_color())
    for ax, title in ((ax_t, "time per frame (median; bar to p90), ms"), (ax_m, "peak RSS, MB")):
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlabel("frame (video length)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    if series:
        ax_t.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# --------------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``napari-stm bench``."""
    p.description = (
        "Time per frame (median, p90) and peak memory against video length, objects, "
        "resolution, model, memory mode and device, on synthetic frames drawn on the fly. "
        "Each configuration runs in its own subprocess."
    )
    p.add_argument("--out", default="bench_results", help="folder for bench.csv/.png/.txt")
    p.add_argument("--overwrite", action="store_true", help="replace earlier results in --out")
    g = p.add_argument_group("what to run (each a list; every combination runs)")
    g.add_argument("--models", nargs="+", default=["stm-lite"], help=", ".join(MODELS))
    g.add_argument(
        "--lengths",
        nargs="+",
        type=int,
        default=[100, 1000, 5000],
        help="video lengths: time and memory are measured when these frames are reached",
    )
    g.add_argument("--objects", nargs="+", type=int, default=[1])
    g.add_argument(
        "--resolutions", nargs="+", default=["480p"], help="480p, 1080p, ... or WIDTHxHEIGHT"
    )
    g.add_argument(
        "--memory", nargs="+", default=["bounded", "official"], choices=["bounded", "official"]
    )
    g.add_argument("--device", nargs="+", default=None, choices=["cpu", "cuda"])
    g.add_argument("--threads", nargs="+", type=int, default=[2], help="CPU threads (torch)")
    g = p.add_argument_group("measurement")
    g.add_argument(
        "--window", type=int, default=10, help="frames timed before each length (default 10)"
    )
    g.add_argument(
        "--fast-forward",
        action="store_true",
        help="bounded memory: run the first frames for real, then only the window before each "
        "length (the rows' 'ran' column says how many frames were computed)",
    )
    g.add_argument(
        "--max-seconds",
        type=float,
        default=1800.0,
        help="per configuration; longer lengths are reported as not reached (default 1800)",
    )
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--stm-weights",
        default=None,
        help="stm-resnet50 weights: a checkpoint, or the official reference's make_weights.py "
        "(default: random initialisation; the timing is the same)",
    )
    g = p.add_argument_group("engine options")
    g.add_argument("--max-memory", type=int, default=10)
    g.add_argument("--mem-every", type=int, default=5)
    g.add_argument(
        "--max-side",
        type=int,
        default=None,
        help="work at most this many pixels a side (0: full size; default: the model's working "
        "size, 576 for stm-lite)",
    )
    g.add_argument(
        "--confidence-gate",
        type=float,
        default=0.0,
        help="default 0: every mem-every frame enters memory, the worst case for time (random "
        "weights would otherwise keep the memory emptier than a trained model does)",
    )
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--prefetch", type=int, default=None, help="frames read ahead (engine default)")
    g.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto")
    g.add_argument("--compile", action="store_true", help="torch.compile the network")
    g.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")


OUTPUTS = ("bench.csv", "bench.png", "bench.txt")


def run(args: argparse.Namespace) -> int:
    """``napari-stm bench``: run every configuration, print the table, write CSV/PNG/text."""
    todo = cases(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out '{out}' is a file; give a folder")
    existing = [n for n in OUTPUTS if (out / n).exists()]
    if existing and not args.overwrite:
        raise InputError(f"'{out}' already holds {', '.join(existing)}; pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    print(
        f"{len(todo)} configuration(s); load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
        f"on {os.cpu_count()} CPUs",
        file=sys.stderr,
    )
    rows: list[dict[str, Any]] = []
    for case in todo:
        print(f"{case.label} ...", file=sys.stderr, flush=True)
        rows.extend(run_case(case, log=sys.stderr))
        # Written after every configuration: a long run interrupted keeps what it measured.
        write_csv(rows, out / "bench.csv")
    table = format_table(rows)
    load = os.getloadavg()
    table += f"\nload average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    print(table)
    (out / "bench.txt").write_text(table + "\n")
    write_plot(rows, out / "bench.png")
    print(f"wrote {out / 'bench.csv'}, {out / 'bench.png'}, {out / 'bench.txt'}", file=sys.stderr)
    failed = [r for r in rows if str(r["status"]).startswith("error")]
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="napari-stm bench")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except InputError as err:
        print(f"napari-stm bench: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
