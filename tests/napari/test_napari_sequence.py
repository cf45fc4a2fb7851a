"""How image and labels layers' axes become a sequence of frames (no viewer needed)."""

import numpy as np
import pytest

from napari_stm.core.errors import InputError
from napari_stm.napari._sequence import LayerFrames, make_view


def test_time_lapse_is_a_sequence_along_the_first_axis():
    view = make_view((5, 32, 48), False, (5, 32, 48))
    assert (view.n_frames, view.frame_size) == (5, (32, 48))
    assert view.image_index(3) == (3,) and view.labels_index(3) == (3,)
    assert view.frame_key(3) == "3"


def test_rgb_layer_keeps_its_colour_axis_in_each_frame():
    data = np.zeros((4, 16, 20, 3), np.uint8)
    data[2, ..., 1] = 7
    view = make_view(data.shape, True, (4, 16, 20))
    frame = LayerFrames(data, view)[2]
    assert frame.shape == (16, 20, 3) and frame[..., 1].max() == 7


def test_extra_image_axis_the_labels_lack_is_a_channel_axis():
    data = np.arange(6 * 2 * 8 * 8).reshape(6, 2, 8, 8)
    view = make_view(data.shape, False, (6, 8, 8), channel=1)
    assert view.channel_axis == 1 and view.seq_axis == 0
    np.testing.assert_array_equal(LayerFrames(data, view)[4], data[4, 1])
    assert view.labels_index(4) == (4,)
    with pytest.raises(InputError, match="channel 2 does not exist"):
        make_view(data.shape, False, (6, 8, 8), channel=2)


def test_channel_first_stack_finds_its_channel_axis():
    view = make_view((3, 7, 8, 8), False, (7, 8, 8))
    assert view.channel_axis == 0 and view.seq_axis == 1 and view.n_frames == 7


def test_volume_time_lapse_through_time_or_through_z():
    shape = (4, 6, 8, 8)  # T, Z, Y, X
    through_t = make_view(shape, False, shape, position=(2, 3, 0, 0))
    assert through_t.seq_axis == 0 and through_t.fixed == ((1, 3),)
    assert through_t.labels_index(1) == (1, 3)
    through_z = make_view(shape, False, shape, along_z=True, position=(2, 3, 0, 0))
    assert through_z.seq_axis == 1 and through_z.fixed == ((0, 2),) and through_z.n_frames == 6
    assert through_z.labels_index(5) == (2, 5)
    assert through_t.context_key() != through_z.context_key()


def test_mismatched_layers_are_named():
    with pytest.raises(InputError, match="frames are 40x32 but the image's are 48x32"):
        make_view((5, 32, 48), False, (5, 32, 40))
    with pytest.raises(InputError, match="must match"):
        make_view((5, 32, 48), False, (4, 32, 48))
    with pytest.raises(InputError, match="single frame"):
        make_view((32, 48), False, (32, 48))


def test_frames_are_read_one_at_a_time():
    class Recording:
        shape, ndim, dtype = (10, 8, 8), 3, np.dtype(np.uint16)

        def __init__(self):
            self.asked = []

        def __getitem__(self, idx):
            self.asked.append(idx)
            return np.full((8, 8), idx[0], np.uint16)

    data = Recording()
    frames = LayerFrames(data, make_view(data.shape, False, data.shape))
    assert len(frames) == 10 and frames[7][0, 0] == 7
    assert data.asked == [(7,)]
    with pytest.raises(IndexError):
        frames[10]
