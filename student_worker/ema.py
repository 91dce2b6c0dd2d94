"""An exponential moving average of the student's weights (timm's ModelEmaV2, DeiT's EMA).

After every optimizer step: ema = decay * ema + (1 - decay) * weights for floating-point
parameters and buffers; integer buffers (BatchNorm's counter) are copied. It is evaluated
beside the student and saved in checkpoints, so a resumed run continues the same average.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightsAverage:
    """The moving average of `model`'s weights, in a copy of `model` kept in eval mode."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights into the average."""
        current = model.state_dict()
        for name, average in self.module.state_dict().items():
            value = current[name].detach()
            if average.is_floating_point():
                average.lerp_(value.to(average.dtype), 1.0 - self.decay)
            else:
                average.copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
