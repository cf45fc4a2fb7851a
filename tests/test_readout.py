"""The memory read against a plain softmax written out in full, and the motion prior."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from napari_stm.core import readout
from napari_stm.core.engine import PropagationConfig
from napari_stm.core.errors import InputError
from napari_stm.core.readout import (
    WeightSets,
    _band,
    dense_weights,
    memory_read,
    motion_prior,
)


def reference_read(keys, values, query, scale, bias=None, top_k=None):
    """softmax(scale * q.k + bias) over memory, written out for one key set per object."""
    n = values.shape[0]
    out = []
    for i in range(n):
        k = keys[min(i, keys.shape[0] - 1)]
        aff = scale * query[min(i, query.shape[0] - 1)].T @ k  # [P, M]
        if bias is not None:
            aff = aff + bias
        if top_k is not None:
            kth = aff.topk(top_k, dim=1).values[:, -1:]
            aff = aff.masked_fill(aff < kth, float("-inf"))
        out.append(values[i] @ torch.softmax(aff, dim=1).T)
    return torch.stack(out)


def random_memory(nk=1, n=3, ck=8, cv=5, p=37, m=90, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(nk, ck, m, generator=g)
    values = torch.randn(n, cv, m, generator=g)
    query = torch.randn(1, ck, p, generator=g)
    return keys, values, query


@pytest.mark.parametrize("nk", [1, 3])
def test_dense_read_is_the_full_softmax(nk, monkeypatch):
    keys, values, query = random_memory(nk=nk)
    want = reference_read(keys, values, query.expand(nk, -1, -1), 0.5)
    got = memory_read(keys, values, query, scale=0.5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # Small chunks must give the same answer: chunk edges are not seams.
    monkeypatch.setattr(readout, "CHUNK_ELEMENTS", 100)
    got = memory_read(keys, values, query, scale=0.5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_topk_read_keeps_only_the_best_matches():
    keys, values, query = random_memory()
    want = reference_read(keys, values, query, 0.5, top_k=4)
    got = memory_read(keys, values, query, top_k=4, scale=0.5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def explicit_bias(gaps, h, w, sigma, cap):
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], 1).float()
    d2 = torch.cdist(pos, pos) ** 2  # [P, P]
    blocks = [-d2 / (2 * (sigma * max(h, w)) ** 2 * max(g, 1)) for g in gaps]
    return torch.cat(blocks, dim=1).clamp(min=-cap)  # [P, F * P]


@pytest.mark.parametrize("top_k", [None, 6])
@pytest.mark.parametrize("cap", [2.0, 1e6])
def test_motion_prior_adds_a_capped_gaussian_of_the_displacement(top_k, cap):
    h, w, gaps, sigma = 5, 7, [1, 4, 30], 0.15
    keys, values, query = random_memory(p=h * w, m=len(gaps) * h * w)
    prior = motion_prior(torch.tensor(gaps), (h, w), sigma, cap)
    bias = explicit_bias(gaps, h, w, sigma, cap)
    want = reference_read(keys, values, query, 0.5, bias, top_k)
    got = memory_read(keys, values, query, top_k=top_k, scale=0.5, prior=prior)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_motion_prior_with_half_precision_inputs():
    h, w, gaps = 4, 4, [1, 2]
    keys, values, query = random_memory(p=h * w, m=len(gaps) * h * w)
    prior = motion_prior(torch.tensor(gaps), (h, w), 0.1)
    want = memory_read(keys, values, query, scale=0.5, prior=prior)
    got = memory_read(keys.bfloat16(), values.bfloat16(), query.bfloat16(), scale=0.5, prior=prior)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.05)


def test_motion_prior_shape_mismatch_is_named():
    keys, values, query = random_memory(p=12, m=24)
    with pytest.raises(ValueError, match="motion prior covers"):
        memory_read(keys, values, query, prior=motion_prior(torch.tensor([1]), (3, 4), 0.1))


def test_motion_sigma_is_validated():
    with pytest.raises(InputError, match="motion_sigma"):
        PropagationConfig(motion_sigma=-1)


def test_window_read_reads_only_where_values_differ_from_the_background():
    # stm-lite's windows: objects whose values are the background's except at a few memory
    # positions, read at a few query positions each, two weight sets (motion priors).
    g = torch.Generator().manual_seed(5)
    k, p, m, n, cv = 2, 30, 40, 4, 6
    weights = torch.softmax(3 * torch.randn(k, p, m, generator=g), dim=-1)
    background = torch.randn(cv, m, generator=g)
    values = background.expand(n, cv, m).clone()
    differs = torch.rand(n, m, generator=g) < 0.2
    differs[2] = False  # an object equal to the background everywhere
    values += differs[:, None] * torch.randn(n, cv, m, generator=g)
    objects = torch.tensor([3, 0, 2])
    owner = torch.tensor([1, 0, 1])
    rows = torch.randint(0, p, (3, 7), generator=g)
    got = readout.window_read(
        weights, owner, rows, values, objects, background, weights @ background.T, differs
    )
    dense = torch.bmm(weights[owner[:, None], rows], values[objects].transpose(1, 2))
    assert got.shape == (3, 7, cv)
    assert torch.allclose(got, dense, atol=1e-5)
    # No object differs anywhere: the background's read at the rows, nothing else.
    none = readout.window_read(
        weights,
        owner,
        rows,
        background.expand(n, cv, m),
        objects,
        background,
        weights @ background.T,
        torch.zeros(n, m, dtype=torch.bool),
    )
    assert torch.allclose(none, (weights @ background.T)[owner[:, None], rows], atol=0)


def test_weight_sets_are_each_sets_dense_weights_over_its_own_positions():
    # Many one-object trackers' priors (and memories) in one call: every set's weights from
    # its memory's shared softmax terms and its prior's band (or its own dense softmax where
    # the band is wide), each equal to its own dense read's weights over its own memory
    # positions (in its order); rows and reads equal the dense weights' rows and products.
    torch.manual_seed(0)
    grid = (12, 20)
    p = grid[0] * grid[1]
    keys = F.normalize(torch.randn(1, 16, 3 * p), dim=1) * 3
    query = F.normalize(torch.randn(1, 16, p), dim=1) * 3
    three = motion_prior(torch.tensor([1, 2, 3]), grid, 0.02)
    two = motion_prior(torch.tensor([2, 1]), grid, 0.03)
    wide = motion_prior(torch.tensor([1, 2, 3]), grid, 0.15)
    own = torch.cat([torch.arange(2 * p, 3 * p), torch.arange(0, p)])  # frames 2 and 0
    priors = (three, two, None, wide)
    every = torch.arange(3 * p)  # another memory over the same frames: its own band
    positions = [None, own, None, every]
    # The first memory's band is narrow; the last's covers most of every frame (dense).
    assert _band([three, None], 3 * p) is not None and _band([wide], 3 * p) is None
    sets = WeightSets(keys, query, 1.0, priors, positions)
    expected = [
        dense_weights(keys, query, 1.0, three),
        dense_weights(keys[..., own], query, 1.0, two),
        dense_weights(keys, query, 1.0),
        dense_weights(keys, query, 1.0, wide),
    ]
    values = torch.randn(4, 3 * p)
    at = torch.tensor([0, 5, 77, p - 1])
    for k, want in enumerate(expected):
        # Relative: the band's bias is -d^2 / (2 s^2) from integer offsets, the dense one's
        # an expanded form that rounds terms in the hundreds.
        assert torch.allclose(sets.dense(k), want, rtol=1e-4, atol=1e-9)
        assert torch.allclose(sets.rows(k, at), want[at], rtol=1e-4, atol=1e-9)
        v = values[k] if positions[k] is None else values[k, positions[k]]
        got = sets.read([k], values[k : k + 1])[0]
        assert torch.allclose(got, want @ v, rtol=1e-4, atol=1e-5)
        # columns: where each of the set's memory positions lies among its own
        held = torch.arange(3 * p) if positions[k] is None else positions[k]
        assert torch.equal(sets.columns[k, held], torch.arange(len(held)))
    # Rows over one memory read in one product, each with its own set.
    both = sets.read([0, 2, 0, 3], values)
    for i, k in enumerate([0, 2, 0, 3]):
        assert torch.allclose(both[i], expected[k] @ values[i], rtol=1e-4, atol=1e-5)


def test_dense_sets_from_one_shared_affinity_are_their_own_dense_weights_bit_for_bit():
    # A call's weight sets share one product of query and memory keys: a dense set adds only
    # its own prior's bias to it, which with scale 1 is the same float32 sum as its own fused
    # product-and-bias (stm-lite's windows read with scale 1); banded sets are unchanged.
    torch.manual_seed(1)
    grid = (9, 14)
    p = grid[0] * grid[1]
    keys = F.normalize(torch.randn(1, 16, 2 * p), dim=1) * 3
    query = F.normalize(torch.randn(1, 16, p), dim=1) * 3
    wide = motion_prior(torch.tensor([1, 4]), grid, 0.15)
    other = motion_prior(torch.tensor([3]), grid, 0.12)  # over one frame
    affinity = query[0].T @ keys[0]
    for prior in (wide, None):
        alone = dense_weights(keys, query, 1.0, prior)
        assert torch.equal(dense_weights(keys, query, 1.0, prior, affinity), alone)
    own = torch.arange(p, 2 * p)  # the second frame only: the shared product's columns
    sets = WeightSets(keys, query, 1.0, (wide, other), [None, own])
    assert torch.equal(sets.dense(0), dense_weights(keys, query, 1.0, wide))
    assert torch.equal(sets.dense(1), dense_weights(keys[..., own], query, 1.0, other))
