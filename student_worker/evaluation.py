"""Evaluation: the student's accuracy and fidelity to its teacher, on unaugmented views.

Each image is seen as its evaluation view (`views.eval_view`: short side resized, centre
crop) at the view size both models share, streamed a batch at a time.

On the held-out split, and on a fixed training probe (TRAIN_PROBE images spread evenly over
the training set, `probe_ids`), which separates optimisation from generalisation (Stanton et
al. 2021): low agreement there means the student does not even match the teacher on what it
trained on. The teacher's answers are
fetched once per batch of each split (the views never change) and kept. A DeiT-style student
also reports each head's accuracy. With an EMA of the weights, both students see each batch of
views as it is cut: the splits are decoded once per evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

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


def probe_ids(count: int) -> list[int]:
    """The training probe: TRAIN_PROBE sample ids spread evenly over the training set (an
    ImageFolder lists its images class by class, so its first ones are all of one class)."""
    if count <= TRAIN_PROBE:
        return list(range(count))
    return [index * count // TRAIN_PROBE for index in range(TRAIN_PROBE)]


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
        probe = Subset(train_set, probe_ids(len(train_set)))
        self.splits: dict[str, Dataset[Sample]] = {
            "eval": EvalViews(eval_set, view_size, crop_pct),
            "train": EvalViews(probe, view_size, crop_pct),
        }
        self.teacher = teacher
        self.two_heads = two_heads
        self.workers = workers
        self._teacher_logits: dict[str, list[torch.Tensor]] = {}

    def evaluate(self, students: Mapping[str, StudentHeads]) -> dict[str, float]:
        """Accuracy, NLL and ECE; with a teacher also agreement, KL and the probe's fidelity.

        `students` maps a metric prefix to a student ("" for the trained weights, "ema_" for
        their average): each split's views are cut once and shown to all of them.
        """
        measured = self._measure("eval", students)
        probes = self._measure("train", students) if self.teacher is not None else {}
        metrics: dict[str, float] = {}
        for prefix, (meter, head_accuracies) in measured.items():
            own = meter.compute()
            if self.teacher is None:
                own = {key: own[key] for key in ("student_accuracy", "nll", "ece", "samples")}
            else:
                probe = probes[prefix][0].compute()
                own["train_agreement"] = probe["agreement"]
                own["train_kl"] = probe["kl"]
            own.update(head_accuracies)
            metrics.update({f"{prefix}{key}": value for key, value in own.items()})
        return metrics

    def _measure(
        self, split: str, students: Mapping[str, StudentHeads]
    ) -> dict[str, tuple[FidelityMeter, dict[str, float]]]:
        batches = DataLoader(
            self.splits[split],
            batch_size=BATCH,
            collate_fn=collate_uint8,
            num_workers=self.workers,
            generator=torch.Generator(),  # leaves the global RNG (the run's) alone
        )
        known = self._teacher_logits.setdefault(split, [])
        tallies = {prefix: _Tally() for prefix in students}
        for index, (images, labels, _) in enumerate(batches):
            teacher: torch.Tensor | None = None
            if self.teacher is not None:
                if index == len(known):
                    known.append(self.teacher.logits(f"eval-{split}-{index}", images, None))
                teacher = known[index]
            for prefix, heads in students.items():
                class_logits, distill_logits = (h.float().cpu() for h in heads(images))
                tallies[prefix].update(class_logits, distill_logits, teacher, labels)
        return {
            prefix: (tally.meter, tally.head_accuracies() if self.two_heads else {})
            for prefix, tally in tallies.items()
        }


class _Tally:
    """One student's running measures over a split."""

    def __init__(self) -> None:
        self.meter = FidelityMeter()
        self.correct = {"class_head_accuracy": 0, "distillation_head_accuracy": 0}
        self.labeled = 0

    def update(
        self,
        class_logits: torch.Tensor,
        distill_logits: torch.Tensor,
        teacher: torch.Tensor | None,
        labels: torch.Tensor,
    ) -> None:
        logits = (class_logits + distill_logits) / 2
        self.meter.update(logits, logits if teacher is None else teacher, labels)
        labeled = labels >= 0
        self.labeled += int(labeled.sum())
        self.correct["class_head_accuracy"] += int(
            (class_logits.argmax(1) == labels)[labeled].sum()
        )
        self.correct["distillation_head_accuracy"] += int(
            (distill_logits.argmax(1) == labels)[labeled].sum()
        )

    def head_accuracies(self) -> dict[str, float]:
        if not self.labeled:
            return {}
        return {key: count / self.labeled for key, count in self.correct.items()}
