"""Reading a tracker request from the wire without trusting it.

The body, the image and the states come from whoever can reach the function. Everything here
is checked against :class:`~cvat_function.limits.Limits` before the memory it would cost is
spent, and every failure is a :class:`RequestError` with a 4xx status and a short message that
names the problem (never a 5xx, never an exception escaping to the worker).

Status codes are chosen so that their standard reason phrase already tells the cause: CVAT
shows a failed function call as ``"<status> Client Error: <reason> for url: ..."`` and drops
the body (``cvat/apps/lambda_manager/views.py``: ``reply.raise_for_status()``), and nuclio's
HTTP trigger writes only the status code, never a reason phrase of the function's.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import re
import warnings
from typing import Any

import numpy as np
import PIL.Image

from cvat_function.limits import IMAGE_FORMATS, Limits

BAD_REQUEST = 400  # malformed: not JSON, not base64, a broken shape or state
NOT_FOUND = 404  # unknown, expired or evicted session
CONFLICT = 409  # replayed or concurrent step of a session, image size changed
TOO_LARGE = 413  # body, image pixels, objects, vertices or numbers over the limits
UNSUPPORTED_MEDIA = 415  # an image format CVAT does not serve
UNPROCESSABLE = 422  # a well-formed shape of a type this tracker does not follow
INTERNAL = 500  # a bug (logged with its traceback)
UNAVAILABLE = 503  # the session store cannot be reached, or not enough memory for a session

#: how many characters of a client's value an error message quotes
QUOTE = 40
#: the length of a session id (secrets.token_urlsafe(32)) and its alphabet
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{43}")
#: digits an integer in the body may have (more is no coordinate, run or step count)
MAX_DIGITS = 18


class RequestError(Exception):
    """A request the function cannot serve; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def quote(value: Any) -> str:
    """``repr`` of a client's value, shortened; safe for any string (lone surrogates too)."""
    try:
        text = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    except Exception:  # a repr that fails (e.g. an integer too long to print)
        text = type(value).__name__
    text = text.encode("ascii", "backslashreplace").decode("ascii")
    return text if len(text) <= QUOTE else text[: QUOTE - 3] + "..."


# --------------------------------------------------------------------------------- the body


class _NumberBudget:
    """json.loads hooks that refuse oversized numbers and count them as they are read."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0

    def _tick(self) -> None:
        self.count += 1
        if self.count > self.limit:
            raise RequestError(
                TOO_LARGE, f"the request holds more than {self.limit} numbers (limit)"
            )

    def integer(self, text: str) -> int:
        self._tick()
        if len(text.lstrip("-")) > MAX_DIGITS:
            raise RequestError(BAD_REQUEST, f"a number with {len(text)} digits is out of range")
        return int(text)

    def real(self, text: str) -> float:
        self._tick()
        if len(text) > 64:
            raise RequestError(BAD_REQUEST, f"a number written with {len(text)} characters")
        value = float(text)
        if not math.isfinite(value):
            raise RequestError(BAD_REQUEST, f"the number {quote(text)} is out of range")
        return value

    @staticmethod
    def constant(text: str) -> Any:
        raise RequestError(BAD_REQUEST, f"{text} is not a JSON number")


def parse_body(body: Any, limits: Limits) -> dict:
    """The request as a dict: bytes or text are parsed with bounds; an object nuclio already
    parsed (it does for ``application/json``) is checked to the same bounds."""
    if isinstance(body, (bytes, bytearray, memoryview)):
        body = bytes(body)
        if len(body) > limits.max_body_bytes:
            raise RequestError(
                TOO_LARGE,
                f"the request body has {len(body)} bytes, over the limit of "
                f"{limits.max_body_bytes}",
            )
        try:
            body = body.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(BAD_REQUEST, "the request body is not JSON (not UTF-8)") from None
    if isinstance(body, str):
        if len(body) > limits.max_body_bytes:
            raise RequestError(
                TOO_LARGE,
                f"the request body has {len(body)} characters, over the limit of "
                f"{limits.max_body_bytes}",
            )
        if not body.strip():
            raise RequestError(BAD_REQUEST, "the request body is empty; expected a JSON object")
        budget = _NumberBudget(limits.max_numbers)
        try:
            body = json.loads(
                body,
                parse_int=budget.integer,
                parse_float=budget.real,
                parse_constant=budget.constant,
            )
        except RecursionError:
            raise RequestError(BAD_REQUEST, "the request body is JSON nested too deeply") from None
        except ValueError as e:  # JSONDecodeError and its kin
            raise RequestError(BAD_REQUEST, f"the request body is not JSON: {e}"[:200]) from None
    if not isinstance(body, dict):
        raise RequestError(
            BAD_REQUEST,
            "the request body must be a JSON object with 'image', 'shapes' and 'states', "
            f"got {type(body).__name__}",
        )
    check_tree(body, limits)
    return body


def check_tree(obj: Any, limits: Limits) -> None:
    """Depth, size and numbers of parsed JSON, walked without recursion."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    items = 0
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > limits.max_json_depth:
                raise RequestError(
                    BAD_REQUEST,
                    f"the request body is JSON nested over {limits.max_json_depth} levels",
                )
            children = node.values() if isinstance(node, dict) else node
            items += len(node)
            if items > limits.max_numbers:
                raise RequestError(
                    TOO_LARGE, f"the request holds more than {limits.max_numbers} values (limit)"
                )
            stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))


# -------------------------------------------------------------------------------- the image


def decode_image(data: Any, limits: Limits) -> np.ndarray:
    """A base64 (or data: URL) encoded frame -> H x W x 3 uint8 RGB.

    The format and the pixel count come from the header (``PIL.Image.open`` reads no pixels);
    only JPEG, PNG, WebP, BMP and TIFF are tried, and nothing over ``max_pixels`` is decoded.
    """
    if data is None:
        raise RequestError(BAD_REQUEST, "missing 'image': expected a base64-encoded frame")
    if not isinstance(data, str) or not data:
        raise RequestError(BAD_REQUEST, "'image' must be a non-empty base64 string")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(BAD_REQUEST, "'image' is not valid base64") from None
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check warns from 89 Mpx; ours below is the one that counts.
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            im = PIL.Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)
    except PIL.Image.DecompressionBombError as e:
        raise RequestError(TOO_LARGE, f"'image' is too large: {quote(str(e))}") from None
    except PIL.UnidentifiedImageError:
        raise RequestError(
            UNSUPPORTED_MEDIA,
            f"'image' is not an image in a format CVAT serves ({', '.join(IMAGE_FORMATS)})",
        ) from None
    except Exception as e:  # any header Pillow cannot read is the client's damaged file
        raise RequestError(BAD_REQUEST, f"'image' has a damaged header: {quote(str(e))}") from None
    with im:
        w, h = im.size
        if w < 1 or h < 1:
            raise RequestError(BAD_REQUEST, f"'image' is {w}x{h} pixels")
        if w * h > limits.max_pixels:
            raise RequestError(
                TOO_LARGE,
                f"'image' is {w}x{h} = {w * h} pixels, over the limit of {limits.max_pixels}",
            )
        try:
            # A multi-page TIFF: its first page only (the header gave its size).
            rgb = np.asarray(im.convert("RGB"))
        except Exception as e:  # truncated or corrupt data past the header
            raise RequestError(
                BAD_REQUEST, f"'image' is a damaged {im.format} file: {quote(str(e))}"
            ) from None
    return rgb


# -------------------------------------------------------------------------------- the state


def parse_state(state: Any, i: int) -> tuple[str, int | None]:
    """(session id, step) of a state this function returned; the step is None in states
    written before steps were counted."""
    if not isinstance(state, dict):
        raise RequestError(
            BAD_REQUEST,
            f"object {i}: malformed state: expected the object this function returned, got "
            f"{type(state).__name__}",
        )
    session_id = state.get("session")
    if not isinstance(session_id, str) or not SESSION_ID.fullmatch(session_id):
        raise RequestError(
            BAD_REQUEST,
            f"object {i}: malformed state: the session id {quote(session_id)} is "
            "not one this function hands out",
        )
    step = state.get("step")
    if step is not None and (
        isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 2**53
    ):
        raise RequestError(BAD_REQUEST, f"object {i}: malformed state: step {quote(step)}")
    return session_id, step


def reason(message: str) -> str:
    """A message made fit for an HTTP header or reason phrase: ASCII, one line, short."""
    text = message.encode("ascii", "replace").decode("ascii")
    text = " ".join(text.split())
    return text if len(text) <= 200 else text[:197] + "..."
