"""The optimizer and the learning-rate schedule of a run, from its config."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from student_worker.config import OptimizerConfig, ScheduleConfig


def build_optimizer(
    settings: OptimizerConfig, parameters: Iterable[torch.nn.Parameter]
) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov) or AdamW, with weight decay."""
    if settings.name == "adamw":
        return torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=settings.weight_decay)
    return torch.optim.SGD(
        parameters,
        lr=settings.lr,
        momentum=settings.momentum,
        nesterov=settings.nesterov,
        weight_decay=settings.weight_decay,
    )


def lr_factor(schedule: ScheduleConfig, step: int, steps_per_epoch: int, total_steps: int) -> float:
    """The learning rate's factor at `step`: linear warm-up, then cosine or multistep decay."""
    warmup = schedule.warmup_epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    if schedule.name == "multistep":
        epoch = step // steps_per_epoch
        return float(schedule.gamma ** sum(epoch >= m for m in schedule.milestones))
    progress = (step - warmup) / max(1.0, total_steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
