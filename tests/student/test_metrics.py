"""Fidelity metrics: hand-computed values, bin edges, and the meter against the functions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from student_worker.metrics import (
    FidelityMeter,
    expected_calibration_error,
    negative_log_likelihood,
    predictive_kl,
    top1_accuracy,
    top1_agreement,
)


def logits_of(probs: list[list[float]]) -> Tensor:
    """Logits whose softmax is `probs`."""
    return torch.tensor(probs, dtype=torch.float64).log()


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


def reference_ece(probs: list[list[float]], labels: list[int], bins: int) -> float:
    """Guo et al. 2017 with plain Python loops: bins (lo, hi], the first one closed at 0."""
    confidences = [max(row) for row in probs]
    correct = [row.index(max(row)) == label for row, label in zip(probs, labels, strict=True)]
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        members = [i for i, c in enumerate(confidences) if (lo < c or b == 0) and c <= hi]
        if members:
            accuracy = sum(correct[i] for i in members) / len(members)
            confidence = sum(confidences[i] for i in members) / len(members)
            total += len(members) / len(probs) * abs(accuracy - confidence)
    return total


def random_case(samples: int, classes: int = 5, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    student = 2 * torch.randn(samples, classes, generator=generator)
    teacher = 2 * torch.randn(samples, classes, generator=generator)
    labels = torch.randint(0, classes, (samples,), generator=generator)
    return student, teacher, labels


def test_accuracy_and_agreement_on_a_tiny_case() -> None:
    student = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 2.0], [5.0, 0.0, 0.0]])
    teacher = torch.tensor([[9.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 2, 2, 1])
    assert top1_accuracy(student, labels) == 2 / 4
    assert top1_accuracy(teacher, labels) == 3 / 4
    assert top1_agreement(student, teacher) == 3 / 4


def test_kl_is_zero_for_identical_logits_and_positive_otherwise() -> None:
    student, teacher, _ = random_case(8)
    assert predictive_kl(student, student) == 0.0
    assert predictive_kl(teacher, student) > 0.0


def test_kl_matches_a_hand_computation_teacher_first() -> None:
    p = [[0.5, 0.25, 0.25], [0.7, 0.2, 0.1]]
    q = [[0.25, 0.5, 0.25], [1 / 3, 1 / 3, 1 / 3]]
    expected = (kl(p[0], q[0]) + kl(p[1], q[1])) / 2
    assert predictive_kl(logits_of(p), logits_of(q)) == pytest.approx(expected, rel=1e-12)
    reversed_order = (kl(q[0], p[0]) + kl(q[1], p[1])) / 2
    assert predictive_kl(logits_of(q), logits_of(p)) == pytest.approx(reversed_order, rel=1e-12)
    assert expected != pytest.approx(reversed_order)


def test_kl_is_invariant_to_a_per_row_constant() -> None:
    student, teacher = (tensor.double() for tensor in random_case(4)[:2])
    shift = torch.tensor([[3.0], [-7.0], [0.5], [100.0]], dtype=torch.float64)
    shifted = predictive_kl(teacher + shift, student - 2 * shift)
    assert shifted == pytest.approx(predictive_kl(teacher, student), rel=1e-12)


def test_ece_of_a_perfectly_calibrated_set_is_zero() -> None:
    logits = logits_of([[0.8, 0.2]] * 10)
    labels = torch.tensor([0] * 8 + [1] * 2)
    assert expected_calibration_error(logits, labels) == pytest.approx(0.0, abs=1e-12)


def test_ece_of_an_overconfident_set_matches_a_hand_computation() -> None:
    logits = logits_of([[0.9, 0.1]] * 4 + [[0.35, 0.65]] * 2)
    labels = torch.tensor([0, 0, 1, 1, 1, 0])
    expected = 4 / 6 * abs(2 / 4 - 0.9) + 2 / 6 * abs(1 / 2 - 0.65)
    assert expected_calibration_error(logits, labels) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("logits", "bins", "lower_bin", "upper_bin"),
    [
        # Confidence exactly 0.5 (on the edge of two bins) and correct; 0.9 and wrong.
        ([[0.0, 0.0], [math.log(0.1), math.log(0.9)]], 2, (0.5 + 0.9) / 2, abs(1 - 1.4) / 2),
        # Confidence exactly 0.25 (edge of bins 0 and 1 of 4) and correct; 0.3 and wrong.
        (
            [[0.0, 0.0, 0.0, 0.0], [math.log(0.25), math.log(0.3), math.log(0.25), math.log(0.2)]],
            4,
            (0.75 + 0.3) / 2,
            abs(1 - 0.55) / 2,
        ),
    ],
)
def test_a_confidence_on_an_edge_goes_to_the_lower_bin(
    logits: list[list[float]], bins: int, lower_bin: float, upper_bin: float
) -> None:
    scores = torch.tensor(logits, dtype=torch.float64)
    assert float(scores.softmax(dim=1)[0].max()) == 1 / len(logits[0])
    ece = expected_calibration_error(scores, torch.tensor([0, 0]), bins=bins)
    assert ece == pytest.approx(lower_bin, rel=1e-12)
    assert ece != pytest.approx(upper_bin)


def test_a_confidence_of_one_goes_to_the_last_bin() -> None:
    logits = torch.tensor([[1000.0, 0.0], [0.0, 1000.0]], dtype=torch.float64)
    assert expected_calibration_error(logits, torch.tensor([0, 0])) == pytest.approx(0.5)


def test_ece_matches_a_plain_python_reference_on_random_data() -> None:
    student, _, labels = random_case(200, seed=3)
    probs = student.double().softmax(dim=1).tolist()
    for bins in (1, 10, 15):
        expected = reference_ece(probs, labels.tolist(), bins)
        assert expected_calibration_error(student, labels, bins) == pytest.approx(expected)


def test_nll_equals_cross_entropy() -> None:
    student, _, labels = random_case(32, classes=10, seed=1)
    expected = float(F.cross_entropy(student.double(), labels))
    assert negative_log_likelihood(student, labels) == pytest.approx(expected, rel=1e-12)


def test_nll_matches_a_hand_computation() -> None:
    logits = logits_of([[0.5, 0.25, 0.25], [0.7, 0.2, 0.1]])
    expected = -(math.log(0.25) + math.log(0.7)) / 2
    assert negative_log_likelihood(logits, torch.tensor([1, 0])) == pytest.approx(expected)


def test_meter_over_batches_equals_the_functions_on_the_whole_set() -> None:
    student, teacher, labels = random_case(41, seed=2)
    meter = FidelityMeter()
    for start, stop in ((0, 7), (7, 20), (20, 21), (21, 41)):
        meter.update(student[start:stop], teacher[start:stop], labels[start:stop])
    result = meter.compute()
    expected = {
        "student_accuracy": top1_accuracy(student, labels),
        "teacher_accuracy": top1_accuracy(teacher, labels),
        "agreement": top1_agreement(student, teacher),
        "kl": predictive_kl(teacher, student),
        "ece": expected_calibration_error(student, labels),
        "nll": negative_log_likelihood(student, labels),
        "samples": 41.0,
        "labeled_samples": 41.0,
    }
    assert result == pytest.approx(expected, rel=1e-12)


def test_meter_uses_labeled_samples_only_for_label_metrics() -> None:
    student, teacher, labels = random_case(30, seed=4)
    partly = labels.clone()
    partly[::3] = -1
    meter = FidelityMeter()
    meter.update(student[:10], teacher[:10], partly[:10])
    meter.update(student[10:20], teacher[10:20], None)
    meter.update(student[20:], teacher[20:], partly[20:])
    keep = torch.cat([partly[:10] != -1, torch.zeros(10, dtype=torch.bool), partly[20:] != -1])
    result = meter.compute()
    assert result["samples"] == 30.0
    assert result["labeled_samples"] == float(keep.sum()) == 13.0
    assert result["agreement"] == pytest.approx(top1_agreement(student, teacher))
    assert result["kl"] == pytest.approx(predictive_kl(teacher, student))
    assert result["student_accuracy"] == pytest.approx(top1_accuracy(student[keep], labels[keep]))
    assert result["teacher_accuracy"] == pytest.approx(top1_accuracy(teacher[keep], labels[keep]))
    assert result["ece"] == pytest.approx(expected_calibration_error(student[keep], labels[keep]))
    assert result["nll"] == pytest.approx(negative_log_likelihood(student[keep], labels[keep]))


def test_meter_returns_nan_where_there_are_no_samples() -> None:
    empty = FidelityMeter().compute()
    assert empty["samples"] == empty["labeled_samples"] == 0.0
    assert all(math.isnan(empty[key]) for key in empty if key not in ("samples", "labeled_samples"))
    student, teacher, _ = random_case(5)
    meter = FidelityMeter()
    meter.update(student, teacher, torch.full((5,), -1))
    unlabeled = meter.compute()
    assert not math.isnan(unlabeled["agreement"])
    assert not math.isnan(unlabeled["kl"])
    label_metrics = ("student_accuracy", "teacher_accuracy", "ece", "nll")
    assert all(math.isnan(unlabeled[key]) for key in label_metrics)


def test_float16_logits_give_the_float64_numbers_of_their_values() -> None:
    student, teacher, labels = random_case(16, seed=5)
    student16, teacher16 = student.half(), teacher.half()
    student64, teacher64 = student16.double(), teacher16.double()
    assert top1_accuracy(student16, labels) == top1_accuracy(student64, labels)
    assert top1_agreement(student16, teacher16) == top1_agreement(student64, teacher64)
    assert predictive_kl(teacher16, student16) == predictive_kl(teacher64, student64)
    assert expected_calibration_error(student16, labels) == expected_calibration_error(
        student64, labels
    )
    assert negative_log_likelihood(student16, labels) == negative_log_likelihood(student64, labels)
    meter = FidelityMeter()
    meter.update(student16, teacher16, labels)
    assert meter.compute()["kl"] == pytest.approx(predictive_kl(teacher64, student64))


def test_bad_inputs_name_the_offending_value() -> None:
    student, teacher, labels = random_case(4)
    with pytest.raises(ValueError, match="same shape"):
        top1_agreement(student, teacher[:, :3])
    with pytest.raises(ValueError, match="label 5 is not a class index"):
        top1_accuracy(student, torch.tensor([0, 5, 1, 2]))
    with pytest.raises(ValueError, match="label -1 is not a class index"):
        negative_log_likelihood(student, torch.tensor([0, -1, 1, 2]))
    with pytest.raises(ValueError, match="label -2"):
        FidelityMeter().update(student, teacher, torch.tensor([0, -2, 1, 2]))
    with pytest.raises(ValueError, match="floating-point"):
        top1_accuracy(labels.view(2, 2), labels[:2])
    with pytest.raises(ValueError, match="bins must be a positive integer; got 0"):
        expected_calibration_error(student, labels, bins=0)


def test_functions_return_nan_for_no_samples() -> None:
    logits, labels = torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)
    assert math.isnan(top1_accuracy(logits, labels))
    assert math.isnan(top1_agreement(logits, logits))
    assert math.isnan(predictive_kl(logits, logits))
    assert math.isnan(expected_calibration_error(logits, labels))
    assert math.isnan(negative_log_likelihood(logits, labels))
