"""How much one request to the tracker may ask for; every bound is checked before the work it
guards (a body before parsing, an image header before decoding, mask runs before unpacking).

Each field has a ``NAPARI_STM_*`` environment variable (``Limits.from_env``); the defaults fit
what CVAT sends: one frame of a task (CVAT's own data limits keep frames far below 50 Mpx), a
few dozen shapes drawn by a person.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

#: the image formats CVAT serves frames in (task data: JPEG or PNG chunks, original images of
#: an image task: also WebP, BMP, TIFF); everything else Pillow reads (EPS, PSD, ...) is refused
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF")

#: a coordinate (pixels) beyond this is no position in any image this function accepts
MAX_COORDINATE = 1_000_000


@dataclass(frozen=True)
class Limits:
    """Per-request bounds; a request past one is answered with a 4xx naming it."""

    #: bytes of the request body (the nuclio trigger's maxRequestBodySize should match)
    max_body_bytes: int = 128 << 20
    #: pixels of the frame, read from the image header before anything is decoded
    max_pixels: int = 50_000_000
    #: objects (shapes or states) in one request
    max_objects: int = 128
    #: vertices of one polygon
    max_polygon_vertices: int = 10_000
    #: numbers in one request (mask runs and coordinates of all its shapes together)
    max_numbers: int = 4_000_000
    #: nesting of the JSON body (CVAT's payload is 4 deep)
    max_json_depth: int = 16

    _ENV = {
        "max_body_bytes": "NAPARI_STM_MAX_BODY_BYTES",
        "max_pixels": "NAPARI_STM_MAX_PIXELS",
        "max_objects": "NAPARI_STM_MAX_OBJECTS",
        "max_polygon_vertices": "NAPARI_STM_MAX_POLYGON_VERTICES",
        "max_numbers": "NAPARI_STM_MAX_NUMBERS",
        "max_json_depth": "NAPARI_STM_MAX_JSON_DEPTH",
    }

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{f.name} must be a positive integer, got {value!r}")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Limits:
        env = dict(os.environ if env is None else env)
        values = {}
        for name, var in cls._ENV.items():
            raw = env.get(var)
            if raw is None or raw.strip() == "":
                continue
            try:
                values[name] = int(raw)
            except ValueError:
                raise ValueError(f"{var}={raw!r} is not a whole number") from None
        return cls(**values)
