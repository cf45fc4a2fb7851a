import numpy as np
import pytest
from scipy import ndimage

from napari_stm.synthetic import make_cell_timelapse, make_clip, make_timelapse


def _touching(labels: np.ndarray, a: int, b: int) -> bool:
    """Whether objects a and b share a border (4-neighbourhood)."""
    return bool((ndimage.binary_dilation(labels == a) & (labels == b)).any())


def test_clip_shapes_and_dtypes():
    frames, labels = make_clip(n_frames=5, height=48, width=64, n_objects=3, seed=1)
    assert frames.shape == (5, 48, 64, 3) and frames.dtype == np.uint8
    assert labels.shape == (5, 48, 64) and labels.dtype == np.uint8
    assert set(np.unique(labels[0])) == {0, 1, 2, 3}
    assert frames.max() > 150 and frames.min() < 100  # uses the range, not a flat image

    gray, _ = make_clip(n_frames=3, height=48, width=64, channels=1, dtype=np.uint16)
    assert gray.shape == (3, 48, 64) and gray.dtype == np.uint16
    assert gray.max() > 255  # scaled to the full 16-bit range

    flt, _ = make_clip(n_frames=2, height=48, width=64, dtype=np.float32)
    assert flt.dtype == np.float32 and 0.0 <= flt.min() and flt.max() <= 1.0


def test_clip_is_deterministic_for_a_seed():
    a = make_clip(n_frames=4, height=40, width=56, seed=3, late_object=True)
    b = make_clip(n_frames=4, height=40, width=56, seed=3, late_object=True)
    c = make_clip(n_frames=4, height=40, width=56, seed=4, late_object=True)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_objects_are_textured_and_differ_from_background():
    frames, labels = make_clip(n_frames=1, height=96, width=128, seed=0)
    image = frames[0].astype(float)
    bg = image[labels[0] == 0]
    for k in (1, 2):
        obj = image[ndimage.binary_erosion(labels[0] == k, iterations=2)]
        assert obj.std(axis=0).mean() > 8  # a texture, not a flat colour
        assert np.abs(obj.mean(axis=0) - bg.mean(axis=0)).max() > 30


def test_late_object_absent_then_present():
    n = 10
    _, labels = make_clip(n_frames=n, height=64, width=80, n_objects=2, late_object=True, seed=2)
    late = 3
    area = (labels == late).sum(axis=(1, 2))
    assert (area[: n // 2] == 0).all()
    assert area[-1] > 0.02 * labels[0].size
    assert set(np.unique(labels[0])) == {0, 1, 2}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_occlusion_happens(seed):
    _, labels = make_clip(n_frames=12, height=96, width=128, n_objects=2, seed=seed)
    area = np.stack([(labels == k).sum(axis=(1, 2)) for k in (1, 2)])
    # The object behind loses a good part of its area, then reappears.
    shrink = area.min(axis=1) / area[:, 0]
    assert shrink.min() < 0.75
    assert (area > 0).all()
    assert any(_touching(labels[t], 1, 2) for t in range(len(labels)))


def test_no_occlusion_keeps_objects_apart():
    _, labels = make_clip(n_frames=12, height=64, width=96, n_objects=3, occlusion=False, seed=5)
    for t in range(len(labels)):
        for a, b in ((1, 2), (1, 3), (2, 3)):
            assert not _touching(labels[t], a, b)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="channels"):
        make_clip(channels=2)
    with pytest.raises(ValueError, match="n_frames"):
        make_clip(n_frames=0)
    with pytest.raises(ValueError, match="dtype"):
        make_clip(n_frames=1, dtype=bool)


def test_timelapse_cells_move_and_one_divides():
    n, cells = 12, 4
    frames, labels = make_timelapse(n_frames=n, height=96, width=96, n_cells=cells, seed=0)
    assert frames.shape == (n, 96, 96) and frames.dtype == np.uint16
    assert labels.shape == (n, 96, 96)
    assert set(np.unique(labels[0])) == set(range(cells + 1))
    # The new daughter appears at the division, not before.
    new = cells + 1
    present = (labels == new).any(axis=(1, 2))
    assert not present[: n // 2].any() and present[n // 2 :].all()
    # Fluorescence: cells bright, background dark and noisy.
    bg = frames[0][labels[0] == 0].astype(float)
    fg = frames[0][labels[0] > 0].astype(float)
    assert fg.mean() > 5 * bg.mean()
    assert bg.std() > 2
    # Cells drift.
    c0 = np.argwhere(labels[0] == 2).mean(axis=0)
    c1 = np.argwhere(labels[-1] == 2).mean(axis=0)
    assert np.linalg.norm(c1 - c0) > 1
    again = make_timelapse(n_frames=n, height=96, width=96, n_cells=cells, seed=0)
    assert np.array_equal(again[0], frames) and np.array_equal(again[1], labels)


def test_bundled_sample_clip():
    from pathlib import Path

    from PIL import Image

    import napari_stm

    root = Path(napari_stm.__file__).parent / "data" / "sample_clip"
    frames = sorted((root / "frames").glob("*.jpg"))
    assert [p.name for p in frames[:2]] == ["00000.jpg", "00001.jpg"] and len(frames) == 24
    first = Image.open(frames[0])
    mask = Image.open(root / "masks" / "00000.png")
    assert first.mode == "RGB" and mask.mode == "P" and mask.size == first.size
    assert set(np.unique(np.asarray(mask))) == {0, 1, 2, 3}
    assert mask.getpalette()[3:9] == [128, 0, 0, 0, 128, 0]  # the DAVIS colours
    assert sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) < 600 * 1024


@pytest.mark.parametrize("modality", ["fluorescence", "dic"])
def test_cell_timelapse_lineages_divisions_and_entering_cells(modality):
    frames, labels = make_cell_timelapse(
        n_frames=8,
        height=96,
        width=96,
        n_cells=6,
        diameter=20,
        modality=modality,
        divisions=6,
        entering=2,
        seed=2,
    )
    assert frames.shape == (8, 96, 96) and frames.dtype == np.uint16
    assert labels.shape == (8, 96, 96) and labels.dtype == np.uint8
    assert set(np.unique(labels[0])) <= set(range(7)), "cells entering later are not in frame 0"
    assert set(np.unique(labels[-1])) & {7, 8}, "an entering cell is inside by the last frame"
    # A divided cell keeps its id (lineage) on two separate daughters.
    split = [
        k
        for k in range(1, 7)
        if ndimage.label(labels[-1] == k)[1] >= 2 and ndimage.label(labels[0] == k)[1] == 1
    ]
    assert split, "some mother became two daughters with her id"
    # The image shows the cells: they differ from the background.
    inside = frames[0][labels[0] > 0].astype(float)
    outside = frames[0][labels[0] == 0].astype(float)
    if modality == "fluorescence":
        assert inside.mean() > outside.mean() + 3 * outside.std() / 2
    else:
        # DIC: relief at the cells, flat grey elsewhere
        assert inside.std() > 1.5 * outside.std()
    again = make_cell_timelapse(
        n_frames=8,
        height=96,
        width=96,
        n_cells=6,
        diameter=20,
        modality=modality,
        divisions=6,
        entering=2,
        seed=2,
    )
    assert np.array_equal(frames, again[0]) and np.array_equal(labels, again[1])


def test_cell_timelapse_photobleaching_and_bad_arguments():
    frames, labels = make_cell_timelapse(
        n_frames=10,
        height=64,
        width=64,
        n_cells=5,
        diameter=16,
        bleaching=0.1,
        divisions=0,
        entering=0,
        seed=1,
        dtype=np.float32,
    )
    first = frames[0][labels[0] > 0].mean() - frames[0][labels[0] == 0].mean()
    last = frames[-1][labels[-1] > 0].mean() - frames[-1][labels[-1] == 0].mean()
    assert last < 0.6 * first
    with pytest.raises(ValueError, match="modality"):
        make_cell_timelapse(modality="phase")
    with pytest.raises(ValueError, match="diameter"):
        make_cell_timelapse(diameter=2)
