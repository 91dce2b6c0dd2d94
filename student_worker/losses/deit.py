"""Touvron et al. ICML 2021, "Training data-efficient image transformers" (DeiT) distillation."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from student_worker.losses import checked_logits, register
from student_worker.losses.kd import kd_per_sample


@register(
    "deit",
    positive=("tau",),
    choices={"mode": ("soft", "hard")},
    small_images={
        "mode": "hard",
        "tau": 1.0,
        "ce_weight": 0.5,
        "kd_weight": 0.5,
        "warmup_epochs": 0,
        "label_smoothing": 0.1,
    },
)
def deit_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    mode: Literal["soft", "hard"],
    tau: float = 1.0,
) -> Tensor:
    """Loss of the distillation head, whose output `student_logits` is; `labels` is unused.

    soft: KL at tau summed, times tau^2, divided by N * C as DeiT's code does (`kd` / C).
    hard: cross-entropy against the teacher's argmax; tau is unused. DeiT's alpha 0.5 means the
    trainer weights this 0.5 and the class head's CE (label smoothing 0.1, true labels) 0.5.
    """
    student, teacher = checked_logits(student_logits, teacher_logits)
    if mode == "soft":
        return kd_per_sample(student, teacher, temperature=tau).sum() * tau**2 / student.numel()
    if mode == "hard":
        return F.cross_entropy(student, teacher.argmax(dim=1))
    raise ValueError(f"deit mode must be 'soft' or 'hard', got {mode!r}")
