"""Official parity, end to end: the CLI with the official checkpoint layout and the paper's
evaluation procedure reproduces the official implementation's probabilities on its fixture clip.

Runs when ../shared/reference/stm_official is present (weights recipe and fixture made by running
the official code); skips with a message naming the missing path otherwise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from official_reference import FIXTURE, MAKE_WEIGHTS, load_make_weights, strip_prefix

TOL = 1e-4

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def official() -> dict[str, np.ndarray]:
    needed = [MAKE_WEIGHTS, FIXTURE / "clip.npz", FIXTURE / "official_outputs.npz"]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        pytest.skip(f"official STM reference files not found: {', '.join(missing)}")
    clip = np.load(FIXTURE / "clip.npz")
    outputs = np.load(FIXTURE / "official_outputs.npz")
    return {
        "frames": clip["frames"],
        "labels": clip["labels"],
        "probs": outputs["probs"],
        "pred": outputs["pred"],
    }


@pytest.fixture(scope="module")
def weights(official, tmp_path_factory) -> Path:
    """The deterministic weights, saved like the official STM_weights.pth (``module.`` keys)."""
    state_dict = load_make_weights().make_state_dict(salt="")
    assert all(k.startswith("module.") for k in state_dict)
    path = tmp_path_factory.mktemp("weights") / "STM_weights.pth"
    torch.save(state_dict, path)
    return path


@pytest.fixture
def two_threads():
    # The fixture was made with 2 threads; the ResNet-50 run is worth them.
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cli_run(official, weights, tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """`napari-stm propagate --model stm-resnet50 --memory official --device cpu` on the clip."""
    from PIL import Image

    from napari_stm.cli import main

    root = tmp_path_factory.mktemp("clip")
    frames = root / "frames"
    frames.mkdir()
    for t, frame in enumerate(official["frames"]):
        Image.fromarray(frame).save(frames / f"{t:05d}.png")
    mask = root / "00000.png"
    Image.fromarray(official["labels"][0]).save(mask)
    out, probs = root / "out", root / "probs.npz"
    argv = [
        "propagate", str(frames), "--masks", str(mask), "--out", str(out),
        "--model", "stm-resnet50", "--weights", str(weights),
        "--memory", "official", "--device", "cpu", "--direction", "forward",
        "--probs", str(probs), "--quiet",
    ]  # fmt: skip
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(before)
    return out, dict(np.load(probs))


def test_cli_reproduces_official_probs(official, cli_run):
    _, saved = cli_run
    probs = saved["probs"]
    assert probs.shape == official["probs"].shape and probs.dtype == np.float32
    assert saved["ids"].tolist() == [1, 2]
    diff = np.abs(probs - official["probs"])
    print(f"official parity through the CLI: max |diff| {diff.max():.2e} over {probs.shape}")
    assert diff.max() <= TOL, (
        f"max |diff| {diff.max():.2e} at {np.unravel_index(diff.argmax(), diff.shape)}"
    )


def near_ties(probs: np.ndarray) -> np.ndarray:
    """Pixels whose two likeliest classes are within 2 x TOL: their argmax may go either way
    (the untrained weights leave a few hundred such pixels per frame)."""
    top2 = np.sort(probs, axis=-3)[..., -2:, :, :]
    return (top2[..., 1, :, :] - top2[..., 0, :, :]) <= 2 * TOL


def same_masks(ours: np.ndarray, official: np.ndarray, probs: np.ndarray) -> bool:
    return bool(np.all((ours == official) | near_ties(probs)))


def test_cli_masks_equal_official_argmax(official, cli_run):
    from PIL import Image

    out, _ = cli_run
    files = sorted(out.glob("*.png"))
    assert [f.stem for f in files] == [f"{t:05d}" for t in range(len(official["pred"]))]
    for t, f in enumerate(files):
        with Image.open(f) as img:
            assert img.mode == "P"  # DAVIS palette PNG
            labels = np.asarray(img)
        assert same_masks(labels, official["pred"][t], official["probs"][t]), f"frame {t}"
    assert np.array_equal(np.asarray(Image.open(files[0])), official["labels"][0])


def test_propagator_reproduces_official_first_frames(official, weights, two_threads):
    # The same path through the Python API, on the first frames only (the CLI ran them all).
    from napari_stm.core.engine import PropagationConfig, Propagator
    from napari_stm.core.weights import load_model

    model = load_model("stm-resnet50", weights=weights, device="cpu")
    n = 2  # the reference, then one step: memorise + segment through the API
    prop = Propagator(
        model, official["frames"][:n], PropagationConfig(memory="official", device="cpu")
    )
    prop.add_reference(0, official["labels"][0])
    results = list(prop.propagate("forward"))
    assert [r.t for r in results] == list(range(n))
    probs = np.stack([r.probs for r in results])
    diff = np.abs(probs - official["probs"][:n]).max()
    print(f"official parity through Propagator, frames 0-{n - 1}: max |diff| {diff:.2e}")
    assert diff <= TOL
    assert all(same_masks(r.labels, official["pred"][r.t], official["probs"][r.t]) for r in results)


def test_official_memory_never_sees_the_padding(monkeypatch):
    # Frames whose sides are not multiples of 16: the official code crops its probabilities to
    # the frame before storing them and pads them again with zeros when it memorises the frame,
    # so what the network predicted inside the padding never enters the memory encoder.
    from napari_stm.core.engine import PropagationConfig, Propagator
    from napari_stm.core.frames import geometry
    from napari_stm.core.network import STM

    if not MAKE_WEIGHTS.is_file():
        pytest.skip(f"official STM weights recipe not found: {MAKE_WEIGHTS}")
    model = STM()
    model.load_state_dict(strip_prefix(load_make_weights().make_state_dict(salt="pad")))
    model.eval()
    rng = np.random.default_rng(0)
    h, w = 41, 70  # pads to 48 x 80: 3/4 rows, 5/5 columns
    frames = rng.integers(0, 256, (5, h, w, 3), dtype=np.uint8)
    labels = np.zeros((h, w), np.uint8)
    labels[5:20, 5:25], labels[22:38, 30:50], labels[8:30, 52:68] = 1, 2, 3
    seen: list[torch.Tensor] = []
    encode = model.encode_memory

    def spy(image, masks, query=None):
        seen.append(masks.detach().clone())
        return encode(image, masks, query)

    monkeypatch.setattr(model, "encode_memory", spy)
    config = PropagationConfig(memory="official", device="cpu")
    prop = Propagator(model, frames, config)
    prop.add_reference(0, labels)
    results = list(prop.propagate("forward"))
    assert len(results) == 5
    geo = geometry((h, w), model.pad_multiple)
    left, right, top, bottom = geo.pad
    assert all(geo.pad[i] > 0 for i in range(4))
    # The reference, then frames 1-3 memorised from the network's own probabilities.
    assert len(seen) == 4
    for masks in seen:
        assert masks.shape == (3, *geo.padded)
        inside = (
            slice(None),
            slice(top, masks.shape[1] - bottom),
            slice(left, masks.shape[2] - right),
        )
        padding = masks.clone()
        padding[inside] = 0
        assert float(padding.abs().max()) == 0.0
        assert float(masks[inside].sum()) > 0
