"""Hostile requests: each is answered with a 4xx naming the problem, before the memory it asks
for is spent; none is a 5xx, none ends the worker. The cases are the ones a fuzz run found
(issue 16) plus their neighbours."""

import base64
import io
import json
import struct
import tracemalloc
import zlib

import numpy as np
import PIL.Image
import pytest
from cvat_helpers import b64png
from cvat_sdk.masks import encode_mask

from cvat_function.limits import Limits
from cvat_function.nuclio.model_handler import ModelHandler
from cvat_function.payload import parse_body
from cvat_function.sessions import MemorySessionStore


@pytest.fixture
def handler(model):
    return ModelHandler(model, store=MemorySessionStore(), limits=Limits(max_pixels=1_000_000))


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height (the pixels are missing)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def mask_body(frame, points):
    return {"image": b64png(frame), "shapes": [{"type": "mask", "points": points}]}


HUGE_RUNS = [
    ([2**62, 2**62, 2**62, 2**62, 0, 0, 0, 0], "out of range"),  # SIGSEGV before
    ([2**40, 0, 0, 5, 5], "out of range"),
    ([2**63, 0, 0, 5, 5], "out of range"),
    ([1e300, 0, 0, 5, 5], "out of range"),
    ([3000000000, 0, 0, 5, 5], "out of range"),  # allocated 3 GB before
    ([30, 0, 0, 5, 5], "runs cover 30 pixels, the bounding box 36"),
    ([-4, 40, 0, 0, 5, 5], "negative run"),
    ([36.5, 0, 0, 5, 5], "non-integer run"),
    ([36, 0, 0, 5.5, 5], "non-integer box coordinate"),
    ([36, 0, 0, 5, 500], "not inside"),
]


@pytest.mark.parametrize("points, words", HUGE_RUNS)
def test_mask_runs_are_checked_before_decoding(handler, clip, points, words):
    frames, _ = clip
    tracemalloc.start()
    status, reply = handler.handle(mask_body(frames[0], points))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert status == 400 and words in reply["error"], reply
    assert peak < 50 << 20  # nothing the runs asked for was allocated


@pytest.mark.parametrize(
    "text, status, words",
    [
        (
            '{"image": "x", "shapes": [{"type": "polygon", "points": [1e400, 1, 2, 2, 3, 3]}]}',
            400,
            "out of range",
        ),
        (
            '{"image": "x", "states": [{"session": "a", "step": ' + "9" * 4300 + "}]}",
            400,
            "digits is out of range",
        ),
        ('{"a": NaN}', 400, "NaN is not a JSON number"),
        ("[" * 1000 + "]" * 1000, 400, "nested"),
        ("[" * 100000 + "]" * 100000, 400, "nested"),
        ('{"image": ' + "[" * 30 + "]" * 30 + "}", 400, "nested over 16 levels"),
        ('{"image": "\\ud800", "states": [null]}', 400, "'image' is not valid base64"),
    ],
)
def test_malformed_json_is_a_400(handler, text, status, words):
    got, reply = handler.handle(text.encode())
    assert got == status and words in reply["error"], reply


def test_already_parsed_bodies_are_held_to_the_same_bounds(handler, clip):
    # nuclio parses application/json bodies itself: the handler then sees Python objects.
    frames, _ = clip
    deep: list = []
    node = deep
    for _ in range(200):
        node.append([])
        node = node[0]
    status, reply = handler.handle({"image": b64png(frames[0]), "shapes": deep})
    assert status == 400 and "nested" in reply["error"]
    status, reply = handler.handle(mask_body(frames[0], [10**400, 0, 0, 5, 5]))
    assert status == 400 and "out of range" in reply["error"]
    polygon = {"type": "polygon", "points": [1, 1, 10**400, 2, 3, 3]}
    status, reply = handler.handle({"image": b64png(frames[0]), "shapes": [polygon]})
    assert status == 400 and "out of range" in reply["error"]


def test_body_and_number_limits():
    limits = Limits(max_body_bytes=1000, max_numbers=50)
    with pytest.raises(Exception, match="over the limit of 1000"):
        parse_body(b"{" + b" " * 2000 + b"}", limits)
    with pytest.raises(Exception, match="more than 50 numbers"):
        parse_body(json.dumps({"a": list(range(60))}).encode(), limits)


def test_images_are_checked_from_the_header(handler):
    tracemalloc.start()
    body = {"image": base64.b64encode(png_header_only(10000, 10000)).decode(), "states": [None]}
    status, reply = handler.handle(body)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert status == 413 and "10000x10000" in reply["error"]
    assert peak < 20 << 20
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10000 10000\n"
    status, reply = handler.handle({"image": base64.b64encode(eps).decode(), "states": [None]})
    assert status == 415 and "JPEG, PNG, WEBP, BMP, TIFF" in reply["error"]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "TIFF"])
def test_every_format_cvat_serves_is_read(handler, clip, fmt):
    frames, labels = clip
    buf = io.BytesIO()
    PIL.Image.fromarray(frames[0]).save(buf, format=fmt)
    shape = {"type": "mask", "points": encode_mask(labels[0] == 1)}
    status, reply = handler.handle(
        {"image": base64.b64encode(buf.getvalue()).decode(), "shapes": [shape]}
    )
    assert status == 200, reply


def test_objects_and_vertices_are_capped(model, clip):
    frames, labels = clip
    handler = ModelHandler(model, limits=Limits(max_objects=3, max_polygon_vertices=100))
    shape = {"type": "mask", "points": encode_mask(labels[0] == 1)}
    status, reply = handler.handle({"image": b64png(frames[0]), "shapes": [shape] * 4})
    assert status == 413 and "4 objects in one request, over the limit of 3" in reply["error"]
    t = np.linspace(0, 2 * np.pi, 101, endpoint=False)
    ring = np.stack([60 + 30 * np.cos(t), 48 + 30 * np.sin(t)], 1).ravel().tolist()
    status, reply = handler.handle(
        {"image": b64png(frames[0]), "shapes": [{"type": "polygon", "points": ring}]}
    )
    assert status == 413 and "202 numbers" in reply["error"]


@pytest.mark.parametrize(
    "session, words",
    [
        ("\ud800" * 43, "not one this function hands out"),
        ("a" * 42, "not one this function hands out"),
        ("a" * 10**6, "not one this function hands out"),
        (12, "not one this function hands out"),
    ],
)
def test_session_ids_are_validated(handler, clip, session, words):
    frames, _ = clip
    status, reply = handler.handle(
        {"image": b64png(frames[0]), "states": [{"session": session, "step": 0}]}
    )
    assert status == 400 and words in reply["error"]
    json.dumps(reply)  # answerable, lone surrogates and all
    assert len(reply["error"]) < 300
