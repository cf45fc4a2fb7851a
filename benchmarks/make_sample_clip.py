"""Write the bundled sample clip: napari_stm/data/sample_clip/{frames/*.jpg, masks/00000.png}.

The clip is synthetic (napari_stm.synthetic.make_clip, fixed seed), so it carries no licence
beyond the project's. Frames are JPEGs and the first frame's labels a palette PNG with the DAVIS
colours, the layout of a DAVIS sequence: the README's example propagates it.

    python benchmarks/make_sample_clip.py [--out DIR]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from napari_stm.synthetic import make_clip

SEED = 2
N_FRAMES = 24
HEIGHT, WIDTH = 240, 320
N_OBJECTS = 3
JPEG_QUALITY = 90
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "napari_stm" / "data" / "sample_clip"


def davis_palette() -> np.ndarray:
    """The DAVIS (PASCAL VOC) colour map: [256, 3] uint8, id 1 dark red, 2 green, 3 olive ..."""
    palette = np.zeros((256, 3), np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette[i] = (r, g, b)
    return palette


def write_sample(out: Path) -> int:
    """Write the clip under ``out`` (replacing its frames/ and masks/); return its size in bytes."""
    frames, labels = make_clip(
        n_frames=N_FRAMES, height=HEIGHT, width=WIDTH, n_objects=N_OBJECTS, seed=SEED
    )
    for sub in ("frames", "masks"):
        if (out / sub).exists():
            shutil.rmtree(out / sub)
        (out / sub).mkdir(parents=True)
    for t, frame in enumerate(frames):
        Image.fromarray(frame).save(out / "frames" / f"{t:05d}.jpg", quality=JPEG_QUALITY)
    mask = Image.fromarray(labels[0], mode="P")
    mask.putpalette(davis_palette().ravel().tolist())
    mask.save(out / "masks" / "00000.png")
    return sum(p.stat().st_size for p in out.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    size = write_sample(args.out)
    print(f"wrote {N_FRAMES} frames and the first mask to {args.out} ({size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
