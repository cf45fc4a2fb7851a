"""Training clips: shapes, object ids, alignment of warped frames and labels, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_stm.core.errors import InputError
from napari_stm.train.datasets import (
    CellTimelapseDataset,
    CtcDataset,
    DavisDataset,
    MixedDataset,
    ProceduralDataset,
    PseudoVideoDataset,
    augment_microscopy,
    choose_frames,
    find_ctc_sequences,
    find_davis_sequences,
    find_image_mask_pairs,
)

S = 64


def _check_sample(sample, frames=3, objects=2):
    images, labels = sample["images"], sample["labels"]
    assert images.shape == (frames, 3, S, S) and images.dtype == torch.float32
    assert labels.shape == (frames, S, S) and labels.dtype == torch.int64
    assert 0 <= float(images.min()) and float(images.max()) <= 1
    assert int(labels.min()) >= 0 and int(labels.max()) <= objects
    assert (labels[0] == 1).any(), "object 1 must be present in the first frame"


def test_finds_pairs_and_skips_images_without_masks(static_root):
    pairs = find_image_mask_pairs([static_root])
    assert len(pairs) == 3
    assert all(img.stem == mask.stem for img, mask in pairs)
    assert find_image_mask_pairs([static_root / "set_b"]) == [
        p for p in pairs if p[0].parent.parent.name == "set_b"
    ]
    with pytest.raises(InputError, match="no images/ and masks/"):
        find_image_mask_pairs([static_root / "set_a" / "images"])


def test_pseudo_videos_keep_masks_aligned(static_root, brightness_agreement):
    ds = PseudoVideoDataset(find_image_mask_pairs([static_root]), crop=S, seed=1)
    pasted = 0
    for i in range(6):
        sample = ds[i]
        _check_sample(sample)
        pasted += int((sample["labels"] == 2).any())
        assert brightness_agreement(sample["images"], sample["labels"]) > 0.97
        # the warps differ from frame to frame: it is a video, not a still
        assert not torch.equal(sample["labels"][0], sample["labels"][1])
    assert pasted > 0, "a second object is pasted into some clips"


def test_samples_are_a_function_of_seed_and_index(static_root):
    pairs = find_image_mask_pairs([static_root])
    a = PseudoVideoDataset(pairs, crop=S, seed=1)
    b = PseudoVideoDataset(pairs, crop=S, seed=1)
    torch.testing.assert_close(a[4]["images"], b[4]["images"], rtol=0, atol=0)
    assert torch.equal(a[4]["labels"], b[4]["labels"])
    assert not torch.equal(a[4]["images"], a[5]["images"])


def test_procedural_clips():
    ds = ProceduralDataset(crop=S, frames=3, objects=2, seed=0, clip_frames=6)
    several = 0
    for i in range(3):
        sample = ds[i]
        _check_sample(sample)
        several += int(sample["labels"][0].max() == 2)
    assert several > 0, "procedural clips give several objects"


def test_davis_sequences_holdout(davis_root):
    seqs = find_davis_sequences(davis_root, holdout=["beta"])
    assert sorted(seqs) == ["alpha", "gamma"]
    assert len(seqs["alpha"]) == 10
    with pytest.raises(InputError, match="not in"):
        find_davis_sequences(davis_root, holdout=["betta"])
    with pytest.raises(InputError, match="not found"):
        find_davis_sequences(davis_root / "missing")


def test_davis_clips_are_aligned_with_two_objects(davis_root, brightness_agreement):
    ds = DavisDataset(find_davis_sequences(davis_root), crop=S, max_gap=3, seed=0)
    two = 0
    for i in range(4):
        sample = ds[i]
        _check_sample(sample)
        two += int(sample["labels"][0].max() == 2)
        assert brightness_agreement(sample["images"], sample["labels"]) > 0.95
    assert two > 0


def test_frame_gaps_follow_the_curriculum():
    ds = DavisDataset({"x": [("a", "b")] * 2}, crop=S, max_gap=25, curriculum=1000)
    assert ds.gap_at(0) == 1
    assert ds.gap_at(500) == 12 or ds.gap_at(500) == 13
    assert ds.gap_at(1000) == ds.gap_at(5000) == 25
    rng = np.random.default_rng(0)
    for gap in (1, 4, 25):
        for _ in range(50):
            idx = choose_frames(rng, 60, 3, gap)
            steps = np.diff(idx)
            assert idx.min() >= 0 and idx.max() < 60
            assert steps.min() >= 1 and steps.max() <= gap
    # a sequence too short for the gap: gaps shrink; shorter than the clip: frames repeat
    assert np.diff(choose_frames(rng, 5, 3, 25)).max() <= 2
    assert len(choose_frames(rng, 2, 3, 25)) == 3


def test_mixture_draws_from_every_part(static_root):
    pseudo = PseudoVideoDataset(find_image_mask_pairs([static_root]), crop=S, seed=0)
    procedural = ProceduralDataset(crop=S, seed=0, clip_frames=4)
    mixed = MixedDataset([(pseudo, 1.0), (procedural, 1.0)], seed=0)
    picked = [mixed.cumulative.searchsorted(0.0)]  # parts exist
    assert len(mixed.datasets) == 2 and picked
    # every index is one part's sample for that index, unchanged
    hits = {0: 0, 1: 0}
    for i in range(8):
        s = mixed[i]
        for k, d in enumerate((pseudo, procedural)):
            if torch.equal(s["labels"], d[i]["labels"]):
                hits[k] += 1
    assert hits[0] > 0 and hits[1] > 0
    assert mixed.gap_at(0) is None


def test_ctc_layout_is_read_directly(ctc_root):
    seqs = find_ctc_sequences([ctc_root])
    assert list(seqs) == ["fluo-01"] and len(seqs["fluo-01"]) == 6
    frame, labels = seqs["fluo-01"][3]
    assert frame.name == "t003.tif" and labels.name == "00003.png"
    assert labels.parent.name == "Annotations_lineage"
    with pytest.raises(InputError, match="raw_tif"):
        find_ctc_sequences([ctc_root.parent])


def test_ctc_clips_stay_in_their_columns_and_are_aligned(ctc_root, brightness_agreement):
    # The right half holds bright unlabelled blobs: any crop reaching it would disagree.
    ds = CtcDataset(
        find_ctc_sequences([ctc_root]),
        crop=S,
        frames=4,
        columns=(0.0, 0.5),
        seed=0,
        cell_px=(10.0, 30.0),
    )
    for i in range(8):
        sample = ds[i]
        _check_sample(sample, frames=4)
        # grey, as the engine makes single-channel frames
        assert torch.equal(sample["images"][:, 0], sample["images"][:, 2])
        assert brightness_agreement(sample["images"], sample["labels"]) > 0.9
    # The other band: only the unlabelled blobs, so no object to train on, yet bright cells.
    right = CtcDataset(
        find_ctc_sequences([ctc_root]),
        crop=S,
        frames=4,
        columns=(0.5, 1.0),
        seed=0,
        cell_px=(10.0, 30.0),
    )
    sample = right[0]
    assert int(sample["labels"].max()) == 0
    assert float(sample["images"].max()) > 0.5


def test_cell_timelapse_clips():
    ds = CellTimelapseDataset(crop=S, frames=4, seed=0, cell_px=(10.0, 24.0))
    for i in range(4):
        sample = ds[i]
        _check_sample(sample, frames=4)
        assert torch.equal(sample["images"][:, 0], sample["images"][:, 1])


def test_microscopy_augmentation_keeps_range_and_grey():
    rng = np.random.default_rng(0)
    frames = torch.rand(3, 1, 32, 32).expand(-1, 3, -1, -1)
    for _ in range(5):
        out = augment_microscopy(rng, frames)
        assert out.shape == frames.shape
        assert 0 <= float(out.min()) and float(out.max()) <= 1
        assert torch.equal(out[:, 0], out[:, 1])


def test_ctc_ids_past_255_stay_apart(tmp_path):
    import tifffile
    from PIL import Image

    root = tmp_path / "ids-01"
    (root / "raw_tif").mkdir(parents=True)
    (root / "Annotations").mkdir()
    labels = np.zeros((48, 64), np.uint16)
    labels[5:20, 5:20] = 44
    labels[25:40, 30:45] = 300  # 300 as a byte would be 44: one cell
    for t in range(3):
        tifffile.imwrite(root / "raw_tif" / f"t{t:03d}.tif", (labels > 0).astype(np.uint16) * 900)
        Image.fromarray(labels).save(root / "Annotations" / f"{t:05d}.png")
    ds = CtcDataset(find_ctc_sequences([root]), crop=32, frames=2, seed=0, cell_px=(10.0, 20.0))
    read = ds._labels("ids-01", 0)
    assert set(np.unique(read)) == {0, 44, 300}
