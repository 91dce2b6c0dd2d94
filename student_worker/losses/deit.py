"""Touvron et al. ICML 2021, "Training data-efficient image transformers" (DeiT) distillation."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from student_worker.losses import Hyperparameters, Recipe, checked_logits, register
from student_worker.losses.kd import kd_per_sample
from student_worker.objective import ObjectiveWeights


class DeiTParams(Hyperparameters):
    mode: Literal["soft", "hard"]
    tau: float = Field(1.0, gt=0.0)
    reduction: Literal["per_element", "per_sample"] = "per_element"


@register(
    "deit",
    DeiTParams,
    small_images=Recipe(
        ObjectiveWeights(ce_weight=0.5, kd_weight=0.5, warmup_epochs=0, label_smoothing=0.1),
        DeiTParams(mode="hard", tau=1.0),
    ),
)
def deit_loss(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, *, params: DeiTParams
) -> Tensor:
    """Loss of the distillation head, whose output `student_logits` is; `labels` is unused.

    soft: KL at tau summed, times tau^2, divided by N * C as DeiT's code does (`kd` / C);
    reduction `per_sample` divides by N alone, the paper's equation (then equal to `kd`).
    hard: cross-entropy against the teacher's argmax; tau is unused. DeiT's alpha 0.5 means the
    objective weights this 0.5 and the class head's CE (label smoothing 0.1, true labels) 0.5.
    """
    student, teacher = checked_logits(student_logits, teacher_logits)
    if params.mode == "soft":
        tau = params.tau
        summed = kd_per_sample(student, teacher, temperature=tau).sum() * tau**2
        per_sample = params.reduction == "per_sample"
        return summed / (student.shape[0] if per_sample else student.numel())
    return F.cross_entropy(student, teacher.argmax(dim=1))
