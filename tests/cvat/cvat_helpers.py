"""Helpers of the CVAT adapter tests."""

from __future__ import annotations

import base64
import io

import numpy as np
import PIL.Image


def b64png(frame: np.ndarray) -> str:
    buf = io.BytesIO()
    PIL.Image.fromarray(frame).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)
