"""An exponential moving average (EMA) of a model's weights, the model a training run keeps and scores.

Each step after the optimizer's update, every floating-point parameter and buffer (BatchNorm running
statistics included) of the average moves towards the trained model's: ``ema = d * ema + (1 - d) * model``
with ``d = min(decay, (1 + step) / (10 + step))``, so the first steps, whose weights are still random, are
forgotten quickly. Integer buffers (BatchNorm's batch counters) are copied. Short, high-learning-rate runs (the
scratch recipe) end on weights that jump from step to step; their average is smoother and scores steadier
(docs/recipes.md).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from addclass.common.errors import InputError


class WeightEma:
    """The moving average of ``model``'s weights, held in a frozen copy of it (``module``, in eval mode)."""

    def __init__(self, model: nn.Module, *, decay: float) -> None:
        """Starts the average at ``model``'s current weights.

        Raises:
            ValueError: ``decay`` is outside (0, 1).
        """
        if not 0.0 < decay < 1.0:
            raise InputError(f"Expected 0 < ema decay < 1. Got {decay} instead.")
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def decay_at(self, step: int) -> float:
        """The decay of the update after step ``step`` (1-based): short at first, ``decay`` later."""
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, *, step: int) -> None:
        """Moves the average towards ``model`` (same architecture) after step ``step``."""
        weight = 1.0 - self.decay_at(step)
        current = model.state_dict()
        for name, value in self.module.state_dict().items():
            source = current[name].detach()
            if value.dtype.is_floating_point:
                value.lerp_(source.to(value.dtype), weight)
            else:
                value.copy_(source)
