"""A generator of hostile and honest tracker calls, for the fuzz test and
``benchmarks/cvat_fuzz.py``.

Each call is a request body as bytes, as it arrives at nuclio; about one in five is an honest
call (a start, or the next frame of a session this generator started) so that the sessions
under attack are real ones. What a call is made of is chosen by a seeded ``random.Random``.
"""

from __future__ import annotations

import base64
import io
import json
import random
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import PIL.Image
from cvat_sdk.masks import encode_mask

H, W = 32, 48


def _png(frame: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(frame).save(buf, format=fmt)
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


@dataclass
class Fuzzer:
    """``calls(n)`` yields (kind, body bytes); ``observe(kind, status, reply)`` keeps the
    states of honest calls so later calls can continue or replay them."""

    seed: int
    frames: np.ndarray = field(init=False)
    states: list[dict] = field(default_factory=list)
    old_states: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        gen = np.random.default_rng(self.seed)
        base = gen.integers(0, 255, (H, W, 3), dtype=np.uint8)
        self.frames = np.stack([np.roll(base, k, axis=1) for k in range(8)])
        self.images = [_b64(_png(f)) for f in self.frames]
        self.weird: list[Callable[[], Any]] = [
            lambda: 2**62,
            lambda: 2**63,
            lambda: -(2**40),
            lambda: 10**30,
            lambda: 1e300,
            lambda: -1e-300,
            lambda: 0.5,
            lambda: -1,
            lambda: True,
            lambda: None,
            lambda: "\ud800",
            lambda: "x" * self.rng.randint(0, 5000),
            lambda: [],
            lambda: {},
            lambda: [[[]]],
            lambda: {"type": "mask"},
            lambda: self.rng.random() * 1e6,
            lambda: self.rng.randint(-(10**6), 10**6),
        ]

    # -- the pieces ------------------------------------------------------------------------
    def _image(self) -> Any:
        r = self.rng.random()
        if r < 0.7:
            return self.rng.choice(self.images)
        choices = [
            lambda: _b64(png_header_only(self.rng.choice([10000, 60000, 2**31 - 1]), 10000)),
            lambda: _b64(png_header_only(0, 5)),
            lambda: _b64(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 9999 9999\n"),
            lambda: _b64(b"GIF89a" + bytes(20)),
            lambda: _b64(_png(self.frames[0])[: self.rng.randint(0, 120)]),
            lambda: _b64(_png(self.frames[0], self.rng.choice(["JPEG", "BMP", "TIFF", "WEBP"]))),
            lambda: "data:image/png;base64," + self.images[0],
            lambda: "@@@" + self.images[0][:50],
            lambda: self.rng.choice(self.weird)(),
            lambda: _b64(bytes(self.rng.getrandbits(8) for _ in range(self.rng.randint(0, 300)))),
        ]
        return self.rng.choice(choices)()

    def _mask(self) -> np.ndarray:
        m = np.zeros((H, W), bool)
        y, x = self.rng.randint(0, H - 8), self.rng.randint(0, W - 8)
        m[y : y + self.rng.randint(2, 8), x : x + self.rng.randint(2, 8)] = True
        return m

    def _honest_shape(self) -> Any:
        kind = self.rng.choice(["mask", "polygon", "rectangle", "bare"])
        m = self._mask()
        ys, xs = np.nonzero(m)
        box = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
        if kind == "mask":
            return {"type": "mask", "points": encode_mask(m)}
        if kind == "polygon":
            x0, y0, x1, y1 = box
            return {"type": "polygon", "points": [x0, y0, x1, y0, x1, y1, x0, y1]}
        if kind == "rectangle":
            return {"type": "rectangle", "points": box}
        return box

    def _hostile_shape(self) -> Any:
        rng = self.rng
        m = self._mask()
        rle = encode_mask(m)
        choices = [
            lambda: {"type": "mask", "points": [rng.choice(self.weird)() for _ in range(5)]},
            lambda: {"type": "mask", "points": [2**62] * 4 + [0, 0, 0, 0]},
            lambda: {
                "type": "mask",
                "points": [rng.choice([2**40, 2**63, 1e300, 3 * 10**9]), 0, 0, 5, 5],
            },
            lambda: {"type": "mask", "points": rle[:-4] + [0, 0, W * 4, H * 4]},
            lambda: {
                "type": "mask",
                "points": [r + rng.randint(-2, 2) for r in rle[:-4]] + rle[-4:],
            },
            lambda: {"type": "mask", "points": [-r for r in rle[:-4]] + rle[-4:]},
            lambda: {"type": "mask", "points": [0] * rng.randint(0, 20000) + rle},
            lambda: {"type": "mask", "points": rle[:-4]},
            lambda: {
                "type": "polygon",
                "points": [
                    rng.uniform(-1e6, 1e6) for _ in range(rng.choice([3, 7, 20001, 2 * 12000]))
                ],
            },
            lambda: {"type": "polygon", "points": [rng.choice(self.weird)() for _ in range(8)]},
            lambda: {"type": "polygon", "points": [[1, 2], [3, 4], [5, 6]]},
            lambda: {
                "type": "polygon",
                "points": [
                    rng.uniform(0, W) if i % 2 == 0 else rng.choice([0, H]) for i in range(2 * 2000)
                ],
            },
            lambda: {"type": "rectangle", "points": [5, 5, 1, 1]},
            lambda: {"type": "rectangle", "points": [0, 0, 10, 10], "rotation": 45},
            lambda: [rng.choice(self.weird)() for _ in range(4)],
            lambda: {"type": rng.choice(["ellipse", "points", "skeleton", "\ud800", 7, None])},
            lambda: {"type": "mask", "points": "1,2,3"},
            lambda: rng.choice(self.weird)(),
        ]
        return rng.choice(choices)()

    def _hostile_state(self) -> Any:
        rng = self.rng
        good = rng.choice(self.states) if self.states else {"session": "A" * 43, "step": 0}
        choices = [
            lambda: {**good, "session": "".join(rng.choice("ABCxyz019_-") for _ in range(43))},
            lambda: {**good, "session": "\ud800" * 43},
            lambda: {**good, "session": rng.choice(self.weird)()},
            lambda: {**good, "step": rng.choice(self.weird)()},
            lambda: {**good, "step": good.get("step", 0) + rng.choice([-1, 1, 2**60])},
            lambda: rng.choice(self.old_states) if self.old_states else dict(good),
            lambda: {k: v for k, v in good.items() if k != "step"},
            lambda: rng.choice(self.weird)(),
            lambda: {**good, "type": "polygon", "width": -1},
        ]
        return rng.choice(choices)()

    def _raw(self) -> bytes:
        rng = self.rng
        choices = [
            lambda: b"",
            lambda: b"{",
            lambda: bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 200))),
            lambda: b"[" * rng.choice([999, 1001, 50000]) + b"]" * 10,
            lambda: b'{"image": "a", "states": [{"session": "a", "step": ' + b"9" * 5000 + b"}]}",
            lambda: b'{"image": 1e400, "shapes": [NaN, Infinity, -Infinity]}',
            lambda: json.dumps(rng.choice([[], 1, "s", None, True])).encode(),
            lambda: b'{"shapes": [' + b"0," * 100000 + b"0]}",
            lambda: b'{"image": "' + b"\\ud800" * 10 + b'"}',
            lambda: b"\xef\xbb\xbf{}",
        ]
        return rng.choice(choices)()

    # -- calls -------------------------------------------------------------------------------
    def call(self) -> tuple[str, bytes]:
        rng = self.rng
        r = rng.random()
        image = self.rng.choice(self.images)
        if r < 0.1:
            n = rng.randint(1, 3)
            body = {
                "image": image,
                "shapes": [self._honest_shape() for _ in range(n)],
                "states": [],
            }
            return "start", json.dumps(body).encode()
        if r < 0.2 and self.states:
            k = rng.randrange(len(self.states))
            body = {"image": self.images[0], "shapes": [None], "states": [self.states[k]]}
            return f"next:{k}", json.dumps(body).encode()
        if r < 0.3:
            return "raw", self._raw()
        n = rng.choice([1, 1, 2, 3, 200])
        if n == 200:  # over the object cap: cheap objects, the count is the attack
            states = [rng.choice(self.states) if self.states else None for _ in range(n)]
            body = {"image": image, "shapes": [None] * n, "states": states}
            return "hostile", json.dumps(body).encode()
        body: dict[str, Any] = {
            "image": self._image() if rng.random() < 0.5 else image,
            "shapes": [self._hostile_shape() if rng.random() < 0.7 else None for _ in range(n)],
            "states": [self._hostile_state() if rng.random() < 0.6 else None for _ in range(n)],
        }
        for key in list(body):
            if rng.random() < 0.05:
                body[key] = rng.choice(self.weird)()
        try:
            return "hostile", json.dumps(body).encode("utf-8", "surrogatepass")
        except (TypeError, ValueError):  # a value json cannot write: send its repr instead
            return "hostile", repr(body).encode("utf-8", "surrogatepass")

    def observe(self, kind: str, status: int, reply: Any) -> None:
        if status != 200 or not isinstance(reply, dict):
            return
        if kind == "start":
            self.states.extend(reply["states"])
        elif kind.startswith("next:"):
            k = int(kind.split(":")[1])
            self.old_states.append(self.states[k])
            self.states[k] = reply["states"][0]
        del self.states[:-50]
        del self.old_states[:-50]

    def calls(self, n: int) -> Iterator[tuple[str, bytes]]:
        for _ in range(n):
            yield self.call()
