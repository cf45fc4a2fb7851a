"""Frames of any dtype, channel count and size become padded network input, and come back."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from napari_stm.core.errors import InputError
from napari_stm.core.frames import (
    MAX_FIT_SIDE,
    MIN_FIT_SIDE,
    PERCENTILES,
    FrameReader,
    Geometry,
    boxes_at,
    check_labels,
    crop_padding,
    fit_side,
    foreground_box,
    from_network,
    geometry,
    object_diameters,
    to_network,
)


def _ramp(shape: tuple[int, ...], dtype: type, top: float) -> np.ndarray:
    return np.linspace(0, top, int(np.prod(shape))).reshape(shape).astype(dtype)


# -- normalisation ------------------------------------------------------------------------------
def test_uint8_is_divided_by_255():
    frames = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    reader = FrameReader(frames)
    out = reader.read(1)
    assert out.dtype == np.float32 and out.shape == (5, 7, 3)
    np.testing.assert_array_equal(out, frames[1].astype(np.float32) / 255)
    assert not reader.needs_range


def test_uint16_uses_robust_percentiles():
    frames = _ramp((3, 20, 30), np.uint16, 4000)
    frames[1, 0, 0] = 65535  # a hot pixel must not squash the range
    reader = FrameReader(frames)
    lo, hi = reader.intensity_range
    sampled = frames.astype(np.float32).reshape(-1)
    want_lo, want_hi = np.percentile(sampled, PERCENTILES)
    assert lo.shape == (1,) and float(lo[0]) == pytest.approx(want_lo)
    assert float(hi[0]) == pytest.approx(want_hi)
    out = reader.read(1)
    want = np.clip((frames[1].astype(np.float32) - lo[0]) / (hi[0] - lo[0]), 0, 1)
    np.testing.assert_allclose(out[..., 0], want, atol=1e-6)
    assert out[0, 0, 0] == 1.0  # clipped, not stretched
    # The video uses nearly the whole range despite the hot pixel.
    video = np.stack([reader.read(t) for t in range(3)])
    assert np.quantile(video, 0.99) > 0.95 and np.quantile(video, 0.01) < 0.05


def test_float_frames_auto_and_none():
    frames = _ramp((2, 8, 8, 3), np.float32, 1000.0)
    out = FrameReader(frames).read(0)
    assert 0.0 <= out.min() and out.max() <= 1.0 and out.max() > 0.3  # rescaled, not clipped at 1
    raw = np.full((1, 4, 4), 0.25, np.float32)
    raw[0, 0, 0] = 7.0
    out = FrameReader(raw, normalize="none").read(0)
    assert out[1, 1, 0] == 0.25 and out[0, 0, 0] == 1.0


def test_percentile_range_is_shared_by_every_frame():
    # A video is scaled by one range: a dim frame stays dim relative to a bright one.
    frames = np.stack([_ramp((6, 6), np.uint16, 1000), _ramp((6, 6), np.uint16, 4000)])
    reader = FrameReader(frames)
    assert reader.read(0).max() < 0.5 * reader.read(1).max()


def test_bool_frames():
    frames = np.zeros((1, 4, 4), bool)
    frames[0, 1, 2] = True
    out = FrameReader(frames).read(0)
    assert out.shape == (4, 4, 3) and out[1, 2].tolist() == [1, 1, 1] and out.sum() == 3


def test_gray_becomes_three_equal_channels():
    frames = np.random.default_rng(1).integers(0, 256, (1, 6, 5), dtype=np.uint8)
    for given in (frames, frames[..., None]):
        out = FrameReader(given).read(0)
        assert out.shape == (6, 5, 3)
        for c in range(3):
            np.testing.assert_array_equal(out[..., c], frames[0] / np.float32(255))


def test_two_channels_are_red_and_green():
    frames = np.random.default_rng(2).integers(0, 256, (1, 4, 6, 2), dtype=np.uint8)
    out = FrameReader(frames).read(0)
    np.testing.assert_array_equal(out[..., :2], frames[0] / np.float32(255))
    assert (out[..., 2] == 0).all()


def test_rgba_drops_alpha():
    frames = np.random.default_rng(3).integers(0, 256, (1, 4, 6, 4), dtype=np.uint8)
    out = FrameReader(frames).read(0)
    np.testing.assert_array_equal(out, frames[0, ..., :3] / np.float32(255))


def test_tensor_is_padded_network_input():
    frames = np.full((1, 70, 93, 3), 255, np.uint8)
    reader = FrameReader(frames)
    geo = geometry(reader.size, 16)
    x = reader.tensor(0, geo, torch.device("cpu"))
    assert x.shape == (1, 3, 80, 96) and x.dtype == torch.float32
    left, right, top, bottom = geo.pad
    assert x[..., top : 80 - bottom, left : 96 - right].min() == 1.0
    assert x.sum() == 3 * 70 * 93  # the padding is zero


@pytest.mark.parametrize("shape", [(2, 37, 50, 3), (2, 37, 50), (2, 37, 50, 4)])
@pytest.mark.parametrize("max_side", [None, 32])
def test_byte_frames_reach_the_network_exactly_as_read(shape, max_side):
    # uint8 frames are converted on the device (the fast path); the numbers must be those of
    # the float frame ``read`` gives.
    frames = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    reader = FrameReader(frames)
    geo = geometry(reader.size, 16, max_side)
    x = reader.tensor(1, geo, torch.device("cpu"))
    floats = torch.from_numpy(reader.read(1).transpose(2, 0, 1).copy())[None]
    assert torch.equal(x, to_network(floats, geo))


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        ([], "no frames"),
        (np.zeros((0, 4, 4), np.uint8), "no frames"),
        ("video.mp4", "frames must be an array"),
        (5, "frames must be an array"),
        (np.zeros((1, 3, 8, 8), np.uint8), "channels must be last"),
        (np.zeros((1, 8, 8, 6), np.uint8), "1 to 4 channels"),
        (np.zeros((1, 8), np.uint8), "expected H x W"),
        (np.zeros((1, 4, 4), complex), "unsupported dtype"),
        ([np.zeros((4, 4)), np.zeros((4, 5))], None),
    ],
)
def test_bad_frames(frames, message):
    with pytest.raises(InputError) as err:
        reader = FrameReader(frames)
        reader.read(len(reader) - 1)
    if message is None:
        assert "5x4 but frame 0 is 4x4" in str(err.value)
    else:
        assert message in str(err.value)


def test_frame_index_and_read_errors():
    reader = FrameReader(np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(InputError, match="frame 2 is outside the video"):
        reader.read(2)

    class Broken:
        def __len__(self):
            return 3

        def __getitem__(self, t):
            if t == 2:
                raise OSError("disk on fire")
            return np.zeros((4, 4), np.uint8)

    reader = FrameReader(Broken())
    with pytest.raises(InputError, match="frame 2 could not be read: OSError: disk on fire"):
        reader.read(2)


# -- geometry -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("size", "pad"),
    [
        ((240, 432), (0, 0, 0, 0)),  # already multiples of 16
        ((70, 93), (1, 2, 5, 5)),  # odd padding: the extra pixel goes right
        ((71, 96), (0, 0, 4, 5)),  # and bottom
        ((1, 1), (7, 8, 7, 8)),
    ],
)
def test_padding_is_split_like_the_official_code(size, pad):
    geo = geometry(size, 16)
    assert geo.pad == pad
    assert geo.padded[0] % 16 == 0 and geo.padded[1] % 16 == 0
    assert geo.padded == (size[0] + pad[2] + pad[3], size[1] + pad[0] + pad[1])
    assert not geo.resized


def test_max_side_resizes_the_longer_side():
    geo = geometry((200, 100), 16, max_side=64)
    assert geo.inner == (64, 32) and geo.padded == (64, 32) and geo.resized
    assert geometry((50, 40), 16, max_side=64).inner == (50, 40)  # never enlarged
    geo = geometry((300, 97), 16, max_side=100)
    assert geo.inner == (100, 32) and geo.padded == (112, 32)


def disc_labels(size: tuple[int, int], radius: float, n: int) -> np.ndarray:
    yy, xx = np.mgrid[: size[0], : size[1]]
    labels = np.zeros(size, np.uint16)
    for i in range(n):
        cy, cx = size[0] // 2, (i + 1) * size[1] // (n + 1)
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = 300 + i
    return labels


def test_object_diameters_are_those_of_discs_of_the_same_area():
    d = object_diameters(disc_labels((200, 400), 30, 3))
    np.testing.assert_allclose(d, 60, rtol=0.02)
    assert object_diameters(np.zeros((8, 8), np.uint8)).size == 0


def test_fit_side_brings_the_objects_to_the_trained_size():
    # 128-pixel cells in a 512 frame, trained at 64: half size.
    big = object_diameters(disc_labels((512, 512), 64, 3))
    assert fit_side((512, 512), 512, 64, big) == 256
    # Under the cap already (55-pixel nuclei in a 690 frame worked at 512): unchanged.
    nuclei = object_diameters(disc_labels((690, 628), 27.5, 5))
    assert fit_side((690, 628), 512, 64, nuclei) == 512
    # Never enlarged, never below the floor, specks do not vote, no objects: unchanged.
    assert fit_side((100, 80), 512, 64, object_diameters(disc_labels((100, 80), 5, 2))) == 512
    huge = object_diameters(disc_labels((512, 2000), 250, 2))
    assert fit_side((512, 2000), 512, 16, huge) == MIN_FIT_SIDE
    assert fit_side((512, 512), 512, 64, np.array([3.0, 4.0])) == 512
    assert fit_side((512, 512), 512, 64, np.array([])) == 512
    # Small objects at the usual side (24-pixel nuclei in a 1024 frame would be 12 at 512):
    # a larger side, as large as they need, at most the frame's own size and MAX_FIT_SIDE.
    small = object_diameters(disc_labels((1024, 1024), 12, 40))
    assert fit_side((1024, 1024), 512, 56, small) is None  # the frame as it is
    medium = object_diameters(disc_labels((1024, 1024), 18, 20))
    assert fit_side((1024, 1024), 512, 56, medium) == pytest.approx(956, abs=25)
    tiny_in_huge = object_diameters(disc_labels((2048, 2048), 12, 40))
    assert fit_side((2048, 2048), 512, 56, tiny_in_huge) == MAX_FIT_SIDE
    # A network whose usual side is the full frame keeps it: small objects are never shrunk.
    assert fit_side((2048, 2048), None, 56, tiny_in_huge) is None
    assert fit_side((2048, 2048), 1536, 56, tiny_in_huge) == 1536
    # Full size asked (side None): fitted from the frame's own side.
    assert fit_side((512, 512), None, 64, big) == 256
    assert fit_side((512, 512), None, 64, nuclei) is None


def test_to_and_from_network_round_trip():
    x = torch.rand(1, 3, 70, 93)
    geo = geometry((70, 93), 16)
    y = to_network(x, geo)
    assert y.shape == (1, 3, 80, 96)
    assert y[..., :5, :].abs().sum() == 0 and y[..., :, -2:].abs().sum() == 0
    torch.testing.assert_close(from_network(y, geo), x, rtol=0, atol=0)


def test_resized_round_trip_keeps_smooth_images():
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 90), torch.linspace(0, 1, 120), indexing="ij")
    x = torch.stack([yy, xx, yy * xx])[None]
    geo = geometry((90, 120), 16, max_side=64)
    y = to_network(x, geo)
    assert y.shape[-2:] == geo.padded and geo.inner == (48, 64)
    back = from_network(y, geo)
    assert back.shape == x.shape
    inner = (slice(None), slice(None), slice(3, -3), slice(3, -3))  # borders extrapolate
    assert (back - x)[inner].abs().max() < 0.02

    masks = torch.zeros(1, 1, 90, 120)
    masks[..., 20:60, 30:90] = 1
    small = to_network(masks, geo, mode="area")
    assert small.shape[-2:] == (48, 64)
    assert float(small.sum()) == pytest.approx(float(masks.sum()) * (48 * 64) / (90 * 120))


# -- labels -------------------------------------------------------------------------------------
def test_check_labels_accepts_ids_and_keeps_values():
    lab = np.zeros((4, 5), np.int64)
    lab[1, 1], lab[2, 3] = 3, 255
    out = check_labels(lab, (4, 5), "frame 0")
    assert out.dtype == np.uint8 and np.array_equal(out, lab)
    assert check_labels(lab[..., None], (4, 5), "x").shape == (4, 5)
    assert check_labels(lab.astype(np.float32), (4, 5), "x").dtype == np.uint8
    assert check_labels(lab > 0, (4, 5), "x").max() == 1


def test_check_labels_keeps_ids_past_255_in_a_dtype_that_holds_them():
    # Cell Tracking Challenge masks number their cells past 255.
    lab = np.zeros((4, 5), np.int64)
    lab[1, 1], lab[2, 3] = 300, 7
    out = check_labels(lab, (4, 5), "frame 0")
    assert out.dtype == np.uint16 and np.array_equal(out, lab)
    lab[0, 0] = 70_000
    out = check_labels(lab, (4, 5), "frame 0")
    assert out.dtype == np.uint32 and np.array_equal(out, lab)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.zeros((4, 6), np.uint8), "frame 7: mask is 6x4 but the frames are 5x4"),
        (np.zeros((2, 4, 5), np.uint8), "2-D label image"),
        (np.full((4, 5), 2**32, np.int64), "object id 4294967296 is above 4294967295"),
        (np.full((4, 5), -1, np.int16), "object id -1 is negative"),
        (np.full((4, 5), 1.5), "whole numbers"),
        (np.full((4, 5), "a"), "unsupported dtype"),
    ],
)
def test_check_labels_errors(labels, message):
    with pytest.raises(InputError) as err:
        check_labels(labels, (4, 5), "frame 7")
    assert message in str(err.value)


def test_read_only_byte_frames_are_read_without_a_warning():
    frame = np.frombuffer(bytes(range(256)) * 9, np.uint8)[: 16 * 16 * 3].reshape(16, 16, 3)
    assert not frame.flags.writeable
    reader = FrameReader([frame])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = reader.tensor(0, geometry((16, 16), 16), torch.device("cpu"))
    np.testing.assert_allclose(x[0].permute(1, 2, 0).numpy(), frame / 255.0, atol=1e-7)


@pytest.mark.parametrize("pad", [(0, 0, 0, 0), (3, 5, 2, 4)])
def test_boxes_from_object_positions_equal_the_boxes_of_the_maps(pad):
    # boxes_at: the boxes of the unpadded parts from the nonzero positions of the padded maps,
    # the same integers as foreground_box of each cropped map (objects in the padding only,
    # none at all, one pixel, a frame's corners).
    g = torch.Generator().manual_seed(3)
    h, w = 20, 30
    size = (h + pad[2] + pad[3], w + pad[0] + pad[1])
    geo = Geometry((h, w), (h, w), pad)
    cls = (torch.rand(8, *size, generator=g) > 0.97).to(torch.uint8)
    cls[1] = 0
    cls[2] = 0
    cls[2, 0, 0] = cls[2, -1, -1] = 2  # padding only, where there is padding
    cls[3] = 0
    cls[3, pad[2] + 4, pad[0] + 7] = 1
    cls[4] = 0
    cls[4, pad[2], pad[0]] = cls[4, pad[2] + h - 1, pad[0] + w - 1] = 1
    got = boxes_at(cls.nonzero(as_tuple=True), len(cls), size, geo)
    assert got == [foreground_box(c) for c in crop_padding(cls, geo)]
    assert got[1] == (slice(0, 0), slice(0, 0))
    assert got[3] == (slice(4, 5), slice(7, 8))
    assert got[4] == (slice(0, h), slice(0, w))


def test_bilinear_taps_kept_per_size_are_plain_tensors():
    # Kept across calls (labels_window of every tracker's result): made once a size, and
    # usable outside inference mode even when first made inside it.
    from napari_stm.core.frames import _bilinear_taps

    with torch.inference_mode():
        first = _bilinear_taps(37, 91, torch.device("cpu"))
    assert _bilinear_taps(37, 91, torch.device("cpu")) is first
    assert not any(t.is_inference() for t in first)
    want = torch.nn.functional.interpolate(
        torch.arange(37.0)[None, None], size=91, mode="linear", align_corners=False
    )[0, 0]
    i0, i1, lam = first
    x = torch.arange(37.0)
    assert torch.allclose(torch.lerp(x[i0], x[i1], lam), want)
