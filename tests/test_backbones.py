import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data

from napari_stm.core.backbones import (
    LITE2,
    EfficientNetLite,
    efficientnet_lite,
    lite0_normalize,
    lite_checkpoint_path,
    load_lite_state,
)
from napari_stm.core.errors import CheckpointError

CAT_IDS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_IDS = {967, 968, 504}  # espresso, cup, coffee mug


@pytest.fixture(scope="module")
def lite0():
    return efficientnet_lite(pretrained=True)


@pytest.fixture(scope="module")
def lite2():
    return efficientnet_lite("lite2", pretrained=True)


def _center_224(image: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255
    h, w = x.shape[-2:]
    s = min(h, w)
    x = x[..., (h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    return lite0_normalize(x)


@pytest.mark.parametrize("size", ["lite0", "lite2"])
@pytest.mark.parametrize(("photo", "classes"), [(data.chelsea, CAT_IDS), (data.coffee, COFFEE_IDS)])
def test_lite_classifies_photos(request, size, photo, classes):
    # Both sizes' ImageNet weights load into our blocks and the shared input scale is right.
    net = request.getfixturevalue(size)
    with torch.no_grad():
        probs = net(_center_224(photo())).softmax(-1)[0]
    top5 = probs.topk(5).indices.tolist()
    assert top5[0] in classes, top5
    # The right classes dominate, not just win by a hair.
    assert probs[sorted(classes)].sum() > 0.5


def test_lite0_features_shapes(lite0):
    x = torch.zeros(1, 3, 64, 96)
    with torch.no_grad():
        feats = lite0.features(x)
    assert {s: tuple(f.shape) for s, f in feats.items()} == {
        4: (1, 24, 16, 24),
        8: (1, 40, 8, 12),
        16: (1, 112, 4, 6),
        32: (1, 320, 2, 3),
    }
    with torch.no_grad():
        only = lite0.features(x, strides=(8,))
    assert list(only) == [8]
    assert torch.equal(only[8], feats[8])
    with pytest.raises(ValueError, match="strides"):
        lite0.features(x, strides=(2,))


def test_lite2_features_are_wider_at_every_stride(lite2):
    with torch.no_grad():
        feats = lite2.features(torch.zeros(1, 3, 64, 96))
    assert {s: tuple(f.shape) for s, f in feats.items()} == {
        4: (1, 24, 16, 24),
        8: (1, 48, 8, 12),
        16: (1, 120, 4, 6),
        32: (1, 352, 2, 3),
    }
    assert len(lite2._blocks) == 21


def test_a_lite0_file_for_a_lite2_model_is_a_clear_error():
    state = torch.load(lite_checkpoint_path(), map_location="cpu", weights_only=True)
    with pytest.raises(CheckpointError, match="not an EfficientNet-Lite2 checkpoint.*wrong shapes"):
        load_lite_state(EfficientNetLite(LITE2), state)
    with pytest.raises(ValueError, match="unknown EfficientNet-Lite size 'lite9'"):
        efficientnet_lite("lite9")


def test_lite0_without_head_loads_the_backbone_keys():
    model = efficientnet_lite(pretrained=True, with_head=False)
    assert not hasattr(model, "_fc")
    with pytest.raises(RuntimeError, match="head"):
        model(torch.zeros(1, 3, 32, 32))


def test_mismatched_state_dict_is_a_clear_error():
    state = torch.load(lite_checkpoint_path(), map_location="cpu", weights_only=True)
    missing = dict(state)
    del missing["_blocks.3._depthwise_conv.weight"]
    with pytest.raises(CheckpointError, match=r"missing keys: _blocks\.3\._depthwise_conv"):
        load_lite_state(EfficientNetLite(), missing)

    extra = dict(state)
    extra["_blocks.3._se_reduce.weight"] = torch.zeros(6, 144, 1, 1)
    with pytest.raises(CheckpointError, match=r"unexpected keys: _blocks\.3\._se_reduce"):
        load_lite_state(EfficientNetLite(), extra)

    wrong = dict(state)
    wrong["_conv_stem.weight"] = torch.zeros(32, 3, 5, 5)
    with pytest.raises(CheckpointError, match=r"wrong shapes: _conv_stem\.weight"):
        load_lite_state(EfficientNetLite(), wrong)

    with pytest.raises(CheckpointError, match="state dict"):
        load_lite_state(EfficientNetLite(), [1, 2, 3])


def test_corrupt_checkpoint_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "lite0.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        efficientnet_lite(path=bad)
    with pytest.raises(CheckpointError, match="not found"):
        efficientnet_lite(path=tmp_path / "absent.pth")
