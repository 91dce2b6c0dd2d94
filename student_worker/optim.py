"""The optimizer and the learning-rate schedule of a run, from its config."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from student_worker.config import OptimizerConfig, ScheduleConfig


def build_optimizer(
    settings: OptimizerConfig, parameters: Iterable[torch.nn.Parameter]
) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov), Adam or AdamW, with weight decay."""
    if settings.name in ("adam", "adamw"):
        adam = torch.optim.AdamW if settings.name == "adamw" else torch.optim.Adam
        return adam(
            parameters, lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay
        )
    return torch.optim.SGD(
        parameters,
        lr=settings.lr,
        momentum=settings.momentum,
        nesterov=settings.nesterov,
        weight_decay=settings.weight_decay,
    )


def lr_factor(
    schedule: ScheduleConfig,
    step: int,
    steps_per_epoch: int,
    total_steps: int,
    base_lr: float = 1.0,
) -> float:
    """The learning rate's factor at `step`: a linear warm-up per step, then cosine from 1
    to min_lr / base_lr, multistep (x gamma at each milestone epoch) or step (x gamma every
    step_epochs) decay."""
    warmup = schedule.warmup_epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    epoch = step // steps_per_epoch
    if schedule.name == "multistep":
        return float(schedule.gamma ** sum(epoch >= m for m in schedule.milestones))
    if schedule.name == "step":
        return float(schedule.gamma ** (epoch // (schedule.step_epochs or 1)))
    floor = schedule.min_lr / base_lr
    progress = (step - warmup) / max(1.0, total_steps - warmup)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
