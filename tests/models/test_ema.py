"""The weight average (`models.training.ema.WeightEma`): its update rule, buffers and limits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from addclass.models.training.ema import WeightEma


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())


def test_the_average_follows_the_update_rule_and_copies_integer_buffers() -> None:
    model = small_model()
    ema = WeightEma(model, decay=0.9)
    start = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.train()(torch.randn(2, 3, 8, 8))  # moves the BN running statistics and its batch counter
    ema.update(model, step=100)
    d = min(0.9, 101 / 110)
    for name, value in ema.module.state_dict().items():
        source = model.state_dict()[name]
        if value.dtype.is_floating_point:
            torch.testing.assert_close(value, d * start[name] + (1 - d) * source)
        else:
            assert torch.equal(value, source), name  # num_batches_tracked
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training
    assert all(p.requires_grad for p in model.parameters())  # the trained model is left as it was


def test_early_steps_are_forgotten_quickly() -> None:
    ema = WeightEma(small_model(), decay=0.999)
    assert ema.decay_at(1) == pytest.approx(2 / 11) and ema.decay_at(10**6) == 0.999
    assert all(ema.decay_at(s) <= ema.decay_at(s + 1) for s in range(1, 50))


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5])
def test_a_decay_outside_zero_one_is_refused(decay: float) -> None:
    with pytest.raises(ValueError, match="0 < ema decay < 1"):
        WeightEma(small_model(), decay=decay)
