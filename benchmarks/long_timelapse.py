"""Write a long procedural microscopy time-lapse in the Cell Tracking Challenge layout.

A drift probe for `benchmarks/heldout_eval.py`: the team's held-out SIM+ sequence has 150
frames, the time-lapses in ../shared/data at most 84, so whether masks still shrink (or grow)
after 100 frames cannot be seen on them. This writes ``OUT/raw_tif/tNNN.tif`` and
``OUT/Annotations_lineage/NNNNN.png`` (lineage labels: daughters keep their mother's id) from
`napari_stm.synthetic.make_cell_timelapse`, which training samples short clips from with other
seeds; a probe, not held-out real data.

    python benchmarks/long_timelapse.py /tmp/long-fluo --frames 150 --seed 101
    python benchmarks/heldout_eval.py /tmp/probe --ctc /tmp/long-fluo --columns 0:1 \\
        --methods copy default=
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import tifffile

from napari_stm.io import write_palette_png
from napari_stm.synthetic import make_cell_timelapse

# Nuclei like Fluo-N2DH-SIM+ (34 px, slow, few divisions over 150 frames, mild bleaching);
# DIC cells like DIC-C2DH-HeLa (90 px, 8 in a 512 field).
PRESETS = {
    "fluorescence": dict(height=480, width=480, n_cells=24, diameter=34.0, divisions=8, speed=0.03),
    "dic": dict(height=512, width=512, n_cells=8, diameter=90.0, divisions=3, speed=0.02),
}


def write_timelapse(
    out: Path,
    modality: str,
    frames: int,
    seed: int,
    snr: float = 1.0,
    bleaching: float = 0.004,
) -> tuple[int, float, float]:
    """Write the time-lapse; return the number of cells on frame 0 and the first / last frame's
    foreground share."""
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} exists and is not empty: choose a new folder")
    images, labels = make_cell_timelapse(
        n_frames=frames,
        modality=modality,
        entering=0,
        bleaching=bleaching,
        snr=snr,
        seed=seed,
        **PRESETS[modality],
    )
    (out / "raw_tif").mkdir(parents=True, exist_ok=True)
    (out / "Annotations_lineage").mkdir(parents=True, exist_ok=True)
    for t in range(frames):
        tifffile.imwrite(out / "raw_tif" / f"t{t:03d}.tif", images[t])
        write_palette_png(out / "Annotations_lineage" / f"{t:05d}.png", labels[t])
    fg = (labels > 0).mean(axis=(1, 2))
    return len(np.unique(labels[0])) - 1, float(fg[0]), float(fg[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--modality", choices=sorted(PRESETS), default="fluorescence")
    parser.add_argument("--frames", type=int, default=150)
    parser.add_argument("--seed", type=int, default=101)
    parser.add_argument("--snr", type=float, default=1.0, help="photon budget (lower: noisier)")
    parser.add_argument("--bleaching", type=float, default=0.004, help="signal lost per frame")
    args = parser.parse_args()
    cells, first, last = write_timelapse(
        args.out, args.modality, args.frames, args.seed, args.snr, args.bleaching
    )
    print(
        f"{args.out}: {args.frames} frames, {cells} cells on frame 0, "
        f"foreground {first:.3f} -> {last:.3f}"
    )


if __name__ == "__main__":
    main()
