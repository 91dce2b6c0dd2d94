"""The training objective: mixed cross-entropy plus a ramped, weighted distillation term.

total = ce_weight * CE(mixed labels, labeled samples, label smoothing)
      + ramp(epoch) * kd_weight * distill(student, teacher, dominant labels)

with ramp = min((epoch + 1) / warmup_epochs, 1) (1 without warm-up). Under mixing a sample's
target is lam * y_a + (1 - lam) * y_b; DKD-style losses that need one class get the label
with the larger share, and an unlabeled sample the teacher's argmax.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from student_worker.augment import MixedLabels

Distill = Callable[[Tensor, Tensor, Tensor], Tensor]
"""A bound distillation loss: (student logits, raw teacher logits, class labels) -> scalar."""


class ObjectiveWeights(BaseModel):
    """The objective's settings; each loss registers its papers' values per image scale."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    ce_weight: float = Field(ge=0.0)
    kd_weight: float = Field(ge=0.0)
    warmup_epochs: int = Field(ge=0)
    label_smoothing: float = Field(ge=0.0, lt=1.0)


@dataclass(frozen=True)
class Objective:
    """One run's objective: its weights and its distillation loss (None: labels alone)."""

    weights: ObjectiveWeights
    distill: Distill | None = None

    def ramp(self, epoch: int) -> float:
        """The distillation term's warm-up factor in epoch `epoch` (counted from 0)."""
        warmup = self.weights.warmup_epochs
        return 1.0 if warmup == 0 else min(1.0, (epoch + 1) / warmup)

    def __call__(
        self,
        class_logits: Tensor,
        distill_logits: Tensor,
        teacher_logits: Tensor | None,
        targets: MixedLabels,
        epoch: int,
    ) -> tuple[Tensor, dict[str, float]]:
        """The total loss and its parts (`ce`, `distill`) as numbers for the log.

        `class_logits` feed the cross-entropy and `distill_logits` the distillation term (the
        same tensor for a one-head student; a DeiT student's two heads otherwise).
        """
        ce = mixed_cross_entropy(class_logits.float(), targets, self.weights.label_smoothing)
        total = self.weights.ce_weight * ce
        parts = {"ce": float(ce.detach())}
        if self.distill is not None:
            if teacher_logits is None:
                raise ValueError("this objective distills: it needs the teacher's logits")
            labels = dominant_labels(targets, teacher_logits)
            distill = self.distill(distill_logits, teacher_logits, labels)
            total = total + self.ramp(epoch) * self.weights.kd_weight * distill
            parts["distill"] = float(distill.detach())
        return total, parts


def mixed_cross_entropy(logits: Tensor, targets: MixedLabels, label_smoothing: float) -> Tensor:
    """lam * CE(y_a) + (1 - lam) * CE(y_b) over the samples whose labels are both known.

    A batch without a labeled sample gives 0 (with a gradient path, so backward works).
    """
    labeled = (targets.labels_a >= 0) & (targets.labels_b >= 0)
    if not bool(labeled.any()):
        return logits.sum() * 0.0
    chosen = logits[labeled]
    loss_a = F.cross_entropy(chosen, targets.labels_a[labeled], label_smoothing=label_smoothing)
    if targets.lam == 1.0:
        return loss_a
    loss_b = F.cross_entropy(chosen, targets.labels_b[labeled], label_smoothing=label_smoothing)
    return targets.lam * loss_a + (1.0 - targets.lam) * loss_b


def dominant_labels(targets: MixedLabels, teacher_logits: Tensor) -> Tensor:
    """A class per sample for one-class losses: its larger share, else the teacher's argmax."""
    dominant = targets.dominant.to(teacher_logits.device)
    return torch.where(dominant < 0, teacher_logits.argmax(dim=1), dominant)
