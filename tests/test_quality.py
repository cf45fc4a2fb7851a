"""Per-object confidence and the lost flag (core/quality.py), on hand-made probabilities."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_stm.core.quality import (
    FLAG_LOST,
    LostWatch,
    label_areas,
    object_confidence,
)


def probs_of(objects: list[np.ndarray]) -> torch.Tensor:
    """[N+1, H, W] from object probabilities (background takes the rest)."""
    obj = torch.from_numpy(np.stack(objects)).float()
    return torch.cat([(1 - obj.sum(0)).clamp_min(0)[None], obj])


def test_certain_mask_scores_one_and_blur_or_spill_lowers_it():
    sharp = np.zeros((20, 20), np.float32)
    sharp[5:15, 5:15] = 1.0
    assert object_confidence(probs_of([sharp])).tolist() == pytest.approx([1.0])

    blurred = sharp * 0.8
    blurred[4, 5:15] = 0.3  # a soft border outside the mask
    spilled = sharp.copy()
    spilled[16:19, 0:20] = 0.4  # probability spread onto something else, below 0.5
    c_blur, c_spill = (object_confidence(probs_of([p])).item() for p in (blurred, spilled))
    # expected J by its definition: sum over the mask of p / (|M| + sum outside of p)
    assert c_blur == pytest.approx(80 / (100 + 3))
    assert c_spill == pytest.approx(100 / (100 + 24))


def test_an_object_with_no_pixel_scores_zero_and_objects_are_independent():
    a = np.zeros((10, 10), np.float32)
    a[:5] = 0.9
    faint = np.full((10, 10), 0.04, np.float32)  # never wins a pixel
    conf = object_confidence(probs_of([a, faint])).tolist()
    assert conf[1] == 0.0
    assert conf[0] == pytest.approx(0.9 * 50 / (50 + 0))


def test_lost_when_area_collapses_against_reference_or_previous_frame():
    watch = LostWatch(share=0.25)
    watch.see_reference({1: 400, 2: 100, 3: 0})
    assert watch.flags({1: 380, 2: 90, 3: 50}) == {1: "", 2: "", 3: ""}
    # object 1 collapses against the previous frame and the reference; 3 never had an area
    # on the reference but had one on the frame before
    assert watch.flags({1: 20, 2: 60, 3: 5}) == {1: FLAG_LOST, 2: "", 3: FLAG_LOST}
    # a slow decline is caught by the reference even though each step is small
    for area in (80, 60, 40, 30, 20):
        flags = watch.flags({1: 400, 2: area, 3: 50})
    assert flags[2] == FLAG_LOST


def test_label_areas_counts_every_asked_id():
    lab = np.array([[0, 1, 1], [7, 7, 7]], np.uint8)
    assert label_areas(lab, [1, 7, 9]) == {1: 2, 7: 3, 9: 0}


def test_the_frame_to_correct_is_the_middle_of_the_worst_unsure_run_away_from_every_reference():
    from napari_stm.core.quality import frame_to_correct

    conf = dict.fromkeys(range(40), 0.95)
    for t in range(20, 31):
        conf[t] = 0.6  # a run of unsure frames
    conf[9] = 0.3  # one frame less sure than any of them, among sure ones
    conf[1] = 0.0  # the least sure of all, beside reference 0
    # The run's middle: a correction there becomes the nearest reference of the whole run.
    assert frame_to_correct(conf, [0]) == 25
    # Then the run's halves (the right one first: it also reaches the sure frames no reference
    # is near), and only then the lone unsure frame.
    assert frame_to_correct(conf, [0, 25]) == 28
    assert frame_to_correct(conf, [0, 25, 28]) == 22
    assert frame_to_correct(conf, [0, 22, 25, 28]) == 9
    # A frame beside a reference is never chosen while another is at least 2 frames away...
    assert frame_to_correct({0: 1.0, 1: 0.0, 2: 0.9, 3: 0.9}, [0]) == 2
    # ...only when every free frame is beside one
    assert frame_to_correct({0: 1.0, 1: 0.4, 2: 0.3, 3: 1.0}, [0, 3]) == 2
    assert frame_to_correct({0: 1.0, 1: 1.0}, [0, 1]) is None
    # ties: the earliest; frames not computed yet count as sure
    assert frame_to_correct({0: 1.0, 10: 0.5, 20: 0.5}, [0, 30]) == 10
    assert frame_to_correct({3: 0.5, 6: 0.9}, [0]) == 3


def test_a_frames_confidence_for_the_picker_is_the_mean_over_its_objects():
    from napari_stm.core.quality import mean_confidence

    assert mean_confidence({1: 0.2, 2: 0.4}, [1, 2]) == pytest.approx(0.3)
    # an object the frame has no confidence for (not tracked there) counts 0
    assert mean_confidence({1: 0.2, 2: 0.4}, [1, 2, 3]) == pytest.approx(0.2)
