"""Fidelity metrics of a student against its teacher and the true labels.

As in Stanton et al. 2021, "Does Knowledge Distillation Really Work?": top-1 agreement and
average predictive KL(teacher || student) measure fidelity; accuracy, ECE (Guo et al. 2017)
and NLL measure generalisation. Everything is computed in float64 on the CPU, so float16
logits from an AMP evaluation give the same numbers as their float32 copies would.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

UNLABELED = -1
"""Label value of a sample without a true label (distillation-only data)."""

DEFAULT_BINS = 15


def _as_float64(logits: Tensor, name: str) -> Tensor:
    """`logits` as a detached (N, C) float64 CPU tensor, checked."""
    if logits.ndim != 2 or logits.shape[1] < 1 or not logits.is_floating_point():
        raise ValueError(
            f"{name} must be a floating-point (N, num_classes >= 1) tensor; "
            f"got {logits.dtype} of shape {tuple(logits.shape)}"
        )
    return logits.detach().to(device="cpu", dtype=torch.float64)


def _pair(student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
    student = _as_float64(student_logits, "student_logits")
    teacher = _as_float64(teacher_logits, "teacher_logits")
    if student.shape != teacher.shape:
        raise ValueError(
            "student and teacher logits must have the same shape; got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    return student, teacher


def _checked_labels(labels: Tensor, logits: Tensor, *, allow_unlabeled: bool) -> Tensor:
    """`labels` as a CPU int64 vector matching `logits`, each a class index (or -1 if allowed)."""
    if labels.ndim != 1 or labels.shape[0] != logits.shape[0] or labels.is_floating_point():
        raise ValueError(
            f"labels must be an integer vector of {logits.shape[0]} class indices; "
            f"got {labels.dtype} of shape {tuple(labels.shape)}"
        )
    labels = labels.detach().to(device="cpu", dtype=torch.long)
    lowest = UNLABELED if allow_unlabeled else 0
    bad = (labels < lowest) | (labels >= logits.shape[1])
    if bool(bad.any()):
        raise ValueError(
            f"label {int(labels[bad][0])} is not a class index in [0, {logits.shape[1]})"
            + (f" nor {UNLABELED} (unlabeled)" if allow_unlabeled else "")
        )
    return labels


def _ratio(total: float, count: int) -> float:
    return total / count if count else math.nan


def _calibration_bins(logits: Tensor, labels: Tensor, bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per confidence bin (lo, hi], the first one closed at 0: counts, correct, confidence sums."""
    if bins < 1:
        raise ValueError(f"bins must be a positive integer; got {bins}")
    confidence = logits.softmax(dim=1).amax(dim=1)
    predicted = logits.argmax(dim=1)
    edges = torch.linspace(0.0, 1.0, bins + 1, dtype=torch.float64)
    index = torch.bucketize(confidence, edges[1:-1], right=False)
    counts = torch.zeros(bins, dtype=torch.float64).index_add_(
        0, index, torch.ones_like(confidence)
    )
    correct = torch.zeros(bins, dtype=torch.float64).index_add_(
        0, index, (predicted == labels).to(torch.float64)
    )
    confidence_sums = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, confidence)
    return counts, correct, confidence_sums


def _ece_from_bins(counts: Tensor, correct: Tensor, confidence_sums: Tensor) -> float:
    """sum_b |b|/N * |acc(b) - conf(b)|, which equals sum_b |correct(b) - confidence(b)| / N."""
    return _ratio(float((correct - confidence_sums).abs().sum()), int(counts.sum()))


def top1_accuracy(logits: Tensor, labels: Tensor) -> float:
    """Fraction of samples whose argmax is the label; nan for no samples."""
    scores = _as_float64(logits, "logits")
    targets = _checked_labels(labels, scores, allow_unlabeled=False)
    return _ratio(float((scores.argmax(dim=1) == targets).sum()), targets.shape[0])


def top1_agreement(student_logits: Tensor, teacher_logits: Tensor) -> float:
    """Fraction of samples where the student's argmax equals the teacher's; nan for no samples."""
    student, teacher = _pair(student_logits, teacher_logits)
    agree = float((student.argmax(dim=1) == teacher.argmax(dim=1)).sum())
    return _ratio(agree, student.shape[0])


def _kl_per_sample(teacher: Tensor, student: Tensor) -> Tensor:
    return F.kl_div(
        student.log_softmax(dim=1), teacher.log_softmax(dim=1), reduction="none", log_target=True
    ).sum(dim=1)


def predictive_kl(teacher_logits: Tensor, student_logits: Tensor) -> float:
    """Mean over samples of KL(p_teacher || p_student), softmax at T = 1; note: TEACHER first.

    The order follows the KL's own (the reference distribution first); nan for no samples.
    """
    student, teacher = _pair(student_logits, teacher_logits)
    return _ratio(float(_kl_per_sample(teacher, student).sum()), student.shape[0])


def expected_calibration_error(logits: Tensor, labels: Tensor, bins: int = DEFAULT_BINS) -> float:
    """ECE over `bins` equal-width confidence bins (lo, hi] (Guo et al. 2017); nan for no samples.

    Confidence is the maximum softmax probability; a sample is correct when its argmax is the label.
    """
    scores = _as_float64(logits, "logits")
    targets = _checked_labels(labels, scores, allow_unlabeled=False)
    return _ece_from_bins(*_calibration_bins(scores, targets, bins))


def negative_log_likelihood(logits: Tensor, labels: Tensor) -> float:
    """Mean cross-entropy of the softmax of `logits` against `labels`; nan for no samples."""
    scores = _as_float64(logits, "logits")
    targets = _checked_labels(labels, scores, allow_unlabeled=False)
    return _ratio(float(F.cross_entropy(scores, targets, reduction="sum")), targets.shape[0])


class FidelityMeter:
    """Accumulates the fidelity metrics over batches, exactly, without keeping the logits.

    Agreement and KL cover every sample; accuracies, ECE and NLL cover labeled samples only
    (labels None, or -1 for a sample, mean unlabeled).
    """

    def __init__(self, bins: int = DEFAULT_BINS) -> None:
        if bins < 1:
            raise ValueError(f"bins must be a positive integer; got {bins}")
        self.bins = bins
        self.samples = 0
        self.labeled_samples = 0
        self._agreeing = 0
        self._kl_sum = 0.0
        self._student_correct = 0
        self._teacher_correct = 0
        self._nll_sum = 0.0
        self._bin_counts = torch.zeros(bins, dtype=torch.float64)
        self._bin_correct = torch.zeros(bins, dtype=torch.float64)
        self._bin_confidence = torch.zeros(bins, dtype=torch.float64)

    def update(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None) -> None:
        """Adds one batch of (N, C) logits of both models and its labels (None: all unlabeled)."""
        student, teacher = _pair(student_logits, teacher_logits)
        self.samples += student.shape[0]
        self._agreeing += int((student.argmax(dim=1) == teacher.argmax(dim=1)).sum())
        self._kl_sum += float(_kl_per_sample(teacher, student).sum())
        if labels is None:
            return
        targets = _checked_labels(labels, student, allow_unlabeled=True)
        labeled = targets != UNLABELED
        student, teacher, targets = student[labeled], teacher[labeled], targets[labeled]
        self.labeled_samples += targets.shape[0]
        self._student_correct += int((student.argmax(dim=1) == targets).sum())
        self._teacher_correct += int((teacher.argmax(dim=1) == targets).sum())
        self._nll_sum += float(F.cross_entropy(student, targets, reduction="sum"))
        counts, correct, confidence_sums = _calibration_bins(student, targets, self.bins)
        self._bin_counts += counts
        self._bin_correct += correct
        self._bin_confidence += confidence_sums

    def compute(self) -> dict[str, float]:
        """The metrics so far; accuracies are fractions, and a metric with no samples is nan."""
        return {
            "student_accuracy": _ratio(self._student_correct, self.labeled_samples),
            "teacher_accuracy": _ratio(self._teacher_correct, self.labeled_samples),
            "agreement": _ratio(self._agreeing, self.samples),
            "kl": _ratio(self._kl_sum, self.samples),
            "ece": _ece_from_bins(self._bin_counts, self._bin_correct, self._bin_confidence),
            "nll": _ratio(self._nll_sum, self.labeled_samples),
            "samples": float(self.samples),
            "labeled_samples": float(self.labeled_samples),
        }
