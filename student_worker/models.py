"""Students by registry name, seen by the trainer as two heads (class, distillation).

The names are the teacher server's (`teacher_server.shared.archs`), so a trained student can be
served as a teacher as it is. A DeiT-style ViT has a real distillation head; any other model
gives its one output for both.
"""

from __future__ import annotations

import torch
from torch import nn


def has_two_heads(model: nn.Module) -> bool:
    """True for a model with a distillation token (it has `forward_heads`)."""
    return callable(getattr(model, "forward_heads", None))


class TwoHeads(nn.Module):
    """`forward` answers (class-head logits, logits the distillation loss reads).

    One module whose `forward` gives both heads, so DDP sees every parameter the loss uses.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        forward_heads = getattr(self.model, "forward_heads", None)
        if callable(forward_heads):
            heads: tuple[torch.Tensor, torch.Tensor] = forward_heads(inputs)
            return heads
        logits: torch.Tensor = self.model(inputs)
        return logits, logits
