"""Many objects through the CVAT tracker: time per frame for K shapes in one request.

    python benchmarks/cvat_objects.py --objects 1 10 30 100 --frames 4 [--path nuclio agent]

CVAT keeps one state per shape, so the function runs one tracker per object; a request with K
states steps K trackers on one frame. The frames are ``napari-stm bench``'s synthetic 480p
video (textured ellipses); the first frame starts K sessions from the ground truth masks
(timed: "start ms"), the next ``--frames`` are continue calls, timed (median). ``--shared``
on/off compares one query encoding per request (what the handler does) with one per tracker.

``--path agent`` drives the cvat-sdk agent function (``cvat_function/agent.py``) as cvat-cli's
agent does: ``preprocess_image`` once per request, then ``init_tracking_state`` or ``track``
once per shape, in the request's order (``--shared`` does not apply there).

``--rounds R`` runs the object counts R times over, one after the other in one process, and
prints each round's ratio to one object and their median: on a shared machine the one-object
time alone drifts by a quarter between runs, and a K-object run next to its own one-object
run shares that run's conditions.

``--interleave`` starts every object count's sessions first, then makes their continue calls
one after the other frame by frame (the order turning each frame) and prints each frame's
ratio to the first count: each K-object call then has one-object calls right beside it, where
``--rounds`` runs a whole count before the next (this machine's speed drifts within minutes).

``--tolerance`` also compares, over the same frames, the trackers stepped as both paths step
them (shared network calls: ``step_trackers``, asked one at a time with the rest computed
ahead, as the agent does) with each tracker stepped on its own (``Tracker.step``): the largest
probability difference and the share of equal labels.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", nargs="+", type=int, default=[1, 10, 30, 100])
    parser.add_argument("--frames", type=int, default=4, help="continue calls timed")
    parser.add_argument("--resolution", default="480p")
    parser.add_argument("--model", default=None)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--shared", choices=["on", "off", "both"], default="both")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--path", nargs="+", choices=["nuclio", "agent"], default=["nuclio"])
    parser.add_argument("--tolerance", action="store_true", help="batched against alone")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the object counts")
    parser.add_argument(
        "--interleave", action="store_true", help="object counts' calls frame by frame"
    )
    args = parser.parse_args()

    import torch

    from napari_stm.bench import parse_resolution
    from napari_stm.core.weights import default_model_name, load_model

    torch.set_num_threads(args.threads)
    name = args.model or default_model_name()
    model = load_model(name, device="cpu")
    _, height, width = parse_resolution(args.resolution)
    modes = {"on": [True], "off": [False], "both": [True, False]}[args.shared]
    print(
        f"model {name}, {args.resolution} ({width}x{height}), {args.threads} thread(s), "
        f"median of {args.frames} continue calls"
    )
    if args.interleave:
        _interleaved(args, model, width, height)
        return
    tolerances: list[tuple] = []
    ratios: dict[tuple, list[float]] = {}
    for r in range(args.rounds):
        _round(args, model, width, height, modes, ratios, tolerances if r == 0 else None)
    if args.rounds > 1:
        print("\nx one object (wall time) in each round, and the median over rounds:")
        print("| path | objects | rounds | median |")
        print("|---|---|---|---|")
        for (path, k), xs in ratios.items():
            each = ", ".join(f"{x:.1f}" for x in xs)
            print(f"| {' '.join(str(p) for p in path)} | {k} | {each} | {np.median(xs):.1f} |")
    if tolerances:
        print("\nshared network calls against each tracker alone, every tracker and frame:")
        print("| objects | max abs prob diff | labels equal, mean % | lowest % |")
        print("|---|---|---|---|")
        for k, diff, mean, low in tolerances:
            print(f"| {k} | {diff:.2g} | {mean:.4f} | {low:.4f} |")


def _round(
    args, model, width: int, height: int, modes: list, ratios: dict, tolerances: list | None
) -> None:
    """One pass over the object counts: a table, each count's ratio added to ``ratios``
    (``tolerances``: where to add the ``--tolerance`` check, None to skip it)."""
    print(
        "| path | objects | shared query | start ms | ms per frame (cpu ms) | ms per object "
        "| x one object (by cpu ms) |"
    )
    print("|---|---|---|---|---|---|---|")
    base: dict[tuple, float] = {}
    for k in args.objects:
        video, shapes, images = _inputs(args, width, height, k)
        if args.tolerance and tolerances is not None:
            tolerances.append((k, *_tolerance(model, video, k, args.frames)))
        if "agent" in args.path:
            start, ms, cpu = _agent(model, images, shapes)
            ratios.setdefault((("agent",), k), []).append(
                _row(base, ("agent",), k, "yes", start, ms, cpu)
            )
        if "nuclio" not in args.path:
            continue
        for shared in modes:
            start, step = _nuclio_runner(model, images, shapes, shared)
            times, cpus = zip(*(step(t) for t in range(1, args.frames + 1)), strict=True)
            ms, cpu = 1000 * float(np.median(times)), 1000 * float(np.median(cpus))
            path = ("nuclio", "shared" if shared else "own query")
            ratios.setdefault((path, k), []).append(
                _row(base, path, k, "yes" if shared else "no", start, ms, cpu)
            )


def _inputs(args, width: int, height: int, k: int) -> tuple:
    """The bench video of ``k`` objects: (video, its first frame's shapes, JPEG frames)."""
    from cvat_sdk.masks import encode_mask

    from napari_stm.bench import SyntheticVideo

    video = SyntheticVideo(args.frames + 1, height, width, k, args.seed)
    labels = video.labels(0)
    shapes = [{"type": "mask", "points": encode_mask(labels == i)} for i in range(1, k + 1)]
    return video, shapes, [_b64(video[t]) for t in range(args.frames + 1)]


def _nuclio_runner(model, images: list[str], shapes: list[dict], shared: bool) -> tuple:
    """The Nuclio handler started on ``images[0]`` with ``shapes``: (the start request's ms, a
    function that makes the continue call on ``images[t]`` and returns its wall and processor
    seconds)."""
    from cvat_function.limits import Limits
    from cvat_function.nuclio.model_handler import ModelHandler
    from cvat_function.sessions import MemorySessionStore
    from napari_stm.core.engine import PropagationConfig

    k = len(shapes)
    handler = ModelHandler(
        model,
        PropagationConfig(),
        MemorySessionStore(max_sessions=4 * k, max_bytes=1 << 40),
        limits=Limits(max_objects=max(128, k)),
    )
    handler.share_query = shared
    t0 = time.perf_counter()
    status, reply = handler.handle({"image": images[0], "shapes": shapes})
    start = 1000 * (time.perf_counter() - t0)
    assert status == 200, reply
    states = reply["states"]

    def step(t: int) -> tuple[float, float]:
        nonlocal states
        body = json.dumps({"image": images[t], "shapes": [None] * k, "states": states})
        t0, c0 = time.perf_counter(), time.process_time()
        status, reply = handler.handle(body.encode())
        took = (time.perf_counter() - t0, time.process_time() - c0)
        assert status == 200, reply
        states = reply["states"]
        return took

    return start, step


def _interleaved(args, model, width: int, height: int) -> None:
    """``--interleave``: every object count's continue calls one after the other, frame by
    frame (the order turning each frame), so that each K-object call has one-object calls
    beside it under the same conditions; each frame's ratio to the first count."""
    runners: dict[tuple, dict[int, Callable]] = {}
    for k in args.objects:
        _, shapes, images = _inputs(args, width, height, k)
        if "agent" in args.path:
            runners.setdefault(("agent",), {})[k] = _agent_runner(model, images, shapes)[1]
        if "nuclio" in args.path:
            runners.setdefault(("nuclio", "shared"), {})[k] = _nuclio_runner(
                model, images, shapes, True
            )[1]
    calls = [(path, k) for path, by_k in runners.items() for k in by_k]
    times: dict[tuple, list[float]] = {c: [] for c in calls}
    for t in range(1, args.frames + 1):
        turn = t % len(calls)
        for path, k in calls[turn:] + calls[:turn]:
            times[(path, k)].append(runners[path][k](t)[0])
    print("\ncalls interleaved frame by frame: ms a frame, and x the first count in each frame")
    print("| path | objects | median ms | min-max ms | x one object, median | min-max |")
    print("|---|---|---|---|---|---|")
    for path, by_k in runners.items():
        first = np.array(times[(path, min(by_k))])
        for k in by_k:
            ms = 1000 * np.array(times[(path, k)])
            x = ms / (1000 * first)
            print(
                f"| {' '.join(path)} | {k} | {np.median(ms):.0f} | {ms.min():.0f}-{ms.max():.0f} "
                f"| {np.median(x):.1f} | {x.min():.1f}-{x.max():.1f} |",
                flush=True,
            )


def _tolerance(model, video, k: int, frames: int) -> tuple[float, float, float]:
    """Trackers stepped as the agent steps them against each on its own, over ``frames``."""
    from napari_stm.core.engine import PropagationConfig, SharedFrame, Tracker, step_trackers

    def start() -> list[Tracker]:
        trackers = [Tracker(model, PropagationConfig(), keep_sources=False) for _ in range(k)]
        frame = SharedFrame(video[0])
        for i, tr in enumerate(trackers):
            tr.step(frame, (video.labels(0) == i + 1).astype(np.uint8))
        return trackers

    alone, together = start(), start()
    diff, equal = 0.0, []
    for t in range(1, frames + 1):
        frame = SharedFrame(video[t])
        want = [tr.step(frame) for tr in alone]
        frame = SharedFrame(video[t])
        for tr, (wl, wp) in zip(together, want, strict=True):
            (got,) = step_trackers([tr], frame, ahead=together)
            gl, gp = got.labels, got.probs
            diff = max(diff, float(np.abs(wp - gp).max()))
            equal.append(100 * float((wl == gl).mean()))
    return diff, float(np.mean(equal)), min(equal)


def _row(
    base: dict, path: tuple, k: int, shared: str, start: float, ms: float, cpu: float
) -> float:
    """Print one table row; return the wall time's ratio to the path's first object count."""
    # Processor time as well: on a shared machine other jobs stretch wall time, not it.
    wall, proc = base.setdefault(path, (ms, cpu))  # the first (smallest) object count
    print(
        f"| {path[0]} | {k} | {shared} | {start:.0f} | {ms:.0f} ({cpu:.0f}) | {ms / k:.1f} "
        f"| {ms / wall:.1f} ({cpu / proc:.1f}) |",
        flush=True,
    )
    return ms / wall


def _agent(model, images: list[str], shapes: list[dict]) -> tuple[float, float, float]:
    """The agent function driven as cvat-cli's agent drives it: the start request's ms and
    the median continue request's ms and processor ms."""
    start, step = _agent_runner(model, images, shapes)
    times, cpus = zip(*(step(t) for t in range(1, len(images))), strict=True)
    return start, 1000 * float(np.median(times)), 1000 * float(np.median(cpus))


def _agent_runner(model, images: list[str], shapes: list[dict]) -> tuple:
    """The agent function started as cvat-cli's agent starts it (``agent_driver_tracking``:
    one ``preprocess_image`` per request, then one call per shape, in order): (the start
    request's ms, a function that makes the continue request on ``images[t]`` and returns its
    wall and processor seconds)."""
    import base64
    import io

    import PIL.Image
    from cvat_sdk.auto_annotation import (
        TrackableShape,
        TrackingFunctionContext,
        TrackingFunctionShapeContext,
    )

    from cvat_function.agent import StmTrackingFunction

    class Context(TrackingFunctionContext):
        pass

    class ShapeContext(TrackingFunctionShapeContext):
        original_shape_type = "mask"

    function = StmTrackingFunction(model)
    pil = [PIL.Image.open(io.BytesIO(base64.b64decode(b))) for b in images]
    for image in pil:
        image.load()
    t0 = time.perf_counter()
    pp = function.preprocess_image(Context(), pil[0])
    states = [
        function.init_tracking_state(ShapeContext(), pp, TrackableShape(**shape))
        for shape in shapes
    ]
    start = 1000 * (time.perf_counter() - t0)

    def step(t: int) -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        pp = function.preprocess_image(Context(), pil[t])
        for state in states:
            function.track(ShapeContext(), pp, state)
        return time.perf_counter() - t0, time.process_time() - c0

    return start, step


def _b64(frame: np.ndarray) -> str:
    import base64
    import io

    import PIL.Image

    buf = io.BytesIO()
    PIL.Image.fromarray(frame).save(buf, format="JPEG", quality=95)
    return base64.b64encode(buf.getvalue()).decode("ascii")


if __name__ == "__main__":
    sys.exit(main())
