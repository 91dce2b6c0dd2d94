"""The objective without a server: mixed CE, the dominant-label rule, the ramp and the weights."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from student_worker import losses
from student_worker.augment import MixedLabels
from student_worker.objective import (
    Objective,
    ObjectiveWeights,
    dominant_labels,
    mixed_cross_entropy,
)

WEIGHTS = ObjectiveWeights(ce_weight=0.3, kd_weight=2.0, warmup_epochs=4, label_smoothing=0.0)


def logits(seed: int = 0, samples: int = 6, classes: int = 5) -> Tensor:
    return torch.randn(samples, classes, generator=torch.Generator().manual_seed(seed))


def test_unmixed_cross_entropy_is_plain_cross_entropy() -> None:
    student, labels = logits(), torch.tensor([0, 1, 2, 3, 4, 0])
    targets = MixedLabels(labels, labels, 1.0)
    torch.testing.assert_close(
        mixed_cross_entropy(student, targets, 0.0), F.cross_entropy(student, labels)
    )


def test_mixed_cross_entropy_weights_both_labels_by_lam() -> None:
    student = logits(1)
    a, b = torch.tensor([0, 1, 2, 3, 4, 0]), torch.tensor([4, 3, 2, 1, 0, 1])
    expected = 0.3 * F.cross_entropy(student, a) + 0.7 * F.cross_entropy(student, b)
    torch.testing.assert_close(mixed_cross_entropy(student, MixedLabels(a, b, 0.3), 0.0), expected)


def test_label_smoothing_applies_to_true_labels() -> None:
    student, labels = logits(2), torch.tensor([0, 1, 2, 3, 4, 0])
    smoothed = mixed_cross_entropy(student, MixedLabels(labels, labels, 1.0), 0.1)
    by_hand = (
        0.9 * -student.log_softmax(1)[torch.arange(6), labels]
        - 0.1 * student.log_softmax(1).mean(1)
    ).mean()
    torch.testing.assert_close(smoothed, by_hand)


def ce_of(student: Tensor, row: int, label: int, smoothing: float = 0.0) -> Tensor:
    log_probs = student[row].log_softmax(0)
    return -(1.0 - smoothing) * log_probs[label] - smoothing * log_probs.mean()


def test_a_partner_labeled_alone_counts_with_its_share_normalised() -> None:
    student = logits(3)
    a = torch.tensor([0, -1, 2, 3, -1, 0])
    b = torch.tensor([1, 1, -1, 3, -1, 0])
    lam = 0.3
    # by hand: rows 0, 3, 5 mix both labels; row 1 has only y_b (share 0.7 / 0.7 = 1), row 2
    # only y_a (0.3 / 0.3 = 1); row 4 has neither and does not count.
    per_row = [
        lam * ce_of(student, 0, 0) + (1 - lam) * ce_of(student, 0, 1),
        ce_of(student, 1, 1),
        ce_of(student, 2, 2),
        lam * ce_of(student, 3, 3) + (1 - lam) * ce_of(student, 3, 3),
        lam * ce_of(student, 5, 0) + (1 - lam) * ce_of(student, 5, 0),
    ]
    expected = torch.stack(per_row).mean()
    torch.testing.assert_close(mixed_cross_entropy(student, MixedLabels(a, b, lam), 0.0), expected)


def test_a_one_sided_batch_keeps_label_smoothing_and_the_both_labeled_rule() -> None:
    student = logits(5)
    a = torch.tensor([0, -1, 2, 3, 4, 0])
    b = torch.tensor([1, 1, 2, 3, 4, 0])
    lam = 0.6
    rows = [lam * ce_of(student, 0, 0, 0.1) + (1 - lam) * ce_of(student, 0, 1, 0.1)]
    rows.append(ce_of(student, 1, 1, 0.1))
    rows += [ce_of(student, i, int(a[i]), 0.1) for i in range(2, 6)]
    torch.testing.assert_close(
        mixed_cross_entropy(student, MixedLabels(a, b, lam), 0.1), torch.stack(rows).mean()
    )


def test_under_a_tenth_of_labels_mixup_still_has_cross_entropy_on_most_steps() -> None:
    """The issue's case: labeled_fraction 0.1 under mixup. Counting only pairs with both labels
    left CE at zero on most steps; counting each labeled partner by its share does not."""
    generator = torch.Generator().manual_seed(0)
    steps_with_ce = 0
    for _ in range(50):
        labels = torch.randint(0, 5, (32,), generator=generator)
        labels[torch.rand(32, generator=generator) >= 0.1] = -1
        perm = torch.randperm(32, generator=generator)
        targets = MixedLabels(labels, labels[perm], 0.7)
        loss = mixed_cross_entropy(logits(samples=32), targets, 0.0)
        steps_with_ce += int(loss.item() > 0)
    assert steps_with_ce >= 45


def test_a_partner_with_share_zero_counts_for_nothing() -> None:
    student = logits(6)
    a = torch.tensor([0, -1, 2, 3, 4, 0])
    b = torch.tensor([1, 1, 2, -1, 4, 0])
    unmixed = MixedLabels(a, b, 1.0)  # lam 1: y_b has no share, so only y_a decides
    known = a >= 0
    torch.testing.assert_close(
        mixed_cross_entropy(student, unmixed, 0.0), F.cross_entropy(student[known], a[known])
    )


def test_a_batch_without_labels_gives_zero_with_a_gradient_path() -> None:
    student = logits(4).requires_grad_(True)
    none = torch.full((6,), -1)
    loss = mixed_cross_entropy(student, MixedLabels(none, none, 1.0), 0.0)
    loss.backward()
    assert loss.item() == 0.0 and student.grad is not None and not student.grad.any()


def test_the_dominant_label_is_the_larger_share_else_the_teachers_choice() -> None:
    teacher = logits(5)
    a = torch.tensor([0, -1, 2, 3, -1, 0])
    b = torch.tensor([1, 1, -1, 3, 2, 4])
    assert dominant_labels(MixedLabels(a, b, 0.7), teacher).tolist() == [
        0,
        int(teacher[1].argmax()),
        2,
        3,
        int(teacher[4].argmax()),
        0,
    ]
    assert dominant_labels(MixedLabels(a, b, 0.3), teacher).tolist() == [
        1,
        1,
        int(teacher[2].argmax()),
        3,
        2,
        4,
    ]
    assert dominant_labels(MixedLabels(a, b, 0.5), teacher)[0] == 0  # a tie goes to y_a


@pytest.mark.parametrize(("epoch", "ramp"), [(0, 0.25), (1, 0.5), (3, 1.0), (10, 1.0)])
def test_the_distillation_term_ramps_up_over_its_warmup(epoch: int, ramp: float) -> None:
    assert Objective(WEIGHTS).ramp(epoch) == ramp
    no_warmup = WEIGHTS.model_copy(update={"warmup_epochs": 0})
    assert Objective(no_warmup).ramp(epoch) == 1.0


def test_the_total_is_weighted_ce_plus_ramped_weighted_distillation() -> None:
    student, teacher = logits(6), logits(7)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    seen: list[Tensor] = []

    def distill(student_logits: Tensor, teacher_logits: Tensor, classes: Tensor) -> Tensor:
        seen.append(classes)
        return (student_logits - teacher_logits).square().mean()

    targets = MixedLabels(labels, labels.flip(0), 0.75)
    total, parts = Objective(WEIGHTS, distill)(student, student * 2, teacher, targets, epoch=1)
    ce = mixed_cross_entropy(student, targets, 0.0)
    term = (student * 2 - teacher).square().mean()
    torch.testing.assert_close(total, 0.3 * ce + 0.5 * 2.0 * term)
    assert parts == pytest.approx({"ce": ce.item(), "distill": term.item()})
    assert torch.equal(seen[0], labels)  # lam 0.75: y_a dominates


def test_labels_alone_need_no_teacher_and_distilling_needs_one() -> None:
    student, labels = logits(8), torch.tensor([0, 1, 2, 3, 4, 0])
    targets = MixedLabels(labels, labels, 1.0)
    baseline = losses.get("ce").objective(32)
    total, parts = baseline(student, student, None, targets, epoch=0)
    torch.testing.assert_close(total, F.cross_entropy(student, labels))
    assert list(parts) == ["ce"]
    with pytest.raises(ValueError, match="needs the teacher's logits"):
        losses.get("kd").objective(32)(student, student, None, targets, epoch=0)


def test_a_registered_objective_is_its_papers_kd() -> None:
    """Hinton's KD at the CIFAR recipe: 0.1 CE + 0.9 KL(T=4) T^2."""
    student, teacher, labels = logits(9), logits(10), torch.tensor([0, 1, 2, 3, 4, 0])
    total, _ = losses.get("kd").objective(32)(
        student, student, teacher, MixedLabels(labels, labels, 1.0), epoch=0
    )
    kl = F.kl_div(
        student.div(4).log_softmax(1),
        teacher.div(4).log_softmax(1),
        reduction="batchmean",
        log_target=True,
    )
    torch.testing.assert_close(total, 0.1 * F.cross_entropy(student, labels) + 0.9 * 16 * kl)
    assert math.isfinite(total.item())


def test_without_a_teacher_two_heads_learn_their_mean_and_one_head_its_logits() -> None:
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    targets = MixedLabels(labels, labels, 1.0)
    ce_only = Objective(WEIGHTS)
    class_head, distill_head = logits(7), logits(8)
    total, parts = ce_only(class_head, distill_head, None, targets, epoch=0)
    mean = (class_head + distill_head) / 2
    torch.testing.assert_close(total, 0.3 * F.cross_entropy(mean, labels))
    one_head, _ = ce_only(class_head, class_head, None, targets, epoch=0)
    assert torch.equal(one_head, 0.3 * F.cross_entropy(class_head, labels))
    assert set(parts) == {"ce"}
