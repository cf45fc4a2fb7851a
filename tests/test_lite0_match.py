import numpy as np
import pytest
import torch

from napari_stm.core.lite0_match import Lite0Match
from napari_stm.core.model import QueryFeatures, VOSNetwork
from napari_stm.core.readout import soft_aggregate
from napari_stm.synthetic import make_clip


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Lite0Match()


def _image(frame: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 255


def _propagate(model: Lite0Match, frames: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Labels of every frame from those of frame 0; memory = frame 0 + the previous frame."""
    ids = [int(i) for i in np.unique(first) if i]
    masks = torch.stack([torch.from_numpy(first == i).float() for i in ids])
    out = [first]
    with torch.inference_mode():
        q = model.encode_query(_image(frames[0]))
        reference = model.encode_memory(_image(frames[0]), masks, q)
        previous = None
        for frame in frames[1:]:
            q = model.encode_query(_image(frame))
            memory = [reference] + ([previous] if previous is not None else [])
            keys = torch.cat([m.keys.flatten(2) for m in memory], dim=2)
            values = torch.cat([m.values.flatten(2) for m in memory], dim=2)
            obj = model.segment(q, keys, values, top_k=model.default_top_k)
            probs = torch.softmax(soft_aggregate(obj), dim=0)
            previous = model.encode_memory(_image(frame), probs[1:], q)
            lut = np.array([0, *ids], dtype=np.uint8)
            out.append(lut[probs.argmax(0).numpy()])
    return np.stack(out)


def _mean_iou(pred: np.ndarray, truth: np.ndarray) -> float:
    scores = []
    for t in range(1, len(truth)):
        for k in np.unique(truth[0]):
            if k == 0:
                continue
            a, b = pred[t] == k, truth[t] == k
            union = (a | b).sum()
            scores.append((a & b).sum() / union if union else 1.0)
    return float(np.mean(scores))


def test_contract_shapes_and_shared_keys(model):
    assert isinstance(model, VOSNetwork) and model.name == "lite0-match"
    assert model.pad_multiple == 16 and not model.training
    image = torch.rand(1, 3, 64, 96)
    q = model.encode_query(image)
    assert isinstance(q, QueryFeatures)
    assert q.key.shape == (1, 176, 8, 12)
    assert torch.allclose(q.key.norm(dim=1), torch.ones(1, 8, 12), atol=1e-5)

    masks = torch.zeros(2, 64, 96)
    masks[0, 8:40, 8:40] = 1
    masks[1, 30:60, 50:90] = 1
    entry = model.encode_memory(image, masks, q)
    assert entry.keys is q.key  # the frame's query key is reused, not recomputed
    assert entry.values.shape == (2, 4, 8, 12)
    # Without the query features, the same keys are computed.
    assert torch.allclose(model.encode_memory(image, masks).keys, q.key, atol=1e-5)

    probs = model.segment(q, entry.keys.flatten(2), entry.values.flatten(2), top_k=5)
    assert probs.shape == (2, 64, 96)
    assert probs.min() >= 0 and probs.max() <= 1
    # Reading a frame against its own memory gives its masks back.
    assert ((probs > 0.5) == (masks > 0.5)).float().mean() > 0.97


def test_backbone_stays_frozen_and_in_eval(model):
    assert not any(p.requires_grad for p in model.parameters())
    model.train()
    try:
        assert not model.backbone.training
        image = torch.rand(1, 3, 32, 32)
        with torch.inference_mode():
            a = model.encode_query(image).key
            b = model.encode_query(image).key
        assert torch.equal(a, b)  # batch statistics never used
    finally:
        model.eval()


def test_bad_masks_are_clear_errors(model):
    image = torch.rand(1, 3, 32, 48)
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        model.encode_memory(image, torch.zeros(1, 32, 32))
    with pytest.raises(ValueError, match="temperature"):
        Lite0Match(pretrained=False, temperature=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_propagates_synthetic_objects(model, seed):
    frames, labels = make_clip(n_frames=8, height=96, width=128, n_objects=2, seed=seed)
    pred = _propagate(model, frames, labels[0])
    assert set(np.unique(pred[-1])) == {0, 1, 2}
    assert _mean_iou(pred, labels) > 0.7


def test_pretrained_matters(model):
    # Random weights match nothing: the ImageNet features carry the result.
    frames, labels = make_clip(n_frames=6, height=96, width=128, n_objects=2, seed=0)
    torch.manual_seed(0)
    random = Lite0Match(pretrained=False)
    assert _mean_iou(_propagate(model, frames, labels[0]), labels) > _mean_iou(
        _propagate(random, frames, labels[0]), labels
    )
