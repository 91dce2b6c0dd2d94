"""KD at T = 4 from the served teacher equals KD with the teacher in-process, on one mixed view."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from student_worker import losses
from student_worker.augment import AugmentSettings, ConsistentViews, student_input
from teacher_server.client import TeacherClient
from teacher_server.shared.archs import create_model
from tests.helpers import CIFAR_MEAN, CIFAR_STD, in_process, random_images

TEMPERATURE = 4.0


def test_kd_from_served_soft_targets_equals_kd_with_the_in_process_teacher(
    url: str, teachers: dict[str, Any]
) -> None:
    """The trainer's path: one consistent view with mixup, the teacher asked at T = 1 (the loss
    owns its temperature), KD at T = 4; and the teacher's own soft targets at T = 4 agree."""
    images, labels = random_images(16, 40, seed=3), torch.arange(16) % 10
    batch = ConsistentViews(AugmentSettings(view_size=32, mixup_alpha=0.8), seed=(0, 0, 5))(
        images, labels
    )
    assert batch.mix is not None and batch.mix.mode == "mixup" and 0 < batch.mix.lam < 1
    torch.manual_seed(0)
    student = create_model("kdserve:resnet8", 10).eval()
    with torch.no_grad():
        student_logits = student(
            student_input(
                batch.view, batch.mix, (32, 32), torch.tensor(CIFAR_MEAN), torch.tensor(CIFAR_STD)
            )
        )
    kd = losses.get("kd").objective(32, hyperparameters={"temperature": TEMPERATURE}).distill
    assert kd is not None
    with TeacherClient.connect(url, model="small") as client:
        raw = client.infer(batch.view, mix=batch.mix)
        soft = client.infer(batch.view, mix=batch.mix, temperature=TEMPERATURE, output="log_probs")
    teacher = teachers["small"]
    with torch.no_grad():  # a KD script with the teacher inside: the same view, in this process
        in_process_logits = teacher["module"](
            student_input(
                batch.view,
                batch.mix,
                teacher["size"],
                torch.tensor(teacher["mean"]),
                torch.tensor(teacher["std"]),
            )
        )
    mix = {"mode": "mixup", "perm": list(batch.mix.perm), "lam": batch.mix.lam}
    assert (in_process_logits - in_process(teacher, batch.view, mix)).abs().max() < 1e-4
    expected = kd(student_logits, in_process_logits, labels).item()
    assert expected > 1e-3, "the student must differ from the teacher for the check to bite"
    assert kd(student_logits, raw, labels).item() == pytest.approx(expected, rel=1e-6)
    from_soft_targets = (
        F.kl_div(
            F.log_softmax(student_logits / TEMPERATURE, dim=1),
            soft,
            reduction="batchmean",
            log_target=True,
        )
        * TEMPERATURE**2
    )
    assert from_soft_targets.item() == pytest.approx(expected, rel=1e-5)
