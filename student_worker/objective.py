"""The training objective: mixed cross-entropy plus a ramped, weighted distillation term.

total = ce_weight * CE(mixed labels, labeled shares, label smoothing)
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
        same tensor for a one-head student; a DeiT student's two heads otherwise). Without a
        distillation term the cross-entropy trains the mean of the two heads, the output the
        student is evaluated and served on (for one head, exactly its logits).
        """
        ce_logits = (
            class_logits if self.distill is not None else (class_logits + distill_logits) / 2
        )
        ce = mixed_cross_entropy(ce_logits.float(), targets, self.weights.label_smoothing)
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
    """lam * CE(y_a) + (1 - lam) * CE(y_b) per sample, averaged over the samples with a label.

    When only one mixing partner is labeled, each CE is weighted by its share over the
    labeled shares: lam / lam = 1 for a labeled y_a alone, likewise for y_b; a partner with
    share 0 counts for nothing. A batch without a labeled sample gives 0 (with a gradient
    path, so backward works).
    """
    lam = targets.lam
    known_a = targets.labels_a >= 0
    known_b = (targets.labels_b >= 0) if lam < 1.0 else known_a
    if lam > 0.0 and bool((known_a == known_b).all()):
        return _both_labeled_cross_entropy(logits, targets, known_a, label_smoothing)
    share_a = known_a.to(logits.dtype) * lam
    share_b = known_b.to(logits.dtype) * (1.0 - lam)
    shares = share_a + share_b
    labeled = shares > 0
    if not bool(labeled.any()):
        return logits.sum() * 0.0
    chosen = logits[labeled]
    loss_a, loss_b = (
        F.cross_entropy(
            chosen, labels[labeled].clamp(min=0), label_smoothing=label_smoothing, reduction="none"
        )
        for labels in (targets.labels_a, targets.labels_b)
    )
    per_sample = (share_a[labeled] * loss_a + share_b[labeled] * loss_b) / shares[labeled]
    return per_sample.mean()


def _both_labeled_cross_entropy(
    logits: Tensor, targets: MixedLabels, labeled: Tensor, label_smoothing: float
) -> Tensor:
    """The common case, every sample labeled on both sides or on neither: two batch means."""
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
