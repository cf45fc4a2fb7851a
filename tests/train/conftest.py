"""Tiny training data written on the fly: still images with masks, and a DAVIS-layout folder.

Objects are white on black, so any misalignment between warped frames and warped labels shows
as disagreement between brightness and labels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _disc(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + ((xx - cx) / 1.3) ** 2 <= r**2


@pytest.fixture(scope="session")
def static_root(tmp_path_factory) -> Path:
    """Two sets of still images + masks (one object each), various sizes."""
    root = tmp_path_factory.mktemp("static")
    rng = np.random.default_rng(0)
    for name, sizes in (("set_a", [(80, 100), (90, 70)]), ("set_b", [(120, 120)])):
        (root / name / "images").mkdir(parents=True)
        (root / name / "masks").mkdir(parents=True)
        for i, (h, w) in enumerate(sizes):
            mask = _disc(h, w, h * rng.uniform(0.4, 0.6), w * rng.uniform(0.4, 0.6), h * 0.25)
            image = np.repeat((mask * 255).astype(np.uint8)[..., None], 3, axis=2)
            Image.fromarray(image).save(root / name / "images" / f"{i:03d}.png")
            Image.fromarray((mask * 255).astype(np.uint8)).save(
                root / name / "masks" / f"{i:03d}.png"
            )
        # an image without a mask is skipped
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / name / "images" / "lonely.png")
    return root


@pytest.fixture(scope="session")
def davis_root(tmp_path_factory) -> Path:
    """Three sequences of 10 frames, 2 white objects moving on black, palette PNG labels."""
    root = tmp_path_factory.mktemp("davis")
    h, w = 72, 128
    palette = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (256 * 3 - 9)
    for s, name in enumerate(("alpha", "beta", "gamma")):
        (root / name / "JPEGImages").mkdir(parents=True)
        (root / name / "Annotations").mkdir(parents=True)
        for t in range(10):
            labels = np.zeros((h, w), np.uint8)
            labels[_disc(h, w, 30 + s, 20 + 6 * t, 12)] = 1
            labels[_disc(h, w, 45, 100 - 5 * t, 10)] = 2
            frame = np.repeat(np.where(labels > 0, 255, 0).astype(np.uint8)[..., None], 3, axis=2)
            Image.fromarray(frame).save(root / name / "JPEGImages" / f"{t:05d}.jpg", quality=95)
            png = Image.fromarray(labels, mode="P")
            png.putpalette(palette)
            png.save(root / name / "Annotations" / f"{t:05d}.png")
    return root


def _brightness_agreement(images, labels) -> float:
    """Share of pixels where "bright" (above the frame's mid-level) equals "labelled"."""
    lum = images.mean(dim=1)  # [T, S, S]
    lo = lum.flatten(1).quantile(0.02, dim=1)[:, None, None]
    hi = lum.flatten(1).quantile(0.98, dim=1)[:, None, None]
    bright = lum > (lo + hi) / 2
    return float((bright == (labels > 0)).float().mean())


@pytest.fixture
def brightness_agreement():
    return _brightness_agreement


@pytest.fixture(scope="session")
def ctc_root(tmp_path_factory) -> Path:
    """A Cell Tracking Challenge layout: 6 uint16 LZW TIFF frames, palette lineage labels.

    Left half: two labelled bright nuclei drifting right. Right half: bright blobs without
    labels, so a crop that ever reaches the right half disagrees with its labels.
    """
    import tifffile

    root = tmp_path_factory.mktemp("ctc") / "fluo-01"
    (root / "raw_tif").mkdir(parents=True)
    (root / "Annotations_lineage").mkdir()
    h, w = 96, 160
    for t in range(6):
        labels = np.zeros((h, w), np.uint8)
        labels[_disc(h, w, 30, 20 + 2 * t, 9)] = 1
        labels[_disc(h, w, 65, 55 - t, 9)] = 2
        blobs = _disc(h, w, 30, 120, 10) | _disc(h, w, 70, 140, 10)
        frame = np.full((h, w), 100, np.uint16)
        frame[(labels > 0) | blobs] = 3000
        tifffile.imwrite(root / "raw_tif" / f"t{t:03d}.tif", frame, compression="lzw")
        Image.fromarray(labels, mode="P").save(root / "Annotations_lineage" / f"{t:05d}.png")
    return root
