"""A test double of CVAT's server calling a tracker function, step for step as
``cvat/apps/lambda_manager/views.py`` (CVAT 2.4x, ``LambdaFunction.invoke``) does it:

1. ``data = {k: v for k, v in data.items() if v is not None}``: a ``null`` field is dropped;
2. the payload is ``{"image": <base64 of the task frame>, "shapes": data.get("shapes", []),
   "states": [None if s is None else json.loads(signer.unsign(s, max_age=8 h))]}`` with
   ``signer = TimestampSigner(salt=f"cvat-tracker-state:{function id}")`` (Django's own
   signer here, not a copy); a bad or expired signature is a 400 "Invalid or expired tracker
   state" and the function is not called;
3. the payload travels as JSON (``requests``' ``json=``) and nuclio's Python wrapper decodes an
   ``application/json`` body before the handler sees it, handing over the raw bytes when that
   fails (``nuclio_sdk.event._EventDeserializer._try_deserialize_json``, called here);
4. ``reply.raise_for_status()``: a 4xx/5xx reaches the user as ``"<status> Client Error:
   <reason> for url: <url>"`` (the body is dropped; nuclio writes the standard reason phrase);
5. each returned state is signed again: ``signer.sign(json.dumps(state, separators=(",", ":")))``.

The function is called through ``nuclio_sdk.test.Platform``, as nuclio would call it.
"""

from __future__ import annotations

import base64
import http
import io
import json
from datetime import timedelta
from typing import Any

import numpy as np
import PIL.Image
from django.core.signing import BadSignature, TimestampSigner
from nuclio_sdk import Event
from nuclio_sdk.event import _EventDeserializer
from nuclio_sdk.test import Platform

from cvat_function.nuclio import main

#: LambdaFunction.TRACKER_STATE_MAX_AGE
TRACKER_STATE_MAX_AGE = timedelta(hours=8)
FUNCTION_ID = "napari-stm-tracker"
URL = "http://nuclio:8070/"


class CvatError(Exception):
    """What CVAT answers its client when the call fails: (status, text)."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"{status}: {text}")
        self.status = status
        self.text = text


def frame_bytes(frame: np.ndarray, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(frame).save(buf, format=fmt, quality=95)
    return buf.getvalue()


class CvatLambda:
    """``call(frame, shapes=..., states=...)`` as ``POST /api/lambda/functions/<id>`` with
    ``{"task", "frame", "shapes", "states"}``; returns the reply CVAT gives its client
    (states signed) or raises :class:`CvatError`."""

    def __init__(
        self,
        platform: Platform,
        frames: list[np.ndarray] | np.ndarray,
        secret_key: str = "cvat-test-secret-key",
        function_id: str = FUNCTION_ID,
        frame_format: str = "PNG",
    ) -> None:
        self.platform = platform
        self.frames = frames
        self.frame_format = frame_format
        self.signer = TimestampSigner(
            key=secret_key, salt=f"cvat-tracker-state:{function_id}", fallback_keys=[]
        )
        self.calls = 0

    def _get_image(self, frame: int) -> str:
        data = frame_bytes(np.asarray(self.frames[frame]), self.frame_format)
        return base64.b64encode(data).decode("utf-8")

    def call(self, frame: int, shapes: list | None = None, states: list | None = None) -> dict:
        data = {"task": 1, "frame": frame, "shapes": shapes, "states": states}
        data = {k: v for k, v in data.items() if v is not None}
        try:
            payload = {
                "image": self._get_image(data["frame"]),
                "shapes": data.get("shapes", []),
                "states": [
                    None
                    if state is None
                    else json.loads(self.signer.unsign(state, max_age=TRACKER_STATE_MAX_AGE))
                    for state in data.get("states", [])
                ],
            }
        except BadSignature:
            raise CvatError(400, "Invalid or expired tracker state") from None
        reply = self.invoke(payload)
        reply["states"] = [
            self.signer.sign(json.dumps(state, separators=(",", ":"))) for state in reply["states"]
        ]
        return reply

    def invoke(self, payload: Any) -> Any:
        """The function's reply to ``payload``, or CvatError as CVAT reports a failed call."""
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode("utf-8")
        self.calls += 1
        response = call_nuclio(self.platform, body)
        if response.status_code >= 400:
            kind = "Client" if response.status_code < 500 else "Server"
            phrase = http.HTTPStatus(response.status_code).phrase
            raise CvatError(
                response.status_code,
                f"{response.status_code} {kind} Error: {phrase} for url: {URL}",
            )
        return json.loads(response.body)


def call_nuclio(platform: Platform, body: bytes) -> Any:
    """The function's nuclio Response to a JSON POST of ``body``."""
    event = Event(
        body=_EventDeserializer._try_deserialize_json(body),
        content_type="application/json",
        method="POST",
        path="/",
    )
    return platform.call_handler(main.handler, event)
