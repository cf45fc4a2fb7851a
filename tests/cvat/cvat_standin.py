"""A stand-in for the few CVAT REST endpoints fill-task uses, on 127.0.0.1 in a thread.

Requests are parsed, and replies built, with cvat-sdk's own models, so a payload the real
server would reject (a missing required field, a wrong type) fails here too.
"""

from __future__ import annotations

import datetime
import io
import json
import secrets
import threading
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import numpy as np
import PIL.Image
from cvat_sdk import models
from cvat_sdk.api_client import ApiClient, Configuration
from cvat_sdk.api_client.model_utils import validate_and_convert_types

TOKEN = "stand-in-access-token"
USER, PASSWORD = "annotator", "s3cret password"


@dataclass
class StandInTask:
    frames: np.ndarray  # T x H x W x 3 uint8
    labels: dict[int, str]  # id -> name
    shapes: list[models.LabeledShape] = field(default_factory=list)
    deleted_frames: list[int] = field(default_factory=list)
    #: per-frame sizes (an image task); None: one size for all (a video task)
    sizes: list[tuple[int, int]] | None = None


def _build(model_class: type, **fields: object) -> object:
    """A reply model as the server makes it (read-only fields included)."""
    return model_class._from_openapi_data(**fields)


def _parse(data: bytes, model_class: type) -> object:
    return validate_and_convert_types(
        json.loads(data), (model_class,), ["body"], True, True, Configuration()
    )


class StandInCvat:
    """``with StandInCvat() as cvat: cvat.tasks[7] = StandInTask(...); cvat.url``."""

    def __init__(self) -> None:
        self.tasks: dict[int, StandInTask] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path?query)
        self.passwords_seen: list[str] = []
        self._sessions: dict[str, str] = {}  # sessionid -> csrftoken
        self._next_id = 1000
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> StandInCvat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def add_shape(self, task_id: int, **kwargs: object) -> models.LabeledShape:
        """A shape as if drawn in the CVAT UI (source "manual" unless given)."""
        with self._lock:
            self._next_id += 1
            kwargs.setdefault("source", "manual")
            kwargs.setdefault("occluded", False)
            kwargs.setdefault("outside", False)
            kwargs.setdefault("z_order", 0)
            kwargs.setdefault("rotation", 0.0)
            kwargs.setdefault("attributes", [])
            kwargs.setdefault("group", 0)
            kwargs["points"] = [float(p) for p in kwargs["points"]]
            shape = _build(models.LabeledShape, id=self._next_id, **kwargs)
            self.tasks[task_id].shapes.append(shape)
            return shape

    # -- HTTP ---------------------------------------------------------------------------------
    def _handler_class(self) -> type:
        cvat = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                cvat._dispatch(self, "GET")

            def do_POST(self) -> None:
                cvat._dispatch(self, "POST")

            def do_PATCH(self) -> None:
                cvat._dispatch(self, "PATCH")

        return Handler

    def _reply(
        self,
        h: BaseHTTPRequestHandler,
        status: int,
        body: object = None,
        content_type: str = "application/json",
        headers: dict | None = None,
    ) -> None:
        if isinstance(body, bytes):
            data = body
        else:
            data = json.dumps(ApiClient.sanitize_for_serialization(body), default=str).encode()
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            if isinstance(v, list):
                for item in v:
                    h.send_header(k, item)
            else:
                h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)

    def _authorised(self, h: BaseHTTPRequestHandler, method: str) -> bool:
        if h.headers.get("Authorization") == f"Bearer {TOKEN}":
            return True
        cookies = SimpleCookie(h.headers.get("Cookie", ""))
        session = cookies.get("sessionid")
        if session is None or session.value not in self._sessions:
            return False
        # Django's CSRF check for unsafe methods with session authentication.
        return method == "GET" or h.headers.get("X-CSRFToken") == self._sessions[session.value]

    def _dispatch(self, h: BaseHTTPRequestHandler, method: str) -> None:
        parts = urlsplit(h.path)
        path = parts.path.rstrip("/")
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        self.requests.append((method, h.path))
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        try:
            if path == "/api/server/about" and method == "GET":
                return self._reply(
                    h,
                    200,
                    _build(
                        models.About,
                        name="CVAT",
                        description="stand-in",
                        version="2.80.0",
                        logo_url="",
                        subtitle="",
                    ),
                )
            if path == "/api/auth/login" and method == "POST":
                login = _parse(body, models.LoginSerializerExRequest)
                self.passwords_seen.append(login.password)
                if (login.username, login.password) != (USER, PASSWORD):
                    return self._reply(h, 400, {"non_field_errors": ["Unable to log in."]})
                sid, csrf = secrets.token_hex(16), secrets.token_hex(16)
                self._sessions[sid] = csrf
                cookies = [f"sessionid={sid}; Path=/", f"csrftoken={csrf}; Path=/"]
                return self._reply(
                    h,
                    200,
                    _build(models.Token, key=secrets.token_hex(8)),
                    headers={"Set-Cookie": cookies},
                )
            if not self._authorised(h, method):
                return self._reply(
                    h, 401, {"detail": "Authentication credentials were not provided."}
                )
            segs = path.split("/")[1:]  # api, tasks, id, ...
            if segs[:2] == ["api", "labels"] and method == "GET":
                task = self.tasks[int(query["task_id"])]
                labels = [
                    _build(models.Label, id=i, name=n, type="any", color="#ff0000", attributes=[])
                    for i, n in task.labels.items()
                ]
                return self._reply(
                    h,
                    200,
                    _build(
                        models.PaginatedLabelList,
                        count=len(labels),
                        next=None,
                        previous=None,
                        results=labels,
                    ),
                )
            if segs[:2] == ["api", "tasks"] and len(segs) >= 3:
                task_id = int(segs[2])
                if task_id not in self.tasks:
                    return self._reply(h, 404, {"detail": "Not found."})
                return self._task(h, method, task_id, segs[3:], query, body)
            return self._reply(h, 404, {"detail": f"no stand-in for {method} {path}"})
        except Exception as e:  # a malformed request: what a real server answers with 400
            return self._reply(h, 400, {"detail": f"{type(e).__name__}: {e}"})

    def _task(
        self,
        h: BaseHTTPRequestHandler,
        method: str,
        task_id: int,
        rest: list[str],
        query: dict,
        body: bytes,
    ) -> None:
        task = self.tasks[task_id]
        n, height, width = task.frames.shape[:3]
        if not rest and method == "GET":
            return self._reply(
                h,
                200,
                _build(
                    models.TaskRead,
                    id=task_id,
                    organization=None,
                    project_id=None,
                    name=f"task {task_id}",
                    size=n,
                    mode="interpolation",
                    dimension="2d",
                    jobs=_build(models.JobsSummary, completed=0, validation=0, count=1, url="x"),
                    labels=_build(models.LabelsSummary, url="x"),
                ),
            )
        if rest == ["data", "meta"] and method == "GET":
            sizes = task.sizes or [(height, width)]
            frames = [
                _build(
                    models.FrameMeta,
                    name=f"frame_{i:06d}.png",
                    related_files=0,
                    width=w,
                    height=hh,
                    has_related_context=False,
                )
                for i, (hh, w) in enumerate(sizes)
            ]
            return self._reply(
                h,
                200,
                _build(
                    models.DataMetaRead,
                    chunks_updated_date=datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc),
                    frames=frames,
                    deleted_frames=list(task.deleted_frames),
                    size=n,
                    image_quality=95,
                    start_frame=0,
                    stop_frame=n - 1,
                    frame_filter="",
                    chunk_size=36,
                ),
            )
        if rest == ["data"] and method == "GET":
            assert query.get("type") == "frame" and query.get("quality") == "original", query
            buf = io.BytesIO()
            PIL.Image.fromarray(task.frames[int(query["number"])]).save(buf, format="PNG")
            return self._reply(h, 200, buf.getvalue(), content_type="image/png")
        if rest == ["annotations"] and method == "GET":
            return self._reply(
                h,
                200,
                _build(models.LabeledData, version=0, tags=[], shapes=list(task.shapes), tracks=[]),
            )
        if rest == ["annotations"] and method == "PATCH":
            data = _parse(body, models.PatchedLabeledDataRequest)
            action = query.get("action")
            out = []
            with self._lock:
                if action == "create":
                    for s in data.shapes:
                        fields = s.to_dict()
                        fields.pop("id", None)
                        fields.setdefault("source", "manual")
                        self._next_id += 1
                        shape = _build(models.LabeledShape, id=self._next_id, **fields)
                        task.shapes.append(shape)
                        out.append(shape)
                elif action == "delete":
                    ids = {s.id for s in data.shapes}
                    out = [s for s in task.shapes if s.id in ids]
                    task.shapes = [s for s in task.shapes if s.id not in ids]
                else:
                    return self._reply(h, 400, {"detail": f"action {action!r}"})
            return self._reply(
                h, 200, _build(models.LabeledData, version=0, tags=[], shapes=out, tracks=[])
            )
        return self._reply(h, 404, {"detail": f"no stand-in for {method} task/{'/'.join(rest)}"})
