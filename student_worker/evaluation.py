"""Evaluation: the student's accuracy and fidelity to its teacher, on unaugmented views.

Each image is seen as its evaluation view (`views.eval_view`: short side resized, centre
crop) at the view size both models share, streamed a batch at a time.

On the held-out split, and on a fixed training probe (its first TRAIN_PROBE images), which
separates optimisation from generalisation (Stanton et al. 2021): low agreement there means
the student does not even match the teacher on what it trained on. The teacher's answers are
fetched once per batch of each split (the views never change) and kept. A DeiT-style student
also reports each head's accuracy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from student_worker.data import ImageSet, Sample, collate_uint8
from student_worker.metrics import FidelityMeter
from student_worker.teacher import Teacher
from student_worker.views import EvalViews

TRAIN_PROBE = 512
BATCH = 256
StudentHeads = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""uint8 images -> the student's (class head, distillation head) logits."""


class Evaluator:
    """Measures a student on the held-out split and the training probe."""

    def __init__(
        self,
        eval_set: ImageSet,
        train_set: ImageSet,
        teacher: Teacher | None,
        *,
        two_heads: bool,
        view_size: int,
        crop_pct: float = 1.0,
        workers: int = 0,
    ) -> None:
        probe = Subset(train_set, range(min(TRAIN_PROBE, len(train_set))))
        self.splits: dict[str, Dataset[Sample]] = {
            "eval": EvalViews(eval_set, view_size, crop_pct),
            "train": EvalViews(probe, view_size, crop_pct),
        }
        self.teacher = teacher
        self.two_heads = two_heads
        self.workers = workers
        self._teacher_logits: dict[str, list[torch.Tensor]] = {}

    def evaluate(self, heads: StudentHeads) -> dict[str, float]:
        """Accuracy, NLL and ECE; with a teacher also agreement, KL and the probe's fidelity."""
        meter, head_accuracies = self._measure("eval", heads)
        metrics = meter.compute()
        if self.teacher is None:
            metrics = {key: metrics[key] for key in ("student_accuracy", "nll", "ece", "samples")}
        else:
            probe = self._measure("train", heads)[0].compute()
            metrics["train_agreement"] = probe["agreement"]
            metrics["train_kl"] = probe["kl"]
        metrics.update(head_accuracies)
        return metrics

    def _measure(self, split: str, heads: StudentHeads) -> tuple[FidelityMeter, dict[str, float]]:
        batches = DataLoader(
            self.splits[split],
            batch_size=BATCH,
            collate_fn=collate_uint8,
            num_workers=self.workers,
        )
        known = self._teacher_logits.setdefault(split, [])
        meter = FidelityMeter()
        correct = {"class_head_accuracy": 0, "distillation_head_accuracy": 0}
        labeled_count = 0
        for index, (images, labels, _) in enumerate(batches):
            class_logits, distill_logits = (h.float().cpu() for h in heads(images))
            logits = (class_logits + distill_logits) / 2
            if self.teacher is None:
                teacher = logits
            else:
                if index == len(known):
                    known.append(self.teacher.logits(f"eval-{split}-{index}", images, None))
                teacher = known[index]
            meter.update(logits, teacher, labels)
            labeled = labels >= 0
            labeled_count += int(labeled.sum())
            correct["class_head_accuracy"] += int((class_logits.argmax(1) == labels)[labeled].sum())
            correct["distillation_head_accuracy"] += int(
                (distill_logits.argmax(1) == labels)[labeled].sum()
            )
        if not (self.two_heads and labeled_count):
            return meter, {}
        return meter, {key: count / labeled_count for key, count in correct.items()}
