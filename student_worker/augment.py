"""Consistent teaching (FunMatch): augment a batch once, send that exact view to the teacher.

Crops and flips are cut per sample on uint8 pixels (`views`, in the data loader's workers);
mixup / cutmix are drawn here, per step, as parameters
(`teacher_server.shared.views.Mix`) and applied to unit floats, by the teacher server and by
`student_input` alike, so teacher and student see one image. When the teacher's resolution
is higher than the student's, the crop is taken at the teacher's size and the student
downsamples it for itself (one crop of the original image, resized separately per model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from student_worker.views import CropSettings, PixelAugment, TrainViews, ViewKey, step_seed
from teacher_server.shared.contract import Mix
from teacher_server.shared.views import mix_views, normalize, resize_views, to_unit_float


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
    """One training batch as both sides see it; `teacher_view` None: the student's view."""

    view: torch.Tensor
    mix: Mix | None
    targets: MixedLabels
    teacher_view: torch.Tensor | None = None

    @property
    def teacher_input(self) -> torch.Tensor:
        """The uint8 view the teacher is asked about (mixed by `mix` on its side)."""
        return self.view if self.teacher_view is None else self.teacher_view


@dataclass(frozen=True)
class AugmentSettings:
    """Crop, flip and mixing knobs (timm's / DeiT's names and meanings)."""

    view_size: int
    crop_scale: tuple[float, float] = (0.35, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    crop: Literal["resized", "padded"] = "resized"
    crop_padding: int = 4
    flip: bool = True
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5
    randaugment_layers: int = 0
    randaugment_magnitude: int = 9
    erasing_prob: float = 0.0

    @property
    def crop_settings(self) -> CropSettings:
        """The per-sample crop and flip, cut in the data loader's workers."""
        return CropSettings(
            self.view_size,
            self.crop_scale,
            self.crop_ratio,
            self.flip,
            self.crop,
            self.crop_padding,
        )

    @property
    def pixels(self) -> PixelAugment:
        """The per-sample RandAugment and random erasing, after the crop."""
        return PixelAugment(self.randaugment_layers, self.randaugment_magnitude, self.erasing_prob)


def draw_mix(settings: AugmentSettings, batch: int, rng: np.random.Generator) -> Mix | None:
    """A batch's mixup or cutmix parameters (timm's Mixup rules), or None for no mixing."""
    use_mixup, use_cutmix = settings.mixup_alpha > 0, settings.cutmix_alpha > 0
    if not (use_mixup or use_cutmix) or batch < 2 or float(rng.uniform()) >= settings.mix_prob:
        return None
    perm = tuple(int(i) for i in rng.permutation(batch))
    size = settings.view_size
    if use_cutmix and (not use_mixup or float(rng.uniform()) < settings.switch_prob):
        lam = float(rng.beta(settings.cutmix_alpha, settings.cutmix_alpha))
        return Mix.cutmix(perm, _cut_box(rng, lam, size, size), size, size)
    return Mix("mixup", perm, lam=float(rng.beta(settings.mixup_alpha, settings.mixup_alpha)))


def _cut_box(
    rng: np.random.Generator, lam: float, height: int, width: int
) -> tuple[int, int, int, int]:
    """A box of area (1 - lam) around a uniform center, clipped to the image (timm's rule)."""
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    center_y, center_x = int(rng.integers(0, height)), int(rng.integers(0, width))
    y0, y1 = max(center_y - cut_h // 2, 0), min(center_y + cut_h // 2, height)
    x0, x1 = max(center_x - cut_w // 2, 0), min(center_x + cut_w // 2, width)
    return y0, x0, y1, x1


class ConsistentViews:
    """A whole step's views of an in-memory uint8 batch, as the trainer's loader cuts them.

    Image i's crop comes from `sample_generator(seed, rank, step, i)` and the mix from the
    step's own generator, so the same (seed, rank, step) gives the views the trainer trains on.
    """

    def __init__(
        self, settings: AugmentSettings, *, seed: int, rank: int = 0, step: int = 0
    ) -> None:
        self.settings = settings
        self.seed, self.rank, self.step = seed, rank, step

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> AugmentedBatch:
        """uint8 images (B, 3, H, W) and labels (B,) -> the uint8 view, mix and mixed labels."""
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"images must be uint8 (B, 3, H, W), got {images.dtype} {list(images.shape)}"
            )
        views = TrainViews(
            [
                (image, int(label), i)
                for i, (image, label) in enumerate(zip(images, labels, strict=True))
            ],
            self.settings.crop_settings,
            seed=self.seed,
            rank=self.rank,
            pixels=self.settings.pixels,
        )
        view = torch.stack(
            [views[ViewKey(self.step, i, i)][0] for i in range(int(images.shape[0]))]
        )
        return batch_views(
            self.settings, view, labels, seed=self.seed, rank=self.rank, step=self.step
        )


def batch_views(
    settings: AugmentSettings,
    view: torch.Tensor,
    labels: torch.Tensor,
    *,
    seed: int,
    rank: int,
    step: int,
    teacher_view: torch.Tensor | None = None,
) -> AugmentedBatch:
    """A step's cut views with the step's mix drawn (from (seed, rank, step) alone)."""
    rng = np.random.default_rng(step_seed(seed, rank, step))
    mix = draw_mix(settings, int(view.shape[0]), rng)
    return AugmentedBatch(view, mix, mixed_labels(labels, mix), teacher_view)


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
