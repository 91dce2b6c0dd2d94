"""Huang et al. NeurIPS 2022, "Knowledge Distillation from A Stronger Teacher" (DIST)."""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from student_worker.losses import Hyperparameters, Recipe, checked_logits, register
from student_worker.objective import ObjectiveWeights

_EPS = 1e-8


class DISTParams(Hyperparameters):
    beta: float = Field(ge=0.0)
    gamma: float = Field(ge=0.0)
    tau: float = Field(gt=0.0)


def _pearson(a: Tensor, b: Tensor, dim: int) -> Tensor:
    """Pearson correlation along `dim`; a constant vector (zero spread) counts as uncorrelated."""
    return F.cosine_similarity(
        a - a.mean(dim, keepdim=True), b - b.mean(dim, keepdim=True), dim=dim, eps=_EPS
    )


@register(
    "dist",
    DISTParams,
    small_images=Recipe(
        ObjectiveWeights(ce_weight=1.0, kd_weight=1.0, warmup_epochs=0, label_smoothing=0.0),
        DISTParams(beta=2.0, gamma=2.0, tau=4.0),
    ),
    large_images=Recipe(
        ObjectiveWeights(ce_weight=1.0, kd_weight=1.0, warmup_epochs=0, label_smoothing=0.0),
        DISTParams(beta=2.0, gamma=2.0, tau=1.0),
    ),
)
def dist_loss(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, *, params: DISTParams
) -> Tensor:
    """tau^2 * (beta * inter + gamma * intra) on softmax at tau; `labels` is unused.

    inter: 1 - Pearson over classes, mean over samples; intra: 1 - Pearson over the batch, mean
    over classes (so a one-sample batch adds a constant gamma * tau^2 and no gradient).
    """
    tau = params.tau
    student, teacher = checked_logits(student_logits, teacher_logits)
    student_probs = F.softmax(student / tau, dim=1)
    teacher_probs = F.softmax(teacher / tau, dim=1)
    inter = 1 - _pearson(student_probs, teacher_probs, dim=1).mean()
    intra = 1 - _pearson(student_probs, teacher_probs, dim=0).mean()
    return tau**2 * (params.beta * inter + params.gamma * intra)
