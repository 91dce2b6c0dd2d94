"""The evaluator: several students (the weights and their EMA) measured in one pass."""

from __future__ import annotations

import pytest
import torch

from student_worker.data import ImageSet
from student_worker.evaluation import Evaluator
from teacher_server.shared.contract import Mix

NUM_CLASSES = 4


class CountingImages:
    """uint8 images that count how often each is decoded."""

    def __init__(self, count: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.randint(
            0, 256, (count, 3, 8, 8), dtype=torch.uint8, generator=generator
        )
        self.reads = 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        self.reads += 1
        return self.images[index]


class LinearTeacher:
    round_trip_s = 0.0

    def __init__(self) -> None:
        self.weight = torch.randn(
            3 * 8 * 8, NUM_CLASSES, generator=torch.Generator().manual_seed(9)
        )
        self.tags: list[str] = []

    def logits(self, tag: str, view: torch.Tensor, mix: Mix | None) -> torch.Tensor:
        self.tags.append(tag)
        return view.float().flatten(1) / 255 @ self.weight


def linear_student(seed: int, offset: float = 0.0):  # type: ignore[no-untyped-def]
    weight = torch.randn(3 * 8 * 8, NUM_CLASSES, generator=torch.Generator().manual_seed(seed))

    def heads(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = images.float().flatten(1) / 255 @ weight
        return logits, logits + offset

    return heads


def image_set(images: CountingImages, labeled: int) -> ImageSet:
    labels = torch.arange(len(images), dtype=torch.int64) % NUM_CLASSES
    labels[labeled:] = -1
    return ImageSet(images, labels, class_names=list("abcd"), image_size=8)


@pytest.mark.parametrize("with_teacher", [True, False])
def test_two_students_in_one_pass_measure_as_each_alone(with_teacher: bool) -> None:
    eval_images, train_images = CountingImages(300, seed=1), CountingImages(40, seed=2)
    teacher = LinearTeacher() if with_teacher else None
    evaluator = Evaluator(
        image_set(eval_images, labeled=250),
        image_set(train_images, labeled=40),
        teacher,
        two_heads=True,
        view_size=8,
    )
    weights, average = linear_student(3, offset=0.5), linear_student(4)
    both = evaluator.evaluate({"": weights, "ema_": average})
    assert eval_images.reads == 300 and train_images.reads == (40 if with_teacher else 0)
    alone = evaluator.evaluate({"": weights})
    averaged_alone = evaluator.evaluate({"ema_": average})
    assert both == {**alone, **averaged_alone}
    assert set(alone) == {key.removeprefix("ema_") for key in averaged_alone}
    assert {"student_accuracy", "class_head_accuracy", "distillation_head_accuracy"} <= set(alone)
    assert ("train_agreement" in alone) is with_teacher
    assert alone["student_accuracy"] != averaged_alone["ema_student_accuracy"]
    if teacher is not None:
        # Two batches of eval views (BATCH 256) and one of the probe, asked once in all.
        assert teacher.tags == ["eval-eval-0", "eval-eval-1", "eval-train-0"]
    assert eval_images.reads == 300 * 3
