"""Losses: soft aggregation in log space equals the engine's, bootstrapping keeps hard pixels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from napari_stm.core.readout import soft_aggregate
from napari_stm.train.losses import bootstrap_fraction, bootstrapped_cross_entropy


@pytest.mark.parametrize("extra", [0, 2])
def test_aggregation_of_logits_equals_the_engines_soft_aggregation(extra):
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8) * 3
    ours = torch.softmax(soft_aggregate(logits, extra_slots=extra, logits=True), dim=1)
    for b in range(2):
        engine = torch.softmax(soft_aggregate(torch.sigmoid(logits[b]), extra_slots=extra), dim=0)
        torch.testing.assert_close(ours[b], engine, atol=1e-5, rtol=1e-4)


def test_aggregation_of_logits_has_finite_gradients_when_saturated():
    logits = torch.tensor([[[[40.0, -40.0]], [[-40.0, -40.0]]]], requires_grad=True)
    loss = F.cross_entropy(soft_aggregate(logits, logits=True), torch.tensor([[[1, 0]]]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_bootstrapped_cross_entropy():
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 4, 5)
    target = torch.randint(0, 3, (2, 4, 5))
    plain = F.cross_entropy(logits, target)
    torch.testing.assert_close(bootstrapped_cross_entropy(logits, target, 1.0), plain)
    per_pixel = F.cross_entropy(logits, target, reduction="none").flatten().sort().values
    hardest_quarter = per_pixel[-10:].mean()  # 40 pixels
    torch.testing.assert_close(bootstrapped_cross_entropy(logits, target, 0.25), hardest_quarter)
    with pytest.raises(ValueError):
        bootstrapped_cross_entropy(logits, target, 0.0)


def test_bootstrap_schedule():
    assert bootstrap_fraction(0, 100, 0.15, 0.2, 0.5) == 1.0
    assert bootstrap_fraction(20, 100, 0.15, 0.2, 0.5) == 1.0
    assert bootstrap_fraction(35, 100, 0.15, 0.2, 0.5) == pytest.approx(0.575)
    assert bootstrap_fraction(50, 100, 0.15, 0.2, 0.5) == 0.15
    assert bootstrap_fraction(99, 100, 0.15, 0.2, 0.5) == 0.15
    assert bootstrap_fraction(99, 100, 1.0, 0.2, 0.5) == 1.0
