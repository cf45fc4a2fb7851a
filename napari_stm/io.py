"""Frames in (image folders, videos, TIFF stacks), label images in and out, overlay pictures.

Everything a user hands us on disk goes through here, so every failure names the file and
the problem and raises `InputError`. Frames are read one at a time on `__getitem__`: a long
480p video must not be decoded into memory just to be propagated frame by frame.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image, ImageDraw, UnidentifiedImageError

from napari_stm.core.atomic import atomic_path
from napari_stm.core.errors import InputError
from napari_stm.core.frames import MAX_OBJECT_ID, label_dtype

__all__ = [
    "DAVIS_PALETTE",
    "FrameSource",
    "IMAGE_EXTENSIONS",
    "LabelTiffWriter",
    "VIDEO_EXTENSIONS",
    "davis_palette",
    "natural_key",
    "open_frames",
    "overlay",
    "read_label_image",
    "read_masks",
    "save_overlay_grid",
    "write_label_tiff",
    "write_palette_png",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
TIFF_EXTENSIONS = (".tif", ".tiff")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")
# Lossy formats scramble label values at object borders, so they are refused as masks.
LABEL_EXTENSIONS = (".png", ".tif", ".tiff", ".bmp")
_LOSSY_EXTENSIONS = (".jpg", ".jpeg")
#: the largest id a palette PNG can hold; label TIFFs and arrays take any id up to MAX_OBJECT_ID
MAX_LABEL_ID = 255


# --------------------------------------------------------------------------- names and palette


def natural_key(name: str) -> list[Any]:
    """Sort key that orders embedded numbers by value, so frame2 comes before frame10."""
    # re.split with a capturing group alternates text and digits, so element types line up.
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def davis_palette() -> np.ndarray:
    """The PASCAL VOC / DAVIS colour map: [256, 3] uint8, id 0 black.

    Built by spreading the bits of each index over R, G and B, most significant first. Ids
    1..21 match the colours of the DAVIS annotation files (which use 191 where this gives 192);
    unlike those files it keeps distinct colours above id 21 instead of a grey ramp.
    """
    palette = np.zeros((256, 3), dtype=np.uint8)
    for index in range(256):
        code, rgb = index, [0, 0, 0]
        for bit in range(8):
            for channel in range(3):
                rgb[channel] |= ((code >> channel) & 1) << (7 - bit)
            code >>= 3
        palette[index] = rgb
    return palette


DAVIS_PALETTE = davis_palette()


# --------------------------------------------------------------------------- frames in


def _raise_missing(path: Path) -> None:
    if not path.exists():
        raise InputError(f"'{path}' does not exist")


class FrameSource:
    """A lazy, read-only sequence of video frames.

    `len(src)` frames; `src[t]` reads frame t (H x W or H x W x 3 numpy array) from disk;
    `src.stems` names each frame (used to name output files); `src.shape` and `src.dtype`
    describe ONE frame (the stack is `src.stack_shape`).
    """

    kind = "frames"

    def __init__(self, path: Path, stems: list[str], shape: tuple[int, ...], dtype: Any) -> None:
        self.path = path
        self.stems = stems
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self._lock = threading.Lock()

    @property
    def frame_shape(self) -> tuple[int, ...]:
        return self.shape

    @property
    def stack_shape(self) -> tuple[int, ...]:
        return (len(self), *self.shape)

    def __len__(self) -> int:
        return len(self.stems)

    def __iter__(self) -> Iterator[np.ndarray]:
        for t in range(len(self)):
            yield self[t]

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, slice):
            return np.stack([self[t] for t in range(*index.indices(len(self)))])
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"frame index must be an int or a slice, not {type(index).__name__}")
        t = int(index)
        if t < 0:
            t += len(self)
        if not 0 <= t < len(self):
            raise IndexError(f"frame {index} is out of range: '{self.path}' has {len(self)} frames")
        # Readers (ffmpeg pipes, open TIFF handles) are stateful; widgets read from threads.
        with self._lock:
            frame = self._read(t)
        if frame.shape != self.shape:
            raise InputError(
                f"frame {self.stems[t]} of '{self.path}' has shape {frame.shape}, "
                f"the first frame has {self.shape}"
            )
        return frame

    def _read(self, t: int) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        """Release open file handles (reading again reopens them where the kind allows)."""

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}('{self.path}', {len(self)} frames of {self.shape} {self.dtype})"
        )


def _pil_frame_layout(mode: str) -> tuple[str, np.dtype, int]:
    """How a PIL mode is delivered: (mode to convert to, dtype, channels; 0 = 2-D)."""
    if mode in ("L", "1", "LA", "La"):
        return "L", np.dtype(np.uint8), 0
    if mode.startswith("I;16"):
        return mode, np.dtype(np.uint16), 0
    if mode == "I":
        return "I", np.dtype(np.int32), 0
    if mode == "F":
        return "F", np.dtype(np.float32), 0
    # P, RGB, RGBA, CMYK, YCbCr ...: the engine wants gray or RGB; alpha is not image content.
    return "RGB", np.dtype(np.uint8), 3


def _image_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype a single image file will be read as, from its header only."""
    try:
        if path.suffix.lower() in TIFF_EXTENSIONS:
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                shape, dtype, axes = tuple(series.shape), np.dtype(series.dtype), series.axes
            if len(shape) == 3 and axes.endswith("S") and shape[-1] in (3, 4):
                return (shape[0], shape[1], 3), dtype
            if len(shape) != 2:
                raise InputError(
                    f"'{path}' holds an image of shape {shape} (axes {axes}); a folder of frames "
                    "must hold one 2-D gray or RGB image per file"
                )
            return shape, dtype
        with Image.open(path) as img:
            width, height = img.size
            _, dtype, channels = _pil_frame_layout(img.mode)
        return ((height, width, channels) if channels else (height, width)), dtype
    except InputError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, tifffile.TiffFileError) as err:
        raise InputError(f"cannot read frame '{path}': {err}") from err


def _read_tiff_pages(
    path: Path, pages: Sequence[int], tif: tifffile.TiffFile | None = None
) -> np.ndarray:
    """Pages of a TIFF (stacked when several); falls back to Pillow for compressions that
    need the optional imagecodecs package.

    Microscopy TIFFs are often LZW/deflate compressed (the Cell Tracking Challenge's are);
    tifffile decodes those only with imagecodecs, Pillow's libtiff decodes them as well.
    """
    key = pages[0] if len(pages) == 1 else list(pages)
    try:
        if tif is not None:
            return tif.asarray(key=key, series=0)
        with tifffile.TiffFile(path) as handle:
            return handle.asarray(key=key, series=0)
    except ValueError as err:
        if "imagecodecs" not in str(err):
            raise
        try:
            with Image.open(path) as img:
                planes = []
                for page in pages:
                    img.seek(page)
                    planes.append(np.array(img))
        except (OSError, EOFError, ValueError) as pil_err:
            raise InputError(
                f"cannot read '{path}': {err} (Pillow failed too: {pil_err}); "
                "install it with 'pip install imagecodecs'"
            ) from err
        return planes[0] if len(planes) == 1 else np.stack(planes)


def _read_image_file(path: Path) -> np.ndarray:
    try:
        if path.suffix.lower() in TIFF_EXTENSIONS:
            data = _read_tiff_pages(path, [0])
            if data.ndim == 3 and data.shape[-1] == 4:
                data = data[..., :3]
            return np.ascontiguousarray(data)
        with Image.open(path) as img:
            target, _, _ = _pil_frame_layout(img.mode)
            if img.mode != target:
                img = img.convert(target)
            return np.array(img)
    except (OSError, UnidentifiedImageError, ValueError, tifffile.TiffFileError) as err:
        raise InputError(f"cannot read frame '{path}': {err}") from err


class ImageFolderSource(FrameSource):
    """One image file per frame, ordered by natural sort of the file names."""

    kind = "folder"

    def __init__(self, path: Path, files: list[Path]) -> None:
        self.files = files
        shape, dtype = _image_header(files[0])
        # Headers only: a size mismatch found at frame 500 mid-propagation would waste the run.
        for file in files[1:]:
            other_shape, _ = _image_header(file)
            if other_shape != shape:
                raise InputError(
                    f"frame '{file}' has size {_describe_shape(other_shape)} but the first frame "
                    f"'{files[0].name}' has {_describe_shape(shape)}; all frames of a video must "
                    "have the same size and channels"
                )
        super().__init__(path, [f.stem for f in files], shape, dtype)

    def _read(self, t: int) -> np.ndarray:
        return _read_image_file(self.files[t])


def _describe_shape(shape: tuple[int, ...]) -> str:
    text = f"{shape[1]}x{shape[0]}"
    return text + (f" with {shape[2]} channels" if len(shape) == 3 else " gray")


class VideoSource(FrameSource):
    """A video file decoded by ffmpeg (imageio-ffmpeg), frame by frame.

    Forward reads stream from the open decoder; a jump backwards makes imageio's ffmpeg
    reader restart at that frame's time stamp (index / fps: exact for constant frame rate
    videos, which is what cameras and screen recorders write).
    """

    kind = "video"

    def __init__(self, path: Path) -> None:
        import imageio.v2 as iio2

        self._iio2 = iio2
        self._reader = None
        self.path = path
        try:
            reader = self._open()
            n_frames = reader.count_frames()
            width, height = reader.get_meta_data()["size"]
        except InputError:
            raise
        except Exception as err:  # ffmpeg reports corrupt files through many exception types
            raise InputError(f"cannot read video '{path}': {err}") from err
        if n_frames < 1:
            raise InputError(f"video '{path}' contains no frames")
        super().__init__(path, [f"{t:05d}" for t in range(n_frames)], (height, width, 3), np.uint8)

    def _open(self) -> Any:
        if self._reader is None:
            self._reader = self._iio2.get_reader(self.path, format="FFMPEG")
        return self._reader

    def _read(self, t: int) -> np.ndarray:
        try:
            frame = self._open().get_data(t)
        except Exception as err:
            raise InputError(f"cannot decode frame {t} of video '{self.path}': {err}") from err
        return np.asarray(frame)[..., :3]

    def close(self) -> None:
        with self._lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None


class TiffStackSource(FrameSource):
    """A multi-page TIFF read frame by frame: memory-mapped when stored uncompressed, else
    page by page; only layouts that pack several frames into one compressed page (rare) are
    decoded whole, on the first read.
    """

    kind = "tiff"

    def __init__(self, path: Path) -> None:
        self._tif: tifffile.TiffFile | None = None
        self._array: np.ndarray | None = None
        try:
            tif = tifffile.TiffFile(path)
            series = tif.series[0]
            shape, axes = tuple(series.shape), series.axes
            planar_rgb = series.keyframe.photometric == tifffile.PHOTOMETRIC.RGB
            n_pages = len(series.pages)
        except (OSError, ValueError, IndexError, tifffile.TiffFileError) as err:
            raise InputError(f"cannot read TIFF '{path}': {err}") from err
        self._tif = tif
        self.path = path
        n_frames, per_frame, self._channel_first = self._layout(path, shape, axes, planar_rgb)
        self._stored = (n_frames, *per_frame)
        self._pages_per_frame = n_pages // n_frames if n_pages % n_frames == 0 else 0
        try:
            # Uncompressed contiguous data maps straight from disk: nothing read until indexed.
            mapped = tifffile.memmap(path, mode="r")
            if mapped.size == int(np.prod(self._stored)):
                self._array = mapped.reshape(self._stored)
        except (ValueError, OSError, tifffile.TiffFileError):
            self._array = None
        if self._channel_first:
            frame_shape = (per_frame[1], per_frame[2], 3)
        elif len(per_frame) == 3:
            frame_shape = (per_frame[0], per_frame[1], 3)
        else:
            frame_shape = per_frame
        super().__init__(path, [f"{t:05d}" for t in range(n_frames)], frame_shape, series.dtype)

    @staticmethod
    def _layout(
        path: Path, shape: tuple[int, ...], axes: str, planar_rgb: bool
    ) -> tuple[int, tuple[int, ...], bool]:
        """(frames, stored shape of one frame, whether its channels come before Y and X)."""
        problem = InputError(
            f"TIFF '{path}' has shape {shape} with axes {axes}; expected a stack of frames "
            "T x H x W or T x H x W x C with 3 or 4 channels"
        )
        if len(shape) < 2 or not axes.endswith(("YX", "YXS")):
            raise problem
        # Singleton axes (ImageJ's Z=1, C=1 ...) carry no layout information.
        dims = [(a, n) for a, n in zip(axes, shape, strict=True) if n > 1 or a in "YX"]
        channels_last = dims[-1][0] == "S" and dims[-1][1] in (3, 4)
        if dims[-1][0] == "S" and not channels_last:
            raise problem
        spatial = dims[-3:] if channels_last else dims[-2:]
        lead = dims[: len(dims) - len(spatial)]
        channel_first = bool(
            lead
            and lead[-1][1] in (3, 4)
            and (lead[-1][0] == "C" or (lead[-1][0] == "S" and planar_rgb))
        )
        if channel_first:
            lead = lead[:-1]
        if len(lead) > 1:
            raise problem
        n_frames = lead[0][1] if lead else 1
        per_frame = tuple(n for _, n in spatial)
        if channel_first:
            per_frame = (dims[len(lead)][1], *per_frame)
        return n_frames, per_frame, channel_first

    def _read(self, t: int) -> np.ndarray:
        try:
            if self._array is None and not self._pages_per_frame:
                self._array = np.asarray(self._handle().series[0].asarray()).reshape(self._stored)
            if self._array is not None:
                frame = np.array(self._array[t])
            else:
                k = self._pages_per_frame
                pages = list(range(t * k, t * k + k))
                frame = _read_tiff_pages(self.path, pages, self._handle())
                frame = frame.reshape(self._stored[1:])
        except (OSError, ValueError, IndexError, tifffile.TiffFileError) as err:
            raise InputError(f"cannot read frame {t} of TIFF '{self.path}': {err}") from err
        if self._channel_first:
            frame = np.moveaxis(frame, 0, -1)
        return np.ascontiguousarray(frame[..., :3] if frame.ndim == 3 else frame)

    def _handle(self) -> tifffile.TiffFile:
        if self._tif is None:
            self._tif = tifffile.TiffFile(self.path)
        return self._tif

    def close(self) -> None:
        with self._lock:
            if self._tif is not None:
                self._tif.close()
                self._tif = None


def _image_files(folder: Path, extensions: tuple[str, ...]) -> list[Path]:
    # Dot-files are skipped: macOS leaves '._00000.jpg' resource forks beside real frames.
    files = [
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in extensions
    ]
    return sorted(files, key=lambda p: natural_key(p.name))


def open_frames(path: str | os.PathLike) -> FrameSource:
    """Open a folder of images, a video file or a TIFF stack as a lazy `FrameSource`."""
    path = Path(path).expanduser()
    _raise_missing(path)
    if path.is_dir():
        files = _image_files(path, IMAGE_EXTENSIONS)
        if not files:
            raise InputError(
                f"folder '{path}' contains no image files "
                f"({', '.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)})"
            )
        seen: dict[str, Path] = {}
        for file in files:
            if file.stem in seen:
                raise InputError(
                    f"frames '{seen[file.stem].name}' and '{file.name}' in '{path}' share the "
                    f"name '{file.stem}'; outputs are named after frames, so names must be unique"
                )
            seen[file.stem] = file
        return ImageFolderSource(path, files)
    suffix = path.suffix.lower()
    if suffix in VIDEO_EXTENSIONS:
        return VideoSource(path)
    if suffix in TIFF_EXTENSIONS:
        return TiffStackSource(path)
    if suffix in IMAGE_EXTENSIONS:
        return ImageFolderSource(path.parent, [path])
    raise InputError(
        f"'{path}' has an unsupported extension '{path.suffix}'; give a folder of images, "
        f"a video ({', '.join(e.lstrip('.') for e in VIDEO_EXTENSIONS)}) or a TIFF stack"
    )


# --------------------------------------------------------------------------- masks in


_RGB_MASK_HELP = (
    "label images must be single-channel (8/16-bit gray) or palette (indexed colour) PNG/TIFF "
    "files whose pixel values are object ids (0 = background, any positive integer = an object)"
)


def _check_ids(path: Path, labels: np.ndarray) -> np.ndarray:
    if labels.size == 0:
        raise InputError(f"label image '{path}' is empty")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high > MAX_OBJECT_ID:
        bad = low if low < 0 else high
        raise InputError(
            f"label image '{path}' contains object id {bad}; ids must be 0..{MAX_OBJECT_ID}"
        )
    return labels.astype(label_dtype(high), copy=False)


def read_label_image(path: str | os.PathLike) -> np.ndarray:
    """Read one label image as H x W object ids (palette PNGs as their indices), in the
    smallest unsigned dtype that holds them (uint8 up to 255)."""
    path = Path(path)
    _raise_missing(path)
    suffix = path.suffix.lower()
    if suffix in _LOSSY_EXTENSIONS:
        raise InputError(
            f"'{path}' is a JPEG: lossy compression changes object ids at borders; "
            "save label images as PNG or TIFF"
        )
    try:
        if suffix in TIFF_EXTENSIONS:
            with tifffile.TiffFile(path) as tif:
                shape = tuple(tif.series[0].shape)
                if len(shape) == 3 and shape[-1] in (3, 4):
                    raise InputError(f"'{path}' is an RGB image; {_RGB_MASK_HELP}")
                if len(shape) != 2:
                    raise InputError(
                        f"'{path}' holds an array of shape {shape}; a label image is one 2-D "
                        "image (use a folder with one label image per frame)"
                    )
                data = _read_tiff_pages(path, [0], tif)
            if data.dtype == bool:
                data = data.astype(np.uint8)
            if not np.issubdtype(data.dtype, np.integer):
                raise InputError(
                    f"'{path}' holds {data.dtype} values; label images hold integer object ids"
                )
            return _check_ids(path, data)
        with Image.open(path) as img:
            mode = img.mode
            if mode == "P":
                # Indices are the ids; converting would turn them into palette colours.
                data = np.array(img)
            elif mode == "1":
                data = np.array(img).astype(np.uint8)
            elif mode in ("L", "I", "I;16", "I;16L", "I;16B", "I;16N"):
                data = np.array(img)
            else:
                raise InputError(f"'{path}' is a {mode} image; {_RGB_MASK_HELP}")
    except InputError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, tifffile.TiffFileError) as err:
        raise InputError(f"cannot read label image '{path}': {err}") from err
    return _check_ids(path, data)


def _frame_index_by_number(stems: Sequence[str]) -> dict[int, int]:
    """Frame index by the number a frame name ends with (t007 -> 7), when unambiguous."""
    numbers: dict[int, int] = {}
    for index, stem in enumerate(stems):
        match = re.search(r"(\d+)$", stem)
        if match is None:
            return {}
        number = int(match.group(1))
        if number in numbers:
            return {}
        numbers[number] = index
    return numbers


def read_masks(
    path: str | os.PathLike, stems: Sequence[str], shape: Sequence[int]
) -> dict[int, np.ndarray]:
    """Read label images for some frames: {frame index: H x W ids}.

    `path` is a folder of label images matched to frames by file name (00000.png labels frame
    00000.jpg; when names differ only in their prefix or zero padding, the trailing number
    decides: 00007.png labels t007.tif), or a single label image, which labels frame 0.
    `shape` is the frame shape (H, W[, C]); every mask must have that height and width.
    """
    path = Path(path).expanduser()
    _raise_missing(path)
    height, width = int(shape[0]), int(shape[1])
    if path.is_dir():
        files = _image_files(path, LABEL_EXTENSIONS + _LOSSY_EXTENSIONS)
        if not files:
            raise InputError(
                f"folder '{path}' contains no label images "
                f"({', '.join(e.lstrip('.') for e in LABEL_EXTENSIONS)})"
            )
        by_stem = {stem: index for index, stem in enumerate(stems)}
        by_number = _frame_index_by_number(stems)
        assigned: list[tuple[int, Path]] = []
        for file in files:
            index = by_stem.get(file.stem)
            if index is None:
                match = re.search(r"(\d+)$", file.stem)
                index = by_number.get(int(match.group(1))) if match else None
            if index is None:
                first, last = (stems[0], stems[-1]) if stems else ("-", "-")
                raise InputError(
                    f"mask '{file}' matches no frame (frames are named {first} .. {last}); "
                    "name each mask after its frame, e.g. 00000.png for 00000.jpg"
                )
            assigned.append((index, file))
    else:
        if not stems:
            raise InputError("there are no frames to attach the mask to")
        assigned = [(0, path)]
    masks: dict[int, np.ndarray] = {}
    for index, file in sorted(assigned, key=lambda item: item[0]):
        if index in masks:
            raise InputError(f"two masks in '{path}' label frame {stems[index]}, e.g. '{file}'")
        labels = read_label_image(file)
        if labels.shape != (height, width):
            raise InputError(
                f"mask '{file}' is {labels.shape[1]}x{labels.shape[0]} (WxH) but the frames "
                f"are {width}x{height}"
            )
        masks[index] = labels
    return masks


# --------------------------------------------------------------------------- masks out


def _check_target(path: Path, overwrite: bool) -> None:
    if not path.parent.is_dir():
        raise InputError(f"output folder '{path.parent}' does not exist")
    if path.exists() and not overwrite:
        raise InputError(f"'{path}' already exists; not overwriting it")


def _as_labels(labels: Any, what: str, ndim: int, max_id: int = MAX_LABEL_ID) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != ndim:
        raise InputError(f"{what} must be a {ndim}-D label array, got shape {array.shape}")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        raise InputError(f"{what} must hold integer object ids, got {array.dtype}")
    if array.size and (array.min() < 0 or array.max() > max_id):
        bad = array.min() if array.min() < 0 else array.max()
        raise InputError(f"{what} contains object id {bad}; ids must be 0..{max_id}")
    return array


def write_palette_png(path: str | os.PathLike, labels: Any, overwrite: bool = True) -> Path:
    """Save H x W ids 0..255 as an indexed PNG with the DAVIS palette (ids kept as indices).

    A palette holds 256 entries, so larger ids raise InputError (write a label TIFF instead).
    """
    path = Path(path)
    labels = np.asarray(labels)
    if labels.size and np.issubdtype(labels.dtype, np.integer) and labels.max() > MAX_LABEL_ID:
        raise InputError(
            f"labels for '{path.name}' hold object id {int(labels.max())}: a palette PNG holds "
            f"ids up to {MAX_LABEL_ID}; save a label TIFF (.tif) instead"
        )
    labels = _as_labels(labels, f"labels for '{path.name}'", 2).astype(np.uint8)
    _check_target(path, overwrite)
    image = Image.fromarray(labels)
    image.putpalette(DAVIS_PALETTE.tobytes())
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


class LabelTiffWriter:
    """Write a T x H x W label TIFF one frame at a time; the file appears only when complete.

    ```
    with LabelTiffWriter("out.tif") as w:
        for labels in results:
            w.write(labels)
    ```
    Frames go to a hidden temporary file beside `path`, renamed over `path` on a clean exit
    and deleted if the block raises (an interrupted run leaves no half-written stack).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        dtype: Any = np.uint8,
        overwrite: bool = True,
        bigtiff: bool = False,
    ) -> None:
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.uint32)):
            raise InputError(f"label TIFFs are uint8, uint16 or uint32, not {self.dtype}")
        self.overwrite = overwrite
        self.bigtiff = bigtiff
        self.frames_written = 0
        self._frame_shape: tuple[int, ...] | None = None
        self._file: contextlib.AbstractContextManager[Path] | None = None
        self._writer: tifffile.TiffWriter | None = None

    def __enter__(self) -> LabelTiffWriter:
        _check_target(self.path, self.overwrite)
        self._file = atomic_path(self.path)
        tmp = self._file.__enter__()
        try:
            self._writer = tifffile.TiffWriter(tmp, bigtiff=self.bigtiff)
        except BaseException as err:
            self._file.__exit__(type(err), err, err.__traceback__)
            raise
        return self

    def write(self, labels: Any) -> None:
        if self._writer is None:
            raise RuntimeError("use LabelTiffWriter in a 'with' block")
        max_id = np.iinfo(self.dtype).max
        array = _as_labels(labels, f"frame {self.frames_written}", 2, max_id).astype(self.dtype)
        if self._frame_shape is None:
            self._frame_shape = array.shape
        elif array.shape != self._frame_shape:
            raise InputError(
                f"frame {self.frames_written} has shape {array.shape}, earlier frames "
                f"{self._frame_shape}"
            )
        self._writer.write(
            array, contiguous=True, photometric="minisblack", metadata={"axes": "TYX"}
        )
        self.frames_written += 1

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        assert self._writer is not None and self._file is not None
        file, self._file = self._file, None
        try:
            self._writer.close()
            if exc_type is None and self.frames_written == 0:
                raise InputError(f"no frames were written to '{self.path}'")
        except BaseException as err:
            file.__exit__(type(err), err, err.__traceback__)  # deletes the temporary file
            raise
        finally:
            self._writer = None
        file.__exit__(exc_type, exc, tb)  # renamed over path unless the block raised


def write_label_tiff(path: str | os.PathLike, stack: Any, overwrite: bool = True) -> Path:
    """Save a T x H x W label stack as one TIFF (uint8, or uint16/uint32 for larger ids)."""
    stack = _as_labels(stack, "label stack", 3, MAX_OBJECT_ID)
    dtype = label_dtype(int(stack.max()) if stack.size else 0)
    bigtiff = stack.size * np.dtype(dtype).itemsize > 2**32 - 2**25
    with LabelTiffWriter(path, dtype=dtype, overwrite=overwrite, bigtiff=bigtiff) as writer:
        for frame in stack:
            writer.write(frame)
    return Path(path)


# --------------------------------------------------------------------------- pictures


def _to_rgb_uint8(frame: Any) -> np.ndarray:
    """Display version of a frame: uint8 RGB; other dtypes stretched over robust percentiles."""
    image = np.asarray(frame)
    if image.ndim == 3 and image.shape[-1] in (2, 4):
        image = image[..., : 1 if image.shape[-1] == 2 else 3]
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim not in (2, 3):
        raise InputError(f"a frame must be H x W or H x W x 3, got shape {image.shape}")
    if image.dtype != np.uint8:
        values = image.astype(np.float32)
        low, high = np.percentile(values, (0.5, 99.5))
        scale = 255.0 / (high - low) if high > low else 0.0
        image = np.clip((values - low) * scale, 0, 255).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return image


def overlay(frame: Any, labels: Any, alpha: float = 0.5) -> np.ndarray:
    """RGB uint8 picture of `frame` with each object tinted in its palette colour and outlined."""
    from skimage.segmentation import find_boundaries

    rgb = _to_rgb_uint8(frame)
    ids = _as_labels(labels, "labels", 2, MAX_OBJECT_ID)
    if ids.shape != rgb.shape[:2]:
        raise InputError(f"labels of shape {ids.shape} do not fit a frame of {rgb.shape[:2]}")
    # Ids past the palette reuse its colours (never 0, the background's black).
    ids = np.where(ids > 0, (ids.astype(np.int64) - 1) % MAX_LABEL_ID + 1, 0).astype(np.uint8)
    colours = DAVIS_PALETTE[ids].astype(np.float32)
    inside = ids > 0
    out = rgb.astype(np.float32)
    out[inside] = (1 - alpha) * out[inside] + alpha * colours[inside]
    edge = find_boundaries(ids, mode="inner") & inside
    # Outlines in the full colour keep touching objects apart where the tint is too faint.
    out[edge] = colours[edge]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def save_overlay_grid(
    path: str | os.PathLike,
    frames: Any,
    labels: Mapping[int, Any] | Sequence[Any] | np.ndarray,
    n: int = 6,
    columns: int = 3,
    tile_width: int = 320,
    alpha: float = 0.5,
) -> Path:
    """One PNG showing `n` evenly spaced frames with their masks overlaid, captioned t=...

    `labels` maps frame index -> H x W ids (a dict, or a T x H x W array / list indexed by t).
    """
    path = Path(path)
    if isinstance(labels, Mapping):
        available = sorted(int(t) for t in labels)
    else:
        available = list(range(len(labels)))
    available = [t for t in available if 0 <= t < len(frames)]
    if not available or n < 1:
        raise InputError("no labelled frames to draw")
    picks = sorted({available[round(i)] for i in np.linspace(0, len(available) - 1, n)})
    tiles = []
    for t in picks:
        picture = Image.fromarray(overlay(frames[t], labels[t], alpha=alpha))
        height = max(1, round(picture.height * tile_width / picture.width))
        picture = picture.resize((tile_width, height), Image.Resampling.BILINEAR)
        ImageDraw.Draw(picture).text((6, 4), f"t={t}", fill=(255, 255, 255))
        tiles.append(picture)
    columns = max(1, min(columns, len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    tile_height = max(tile.height for tile in tiles)
    gap = 4
    sheet = Image.new(
        "RGB",
        (columns * tile_width + (columns - 1) * gap, rows * tile_height + (rows - 1) * gap),
        (255, 255, 255),
    )
    for i, tile in enumerate(tiles):
        row, col = divmod(i, columns)
        sheet.paste(tile, (col * (tile_width + gap), row * (tile_height + gap)))
    _check_target(path, overwrite=True)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path
