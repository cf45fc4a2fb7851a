"""stm-lite: the VOSNetwork contract, batched == unbatched, the engine drives it, size budget."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_network import iou

import napari_stm
from napari_stm.core.backbones import efficientnet_lite
from napari_stm.core.engine import PropagationConfig, Propagator
from napari_stm.core.errors import CheckpointError
from napari_stm.core.stm_lite import (
    KEY_DIM,
    MAX_SCALE,
    VALUE_DIM,
    STMLite,
    _background_values,
    stm_lite2,
)
from napari_stm.core.weights import (
    ModelSpec,
    default_model_name,
    get_spec,
    load_model,
    register,
    unregister,
)
from napari_stm.synthetic import make_clip

H, W = 64, 96


@pytest.fixture(scope="module")
def model() -> STMLite:
    torch.manual_seed(0)
    return STMLite(pretrained=True).eval()


@pytest.fixture(scope="module")
def clip():
    frames, labels = make_clip(n_frames=5, height=H, width=W, n_objects=2, seed=3)
    return frames, labels


def _image(frame: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 255


def _masks(labels: np.ndarray, n: int = 2) -> torch.Tensor:
    return torch.stack([torch.from_numpy(labels == k + 1) for k in range(n)]).float()


def test_contract_shapes(model, clip):
    frames, labels = clip
    image = _image(frames[0])
    with torch.inference_mode():
        q = model.encode_query(image)
        entry = model.encode_memory(image, _masks(labels[0]), q)
        assert q.key.shape == (1, KEY_DIM, H // 16, W // 16)
        # Key sharing: a memory key is the frame's query key.
        assert entry.keys is q.key
        assert entry.values.shape == (2, model.read_dim, H // 16, W // 16)
        # Without the query the same entry is computed from the image.
        again = model.encode_memory(image, _masks(labels[0]))
        torch.testing.assert_close(again.keys, entry.keys)
        torch.testing.assert_close(again.values, entry.values)
        q1 = model.encode_query(_image(frames[1]))
        for top_k in (None, 5):
            probs = model.segment(q1, entry.keys.flatten(2), entry.values.flatten(2), top_k)
            assert probs.shape == (2, H, W)
            assert probs.dtype == torch.float32
            assert 0 <= float(probs.min()) and float(probs.max()) <= 1


def test_batched_calls_match_single_frames(model, clip):
    # Training runs a batch through the same methods: results must equal frame-by-frame calls.
    frames, labels = clip
    images = torch.cat([_image(frames[0]), _image(frames[2])])
    masks = torch.stack([_masks(labels[0]), _masks(labels[2])])
    query_images = torch.cat([_image(frames[1]), _image(frames[3])])
    with torch.inference_mode():
        entry = model.encode_memory(images, masks)
        q = model.encode_query(query_images)
        batched = model.segment(q, entry.keys.flatten(2), entry.values.flatten(3))
        assert batched.shape == (2, 2, H, W)
        for i in range(2):
            e = model.encode_memory(images[i : i + 1], masks[i])
            qi = model.encode_query(query_images[i : i + 1])
            single = model.segment(qi, e.keys.flatten(2), e.values.flatten(2))
            torch.testing.assert_close(batched[i], single, atol=1e-5, rtol=1e-4)


def test_stored_values_are_read_like_the_full_values(model):
    # Memory values are stored through convFM's value part; reading them and adding the
    # frame's part must equal reading the 256-channel values and applying convFM whole.
    torch.manual_seed(0)
    dec = model.decoder
    raw = torch.randn(1, 2, VALUE_DIM, 3, 4)
    weights = torch.softmax(3 * torch.randn(12, 12), dim=1)  # query x memory positions
    c16 = dec.frame_dim
    f16 = torch.randn(1, c16, 3, 4)
    with torch.inference_mode():
        read_raw = (raw.flatten(3) @ weights.T).view(2, VALUE_DIM, 3, 4)
        full = dec.convFM(torch.cat([read_raw, f16.expand(2, -1, -1, -1)], dim=1))
        read = (dec.project(raw).flatten(3) @ weights.T).view(2, model.read_dim, 3, 4)
        frame = torch.nn.functional.conv2d(f16, dec.convFM.weight[:, -c16:], dec.convFM.bias)
        torch.testing.assert_close(read[:, :-1] + frame, full, atol=1e-5, rtol=1e-5)
        # The last channel stays the read-out's soft mask (the object's coverage).
        torch.testing.assert_close(read[:, -1], read_raw[:, -1])


def test_logits_are_the_probabilities_before_the_sigmoid(model, clip):
    frames, labels = clip
    with torch.inference_mode():
        e = model.encode_memory(_image(frames[0]), _masks(labels[0]))
        q = model.encode_query(_image(frames[1]))
        probs = model.segment(q, e.keys.flatten(2), e.values.flatten(2))
        logits = model.segment(q, e.keys.flatten(2), e.values.flatten(2), logits=True)
    torch.testing.assert_close(torch.sigmoid(logits), probs)


def test_encoder_is_the_imagenet_lite0(model):
    ref = efficientnet_lite(pretrained=True, with_head=False).state_dict()
    own = model.encoder.state_dict()
    assert own  # the stride-32 stage is dropped, everything else is ImageNet's
    assert not any(k.startswith("_blocks.11.") for k in own)
    for k, v in own.items():
        torch.testing.assert_close(v, ref[k], rtol=0, atol=0)


def test_encoder_batch_norm_stays_frozen_in_train_mode(model):
    model.train()
    try:
        assert not model.encoder.training
        assert model.decoder.training
    finally:
        model.eval()


def test_affinity_scale_is_bounded():
    # Unbounded affinities underflow the softmax into denormals, 10-20x slower on CPU.
    net = STMLite(pretrained=False)
    with torch.no_grad():
        net.scale_logit.fill_(50.0)
    assert float(net.affinity_scale.detach()) <= MAX_SCALE


def test_size_within_budget(model):
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    assert buf.tell() <= 25 * 1024 * 1024


def test_bad_input_is_named(model):
    with pytest.raises(ValueError, match="multiples of 16"):
        model.encode_query(torch.rand(1, 3, 60, 64))
    with pytest.raises(ValueError, match="masks must be"):
        model.encode_memory(torch.rand(1, 3, 64, 64), torch.rand(2, 32, 32))
    with torch.inference_mode():
        q = model.encode_query(torch.rand(1, 3, 64, 64))
        with pytest.raises(ValueError, match="129 channels"):
            model.segment(q, q.key.flatten(2), torch.rand(1, VALUE_DIM, 16))


def test_propagates_in_the_engine(model, clip):
    frames, labels = clip
    prop = Propagator(model, frames, PropagationConfig(device="cpu"))
    prop.add_reference(0, labels[0])
    out = {r.t: r for r in prop.propagate("forward")}
    assert sorted(out) == list(range(len(frames)))
    assert np.array_equal(out[0].labels, labels[0])
    for t in range(1, len(frames)):
        assert out[t].labels.shape == (H, W)
        assert set(np.unique(out[t].labels)) <= {0, 1, 2}
        assert out[t].probs.shape == (3, H, W)
        np.testing.assert_allclose(out[t].probs.sum(0), 1, atol=1e-4)


def test_loads_through_the_registry(model, clip, tmp_path):
    path = tmp_path / "w.pth"
    torch.save(model.state_dict(), path)
    register(ModelSpec("stm-lite-test", "napari_stm.core.stm_lite:STMLite", "test"))
    try:
        loaded = load_model("stm-lite-test", weights=path, device="cpu")
    finally:
        unregister("stm-lite-test")
    frames, labels = clip
    with torch.inference_mode():
        for net in (model, loaded):
            e = net.encode_memory(_image(frames[0]), _masks(labels[0]))
            q = net.encode_query(_image(frames[1]))
            net._out = net.segment(q, e.keys.flatten(2), e.values.flatten(2))
    # Not bit-exact: an engine test before may have put the shared model's weights in
    # channels-last layout, which changes the order of float additions.
    torch.testing.assert_close(loaded._out, model._out, rtol=0, atol=1e-5)


def test_stm_lite2_is_the_same_design_on_lite2(clip, tmp_path):
    # Trained weights of the Lite2 variant load by name and propagate in the engine; the
    # bundled Lite0 weights given to it are refused with the layers that do not fit.
    torch.manual_seed(0)
    net = stm_lite2(pretrained=False)
    assert net.backbone == "lite2"
    assert net.encoder._blocks[-1]._project_conv.out_channels == 120
    path = tmp_path / "lite2.pth"
    torch.save(net.state_dict(), path)
    loaded = load_model("stm-lite2", weights=path, device="cpu")
    frames, labels = clip
    prop = Propagator(loaded, frames[:3], PropagationConfig(device="cpu"))
    prop.add_reference(0, labels[0])
    out = {r.t: r for r in prop.propagate("forward")}
    assert sorted(out) == [0, 1, 2]
    assert out[2].probs.shape == (3, H, W)
    with pytest.raises(CheckpointError, match="does not fit model 'stm-lite2'"):
        bundled = Path(napari_stm.__file__).parent / get_spec("stm-lite").weights
        load_model("stm-lite2", weights=bundled, device="cpu")
    with pytest.raises(CheckpointError, match="weights"):
        load_model("stm-lite2", device="cpu")


def test_bundled_weights_are_the_offline_default(monkeypatch):
    # No network: loading the default must not try one.
    import urllib.request

    def no_network(*a, **k):
        raise AssertionError("the bundled model tried to download")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    assert default_model_name() == "stm-lite"
    spec = get_spec("stm-lite")
    assert spec.weights == "weights/stm_lite.pth" and spec.sha256  # pinned
    net = load_model("stm-lite", device="cpu")
    assert isinstance(net, STMLite) and net.motion_prior


def test_each_bundled_model_works_at_its_own_size():
    # Chosen per weights: stm-lite's natural video at 576 a side, the cells model from 512 down.
    from napari_stm.core.tracker import working_geometry

    video = working_geometry((480, 854), load_model("stm-lite", device="cpu"), PropagationConfig())
    assert video.inner == (324, 576)
    cells = load_model("stm-lite-cells", device="cpu")
    assert working_geometry((480, 854), cells, PropagationConfig()).inner == (288, 512)
    assert working_geometry((480, 854), cells, PropagationConfig(max_side=0)).inner == (480, 854)


def test_bundled_model_tracks_the_sample_clip():
    """The shipped weights on the shipped clip (half size): a trained model, not a random one."""
    from napari_stm.cli import SAMPLE
    from napari_stm.io import open_frames

    source = open_frames(str(SAMPLE / "frames"))
    # The sample clip is make_clip's (benchmarks/make_sample_clip.py): its labels are the truth.
    _, truth = make_clip(n_frames=24, height=240, width=320, n_objects=3, seed=2)
    frames = np.stack([np.asarray(source[t])[::2, ::2] for t in range(12)])
    truth = truth[:12, ::2, ::2]
    prop = Propagator(load_model("stm-lite", device="cpu"), frames, PropagationConfig())
    prop.add_reference(0, truth[0])
    ious = [
        iou(r.labels == k, truth[r.t] == k)
        for r in prop.propagate("forward")
        if not r.is_reference
        for k in (1, 2, 3)
    ]
    print(f"stm-lite on the sample clip: mean IoU {np.mean(ious):.3f}")
    assert np.mean(ious) > 0.7


def test_kept_differs_are_the_computed_differs_bit_for_bit():
    """Where each object's values differ from the background, kept per memory entry across
    calls, equals the comparison made afresh: on the first call, on a call that reuses it,
    on one whose background differs (other objects first) and with a rewritten entry."""
    gen = torch.Generator().manual_seed(0)
    n, cv, grid, frames = 5, 3, (4, 5), 3
    g = grid[0] * grid[1]
    empty = torch.randn(cv, frames * g, generator=gen)
    values = empty.expand(n, -1, -1).clone()
    values[:, -1] = 0  # no soft mask: every object is far everywhere but on its own cells
    for i in range(n):  # each object its own few cells of frames 1-2, with a soft mask there
        at = g + torch.randperm((frames - 1) * g, generator=gen)[:4]
        values[i, :, at] = torch.randn(cv, 4, generator=gen)
        values[i, -1, at] = 0.9
    values[2, :-1, 7] = empty[:-1, 7] * (1 + 1e-6)  # a difference to float rounding counts
    held = torch.ones(n, frames * g, dtype=torch.bool)
    held[4, :g] = False  # object 4 holds no entry at memory frame 0
    values[4, :, :g] = 0

    def entries(objects: list[int], caches: list[dict], version: int = 0) -> tuple:
        return tuple(
            tuple(
                None if not held[i, f * g] else (caches[i], (0, 10 * i + f + 100 * version))
                for f in range(frames)
            )
            for i in objects
        )

    caches: list[dict] = [{} for _ in range(n)]
    # Computed, reused, reused in another order, and with object 2 first: its value at cell
    # 7 is then the background there, so the others' kept rows of frame 0 no longer hold.
    for objects in ([0, 1, 2, 3, 4], [0, 1, 2, 3, 4], [3, 1, 4, 0, 2], [2, 0, 1, 3, 4]):
        v, h = values[objects], held[objects]
        expected = _background_values(v, grid, h)
        got = _background_values(v, grid, h, entries(objects, caches))
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
        assert bool(got[1][objects.index(0), 7]) == (objects[0] == 2)
    assert all(caches), "the rows were kept"
    # A rewritten entry (a new key) with other values is compared afresh.
    values[1, :, g + 3] += 1
    expected = _background_values(values, grid, held)
    got = _background_values(values, grid, held, entries(list(range(n)), caches, 1))
    assert torch.equal(got[1], expected[1]) and bool(got[1][1, g + 3])
