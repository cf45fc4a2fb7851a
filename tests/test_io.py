"""Frames and masks from disk, and label images back to disk, on tiny real files."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_stm.core.errors import InputError
from napari_stm.io import (
    DAVIS_PALETTE,
    LabelTiffWriter,
    natural_key,
    open_frames,
    overlay,
    read_label_image,
    read_masks,
    save_overlay_grid,
    write_label_tiff,
    write_palette_png,
)


def make_frames(n: int = 5, h: int = 24, w: int = 32) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def save_png_folder(folder, frames, names=None):
    folder.mkdir(parents=True, exist_ok=True)
    names = names or [f"{t:05d}" for t in range(len(frames))]
    for name, frame in zip(names, frames, strict=True):
        Image.fromarray(frame).save(folder / f"{name}.png")
    return folder


# --------------------------------------------------------------------------- frames


def test_folder_natural_order_and_lazy_reads(tmp_path):
    frames = make_frames(3)
    names = ["frame10", "frame2", "frame1"]
    save_png_folder(tmp_path, frames, names)
    (tmp_path / "notes.txt").write_text("not a frame")
    src = open_frames(tmp_path)
    assert src.stems == ["frame1", "frame2", "frame10"]
    assert len(src) == 3 and src.shape == (24, 32, 3) and src.dtype == np.uint8
    np.testing.assert_array_equal(src[0], frames[2])
    np.testing.assert_array_equal(src[-1], frames[0])
    # Frames are read on demand: a file damaged after opening fails only when it is read.
    (tmp_path / "frame2.png").write_bytes(b"not a png any more")
    np.testing.assert_array_equal(src[2], frames[0])
    with pytest.raises(InputError, match="frame2.png"):
        src[1]
    with pytest.raises(IndexError):
        src[3]


def test_natural_key():
    names = ["img10.png", "img2.png", "IMG1.png", "img2b.png"]
    assert sorted(names, key=natural_key) == ["IMG1.png", "img2.png", "img2b.png", "img10.png"]


def test_folder_of_uint16_tiffs(tmp_path):
    stack = np.arange(3 * 6 * 7, dtype=np.uint16).reshape(3, 6, 7) * 100
    for t, frame in enumerate(stack):
        tifffile.imwrite(tmp_path / f"t{t:03d}.tif", frame)
    src = open_frames(tmp_path)
    assert src.stems == ["t000", "t001", "t002"]
    assert src.shape == (6, 7) and src.dtype == np.uint16
    np.testing.assert_array_equal(src[2], stack[2])


def test_lzw_tiffs_open_like_the_cell_tracking_challenges(tmp_path):
    # The Cell Tracking Challenge ships LZW-compressed TIFFs, which tifffile decodes only
    # through imagecodecs (a dependency for that reason).
    stack = np.arange(5 * 16 * 24, dtype=np.uint16).reshape(5, 16, 24) * 7
    masks = tmp_path / "masks"
    frames = tmp_path / "frames"
    masks.mkdir()
    frames.mkdir()
    for t, frame in enumerate(stack):
        tifffile.imwrite(frames / f"t{t:03d}.tif", frame, compression="lzw")
    labels = np.zeros((16, 24), np.uint16)
    labels[2:6, 3:9], labels[9:14, 10:20] = 1, 301
    tifffile.imwrite(masks / "man_seg000.tif", labels, compression="lzw")
    with tifffile.TiffFile(frames / "t001.tif") as tif:
        assert tif.pages[0].compression == tifffile.COMPRESSION.LZW
    src = open_frames(frames)
    np.testing.assert_array_equal(np.stack([src[t] for t in range(5)]), stack)
    got = read_masks(masks, src.stems, src.shape)
    np.testing.assert_array_equal(got[0], labels)
    tifffile.imwrite(tmp_path / "stack.tif", stack, compression="lzw")
    np.testing.assert_array_equal(open_frames(tmp_path / "stack.tif")[2], stack[2])


def test_frame_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        open_frames(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(InputError, match="no image files"):
        open_frames(empty)
    odd = save_png_folder(tmp_path / "odd", make_frames(3))
    Image.fromarray(make_frames(1, h=20)[0]).save(odd / "00001.png")
    with pytest.raises(InputError, match=r"00001\.png.*32x20.*32x24"):
        open_frames(odd)
    corrupt = save_png_folder(tmp_path / "corrupt", make_frames(2))
    (corrupt / "00002.jpg").write_bytes(b"\xff\xd8garbage")
    with pytest.raises(InputError, match=r"00002\.jpg"):
        open_frames(corrupt)
    twins = save_png_folder(tmp_path / "twins", make_frames(2))
    Image.fromarray(make_frames(1)[0]).save(twins / "00000.jpg")
    with pytest.raises(InputError, match="share the name '00000'"):
        open_frames(twins)
    other = tmp_path / "clip.xyz"
    other.write_bytes(b"data")
    with pytest.raises(InputError, match="unsupported extension"):
        open_frames(other)


def test_tiff_stack_is_memory_mapped_when_uncompressed(tmp_path):
    stack = np.arange(6 * 8 * 9, dtype=np.uint16).reshape(6, 8, 9)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, stack)
    src = open_frames(path)
    assert src.kind == "tiff" and len(src) == 6 and src.shape == (8, 9)
    assert src.stems[:2] == ["00000", "00001"]
    assert isinstance(src._array, np.memmap)  # nothing decoded up front
    np.testing.assert_array_equal(src[4], stack[4])
    src.close()


def test_tiff_stack_compressed_and_rgb(tmp_path):
    stack = make_frames(4, 8, 10)
    path = tmp_path / "rgb.tif"
    tifffile.imwrite(path, stack, photometric="rgb", compression="zlib")
    src = open_frames(path)
    assert src._array is None  # read page by page
    assert src.shape == (8, 10, 3) and len(src) == 4
    for t in (3, 0, 2):
        np.testing.assert_array_equal(src[t], stack[t])
    # ImageJ hyperstack with channels as separate planes: T x C x Y x X.
    planes = np.moveaxis(stack, -1, 1)
    tifffile.imwrite(tmp_path / "tc.tif", planes, imagej=True, metadata={"axes": "TCYX"})
    src = open_frames(tmp_path / "tc.tif")
    assert src.shape == (8, 10, 3)
    np.testing.assert_array_equal(src[1], stack[1])
    bad = np.zeros((2, 3, 5, 8, 10), np.uint8)
    tifffile.imwrite(tmp_path / "bad.tif", bad, metadata={"axes": "TZQYX"})
    with pytest.raises(InputError, match="expected a stack of frames"):
        open_frames(tmp_path / "bad.tif")


def test_video_reads_frames_lazily_in_any_order(tmp_path):
    iio2 = pytest.importorskip("imageio.v2")
    frames = np.zeros((8, 48, 64, 3), np.uint8)
    for t in range(8):
        frames[t, ..., 0] = 30 * t  # brightness encodes the frame index
    path = tmp_path / "clip.mp4"
    try:
        iio2.mimwrite(path, frames, fps=8, macro_block_size=16)
    except Exception as err:  # no ffmpeg binary on this machine
        pytest.skip(f"cannot write mp4: {err}")
    src = open_frames(path)
    assert src.kind == "video" and len(src) == 8 and src.shape == (48, 64, 3)
    assert src.stems == [f"{t:05d}" for t in range(8)]
    for t in (0, 5, 7, 2, 3):  # jumping back restarts the decoder at the right frame
        assert abs(float(src[t][..., 0].mean()) - 30 * t) < 8
    src.close()
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 100)
    with pytest.raises(InputError, match="broken.mp4"):
        open_frames(broken)


# --------------------------------------------------------------------------- masks


def test_palette_png_round_trip_keeps_ids(tmp_path):
    labels = np.zeros((24, 32), np.uint8)
    labels[2:8, 3:9] = 1
    labels[10:20, 10:30] = 7
    labels[0, 0] = 255
    path = write_palette_png(tmp_path / "00000.png", labels)
    with Image.open(path) as img:
        assert img.mode == "P"
        assert img.getpalette()[:12] == [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0]
    np.testing.assert_array_equal(read_label_image(path), labels)
    assert not [p for p in tmp_path.iterdir() if p.name != "00000.png"]  # no temp left
    with pytest.raises(InputError, match="already exists"):
        write_palette_png(path, labels, overwrite=False)
    with pytest.raises(InputError, match="id 300"):
        write_palette_png(tmp_path / "x.png", np.full((4, 4), 300))


def test_davis_palette_values():
    assert DAVIS_PALETTE.shape == (256, 3)
    assert DAVIS_PALETTE[:5].tolist() == [
        [0, 0, 0],
        [128, 0, 0],
        [0, 128, 0],
        [128, 128, 0],
        [0, 0, 128],
    ]
    assert DAVIS_PALETTE[8].tolist() == [64, 0, 0]
    assert DAVIS_PALETTE[9].tolist() == [192, 0, 0]
    assert len({tuple(c) for c in DAVIS_PALETTE}) == 256


def test_read_masks_by_stem_number_and_single_file(tmp_path):
    labels = np.zeros((24, 32), np.uint8)
    labels[5:10, 5:10] = 3
    masks = tmp_path / "masks"
    masks.mkdir()
    write_palette_png(masks / "00002.png", labels)
    Image.fromarray(labels * 10).save(masks / "00004.png")  # gray "L": values are ids
    got = read_masks(masks, [f"{t:05d}" for t in range(5)], (24, 32, 3))
    assert sorted(got) == [2, 4]
    np.testing.assert_array_equal(got[2], labels)
    np.testing.assert_array_equal(got[4], labels * 10)
    # Frame names with a prefix (t002.tif) still match masks by their number.
    got = read_masks(masks, [f"t{t:03d}" for t in range(5)], (24, 32))
    assert sorted(got) == [2, 4]
    # One file labels frame 0.
    got = read_masks(masks / "00004.png", ["a", "b"], (24, 32))
    assert list(got) == [0]


def test_label_tiff_ids_past_255_are_kept(tmp_path):
    labels = np.zeros((24, 32), np.uint16)
    labels[1:4, 1:4] = 200
    tifffile.imwrite(tmp_path / "00000.tif", labels)
    got = read_label_image(tmp_path / "00000.tif")
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, labels)
    labels[0, 0] = 1256  # Cell Tracking Challenge masks number cells past 255
    tifffile.imwrite(tmp_path / "00001.tif", labels)
    got = read_label_image(tmp_path / "00001.tif")
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got, labels)
    with pytest.raises(InputError, match=r"00001\.png.*id 1256.*up to 255.*TIFF"):
        write_palette_png(tmp_path / "00001.png", labels)


def test_mask_errors(tmp_path):
    stems = ["00000", "00001"]
    rgb = tmp_path / "rgb"
    rgb.mkdir()
    Image.fromarray(make_frames(1)[0]).save(rgb / "00000.png")
    with pytest.raises(InputError, match="RGB image.*single-channel.*palette"):
        read_masks(rgb, stems, (24, 32))
    small = tmp_path / "small"
    small.mkdir()
    write_palette_png(small / "00001.png", np.zeros((10, 12), np.uint8))
    with pytest.raises(InputError, match=r"00001\.png.*12x10.*32x24"):
        read_masks(small, stems, (24, 32))
    stray = tmp_path / "stray"
    stray.mkdir()
    write_palette_png(stray / "00009.png", np.zeros((24, 32), np.uint8))
    with pytest.raises(InputError, match=r"00009\.png.*matches no frame"):
        read_masks(stray, stems, (24, 32))
    Image.fromarray(np.zeros((24, 32), np.uint8)).save(tmp_path / "m.jpg")
    with pytest.raises(InputError, match="JPEG"):
        read_masks(tmp_path / "m.jpg", stems, (24, 32))
    with pytest.raises(InputError, match="does not exist"):
        read_masks(tmp_path / "nope", stems, (24, 32))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(InputError, match="bad.png"):
        read_masks(tmp_path / "bad.png", stems, (24, 32))


# --------------------------------------------------------------------------- label stacks


def test_label_tiff_writer_streams_and_finalises_atomically(tmp_path):
    path = tmp_path / "labels.tif"
    stack = np.zeros((4, 8, 10), np.uint8)
    for t in range(4):
        stack[t, t : t + 2, 2:5] = t + 1
    with LabelTiffWriter(path) as writer:
        for frame in stack:
            writer.write(frame)
            assert not path.exists()  # only a hidden temporary file while streaming
    np.testing.assert_array_equal(tifffile.imread(path), stack)
    assert [p.name for p in tmp_path.iterdir()] == ["labels.tif"]

    failed = tmp_path / "failed.tif"
    with pytest.raises(RuntimeError), LabelTiffWriter(failed) as writer:
        writer.write(stack[0])
        raise RuntimeError("interrupted")
    assert [p.name for p in tmp_path.iterdir()] == ["labels.tif"]

    big = stack.astype(np.uint16)
    big[0, 0, 0] = 1000
    write_label_tiff(tmp_path / "big.tif", big)
    read = tifffile.imread(tmp_path / "big.tif")
    assert read.dtype == np.uint16 and read[0, 0, 0] == 1000
    write_label_tiff(path, stack[:2])  # replacing an earlier result is allowed by default
    assert tifffile.imread(path).shape == (2, 8, 10)


# --------------------------------------------------------------------------- pictures


def test_overlay_tints_objects_and_outlines_them():
    frame = np.full((12, 12, 3), 100, np.uint8)
    labels = np.zeros((12, 12), np.uint8)
    labels[3:9, 3:9] = 2  # palette colour (0, 128, 0)
    out = overlay(frame, labels, alpha=0.5)
    assert out.dtype == np.uint8 and out.shape == (12, 12, 3)
    np.testing.assert_array_equal(out[0, 0], [100, 100, 100])  # background untouched
    np.testing.assert_array_equal(out[5, 5], [50, 114, 50])  # inside: half frame, half colour
    np.testing.assert_array_equal(out[3, 5], [0, 128, 0])  # edge: full object colour
    gray16 = np.linspace(0, 4000, 144, dtype=np.uint16).reshape(12, 12)
    assert overlay(gray16, labels).shape == (12, 12, 3)


def test_overlay_grid_picture(tmp_path):
    frames = make_frames(10, 24, 32)
    labels = {t: np.pad(np.ones((4, 4), np.uint8), ((t, 20 - t), (2, 26))) for t in range(10)}
    path = save_overlay_grid(tmp_path / "grid.png", frames, labels, n=6, columns=3, tile_width=64)
    with Image.open(path) as img:
        assert img.mode == "RGB"
        assert img.size == (3 * 64 + 2 * 4, 2 * 48 + 4)
