"""Students by registry name, seen by the trainer as two heads (class, distillation).

The names are the teacher server's (`teacher_server.shared.archs`), so a trained student can be
served as a teacher as it is. A DeiT-style ViT has a real distillation head; any other model
gives its one output for both.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from student_worker.config import StudentConfig
from teacher_server.shared.archs import NoStochasticDepth, create_model
from teacher_server.shared.weights import load_weights

CHECK_SIZE = 224
"""The resolution a student is built at to check it (any size its arch takes)."""


def check_student(student: StudentConfig, image_size: int | None) -> None:
    """What the trainer would find wrong with `student` only when building it, found before
    (a sweep checks every run's before it starts one): `init_weights` missing, `drop_path`
    on an arch without stochastic depth (built on the meta device: no memory, no time)."""
    if student.init_weights is not None and not student.init_weights.is_file():
        raise ValueError(f"student.init_weights {str(student.init_weights)!r}: no such file")
    if student.drop_path:
        size = image_size or CHECK_SIZE
        with torch.device("meta"):
            try:
                create_model(student.arch, 10, (size, size), drop_path=student.drop_path)
            except NoStochasticDepth as exc:
                raise ValueError(f"student.drop_path: {exc}") from None


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


@torch.no_grad()
def init_from_weights(model: nn.Module, path: Path, interpolation: float = 1.0) -> None:
    """Start `model` from `interpolation * weights + (1 - interpolation) * its random init`
    (Stanton et al. 2021, section 6: a student of the teacher's architecture started near the
    teacher); 1.0 loads the weights as they are. Integer buffers take the file's values."""
    if not 0.0 <= interpolation <= 1.0:
        raise ValueError(f"init_interpolation must be in [0, 1], got {interpolation}")
    random_start = {name: value.clone() for name, value in model.state_dict().items()}
    load_weights(model, path)
    if interpolation == 1.0:
        return
    for name, value in model.state_dict().items():
        if value.is_floating_point():
            value.mul_(interpolation).add_(random_start[name], alpha=1.0 - interpolation)
