"""Training clips: a few frames of a video with per-object labels, cropped to a square.

Three sources, all giving the same sample layout:

- :class:`PseudoVideoDataset`: the paper's first stage. A still image and its object mask become
  a short "video" by random affine and elastic warps, one per frame; with some probability a
  second object, cut from another image, is pasted over it and moves on its own (a second
  object, and occlusions).
- :class:`ProceduralDataset`: clips from :func:`napari_stm.synthetic.make_clip` (textured shapes
  over textured backgrounds, crossing paths), so training runs with no external data at all.
- :class:`DavisDataset`: real videos in the DAVIS layout, a few frames per sample whose maximum
  frame gap grows during training (the paper's curriculum, 0 -> 25).
- :class:`CtcDataset`: real microscopy time-lapses in the Cell Tracking Challenge layout
  (``raw_tif/t000.tif`` + ``Annotations*/00000.png``), optionally restricted to a band of
  columns (the rest held out), zoomed so the cells land at a chosen size in the crop.
- :class:`CellTimelapseDataset`: procedural fluorescence and DIC time-lapses of
  :func:`napari_stm.synthetic.make_cell_timelapse` (crowded, dividing, entering cells).

Microscopy frames are normalised exactly as the engine normalises a user's frames
(:class:`napari_stm.core.frames.FrameReader`: uint8 / 255, other dtypes by robust percentiles,
grey to three channels), then augmented (:func:`augment_microscopy`).

A sample is ``{"images": float32 [T, 3, S, S] in [0, 1], "labels": int64 [T, S, S]}`` with labels
0 (background) and 1..K (``objects`` = K slots; objects are taken from those present in the first
frame, object 1 is always present there, and unused slots stay empty). Every sample is a pure
function of (seed, index), so a run is reproducible and resumes exactly where it stopped, with
any number of loader workers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from napari_stm.core.errors import InputError
from napari_stm.core.frames import label_dtype

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
#: an object must cover at least this share of the first frame's crop to be trained on
MIN_OBJECT_SHARE = 0.004
#: crops tried before settling for the best one seen
CROP_TRIES = 10
#: clips drawn for one index before settling for one with no usable object (then empty labels)
CLIP_TRIES = 5

Sample = dict[str, Tensor]


# --------------------------------------------------------------------------- randomness


def sample_rng(seed: int, index: int, salt: int = 0) -> np.random.Generator:
    """The generator of one sample: independent streams for every (seed, index, salt)."""
    return np.random.default_rng(np.random.SeedSequence([seed, index, salt]))


# --------------------------------------------------------------------------- geometry


def affine(
    rng: np.random.Generator,
    rotate: float = 0.0,
    scale: tuple[float, float] = (1.0, 1.0),
    shear: float = 0.0,
    translate: float = 0.0,
) -> np.ndarray:
    """A random 2x3 map of normalised output coordinates onto normalised input coordinates.

    ``rotate`` and ``shear`` in degrees (uniform in +-value), ``scale`` a range (zoom factor:
    above 1 shows a smaller region larger), ``translate`` in half-widths (+-value).
    """
    a = math.radians(rng.uniform(-rotate, rotate))
    sh = math.radians(rng.uniform(-shear, shear))
    z = rng.uniform(*scale)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    shr = np.array([[1.0, math.tan(sh)], [0.0, 1.0]])
    m = rot @ shr / z
    t = rng.uniform(-translate, translate, 2)
    return np.concatenate([m, t[:, None]], axis=1)


def compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """2x3 maps: ``outer`` applied after ``inner`` (x -> outer(inner(x)))."""
    o = np.vstack([outer, [0.0, 0.0, 1.0]])
    i = np.vstack([inner, [0.0, 0.0, 1.0]])
    return (o @ i)[:2]


def elastic_field(rng: np.random.Generator, size: int, alpha: float, cells: int = 4) -> Tensor:
    """A smooth random displacement [size, size, 2] in normalised units, at most about ``alpha``.

    Random offsets on a coarse ``cells`` x ``cells`` grid, interpolated bicubically: a smooth,
    non-rigid deformation like the paper's (cheap at any crop size).
    """
    coarse = torch.from_numpy(rng.uniform(-alpha, alpha, (1, 2, cells, cells)).astype(np.float32))
    field = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)
    return field[0].permute(1, 2, 0)


def crop_map(center: tuple[float, float], side: float, src_hw: tuple[int, int]) -> np.ndarray:
    """2x3 map from a square's normalised coordinates onto a source image's (grid_sample's).

    ``center`` (y, x) and ``side`` in source pixels.
    """
    h, w = src_hw
    cy, cx = center
    # grid_sample (align_corners=False): x_norm = (x_pixel + 0.5) / W * 2 - 1
    sx, sy = side / w, side / h
    tx, ty = (cx + 0.5) / w * 2 - 1, (cy + 0.5) / h * 2 - 1
    return np.array([[sx, 0.0, tx], [0.0, sy, ty]])


def make_grid(theta: np.ndarray, size: int, field: Tensor | None = None) -> Tensor:
    """Sampling grid [1, size, size, 2] of a 2x3 map (``field`` displaces the output first)."""
    lin = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    pts = torch.stack([xx, yy], dim=-1)  # (x, y) as grid_sample wants
    if field is not None:
        pts = pts + field
    th = torch.from_numpy(theta.astype(np.float32))
    grid = pts @ th[:, :2].T + th[:, 2]
    return grid[None]


def warp_image(image: Tensor, grid: Tensor) -> Tensor:
    """[C, H, W] float -> [C, S, S]; outside the source is 0, like the labels."""
    return F.grid_sample(
        image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )[0]


def warp_labels(labels: Tensor, grid: Tensor) -> Tensor:
    """[H, W] integer labels -> [S, S] by nearest neighbour; outside the source is background."""
    out = F.grid_sample(
        labels[None, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False
    )
    return out[0, 0].round().long()


def warp_mask(mask: Tensor, grid: Tensor) -> Tensor:
    """[H, W] {0, 1} mask -> soft [S, S] (bilinear: the same interpolation as the image)."""
    return warp_image(mask[None].float(), grid)[0]


# --------------------------------------------------------------------------- photometry


def jitter_colours(rng: np.random.Generator, frames: Tensor, strength: float = 0.1) -> Tensor:
    """Brightness, contrast and saturation changes per clip and, weaker, per frame; sometimes
    grey (microscopy is often single-channel)."""
    out = frames.clone()
    t = frames.shape[0]
    base = rng.uniform(1 - strength, 1 + strength, 3)
    for i in range(t):
        b, c, s = base * rng.uniform(1 - strength / 3, 1 + strength / 3, 3)
        x = out[i] * b
        mean = x.mean()
        x = (x - mean) * c + mean
        grey = x.mean(dim=0, keepdim=True)
        out[i] = (x - grey) * s + grey
    if rng.random() < 0.1:
        out = out.mean(dim=1, keepdim=True).expand_as(out).clone()
    return out.clamp(0.0, 1.0)


# --------------------------------------------------------------------------- objects


def pick_objects(
    rng: np.random.Generator, labels: Tensor, objects: int, min_pixels: int
) -> Tensor | None:
    """Relabel [T, S, S] labels to 0..k (k <= objects) with objects present in frame 0.

    Objects smaller than ``min_pixels`` in frame 0 are not chosen. Returns None when none is
    left. Objects not chosen become background.
    """
    ids, counts = torch.unique(labels[0], return_counts=True)
    present = [int(i) for i, c in zip(ids, counts, strict=True) if i != 0 and c >= min_pixels]
    if not present:
        return None
    chosen = list(rng.permutation(present)[:objects])
    lut = torch.zeros(int(labels.max()) + 1, dtype=torch.long)
    for k, i in enumerate(chosen):
        lut[i] = k + 1
    return lut[labels]


def _read_rgb(path: Path, min_side: int | None = None) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        if min_side is not None and im.format == "JPEG":
            # JPEG decodes at 1/2, 1/4 or 1/8 scale almost for free: small crops need no more.
            scale = min(im.size) / min_side
            if scale >= 2:
                im.draft("RGB", (im.size[0] // int(scale), im.size[1] // int(scale)))
        return np.asarray(im.convert("RGB"))


def _read_labels(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in ("P", "L", "I", "I;16", "1"):
            return np.asarray(im).astype(np.int64)
        # RGB masks: anything non-black is the object
        return (np.asarray(im.convert("L")) > 0).astype(np.int64)


def _to_tensor(image: np.ndarray) -> Tensor:
    return torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float() / 255.0


def _shrink(image: Tensor, needed: float) -> Tensor:
    """Downsize [C, H, W] (antialiased) when its shorter side exceeds 1.5x ``needed`` pixels.

    Warps sample sparsely; a much larger source would alias. Normalised coordinates do not
    depend on the size, so the same sampling grid still applies.
    """
    h, w = image.shape[-2:]
    if min(h, w) <= 1.5 * needed:
        return image
    f = 1.2 * needed / min(h, w)
    size = (max(1, round(h * f)), max(1, round(w * f)))
    return F.interpolate(
        image[None], size=size, mode="bilinear", antialias=True, align_corners=False
    )[0]


class _ClipDataset(Dataset):
    """Random-access clips: ``_clip(rng)`` draws one; an index retries until an object shows."""

    seed: int
    objects: int
    crop: int
    length: int
    salt: int = 0

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Sample:
        min_pixels = max(1, int(MIN_OBJECT_SHARE * self.crop * self.crop))
        for attempt in range(CLIP_TRIES):
            rng = sample_rng(self.seed, index, self.salt * 100 + attempt)
            frames, labels = self._clip(rng, index)
            chosen = pick_objects(rng, labels, self.objects, min_pixels)
            if chosen is not None:
                break
        else:
            chosen = torch.zeros_like(labels)
        return {"images": frames.contiguous(), "labels": chosen}

    def _clip(self, rng: np.random.Generator, index: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


# --------------------------------------------------------------------------- still images


def find_image_mask_pairs(roots: Sequence[str | os.PathLike]) -> list[tuple[Path, Path]]:
    """(image, mask) pairs under each root: ``<set>/images/<stem>.*`` + ``<set>/masks/<stem>.*``.

    A root may be one such set or a folder of sets. Images without a mask are skipped.
    """
    pairs: list[tuple[Path, Path]] = []
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            raise InputError(f"image folder not found: {root}")
        sets = (
            [root]
            if (root / "images").is_dir()
            else sorted(
                p for p in root.iterdir() if (p / "images").is_dir() and (p / "masks").is_dir()
            )
        )
        if not sets or not (sets[0] / "masks").is_dir():
            raise InputError(
                f"{root} holds no images/ and masks/ folders (expected <set>/images/<stem>.jpg "
                "and <set>/masks/<stem>.png)"
            )
        for s in sets:
            masks = {
                p.stem: p for p in (s / "masks").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
            }
            for img in sorted((s / "images").iterdir()):
                if img.suffix.lower() in IMAGE_SUFFIXES and img.stem in masks:
                    pairs.append((img, masks[img.stem]))
    if not pairs:
        raise InputError(f"no image/mask pairs found under {', '.join(map(str, roots))}")
    return pairs


class PseudoVideoDataset(_ClipDataset):
    """Short clips made from still images and their masks by random warps (stage 1)."""

    salt = 1

    def __init__(
        self,
        pairs: Sequence[tuple[Path, Path]],
        crop: int = 384,
        frames: int = 3,
        objects: int = 2,
        seed: int = 0,
        paste_probability: float = 0.5,
        length: int = 1_000_000,
    ) -> None:
        if not pairs:
            raise InputError("PseudoVideoDataset needs at least one image/mask pair")
        self.pairs = list(pairs)
        self.crop, self.frames, self.objects = crop, frames, objects
        self.seed, self.paste_probability, self.length = seed, paste_probability, length

    def _load(self, i: int) -> tuple[Tensor, Tensor]:
        """Image [3, H', W'] (shrunk for the crop size) and mask [H, W] (full size, bool)."""
        img_path, mask_path = self.pairs[i]
        image = _read_rgb(img_path)
        mask = _read_labels(mask_path) > 0
        if mask.shape != image.shape[:2]:
            raise InputError(
                f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image is "
                f"{image.shape[1]}x{image.shape[0]}"
            )
        return _shrink(_to_tensor(image), self.crop), torch.from_numpy(mask)

    def _clip(self, rng: np.random.Generator, index: int) -> tuple[Tensor, Tensor]:
        s, t = self.crop, self.frames
        image, mask = self._load(int(rng.integers(len(self.pairs))))
        h, w = mask.shape
        ys, xs = torch.nonzero(mask, as_tuple=True)
        if len(ys):
            cy, cx = float(ys.float().mean()), float(xs.float().mean())
        else:
            cy, cx = h / 2, w / 2
        side = min(h, w) * rng.uniform(0.7, 1.0)
        center = (
            float(np.clip(cy + rng.uniform(-0.2, 0.2) * side, side / 2, h - side / 2)),
            float(np.clip(cx + rng.uniform(-0.2, 0.2) * side, side / 2, w - side / 2)),
        )
        base = crop_map(center, side, (h, w))
        flip = rng.random() < 0.5
        frames = torch.empty(t, 3, s, s)
        alpha1 = torch.empty(t, s, s)
        for i in range(t):
            theta = affine(rng, rotate=20, scale=(0.9, 1.1), shear=10, translate=0.1)
            if flip:
                theta[:, 0] *= -1
            grid = make_grid(compose(base, theta), s, elastic_field(rng, s, 0.03))
            frames[i] = warp_image(image, grid)
            alpha1[i] = warp_mask(mask, grid)
        labels = (alpha1 >= 0.5).long()
        if self.objects > 1 and rng.random() < self.paste_probability:
            frames, labels = self._paste(rng, frames, labels)
        return jitter_colours(rng, frames), labels

    def _paste(
        self, rng: np.random.Generator, frames: Tensor, labels: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Another image's object, moving over the clip on its own path, as object 2."""
        s, t = self.crop, self.frames
        image, mask = self._load(int(rng.integers(len(self.pairs))))
        ys, xs = torch.nonzero(mask, as_tuple=True)
        if len(ys) < 16:
            return frames, labels
        y0, y1, x0, x1 = int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())
        side = max(y1 - y0, x1 - x0) * 1.1 + 2
        obj = crop_map(((y0 + y1) / 2, (x0 + x1) / 2), side, mask.shape)
        # The object spans a quarter to a half of the crop, starts anywhere, drifts across.
        size = rng.uniform(0.25, 0.5)
        start = rng.uniform(-0.6, 0.6, 2)
        drift = rng.uniform(-0.3, 0.3, 2)
        out_frames, out_labels = frames.clone(), labels.clone()
        for i in range(t):
            pos = start + drift * i / max(t - 1, 1)
            # output -> object square: centre at pos, half-size ``size``, own small rotation
            place = np.array([[1 / size, 0.0, -pos[0] / size], [0.0, 1 / size, -pos[1] / size]])
            theta = compose(affine(rng, rotate=15, scale=(0.9, 1.1), shear=5), place)
            grid = make_grid(compose(obj, theta), s, elastic_field(rng, s, 0.02))
            alpha = warp_mask(mask, grid)
            out_frames[i] = warp_image(image, grid) * alpha + frames[i] * (1 - alpha)
            out_labels[i][alpha >= 0.5] = 2
        # The pasted object must leave the first one visible in frame 0, else no paste.
        if (out_labels[0] == 1).sum() < MIN_OBJECT_SHARE * s * s:
            return frames, labels
        return out_frames, out_labels


# --------------------------------------------------------------------------- procedural


class ProceduralDataset(_ClipDataset):
    """Clips of :func:`napari_stm.synthetic.make_clip`: no data files needed."""

    salt = 2

    def __init__(
        self,
        crop: int = 384,
        frames: int = 3,
        objects: int = 2,
        seed: int = 0,
        clip_frames: int = 8,
        length: int = 1_000_000,
    ) -> None:
        if clip_frames < frames:
            raise InputError(f"clip_frames ({clip_frames}) must be at least frames ({frames})")
        self.crop, self.frames, self.objects = crop, frames, objects
        self.seed, self.clip_frames, self.length = seed, clip_frames, length

    def _clip(self, rng: np.random.Generator, index: int) -> tuple[Tensor, Tensor]:
        from napari_stm.synthetic import make_clip

        s = self.crop
        video, labels = make_clip(
            n_frames=self.clip_frames,
            height=s,
            width=s,
            n_objects=int(rng.integers(1, 4)),
            seed=int(rng.integers(2**31)),
            occlusion=bool(rng.random() < 0.7),
            dtype=np.float32,
        )
        order = np.sort(rng.choice(self.clip_frames, self.frames, replace=False))
        if rng.random() < 0.5:
            order = order[::-1]
        frames = torch.from_numpy(video[order]).permute(0, 3, 1, 2).contiguous()
        labs = torch.from_numpy(labels[order].astype(np.int64))
        return jitter_colours(rng, frames), labs


# --------------------------------------------------------------------------- DAVIS layout


def find_davis_sequences(
    root: str | os.PathLike, holdout: Sequence[str] = ()
) -> dict[str, list[tuple[Path, Path]]]:
    """``<root>/<seq>/JPEGImages/*.jpg`` + ``Annotations/*.png`` -> {seq: [(frame, labels)]}.

    Also accepts the DAVIS release layout ``<root>/JPEGImages/480p/<seq>``. Sequences named in
    ``holdout`` are left out; naming one that does not exist is an error (a typo would
    otherwise train on the validation set).
    """
    root = Path(root)
    if (root / "JPEGImages" / "480p").is_dir():
        seq_dirs = {
            p.name: (p, root / "Annotations" / "480p" / p.name)
            for p in sorted((root / "JPEGImages" / "480p").iterdir())
            if p.is_dir()
        }
    elif root.is_dir():
        seq_dirs = {
            p.name: (p / "JPEGImages", p / "Annotations")
            for p in sorted(root.iterdir())
            if (p / "JPEGImages").is_dir() and (p / "Annotations").is_dir()
        }
    else:
        raise InputError(f"DAVIS folder not found: {root}")
    unknown = sorted(set(holdout) - set(seq_dirs))
    if unknown:
        raise InputError(
            f"held-out sequences not in {root}: {', '.join(unknown)} "
            f"(available: {', '.join(seq_dirs) or 'none'})"
        )
    out: dict[str, list[tuple[Path, Path]]] = {}
    for name, (img_dir, ann_dir) in seq_dirs.items():
        if name in holdout:
            continue
        anns = {p.stem: p for p in ann_dir.glob("*.png")}
        frames = [
            (p, anns[p.stem])
            for p in sorted(img_dir.iterdir())
            if p.suffix.lower() in IMAGE_SUFFIXES and p.stem in anns
        ]
        if len(frames) >= 2:
            out[name] = frames
    if not out:
        raise InputError(
            f"no usable sequences in {root} (expected <seq>/JPEGImages/*.jpg with "
            "<seq>/Annotations/*.png, at least 2 annotated frames each)"
        )
    return out


def choose_frames(rng: np.random.Generator, n: int, count: int, gap: int) -> np.ndarray:
    """``count`` increasing frame indices in [0, n), consecutive ones 1..``gap`` apart.

    The gap shrinks so the clip fits a short sequence; a sequence shorter than the clip
    repeats frames.
    """
    if count == 1:
        return rng.integers(n, size=1)
    gap = min(gap, (n - 1) // (count - 1))
    if gap < 1:
        return np.sort(rng.integers(n, size=count))
    steps = rng.integers(1, gap + 1, count - 1)
    start = int(rng.integers(n - int(steps.sum())))
    return start + np.concatenate([[0], np.cumsum(steps)])


class DavisDataset(_ClipDataset):
    """Real clips: ``frames`` annotated frames of one sequence, in order (or reversed).

    Consecutive chosen frames are 1..g apart, where g grows linearly from 1 to ``max_gap`` over
    the first ``curriculum`` samples (the paper's curriculum: 0 -> 25).
    """

    salt = 3

    def __init__(
        self,
        sequences: dict[str, list[tuple[Path, Path]]],
        crop: int = 384,
        frames: int = 3,
        objects: int = 2,
        seed: int = 0,
        max_gap: int = 25,
        curriculum: int = 0,
        length: int = 1_000_000,
    ) -> None:
        if not sequences:
            raise InputError("DavisDataset needs at least one sequence")
        self.sequences = sequences
        self.names = sorted(sequences)
        self.crop, self.frames, self.objects = crop, frames, objects
        self.seed, self.max_gap, self.curriculum, self.length = seed, max_gap, curriculum, length

    def gap_at(self, index: int) -> int:
        """The largest frame gap of sample ``index`` under the curriculum."""
        if self.curriculum <= 0:
            return max(1, self.max_gap)
        return max(1, round(self.max_gap * min(1.0, index / self.curriculum)))

    def _clip(self, rng: np.random.Generator, index: int) -> tuple[Tensor, Tensor]:
        s, t = self.crop, self.frames
        files = self.sequences[self.names[int(rng.integers(len(self.names)))]]
        idx = choose_frames(rng, len(files), t, self.gap_at(index))
        if rng.random() < 0.5:
            idx = idx[::-1]
        labels_np = [_read_labels(files[i][1]) for i in idx]
        h, w = labels_np[0].shape
        first = torch.from_numpy(labels_np[0])
        # A random square of 36-100 % of the shorter side's area, where frame 0 shows an object.
        best, best_count = None, -1
        for _ in range(CROP_TRIES):
            side = min(h, w) * math.sqrt(rng.uniform(0.36, 1.0))
            cy = rng.uniform(side / 2, h - side / 2)
            cx = rng.uniform(side / 2, w - side / 2)
            y0, x0 = int(cy - side / 2), int(cx - side / 2)
            count = int((first[y0 : y0 + int(side), x0 : x0 + int(side)] > 0).sum())
            if count > best_count:
                best, best_count = (cy, cx, side), count
            if count >= MIN_OBJECT_SHARE * side * side * 4:
                break
        assert best is not None
        cy, cx, side = best
        base = crop_map((cy, cx), side, (h, w))
        flip = rng.random() < 0.5
        frames = torch.empty(t, 3, s, s)
        labels = torch.empty(t, s, s, dtype=torch.long)
        for k, i in enumerate(idx):
            # Any decoded size will do: the grid is in normalised coordinates.
            needed = s * min(h, w) / side
            image = _shrink(_to_tensor(_read_rgb(files[i][0], min_side=int(needed))), needed)
            theta = affine(rng, rotate=10, scale=(0.95, 1.05), shear=5, translate=0.03)
            if flip:
                theta[:, 0] *= -1
            grid = make_grid(compose(base, theta), s)
            frames[k] = warp_image(image, grid)
            labels[k] = warp_labels(torch.from_numpy(labels_np[k]), grid)
        return jitter_colours(rng, frames), labels


# --------------------------------------------------------------------------- microscopy


def augment_microscopy(rng: np.random.Generator, frames: Tensor) -> Tensor:
    """Intensity, gamma, blur and noise changes of grey [T, 3, S, S] frames in [0, 1].

    One draw per clip (a microscope's settings hold over a time-lapse) and a weaker one per
    frame (photobleaching, focus drift). Kept grey: the three channels stay equal.
    """
    t = frames.shape[0]
    x = frames[:, :1].clone()
    gamma = math.exp(rng.uniform(-0.4, 0.4))
    gain, offset = rng.uniform(0.7, 1.3), rng.uniform(-0.1, 0.1)
    blur = rng.uniform(0.3, 1.2) if rng.random() < 0.3 else 0.0
    noise = rng.uniform(0.0, 0.06) if rng.random() < 0.5 else 0.0
    if blur > 0:
        radius = max(1, math.ceil(2.5 * blur))
        taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
        k = torch.exp(-(taps**2) / (2 * blur**2))
        k = k / k.sum()
        x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
        x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))
    for i in range(t):
        drift = rng.uniform(0.95, 1.05)
        y = x[i].clamp(0, 1) ** gamma
        y = (y - y.mean()) * gain * drift + y.mean() + offset
        if noise > 0:
            gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
            y = y + noise * torch.randn(y.shape, generator=gen)
        x[i] = y
    return x.clamp(0.0, 1.0).expand(-1, 3, -1, -1).contiguous()


def _turn(rng: np.random.Generator) -> np.ndarray:
    """A random 90-degree rotation (and flip) as a 2x3 map: microscopy has no up or down."""
    k = int(rng.integers(4))
    c, s = [1.0, 0.0, -1.0, 0.0][k], [0.0, 1.0, 0.0, -1.0][k]
    m = np.array([[c, -s, 0.0], [s, c, 0.0]])
    if rng.random() < 0.5:
        m[:, 0] *= -1
    return m


def _median_diameter(labels: np.ndarray) -> float | None:
    """Median equivalent diameter (pixels) of the objects of a label image."""
    counts = np.bincount(labels.ravel())[1:]
    counts = counts[counts > 0]
    if not len(counts):
        return None
    return float(np.median(2 * np.sqrt(counts / math.pi)))


class _Frames:
    """A CTC sequence's frames (``len`` and ``[t]``, as FrameReader wants them), each decoded
    once per process: a time-lapse is small (tens of MB) and LZW decoding is slow."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, t: int) -> np.ndarray:
        import tifffile

        if t not in self._cache:
            self._cache[t] = tifffile.imread(self.paths[t])
        return self._cache[t]


def find_ctc_sequences(
    roots: Sequence[str | os.PathLike],
    annotations: Sequence[str] = ("Annotations_lineage", "Annotations"),
) -> dict[str, list[tuple[Path, Path]]]:
    """``<root>/raw_tif/t000.tif ...`` with ``<root>/<annotations>/00000.png ...`` -> {name:
    [(frame, labels)]} for each root, the first annotation folder of ``annotations`` present.

    Frame ``tNNN`` pairs with labels ``NNNNN``; frames without labels are skipped.
    """
    out: dict[str, list[tuple[Path, Path]]] = {}
    for root in roots:
        root = Path(root)
        raw = root / "raw_tif"
        if not raw.is_dir():
            raise InputError(f"{root} is not a Cell Tracking Challenge sequence (no raw_tif/)")
        ann = next((root / a for a in annotations if (root / a).is_dir()), None)
        if ann is None:
            raise InputError(f"{root} has none of the label folders {', '.join(annotations)}")
        labels = {int(p.stem): p for p in ann.glob("*.png") if p.stem.isdigit()}
        frames = []
        for p in sorted(raw.glob("t*.tif*")):
            digits = p.stem.split(".")[0][1:]
            if digits.isdigit() and int(digits) in labels:
                frames.append((p, labels[int(digits)]))
        if len(frames) < 2:
            raise InputError(f"{root}: fewer than 2 frames with labels in {ann.name}/")
        out[root.name] = frames
    return out


class CtcDataset(_ClipDataset):
    """Real microscopy clips: ``frames`` consecutive-ish frames of a CTC sequence.

    Only ``columns`` (a share of the width, e.g. (0, 0.5) for the left half) is ever read, so
    the rest of each sequence stays held out. The crop is zoomed so that the cells' median
    diameter lands log-uniformly in ``cell_px`` pixels of the crop (the network meets 20- and
    300-pixel cells at the size it works best at); then 90-degree turns, flips, a mild affine
    per frame and :func:`augment_microscopy`.
    """

    salt = 5

    def __init__(
        self,
        sequences: dict[str, list[tuple[Path, Path]]],
        crop: int = 384,
        frames: int = 3,
        objects: int = 2,
        seed: int = 0,
        max_gap: int = 3,
        columns: tuple[float, float] = (0.0, 1.0),
        cell_px: tuple[float, float] = (16.0, 96.0),
        length: int = 1_000_000,
    ) -> None:
        if not sequences:
            raise InputError("CtcDataset needs at least one sequence")
        if not 0 <= columns[0] < columns[1] <= 1:
            raise InputError(f"columns must be 0 <= a < b <= 1, got {columns}")
        self.sequences = sequences
        self.names = sorted(sequences)
        self.crop, self.frames, self.objects = crop, frames, objects
        self.seed, self.max_gap, self.length = seed, max_gap, length
        self.columns, self.cell_px = columns, cell_px
        self._readers: dict[str, object] = {}
        self._label_cache: dict[tuple[str, int], np.ndarray] = {}

    def _labels(self, name: str, i: int) -> np.ndarray:
        key = (name, i)
        if key not in self._label_cache:
            labels = _read_labels(self.sequences[name][i][1])
            # Smallest dtype that keeps the ids apart: CTC masks number cells past 255.
            self._label_cache[key] = labels.astype(label_dtype(int(labels.max(initial=0))))
        return self._label_cache[key].astype(np.int64)

    def _reader(self, name: str):  # noqa: ANN202 - a FrameReader
        from napari_stm.core.frames import FrameReader

        if name not in self._readers:
            self._readers[name] = FrameReader(_Frames([f for f, _ in self.sequences[name]]))
        return self._readers[name]

    def _clip(self, rng: np.random.Generator, index: int) -> tuple[Tensor, Tensor]:
        s, t = self.crop, self.frames
        name = self.names[int(rng.integers(len(self.names)))]
        files = self.sequences[name]
        idx = choose_frames(rng, len(files), t, self.max_gap)
        if rng.random() < 0.5:
            idx = idx[::-1]
        labels_np = [self._labels(name, int(i)) for i in idx]
        h, w = labels_np[0].shape
        x0, x1 = int(self.columns[0] * w), int(self.columns[1] * w)
        region = labels_np[0][:, x0:x1]
        diam = _median_diameter(region) or 0.1 * min(h, x1 - x0)
        target = math.exp(rng.uniform(*np.log(self.cell_px)))
        side = min(s * diam / target, h, x1 - x0)
        best, best_count = None, -1
        for _ in range(CROP_TRIES):
            cy = rng.uniform(side / 2, h - side / 2)
            cx = rng.uniform(x0 + side / 2, x1 - side / 2)
            ya, xa = int(cy - side / 2), int(cx - side / 2)
            count = int((labels_np[0][ya : ya + int(side), xa : xa + int(side)] > 0).sum())
            if count > best_count:
                best, best_count = (cy, cx), count
            if count >= 0.1 * side * side:
                break
        assert best is not None
        # Only a window around the crop is warped (the per-frame affine moves it a little):
        # the whole frame would be shrunk and sampled for nothing.
        m = 0.15 * side
        ya, yb = max(0, int(best[0] - side / 2 - m)), min(h, int(best[0] + side / 2 + m) + 1)
        # The window stops at the band's edges: held-out columns are never read.
        xa, xb = max(x0, int(best[1] - side / 2 - m)), min(x1, int(best[1] + side / 2 + m) + 1)
        centre = (best[0] - ya, best[1] - xa)
        base = compose(crop_map(centre, side, (yb - ya, xb - xa)), _turn(rng))
        reader = self._reader(name)
        frames = torch.empty(t, 1, s, s)
        labels = torch.empty(t, s, s, dtype=torch.long)
        for k, i in enumerate(idx):
            window = reader.read(int(i))[ya:yb, xa:xb, :1]  # grey: its channels are equal
            image = _shrink(torch.from_numpy(np.ascontiguousarray(window)).permute(2, 0, 1), s)
            theta = affine(rng, rotate=5, scale=(0.97, 1.03), translate=0.01)
            grid = make_grid(compose(base, theta), s)
            frames[k] = warp_image(image, grid)
            labels[k] = warp_labels(torch.from_numpy(labels_np[k][ya:yb, xa:xb]), grid)
        return augment_microscopy(rng, frames.expand(-1, 3, -1, -1)), labels


class CellTimelapseDataset(_ClipDataset):
    """Procedural microscopy clips (:func:`napari_stm.synthetic.make_cell_timelapse`).

    Half fluorescence, half DIC; cell diameters log-uniform in ``cell_px`` pixels of the crop,
    5-60 % of the crop covered by cells, uint8 or uint16 frames normalised as the engine does.
    """

    salt = 6

    def __init__(
        self,
        crop: int = 384,
        frames: int = 3,
        objects: int = 2,
        seed: int = 0,
        cell_px: tuple[float, float] = (14.0, 96.0),
        length: int = 1_000_000,
    ) -> None:
        self.crop, self.frames, self.objects = crop, frames, objects
        self.seed, self.cell_px, self.length = seed, cell_px, length

    def _clip(self, rng: np.random.Generator, index: int) -> tuple[Tensor, Tensor]:
        from napari_stm.core.frames import FrameReader
        from napari_stm.synthetic import make_cell_timelapse

        s, t = self.crop, self.frames
        diameter = math.exp(rng.uniform(*np.log(self.cell_px)))
        coverage = rng.uniform(0.05, 0.6)
        n_cells = int(np.clip(round(coverage * s * s / (math.pi * diameter**2 / 4)), 1, 200))
        video, labs = make_cell_timelapse(
            n_frames=t,
            height=s,
            width=s,
            n_cells=n_cells,
            diameter=diameter,
            modality="dic" if rng.random() < 0.5 else "fluorescence",
            divisions=int(rng.integers(0, 3)),
            entering=int(rng.integers(0, 3)),
            bleaching=rng.uniform(0.0, 0.05),
            speed=rng.uniform(0.02, 0.25),
            snr=math.exp(rng.uniform(-1.0, 1.0)),
            seed=int(rng.integers(2**31)),
            dtype=np.uint8 if rng.random() < 0.3 else np.uint16,
        )
        reader = FrameReader(video)
        frames = torch.stack([torch.from_numpy(reader.read(i)).permute(2, 0, 1) for i in range(t)])
        return augment_microscopy(rng, frames), torch.from_numpy(labs.astype(np.int64))


# --------------------------------------------------------------------------- mixing


class MixedDataset(Dataset):
    """Each index drawn from one of several datasets, with the given weights."""

    def __init__(
        self, parts: Sequence[tuple[Dataset, float]], seed: int = 0, length: int = 1_000_000
    ) -> None:
        parts = [(d, float(w)) for d, w in parts if w > 0]
        if not parts:
            raise InputError("MixedDataset needs at least one dataset with a positive weight")
        self.datasets = [d for d, _ in parts]
        weights = np.array([w for _, w in parts])
        self.cumulative = np.cumsum(weights / weights.sum())
        self.seed, self.length = seed, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Sample:
        u = sample_rng(self.seed, index, 4).random()
        part = min(int(np.searchsorted(self.cumulative, u, side="right")), len(self.datasets) - 1)
        return self.datasets[part][index]

    def gap_at(self, index: int) -> int | None:
        """The video curriculum's largest gap at ``index`` (None without videos)."""
        for d in self.datasets:
            if isinstance(d, DavisDataset):
                return d.gap_at(index)
        return None
