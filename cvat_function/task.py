"""``napari-stm cvat fill-task``: fill the masks of a whole CVAT task through cvat-sdk.

Reads the task's frames and the masks and polygons already drawn on it, runs the propagation
engine in both directions from every annotated frame, and uploads one shape per object per
frame. Open-source CVAT's UI offers trackers for rectangles only, so this is the way to get
masks across a task there.

Which shapes are whose:

- Shapes this command creates carry ``source: "auto"`` and a group id in a reserved range,
  ``GROUP_BASE + object`` (``GROUP_BASE`` spells "STM" in ASCII). CVAT stores both fields as
  given, so a later run recognises its own shapes; ``--replace`` deletes exactly those (after
  the new ones are uploaded, so a failed run loses nothing). Every other shape (drawn by a
  person, imported, made by another model) is read, never changed.
- Objects: shapes sharing a label and a group (CVAT's G key) are one object, on any frame.
  Ungrouped shapes of a label are one object across frames when each annotated frame holds one
  of them; several ungrouped shapes of a label on one frame are separate objects when that is
  the label's only annotated frame, and an error otherwise (which is which would be a guess).
- A frame where an object is drawn is a reference for that object only: fixing one object on
  a frame says nothing about the others there. Objects drawn on the same frames propagate
  together (one engine run per distinct set of frames).
- Only shapes are read and created; tracks are left alone.
"""

from __future__ import annotations

import argparse
import getpass
import io
import os
import sys
from collections import OrderedDict, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image

from cvat_function.shapes import SUPPORTED_TYPES, ShapeError, mask_from_shape, shape_points
from napari_stm.core.engine import PropagationConfig, Propagator
from napari_stm.core.errors import CheckpointError, InputError
from napari_stm.core.model import VOSNetwork

#: group ids GROUP_BASE + 1 .. GROUP_BASE + MAX_OBJECTS mark shapes made by this command
GROUP_BASE = 0x53544D00  # b"STM\0", inside CVAT's positive 32-bit group range
#: object ids the engine handles in one run
MAX_OBJECTS = 255
SOURCE = "auto"
#: decoded frames kept, so the two passes of "both" do not download a frame twice
FRAME_CACHE = 48


class FillTaskError(Exception):
    """A task, option or annotation fill-task cannot work with; the message says what to do."""


# --------------------------------------------------------------------------- command line


def parse_frames(text: str) -> tuple[int | None, int | None]:
    """``A:B`` (inclusive, either side may be left out) -> (A, B)."""
    a, sep, b = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"--frames must look like A:B (e.g. 10:250), not {text!r}")
    try:
        first = int(a) if a.strip() else None
        last = int(b) if b.strip() else None
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--frames A:B needs frame numbers, not {text!r}"
        ) from None
    if (first is not None and first < 0) or (last is not None and last < 0):
        raise argparse.ArgumentTypeError(f"--frames {text}: frame numbers start at 0")
    if first is not None and last is not None and last < first:
        raise argparse.ArgumentTypeError(f"--frames {text}: the range is empty")
    return first, last


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``napari-stm cvat fill-task``."""
    parser.description = (
        "Fill masks across a CVAT task from the masks and polygons already drawn on it. "
        "Credentials: CVAT_ACCESS_TOKEN, or CVAT_USER and CVAT_PASSWORD, else a prompt."
    )
    parser.add_argument("--url", required=True, help="CVAT server, e.g. http://localhost:8080")
    parser.add_argument("--task", type=int, required=True, help="task id")
    parser.add_argument(
        "--labels", nargs="+", metavar="NAME", help="only these labels (default: all)"
    )
    parser.add_argument(
        "--frames",
        type=parse_frames,
        metavar="A:B",
        help="only frames A to B, both included; only annotations inside are used",
    )
    parser.add_argument(
        "--as",
        dest="shape_type",
        choices=SUPPORTED_TYPES,
        default="mask",
        help="shape type to create (default: mask)",
    )
    parser.add_argument(
        "--replace",
        action="store_true",
        help="delete the shapes an earlier fill-task run created (and only those)",
    )
    parser.add_argument("--org", metavar="SLUG", help="organization of the task")
    parser.add_argument("--model", help="model name (default: the best available)")
    parser.add_argument("--weights", help="checkpoint path or URL for the model")
    parser.add_argument("--device", help="cpu, cuda, ... (default: CUDA when available)")
    parser.add_argument(
        "--max-side",
        type=int,
        help="segment at most this many pixels a side (0: full size; default: the model's "
        "working size, 512 for stm-lite)",
    )
    parser.add_argument(
        "--batch", type=int, default=20, help="frames per upload request (default: 20)"
    )


def credentials(env: dict[str, str] | None = None) -> Any:
    """cvat-sdk credentials from the environment, else asked for (the password never echoed)."""
    from cvat_sdk.core.client import AccessTokenCredentials, PasswordCredentials

    env = dict(os.environ if env is None else env)
    token = env.get("CVAT_ACCESS_TOKEN")
    if token:
        return AccessTokenCredentials(token)
    user = env.get("CVAT_USER")
    password = env.get("CVAT_PASSWORD")
    if not (user and password):
        if not sys.stdin.isatty():
            raise FillTaskError(
                "no CVAT credentials: set CVAT_ACCESS_TOKEN, or CVAT_USER and CVAT_PASSWORD"
            )
        user = user or input("CVAT user: ")
        password = password or getpass.getpass(f"CVAT password for {user}: ")
    return PasswordCredentials(user, password)


def connect(url: str, creds: Any, org: str | None = None) -> Any:
    """A logged-in cvat-sdk Client."""
    from cvat_sdk import Client
    from cvat_sdk.core.client import Config

    client = Client(url, config=Config(), check_server_version=False)
    client.login(creds)
    client.check_server_version(fail_if_unsupported=False)
    if org:
        client.organization_slug = org
    return client


def run(args: argparse.Namespace) -> int:
    """Run ``fill-task`` from parsed arguments; the exit status."""
    import urllib3
    from cvat_sdk.core.exceptions import CvatSdkException
    from cvat_sdk.exceptions import ApiException

    from napari_stm.core.weights import default_model_name, load_model

    try:
        first, last = args.frames if args.frames else (None, None)
        client = connect(args.url, credentials(), args.org)
        model = load_model(
            args.model or default_model_name(), weights=args.weights, device=args.device
        )
        report = fill_task(
            client,
            args.task,
            model,
            PropagationConfig(max_side=args.max_side),
            labels=args.labels,
            first=first,
            last=last,
            shape_type=args.shape_type,
            replace=args.replace,
            batch=args.batch,
        )
    except (FillTaskError, InputError, CheckpointError, ShapeError) as e:
        print(f"napari-stm cvat fill-task: error: {e}", file=sys.stderr)
        return 2
    except ApiException as e:
        print(
            f"napari-stm cvat fill-task: the CVAT server answered {e.status} {e.reason}"
            f"{': ' + _short(e.body) if e.body else ''}",
            file=sys.stderr,
        )
        return 1
    except CvatSdkException as e:  # e.g. a malformed URL
        print(f"napari-stm cvat fill-task: error: {e}", file=sys.stderr)
        return 2
    except (OSError, urllib3.exceptions.HTTPError) as e:
        reason = getattr(e, "reason", None) or e
        print(f"napari-stm cvat fill-task: cannot reach {args.url}: {reason}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


def _short(body: Any, limit: int = 300) -> str:
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
    return text if len(text) <= limit else text[:limit] + "..."


# --------------------------------------------------------------------------- the work


@dataclass
class FillReport:
    task: int
    objects: int
    references: list[int]
    frames: int
    created: int
    removed: int

    def summary(self) -> str:
        refs = ", ".join(map(str, self.references[:10])) + (
            ", ..." if len(self.references) > 10 else ""
        )
        return (
            f"task {self.task}: {self.objects} object(s) from annotated frame(s) {refs}; "
            f"{self.created} shape(s) created on {self.frames} frame(s), "
            f"{self.removed} shape(s) of an earlier run removed"
        )


def type_of(shape: Any) -> str:
    """A shape's type as text (cvat-sdk models hold a ShapeType, not a str)."""
    return str(getattr(shape.type, "value", shape.type))


def is_ours(shape: Any) -> bool:
    """Whether a CVAT shape was created by fill-task."""
    group = getattr(shape, "group", None) or 0
    return (
        getattr(shape, "source", None) == SOURCE
        and GROUP_BASE < group <= GROUP_BASE + MAX_OBJECTS
        and type_of(shape) in SUPPORTED_TYPES
    )


@dataclass(frozen=True)
class _Object:
    label_id: int
    key: tuple


def identify_objects(shapes: Sequence[Any]) -> dict[int, _Object]:
    """Shape id -> object, by the rules in the module docstring."""
    out: dict[int, _Object] = {}
    ungrouped: dict[int, list[Any]] = defaultdict(list)
    for s in shapes:
        if s.group:
            out[s.id] = _Object(s.label_id, ("group", s.label_id, s.group))
        else:
            ungrouped[s.label_id].append(s)
    for label_id, group in ungrouped.items():
        per_frame: dict[int, int] = defaultdict(int)
        for s in group:
            per_frame[s.frame] += 1
        if len(per_frame) == 1:
            for s in group:
                out[s.id] = _Object(label_id, ("shape", s.id))
        elif max(per_frame.values()) == 1:
            for s in group:
                out[s.id] = _Object(label_id, ("label", label_id))
        else:
            frame = next(f for f, n in sorted(per_frame.items()) if n > 1)
            raise FillTaskError(
                f"frame {frame} holds {per_frame[frame]} ungrouped shapes of label #{label_id} "
                f"and the label is annotated on {len(per_frame)} frames, so which shape is which "
                "object across frames is unknown: group the shapes of each object (select them, "
                "press G in CVAT) and run again"
            )
    return out


class TaskFrames:
    """A task's frames, fetched from the server one by one as the engine reads them."""

    def __init__(self, task: Any, n: int, cache: int = FRAME_CACHE) -> None:
        self.task = task
        self.n = n
        self.cache_size = cache
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, t: int) -> np.ndarray:
        t = int(t)
        if not 0 <= t < self.n:
            raise IndexError(t)
        if t in self._cache:
            self._cache.move_to_end(t)
            return self._cache[t]
        try:
            data = self.task.get_frame(t, quality="original").read()
            with PIL.Image.open(io.BytesIO(data)) as im:
                frame = np.asarray(im.convert("RGB"))
        except Exception as e:  # the engine reports OSError as "frame t could not be read"
            raise OSError(f"{type(e).__name__}: {e}") from None
        self._cache[t] = frame
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return frame


def _frame_size(meta: Any) -> tuple[int, int]:
    frames = list(meta.frames)
    if not frames:
        raise FillTaskError("the task has no frames")
    sizes = {(f.height, f.width) for f in frames}
    if len(sizes) > 1:
        (h0, w0), (h1, w1) = sorted(sizes)[:2]
        raise FillTaskError(
            f"the task's frames have different sizes ({w0}x{h0}, {w1}x{h1}, ...): fill-task "
            "propagates through frames of one size (a video, or a task per image size)"
        )
    return sizes.pop()


def fill_task(
    client: Any,
    task_id: int,
    model: VOSNetwork,
    config: PropagationConfig | None = None,
    labels: Iterable[str] | None = None,
    first: int | None = None,
    last: int | None = None,
    shape_type: str = "mask",
    replace: bool = False,
    batch: int = 20,
    progress: bool = True,
) -> FillReport:
    """Fill task ``task_id``; see the module docstring. Returns what was done."""
    from cvat_sdk import models
    from cvat_sdk.core.proxies.annotations import AnnotationUpdateAction
    from tqdm.auto import tqdm

    if shape_type not in SUPPORTED_TYPES:
        raise FillTaskError(f"shape type must be one of {SUPPORTED_TYPES}, not {shape_type!r}")
    task = client.tasks.retrieve(task_id)
    meta = task.get_meta()
    n = int(meta.size)
    height, width = _frame_size(meta)
    deleted = set(getattr(meta, "deleted_frames", None) or [])
    first = 0 if first is None else first
    last = n - 1 if last is None else min(last, n - 1)
    if first > last:
        raise FillTaskError(f"--frames starts at {first} but the task has frames 0..{n - 1}")

    task_labels = {lab.name: lab.id for lab in task.get_labels()}
    if labels:
        unknown = [name for name in labels if name not in task_labels]
        if unknown:
            raise FillTaskError(
                f"unknown label(s) {', '.join(map(repr, unknown))}; the task has "
                f"{', '.join(map(repr, task_labels)) or 'no labels'}"
            )
        wanted = {task_labels[name] for name in labels}
    else:
        wanted = set(task_labels.values())

    shapes = [s for s in task.get_annotations().shapes if s.label_id in wanted]
    ours = [s for s in shapes if is_ours(s)]
    if ours and not replace:
        raise FillTaskError(
            f"{len(ours)} shape(s) from an earlier fill-task run are on task {task_id}: pass "
            "--replace to replace them (shapes drawn by people are never changed)"
        )
    refs = [
        s
        for s in shapes
        if not is_ours(s)
        and type_of(s) in SUPPORTED_TYPES
        and not getattr(s, "outside", False)
        and first <= s.frame <= last
        and s.frame not in deleted
    ]
    if not refs:
        raise FillTaskError(
            f"no mask or polygon drawn on task {task_id}"
            + (f" between frames {first} and {last}" if (first, last) != (0, n - 1) else "")
            + (f" with label(s) {', '.join(labels)}" if labels else "")
            + ": draw the objects on at least one frame first"
        )
    objects = identify_objects(refs)
    ids: dict[_Object, int] = {}
    for s in sorted(refs, key=lambda s: (s.frame, s.id)):
        ids.setdefault(objects[s.id], len(ids) + 1)
    if len(ids) > MAX_OBJECTS:
        raise FillTaskError(f"{len(ids)} objects; fill-task handles at most {MAX_OBJECTS} per run")
    label_of = {i: obj.label_id for obj, i in ids.items()}

    masks: dict[int, np.ndarray] = {}
    for s in refs:
        try:
            masks[s.id] = mask_from_shape(type_of(s), list(s.points), height, width)
        except ShapeError as e:
            raise FillTaskError(f"shape #{s.id} on frame {s.frame}: {e}") from None
    # The engine takes an annotated frame as complete: an object not drawn there is absent
    # there. A person who fixes one object on a frame says nothing about the others, so objects
    # run together only when they were drawn on the same frames.
    drawn_on: dict[int, set[int]] = defaultdict(set)
    for s in refs:
        drawn_on[ids[objects[s.id]]].add(s.frame)
    runs: dict[frozenset[int], list[int]] = defaultdict(list)
    for obj, frames_of_obj in sorted(drawn_on.items()):
        runs[frozenset(frames_of_obj)].append(obj)

    source = TaskFrames(task, n)
    created = 0
    filled: set[int] = set()
    pending: list[Any] = []

    def upload() -> None:
        nonlocal created
        if pending:
            task.update_annotations(
                models.PatchedLabeledDataRequest(shapes=pending),
                action=AnnotationUpdateAction.CREATE,
            )
            created += len(pending)
            pending.clear()

    with tqdm(
        total=len(runs) * (last + 1 - first),
        unit="frame",
        desc=f"task {task_id}",
        disable=not progress,
    ) as bar:
        for ref_frames, run_objects in runs.items():
            prop = Propagator(model, source, config)
            if prop.reader.size != (height, width):
                raise FillTaskError(
                    f"frame 0 downloads as {prop.reader.size[1]}x{prop.reader.size[0]} but "
                    f"the task says {width}x{height}"
                )
            for t in sorted(ref_frames):
                lab = np.zeros((height, width), np.uint8)
                # Higher z shapes cover lower ones, as CVAT draws them.
                on_t = [s for s in refs if s.frame == t and ids[objects[s.id]] in run_objects]
                for s in sorted(on_t, key=lambda s: (s.z_order or 0, s.id)):
                    lab[masks[s.id]] = ids[objects[s.id]]
                prop.add_reference(t, lab)
            frames_in_batch = 0
            for res in prop.propagate("both", start=first, stop=last + 1):
                bar.update(1)
                if res.is_reference or res.t in deleted:
                    continue
                for obj in run_objects:
                    points = shape_points(shape_type, res.labels == obj)
                    if points is None:
                        continue
                    pending.append(
                        models.LabeledShapeRequest(
                            type=shape_type,
                            frame=int(res.t),
                            label_id=label_of[obj],
                            points=[float(p) for p in points],
                            group=GROUP_BASE + obj,
                            source=SOURCE,
                            occluded=False,
                            z_order=0,
                            attributes=[],
                        )
                    )
                    filled.add(int(res.t))
                frames_in_batch += 1
                if frames_in_batch >= batch:
                    upload()
                    frames_in_batch = 0
            upload()

    removed = 0
    if ours:
        # Only now: if propagation fails half-way, the earlier results are still there.
        task.update_annotations(
            models.PatchedLabeledDataRequest(
                shapes=[models.LabeledShapeRequest(**s.to_dict()) for s in ours]
            ),
            action=AnnotationUpdateAction.DELETE,
        )
        removed = len(ours)
    references = sorted({s.frame for s in refs})
    return FillReport(task_id, len(ids), references, len(filled), created, removed)
