"""STM network: the official checkpoint layout loads strictly, and one memorise + segment step
reproduces the official implementation's numbers (fixture made by running the official code)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from official_reference import FIXTURE, MAKE_WEIGHTS, REFERENCE, load_make_weights, strip_prefix

from napari_stm.core.network import STM
from napari_stm.core.readout import soft_aggregate

OFFICIAL_SLOTS = 11  # the official evaluation aggregates over 11 object slots
TOL = 1e-4

needs_reference = pytest.mark.skipif(
    not MAKE_WEIGHTS.is_file(),
    reason=f"official STM reference files not found at {REFERENCE}",
)


@pytest.fixture(scope="module")
def make_weights():
    if not MAKE_WEIGHTS.is_file():
        pytest.skip(f"official STM reference files not found at {REFERENCE}")
    return load_make_weights()


@pytest.fixture(scope="module")
def official_weights(make_weights):
    return strip_prefix(make_weights.make_state_dict(salt=""))


@pytest.fixture(scope="module")
def model(official_weights):
    torch.set_num_threads(2)
    net = STM()
    net.load_state_dict(official_weights, strict=True)
    return net.eval()


@needs_reference
def test_state_dict_layout_is_the_official_checkpoint(make_weights):
    expected = [(key.removeprefix("module."), shape) for key, shape, _ in make_weights.read_keys()]
    ours = [(k, tuple(v.shape)) for k, v in STM().state_dict().items()]
    assert ours == expected  # same names, same shapes, same order


@needs_reference
def test_official_weights_load_strictly(model, official_weights):
    # The model fixture loaded them with strict=True; every tensor arrived unchanged.
    # (make_weights.py gives num_batches_tracked shape [1], not the checkpoint's []: np.
    # ascontiguousarray makes 0-d arrays 1-d; load_state_dict accepts both, so compare values.)
    ours = model.state_dict()
    assert all(torch.equal(ours[k], v.reshape(ours[k].shape)) for k, v in official_weights.items())


@pytest.fixture(scope="module")
def official_step(model):
    """Memorise frame 0 with its one-hot labels, segment frame 1 with that memory alone."""
    if not FIXTURE.is_dir():
        pytest.skip(f"official STM fixture not found at {FIXTURE}")
    clip = np.load(FIXTURE / "clip.npz")
    # Scaled in float64 then cast, as the official data loader does.
    frames = torch.from_numpy((clip["frames"][:2] / 255.0).astype(np.float32))
    frames = frames.permute(0, 3, 1, 2)
    labels = torch.from_numpy(clip["labels"][0].astype(np.int64))
    ids = torch.arange(1, int(labels.max()) + 1)
    masks = (labels[None] == ids[:, None, None]).float()
    with torch.inference_mode():
        mem = model.encode_memory(frames[0:1], masks)
        query = model.encode_query(frames[1:2])
        probs = model.segment(query, mem.keys.flatten(2), mem.values.flatten(2))
    return mem, probs


def _max_diff(ours: torch.Tensor, ref: np.ndarray) -> float:
    assert tuple(ours.shape) == ref.shape
    return float((ours - torch.from_numpy(ref)).abs().max())


@needs_reference
def test_memorise_matches_official(official_step):
    mem, _ = official_step
    ref = np.load(FIXTURE / "official_outputs.npz")
    assert _max_diff(mem.keys, ref["memorize0_keys"]) <= TOL
    assert _max_diff(mem.values, ref["memorize0_values"]) <= TOL


@needs_reference
def test_segment_matches_official(official_step):
    _, probs = official_step
    ref = np.load(FIXTURE / "official_outputs.npz")
    n = probs.shape[0]
    logit = soft_aggregate(probs, extra_slots=OFFICIAL_SLOTS - 1 - n)
    assert logit.shape[0] == OFFICIAL_SLOTS
    assert _max_diff(logit[: n + 1], ref["segment1_logit"]) <= TOL
    prob = torch.softmax(logit, dim=0)
    assert _max_diff(prob[: n + 1], ref["segment1_prob"]) <= TOL
    # A real segmentation, not a constant: both objects are found somewhere in frame 1.
    assert torch.equal(prob[: n + 1].argmax(0).unique(), torch.arange(n + 1))


def test_segment_shapes_and_bad_input():
    torch.set_num_threads(2)
    torch.manual_seed(0)
    net = STM().eval()
    image = torch.rand(1, 3, 32, 48)
    masks = torch.zeros(2, 32, 48)
    masks[0, :16] = 1
    masks[1, 16:, :24] = 1
    with torch.inference_mode():
        mem = net.encode_memory(image, masks)
        assert mem.keys.shape == (2, 128, 2, 3) and mem.values.shape == (2, 512, 2, 3)
        # Two independent one-object trackers: each object encoded with no "others".
        apart = net.encode_memory(image, masks, groups=2)
        for k in range(2):
            alone = net.encode_memory(image, masks[k : k + 1])
            assert torch.equal(apart.keys[k : k + 1], alone.keys)
            assert torch.equal(apart.values[k : k + 1], alone.values)
        query = net.encode_query(image)
        assert query.key.shape == (1, 128, 2, 3) and query.value.shape == (1, 512, 2, 3)
        # Two memory frames: positions concatenated along M.
        keys = torch.cat([mem.keys.flatten(2)] * 2, dim=2)
        values = torch.cat([mem.values.flatten(2)] * 2, dim=2)
        probs = net.segment(query, keys, values)
        assert probs.shape == (2, 32, 48)
        assert bool(((probs >= 0) & (probs <= 1)).all())
        # top_k reaches the read: a single best position per query differs from the dense read.
        top1 = net.segment(query, keys, values, top_k=1)
        assert top1.shape == probs.shape and not torch.allclose(top1, probs)
    # A programming error (the engine pads frames), not a user's: the class lite0-match raises.
    with pytest.raises(ValueError, match="multiples of 16"):
        net.encode_query(torch.rand(1, 3, 30, 48))
    with pytest.raises(ValueError, match="masks"):
        net.encode_memory(image, torch.zeros(2, 16, 48))
