"""The accelerator's mixed precision, run on CPU: bfloat16 autocast around the networks and
float16 memory, as ``PropagationConfig.amp`` does on CUDA. CPU autocast follows the same rules
(which ops run in bfloat16, which refuse mixed dtypes), so dtype errors and precision losses of
the GPU path show here without a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from official_reference import MAKE_WEIGHTS, REFERENCE, load_make_weights, strip_prefix

from napari_stm.core import engine, runtime
from napari_stm.core.engine import PropagationConfig, Propagator
from napari_stm.core.network import STM
from napari_stm.core.readout import memory_read, motion_prior
from napari_stm.core.weights import load_model
from napari_stm.synthetic import make_clip


@pytest.fixture
def amp_on_cpu(monkeypatch):
    monkeypatch.setattr(runtime, "AMP_DEVICES", frozenset({"cuda", "cpu"}))


def spread_memory(ck: int, cv: int, grid=(12, 20), frames=4, seed=0):
    """Keys spread enough that many memory positions share a query's weight: the case where
    rounding an affinity or the prior's bias moves the result."""
    g = torch.Generator().manual_seed(seed)
    p = grid[0] * grid[1]
    keys = 2 * torch.randn(1, ck, p * frames, generator=g)
    values = torch.randn(2, cv, p * frames, generator=g)
    query = 2 * torch.randn(1, ck, p, generator=g)
    return keys, values, query


@pytest.mark.parametrize("path", ["dense", "dense+prior", "sdpa", "top-k+prior"], ids=lambda s: s)
def test_read_under_autocast_keeps_float32_affinities(path):
    cv = 16 if path == "sdpa" else 12  # one width for keys and values: SDPA's CPU kernel
    keys, values, query = spread_memory(ck=16, cv=cv)
    grid = (12, 20)
    prior = None
    if "prior" in path:
        # A slow object (cells): large inverse spreads, so the bias's expanded terms reach the
        # hundreds that bfloat16 rounds by whole units.
        prior = motion_prior(torch.tensor([1, 2, 5, 9]), grid, sigma=0.01)
    top_k = 20 if "top-k" in path else None
    want = memory_read(keys, values, query, top_k=top_k, prior=prior)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = memory_read(keys.half(), values.half(), query.bfloat16(), top_k=top_k, prior=prior)
    assert got.dtype == torch.bfloat16  # the caller's dtype, so autocast can mix it on
    # bfloat16 keeps 8 bits: the query's rounding alone moves a read by about 0.02 here.
    # Before the read left autocast, the prior's bias was off by whole units (0.9 measured).
    assert (got.float() - want).abs().max() < 0.1


def _official_stm() -> STM:
    state = strip_prefix(load_make_weights().make_state_dict(salt=""))
    net = STM()
    net.load_state_dict(state, strict=True)
    return net.eval()


def _model(name: str) -> torch.nn.Module:
    if name == "stm-resnet50":
        if not MAKE_WEIGHTS.is_file():
            pytest.skip(f"official STM reference files not found at {REFERENCE}")
        return _official_stm()
    return load_model(name, device="cpu")


def _propagate(model, frames, ref, memory: str) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    prop = Propagator(model, frames, PropagationConfig(device="cpu", memory=memory))
    prop.add_reference(0, ref)
    return {r.t: (r.labels, r.probs) for r in prop.propagate("forward")}


@pytest.mark.parametrize(
    ("name", "memory"),
    [
        ("stm-lite", "bounded"),
        ("stm-lite", "official"),
        ("lite0-match", "bounded"),
        ("stm-resnet50", "bounded"),
    ],
)
def test_mixed_precision_propagation_matches_float32(name, memory, monkeypatch):
    frames, labels = make_clip(n_frames=8, height=64, width=96, n_objects=2, seed=3)
    model = _model(name)
    want = _propagate(model, frames, labels[0], memory)
    monkeypatch.setattr(runtime, "AMP_DEVICES", frozenset({"cuda", "cpu"}))
    got = _propagate(model, frames, labels[0], memory)
    # Half-precision storage is the bounded memory's (official mode keeps float32, as the
    # paper's code did).
    bank = engine.Tracker(model, PropagationConfig(device="cpu", memory=memory)).bank
    assert bank.storage_dtype == (torch.float16 if memory == "bounded" else None)
    for t in range(1, len(frames)):
        # Measured 0.012-0.036 for all three networks (bfloat16 features throughout).
        assert np.abs(got[t][1] - want[t][1]).max() < 0.08, f"frame {t}"
        if name != "stm-resnet50":
            # Trained networks are decisive, so their labels barely move. stm-resnet50's test
            # weights are not trained: near three-way ties, its labels flip on any rounding.
            assert (got[t][0] == want[t][0]).mean() > 0.99, f"frame {t}"


def test_mixed_precision_tracker_state_round_trip(amp_on_cpu, tmp_path):
    frames, labels = make_clip(n_frames=6, height=64, width=96, n_objects=2, seed=4)
    model = load_model("stm-lite", device="cpu")
    config = PropagationConfig(device="cpu")
    first = engine.Tracker(model, config)
    first.step(frames[0], labels[0])
    first.step(frames[1])
    path = tmp_path / "state.pt"
    torch.save(first.state_dict(), path)
    second = engine.Tracker(model, config)
    second.load_state_dict(torch.load(path, weights_only=True))
    assert second.bank.tensors(2)[0].dtype == torch.float16
    for t in range(2, len(frames)):
        (a, pa), (b, pb) = first.step(frames[t]), second.step(frames[t])
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(pa, pb)
