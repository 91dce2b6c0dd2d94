"""Consistent views: the teacher answers for exactly the float input the student trains on."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from student_worker.augment import AugmentSettings, ConsistentViews, mixed_labels, student_input
from teacher_server.client import TeacherClient
from teacher_server.server.serve import ServerThread
from teacher_server.shared.contract import Mix
from tests.helpers import CIFAR_MEAN, CIFAR_STD


def batch(n: int = 8, size: int = 36, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)
    return images, torch.arange(n) % 10


def test_views_are_uint8_at_the_view_size_and_seeded() -> None:
    images, labels = batch()
    settings = AugmentSettings(view_size=24, mixup_alpha=0.8, cutmix_alpha=1.0)
    first = ConsistentViews(settings, seed=3)(images, labels)
    again = ConsistentViews(settings, seed=3)(images, labels)
    other = ConsistentViews(settings, seed=4)(images, labels)
    assert first.view.dtype == torch.uint8 and first.view.shape == (8, 3, 24, 24)
    assert torch.equal(first.view, again.view) and first.mix == again.mix
    assert not torch.equal(first.view, other.view)


def test_full_crop_without_flip_is_a_resize_and_flip_mirrors() -> None:
    images, labels = batch(n=2, size=24)
    keep = AugmentSettings(view_size=24, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=False)
    assert torch.equal(ConsistentViews(keep, seed=0)(images, labels).view, images)
    flips = [
        ConsistentViews(
            AugmentSettings(view_size=24, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0)), seed=s
        )(images, labels).view
        for s in range(8)
    ]
    assert any(torch.equal(v, images.flip(-1)) for v in flips)
    assert any(torch.equal(v, images) for v in flips)


def test_cutmix_label_weight_is_the_kept_area_after_clipping() -> None:
    images, labels = batch(n=6, size=32)
    views = ConsistentViews(AugmentSettings(view_size=32, cutmix_alpha=1.0), seed=0)
    for _ in range(20):
        drawn = views(images, labels)
        assert drawn.mix is not None and drawn.mix.mode == "cutmix" and drawn.mix.box is not None
        y0, x0, y1, x1 = drawn.mix.box
        assert 0 <= y0 <= y1 <= 32 and 0 <= x0 <= x1 <= 32
        assert drawn.targets.lam == pytest.approx(1 - (y1 - y0) * (x1 - x0) / 32**2)
        assert sorted(drawn.mix.perm) == list(range(6))
        assert torch.equal(drawn.targets.labels_b, labels[list(drawn.mix.perm)])


def test_mixed_labels_contract() -> None:
    labels = torch.tensor([3, 1, -1])
    plain = mixed_labels(labels, None)
    assert plain.lam == 1.0 and torch.equal(plain.labels_b, labels)
    mixed = mixed_labels(labels, Mix("mixup", (2, 0, 1), lam=0.3))
    assert torch.equal(mixed.labels_b, torch.tensor([-1, 3, 1]))
    assert torch.equal(mixed.dominant, mixed.labels_b)
    assert torch.equal(mixed_labels(labels, Mix("mixup", (2, 0, 1), lam=0.7)).dominant, labels)


@pytest.mark.parametrize("teacher", ["wide", "small"])
@pytest.mark.parametrize("mode", ["mixup", "cutmix", None])
def test_served_teacher_sees_the_students_exact_input(
    server: ServerThread, teachers: dict[str, Any], mode: str | None, teacher: str
) -> None:
    """40 px views: "wide" (40 px) takes them as they are, "small" (32 px) resizes after mixing."""
    images, labels = batch(n=8, size=48, seed=5)
    settings = AugmentSettings(
        view_size=40,
        mixup_alpha=0.8 if mode == "mixup" else 0.0,
        cutmix_alpha=1.0 if mode == "cutmix" else 0.0,
    )
    drawn = ConsistentViews(settings, seed=1)(images, labels)
    assert (drawn.mix is None) == (mode is None)
    with TeacherClient.connect(server.endpoints.grpc_url, model=teacher) as client:
        served = client.infer(drawn.view, mix=drawn.mix)
    spec = teachers[teacher]
    teacher_input = student_input(
        drawn.view, drawn.mix, spec["size"], torch.tensor(spec["mean"]), torch.tensor(spec["std"])
    )
    with torch.no_grad():
        expected = spec["module"](teacher_input)
    assert (served - expected).abs().max().item() < 1e-4
    own = student_input(
        drawn.view, drawn.mix, (32, 32), torch.tensor(CIFAR_MEAN), torch.tensor(CIFAR_STD)
    )
    assert own.shape == (8, 3, 32, 32) and own.dtype == torch.float32
