"""Copy-the-first-mask baseline: every frame's prediction is the first frame's annotation.

It is the floor any propagation method must beat (it scores the objects that do not move).

    python benchmarks/copy_first_mask.py ../shared/data/davis2016-dev /tmp/copy_first
    napari-stm evaluate /tmp/copy_first ../shared/data/davis2016-dev --csv /tmp/copy_first

Works on any ground truth layout `napari-stm evaluate` reads (e.g. `<root>/<seq>/Annotations`
or the official `<root>/Annotations/480p/<seq>`). Predictions are written for every frame of
`JPEGImages` when the sequence has one, else for every annotated frame.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from napari_stm.evaluation import find_sequences
from napari_stm.io import IMAGE_EXTENSIONS, natural_key, read_label_image, write_palette_png


def frame_stems(gt_root: Path, sequence: str, gt_dir: Path) -> list[str]:
    """Names of all frames of a sequence: from its JPEGImages folder, else its annotations."""
    for images in (gt_root / sequence / "JPEGImages", gt_root / "JPEGImages" / "480p" / sequence):
        if images.is_dir():
            files = [p for p in images.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS]
            if files:
                return [p.stem for p in sorted(files, key=lambda p: natural_key(p.name))]
    return [p.stem for p in sorted(gt_dir.glob("*.png"), key=lambda p: natural_key(p.name))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gt_root", type=Path, help="DAVIS-layout ground truth root")
    parser.add_argument("out", type=Path, help="folder for the predictions (<out>/<seq>/*.png)")
    args = parser.parse_args(argv)
    sequences = find_sequences(args.gt_root)
    if args.out.resolve() == args.gt_root.resolve():
        parser.error("the output folder must not be the ground truth folder")
    for sequence, gt_dir in sequences.items():
        target = args.out / sequence
        if target.exists() and any(target.iterdir()):
            parser.error(f"'{target}' is not empty; choose a new output folder")
        target.mkdir(parents=True, exist_ok=True)
        first = read_label_image(min(gt_dir.glob("*.png"), key=lambda p: natural_key(p.name)))
        stems = frame_stems(args.gt_root, sequence, gt_dir)
        for stem in stems:
            write_palette_png(target / f"{stem}.png", first)
        print(f"{sequence}: {len(stems)} frames")
    return 0


if __name__ == "__main__":
    sys.exit(main())
