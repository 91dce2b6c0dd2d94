"""Zhao et al. CVPR 2022, "Decoupled Knowledge Distillation": KD split into TCKD and NCKD."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from student_worker.losses import Hyperparameters, Recipe, checked_logits, register
from student_worker.objective import ObjectiveWeights


class DKDParams(Hyperparameters):
    alpha: float = Field(ge=0.0)
    beta: float = Field(ge=0.0)
    temperature: float = Field(gt=0.0)


def decoupled_terms(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, *, temperature: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample (TCKD, NCKD, p_t) at `temperature`, without T^2: KD = TCKD + (1 - p_t) * NCKD.

    TCKD compares the binary (target, rest) distributions, NCKD the distributions over the
    non-target classes; p_t is the teacher's probability of the target class.
    """
    student, teacher = checked_logits(student_logits, teacher_logits)
    num_samples, num_classes = student.shape
    if num_classes < 2:
        raise ValueError(
            f"dkd needs at least 2 classes, got logits of shape {tuple(student.shape)}"
        )
    if labels.dtype != torch.long or labels.shape != (num_samples,):
        raise ValueError(
            f"dkd needs labels as int64 class indices of shape ({num_samples},), got "
            f"{labels.dtype} of shape {tuple(labels.shape)}; under mixup pass the label with the "
            "larger share"
        )
    student_binary, student_rest = _target_and_rest(student / temperature, labels)
    teacher_binary, teacher_rest = _target_and_rest(teacher / temperature, labels)
    tckd = F.kl_div(student_binary, teacher_binary, reduction="none", log_target=True).sum(dim=1)
    nckd = F.kl_div(student_rest, teacher_rest, reduction="none", log_target=True).sum(dim=1)
    return tckd, nckd, teacher_binary[:, 0].exp()


def _target_and_rest(scaled_logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Log-probabilities of (target, any other class), and the log-softmax over the other classes.

    Stays in log space so that a target probability of ~0 or ~1 gives finite logs and gradients.
    """
    num_samples, num_classes = scaled_logits.shape
    positions = torch.arange(num_classes - 1, device=scaled_logits.device)
    positions = positions.expand(num_samples, num_classes - 1)
    others = positions + (positions >= labels[:, None]).long()
    target = scaled_logits.gather(1, labels[:, None])
    rest = scaled_logits.gather(1, others)
    log_total = torch.logsumexp(scaled_logits, dim=1, keepdim=True)
    log_rest_total = torch.logsumexp(rest, dim=1, keepdim=True)
    binary = torch.cat([target - log_total, log_rest_total - log_total], dim=1)
    return binary, rest - log_rest_total


@register(
    "dkd",
    DKDParams,
    small_images=Recipe(
        ObjectiveWeights(ce_weight=1.0, kd_weight=1.0, warmup_epochs=20, label_smoothing=0.0),
        DKDParams(alpha=1.0, beta=8.0, temperature=4.0),
    ),
    large_images=Recipe(
        ObjectiveWeights(ce_weight=1.0, kd_weight=1.0, warmup_epochs=1, label_smoothing=0.0),
        DKDParams(alpha=0.5, beta=0.5, temperature=1.0),
    ),
)
def dkd_loss(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, *, params: DKDParams
) -> Tensor:
    """(alpha * TCKD + beta * NCKD) * T^2, mean over samples (Zhao et al. CVPR 2022).

    `labels` must be int64 class indices (N,), the only form the trainer passes (under mixup the
    label with the larger share). The objective ramps this term up over `warmup_epochs`.
    """
    temperature = params.temperature
    tckd, nckd, _ = decoupled_terms(student_logits, teacher_logits, labels, temperature=temperature)
    return (params.alpha * tckd + params.beta * nckd).mean() * temperature**2
