"""Consistent teaching (FunMatch): augment a batch once, send that exact view to the teacher.

Crops and flips are applied to the uint8 pixels here; mixup / cutmix are drawn as parameters
(`teacher_server.shared.views.Mix`) and applied to unit floats, by the teacher server and by
`student_input` alike, so teacher and student see one image. When the teacher's resolution
is higher than the student's, the crop is taken at the teacher's size and the student
downsamples it for itself (one crop of the original image, resized separately per model).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from teacher_server.shared.contract import Mix
from teacher_server.shared.tv import import_torchvision
from teacher_server.shared.views import mix_views, normalize, resize_views, to_unit_float

import_torchvision()
from torchvision.transforms.v2 import functional as tv_functional  # noqa: E402


@dataclass(frozen=True)
class MixedLabels:
    """Per-sample targets under mixing: lam * y_a + (1 - lam) * y_b (-1: unlabeled)."""

    labels_a: torch.Tensor
    labels_b: torch.Tensor
    lam: float

    @property
    def dominant(self) -> torch.Tensor:
        """The label with the larger share (DKD's target class)."""
        return self.labels_a if self.lam >= 0.5 else self.labels_b

    def to(self, device: torch.device) -> MixedLabels:
        return MixedLabels(
            self.labels_a.to(device, non_blocking=True),
            self.labels_b.to(device, non_blocking=True),
            self.lam,
        )


@dataclass(frozen=True)
class AugmentedBatch:
    """One training batch as both sides see it."""

    view: torch.Tensor
    mix: Mix | None
    targets: MixedLabels


@dataclass(frozen=True)
class AugmentSettings:
    """Crop, flip and mixing knobs (timm's / DeiT's names and meanings)."""

    view_size: int
    crop_scale: tuple[float, float] = (0.35, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5


class ConsistentViews:
    """Draws each batch's crops, flips and mix parameters from its own seeded generator.

    The seed may be a tuple such as (run seed, rank, step): the trainer draws every step's
    view from its own generator, so a resumed run needs no saved augmentation state.
    """

    def __init__(self, settings: AugmentSettings, seed: int | Sequence[int]) -> None:
        self.settings = settings
        self.rng = np.random.default_rng(seed)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> AugmentedBatch:
        """uint8 images (B, 3, H, W) and labels (B,) -> the uint8 view, mix and mixed labels."""
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"images must be uint8 (B, 3, H, W), got {images.dtype} {list(images.shape)}"
            )
        view = self._crop_and_flip(images)
        size = self.settings.view_size
        mix = self._draw_mix(int(images.shape[0]), size, size)
        return AugmentedBatch(view, mix, mixed_labels(labels, mix))

    def _crop_and_flip(self, images: torch.Tensor) -> torch.Tensor:
        size = self.settings.view_size
        height, width = int(images.shape[2]), int(images.shape[3])
        views = torch.empty((images.shape[0], 3, size, size), dtype=torch.uint8)
        for index, image in enumerate(images):
            top, left, crop_h, crop_w = self._crop_box(height, width)
            view = tv_functional.resized_crop(
                image, top, left, crop_h, crop_w, [size, size], antialias=True
            )
            if self.settings.flip and self._uniform() < 0.5:
                view = view.flip(-1)
            views[index] = view
        return views

    def _crop_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """RandomResizedCrop's box (scale and log-ratio uniform, 10 tries, then a center crop)."""
        area = height * width
        low, high = (math.log(r) for r in self.settings.crop_ratio)
        for _ in range(10):
            target = area * self._uniform(*self.settings.crop_scale)
            ratio = math.exp(self._uniform(low, high))
            crop_w = round(math.sqrt(target * ratio))
            crop_h = round(math.sqrt(target / ratio))
            if 0 < crop_w <= width and 0 < crop_h <= height:
                top = int(self._uniform(0, height - crop_h + 1))
                left = int(self._uniform(0, width - crop_w + 1))
                return top, left, crop_h, crop_w
        side = min(height, width)
        return (height - side) // 2, (width - side) // 2, side, side

    def _draw_mix(self, batch: int, height: int, width: int) -> Mix | None:
        settings = self.settings
        use_mixup, use_cutmix = settings.mixup_alpha > 0, settings.cutmix_alpha > 0
        if not (use_mixup or use_cutmix) or batch < 2 or self._uniform() >= settings.mix_prob:
            return None
        perm = tuple(int(i) for i in self.rng.permutation(batch))
        if use_cutmix and (not use_mixup or self._uniform() < settings.switch_prob):
            lam = self._beta(settings.cutmix_alpha)
            return Mix.cutmix(perm, self._cut_box(lam, height, width), height, width)
        return Mix("mixup", perm, lam=self._beta(settings.mixup_alpha))

    def _cut_box(self, lam: float, height: int, width: int) -> tuple[int, int, int, int]:
        """A box of area (1 - lam) around a uniform center, clipped to the image (timm's rule)."""
        cut = math.sqrt(1.0 - lam)
        cut_h, cut_w = int(height * cut), int(width * cut)
        center_y, center_x = int(self._uniform(0, height)), int(self._uniform(0, width))
        y0, y1 = max(center_y - cut_h // 2, 0), min(center_y + cut_h // 2, height)
        x0, x1 = max(center_x - cut_w // 2, 0), min(center_x + cut_w // 2, width)
        return y0, x0, y1, x1

    def _uniform(self, low: float = 0.0, high: float = 1.0) -> float:
        return float(self.rng.uniform(low, high))

    def _beta(self, alpha: float) -> float:
        return float(self.rng.beta(alpha, alpha))


def mixed_labels(labels: torch.Tensor, mix: Mix | None) -> MixedLabels:
    """(y_a, y_b, lam) per the contract: no mix -> y_b = y_a and lam = 1."""
    if mix is None:
        return MixedLabels(labels, labels, 1.0)
    partners = labels.index_select(0, torch.as_tensor(mix.perm, dtype=torch.long))
    return MixedLabels(labels, partners, mix.lam)


def student_input(
    view: torch.Tensor,
    mix: Mix | None,
    size: tuple[int, int],
    mean: torch.Tensor,
    std: torch.Tensor,
) -> torch.Tensor:
    """The student's float input from the uint8 view: unit float, mix, resize, normalize.

    The same steps, in the same order, as the teacher server's preprocessing.
    """
    views = to_unit_float(view)
    if mix is not None:
        views = mix_views(views, mix)
    return normalize(resize_views(views, size), mean, std)
