"""Hinton et al. 2015, "Distilling the Knowledge in a Neural Network": match softened outputs."""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from student_worker.losses import Hyperparameters, Recipe, checked_logits, register
from student_worker.objective import ObjectiveWeights


class KDParams(Hyperparameters):
    temperature: float = Field(gt=0.0)


def kd_per_sample(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float) -> Tensor:
    """Per-sample KL(softmax(t/T) || softmax(s/T)), summed over classes, without the T^2 factor."""
    student, teacher = checked_logits(student_logits, teacher_logits)
    return F.kl_div(
        F.log_softmax(student / temperature, dim=1),
        F.log_softmax(teacher / temperature, dim=1),
        reduction="none",
        log_target=True,
    ).sum(dim=1)


@register(
    "kd",
    KDParams,
    small_images=Recipe(
        ObjectiveWeights(ce_weight=0.1, kd_weight=0.9, warmup_epochs=0, label_smoothing=0.0),
        KDParams(temperature=4.0),
    ),
)
def kd_loss(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, *, params: KDParams
) -> Tensor:
    """KL(softmax(t/T) || softmax(s/T)) * T^2, mean over samples; `labels` is unused.

    T^2 keeps the gradient scale independent of T (Hinton et al. 2015).
    """
    temperature = params.temperature
    per_sample = kd_per_sample(student_logits, teacher_logits, temperature=temperature)
    return per_sample.mean() * temperature**2
