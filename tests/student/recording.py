"""What a real training run did, recorded from outside: each step as trained, and the
student's own forward inputs."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from student_worker.trainer import Step, Trainer

TrainedSteps = list[tuple[Step, torch.Tensor | None]]


def record_steps(monkeypatch: pytest.MonkeyPatch) -> TrainedSteps:
    """Every Trainer's steps from now on, as `(step, teacher logits)` in training order."""
    trained: TrainedSteps = []
    train_step = Trainer._train_step

    def recording_step(self: Trainer, item: Step, logits: torch.Tensor | None) -> Any:
        trained.append((item, logits))
        return train_step(self, item, logits)

    monkeypatch.setattr(Trainer, "_train_step", recording_step)
    return trained


def record_training_inputs(trainer: Trainer) -> list[torch.Tensor]:
    """The float inputs `trainer`'s student model is given in training mode."""
    inputs: list[torch.Tensor] = []

    def keep(module: torch.nn.Module, args: tuple[torch.Tensor]) -> None:
        if module.training:
            inputs.append(args[0].detach().clone())

    trainer.model.register_forward_pre_hook(keep)
    return inputs
