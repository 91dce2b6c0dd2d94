"""The optimizer and the learning-rate schedule of a run, from its config."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from fractions import Fraction
from typing import Any

import torch

from student_worker.config import OptimizerConfig, ScheduleConfig


def build_optimizer(settings: OptimizerConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov), Adam, AdamW or RMSpropTF, with weight decay (on
    every parameter, or `exclude_from_decay`: all but `decay_exempt`'s)."""
    parameters: list[dict[str, Any]] = [{"params": list(model.parameters())}]
    if settings.exclude_from_decay:
        exempt = decay_exempt(model)
        named = list(model.named_parameters())
        parameters = [
            {"params": [p for name, p in named if name not in exempt]},
            {"params": [p for name, p in named if name in exempt], "weight_decay": 0.0},
        ]
    if settings.name in ("adam", "adamw"):
        adam = torch.optim.AdamW if settings.name == "adamw" else torch.optim.Adam
        return adam(
            parameters, lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay
        )
    if settings.name == "rmsprop_tf":
        return RMSpropTF(
            parameters,
            lr=settings.lr,
            alpha=settings.alpha,
            eps=settings.eps,
            momentum=settings.momentum,
            weight_decay=settings.weight_decay,
        )
    return torch.optim.SGD(
        parameters,
        lr=settings.lr,
        momentum=settings.momentum,
        nesterov=settings.nesterov,
        weight_decay=settings.weight_decay,
    )


def decay_exempt(model: torch.nn.Module) -> set[str]:
    """The parameters timm's rule keeps from weight decay: those of one dimension or none
    (biases, the weights of norms) and those the model names in `no_weight_decay()`
    (a ViT's class and distillation tokens and position embedding)."""
    named = getattr(model, "no_weight_decay", None)
    listed = set(named()) if callable(named) else set()
    return {
        name
        for name, parameter in model.named_parameters()
        if parameter.ndim <= 1 or name in listed
    }


class RMSpropTF(torch.optim.Optimizer):
    """RMSprop as TensorFlow writes it (timm's RMSpropTF, used by EfficientNet-style and
    DIST's B2 recipes), which torch's RMSprop differs from in three ways:

        v <- alpha * v + (1 - alpha) * g^2           v starts at 1, not 0
        b <- momentum * b + lr * g / sqrt(v + eps)    eps inside the root; lr in the buffer
        w <- w - b

    with g the gradient plus weight_decay * w (L2, not decoupled).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        *,
        lr: float,
        alpha: float = 0.9,
        eps: float = 1e-10,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        defaults = {"lr": lr, "alpha": alpha, "eps": eps, "momentum": momentum}
        super().__init__(params, {**defaults, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                grad = parameter.grad
                if group["weight_decay"]:
                    grad = grad.add(parameter, alpha=group["weight_decay"])
                state = self.state[parameter]
                if not state:
                    state["square_avg"] = torch.ones_like(parameter)
                    if group["momentum"] > 0:
                        state["momentum_buffer"] = torch.zeros_like(parameter)
                square_avg = state["square_avg"]
                square_avg.mul_(group["alpha"]).addcmul_(grad, grad, value=1 - group["alpha"])
                root = square_avg.add(group["eps"]).sqrt_()
                if group["momentum"] > 0:
                    buffer = state["momentum_buffer"]
                    buffer.mul_(group["momentum"]).addcdiv_(grad, root, value=group["lr"])
                    parameter.sub_(buffer)
                else:
                    parameter.addcdiv_(grad, root, value=-group["lr"])
        return loss


def lr_factor(
    schedule: ScheduleConfig,
    step: int,
    steps_per_epoch: int,
    total_steps: int,
    base_lr: float = 1.0,
) -> float:
    """The learning rate's factor at `step`: a linear warm-up per step, then cosine from 1
    to min_lr / base_lr, multistep (x gamma at each milestone epoch) or step (x gamma every
    step_epochs, which may be fractional: DIST's x0.97 every 2.4 epochs) decay."""
    warmup = schedule.warmup_epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    epoch = step // steps_per_epoch
    if schedule.name == "multistep":
        return float(schedule.gamma ** sum(epoch >= m for m in schedule.milestones))
    if schedule.name == "step":
        # x gamma every step_epochs (2.4 is 12/5: exact, so the decay lands on its step).
        every = Fraction(schedule.step_epochs or 1).limit_denominator(1000) * steps_per_epoch
        return float(schedule.gamma ** math.floor(step / every))
    floor = schedule.min_lr / base_lr
    progress = (step - warmup) / max(1.0, total_steps - warmup)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
