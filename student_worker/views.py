"""Per-sample uint8 views cut from the original image, in DataLoader worker processes.

Training: a random resized crop drawn on the image as stored (a JPEG at its full size, a CIFAR
image at 32 px), resized once to the view size (the larger of the teacher's and the student's
input), then a flip, RandAugment and random erasing (timm's order), all on uint8.
Evaluation: the short side resized to size / crop_pct and the centre cropped (timm's eval
transform). Each sample's randomness comes from its own generator seeded by (seed, rank,
step, stream, position in the batch), so a view depends on nothing else: not on the worker
that cut it, nor on how many workers there are, and a resumed run cuts the same views.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from student_worker.data import Sample
from teacher_server.shared.tv import import_torchvision

import_torchvision()
from torchvision.transforms import v2 as transforms_v2  # noqa: E402
from torchvision.transforms.v2 import functional as tv_functional  # noqa: E402

STUDENT_STREAM = 1
TEACHER_STREAM = 2
"""Stream tags of a sample's generators: the student's view, and the teacher's own
(`teaching: independent`); a step's batch-wide draws (mixing) use tag 0."""


@dataclass(frozen=True)
class CropSettings:
    """The crop and flip of a training view: `resized`, timm's RandomResizedCrop (scale,
    ratio); `padded`, CIFAR's RandomCrop(size, padding): the image padded with `padding` px
    of zeros and a crop of its own size cut at random (then resized to the view)."""

    size: int
    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    mode: Literal["resized", "padded"] = "resized"
    padding: int = 4


@dataclass(frozen=True)
class PixelAugment:
    """RandAugment (torchvision v2: `layers` ops at `magnitude` of 30) and random erasing
    (timm's RandomErasing, mode "pixel", with uniform uint8 noise) on a cut view."""

    randaugment_layers: int = 0
    randaugment_magnitude: int = 9
    erasing_prob: float = 0.0

    @property
    def active(self) -> bool:
        return self.randaugment_layers > 0 or self.erasing_prob > 0


ERASE_AREA = (0.02, 1 / 3)
ERASE_LOG_RATIO = (math.log(0.3), math.log(1 / 0.3))


def step_seed(seed: int, rank: int, step: int) -> tuple[int, int, int, int]:
    """The seed of a step's batch-wide draws (mix parameters)."""
    return (seed, rank, step, 0)


def model_noise_seed(seed: int, rank: int, step: int) -> int:
    """The seed torch's global RNG is set to before a step's forward: its drop-path and
    dropout masks depend on (seed, rank, step) alone, like the views (so a resumed run draws
    what the whole run drew, whatever ran in between, and each rank draws its own)."""
    return int(np.random.SeedSequence((seed, rank, step, 1)).generate_state(1, np.uint64)[0])


def sample_generator(
    seed: int, rank: int, step: int, position: int, stream: int = STUDENT_STREAM
) -> np.random.Generator:
    """The generator of one sample's view: its own, whatever process cuts it."""
    return np.random.default_rng((seed, rank, step, stream, position))


def crop_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (top, left, h, w): area share and log-ratio uniform, 10 tries,
    then the largest centred crop of the clamped ratio (torchvision's fallback)."""
    area = height * width
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * float(rng.uniform(*scale))
        aspect = math.exp(float(rng.uniform(log_low, log_high)))
        crop_w = round(math.sqrt(target * aspect))
        crop_h = round(math.sqrt(target / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            return top, left, crop_h, crop_w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        crop_w, crop_h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        crop_w, crop_h = round(height * ratio[1]), height
    else:
        crop_w, crop_h = width, height
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def random_view(image: torch.Tensor, crop: CropSettings, rng: np.random.Generator) -> torch.Tensor:
    """uint8 (3, H, W) at any size -> a random crop (3, size, size), maybe flipped."""
    height, width = image.shape[-2], image.shape[-1]
    if crop.mode == "padded":
        pad = crop.padding
        image = torch.nn.functional.pad(image, (pad, pad, pad, pad))
        top, left = int(rng.integers(0, 2 * pad + 1)), int(rng.integers(0, 2 * pad + 1))
        crop_h, crop_w = height, width
    else:
        top, left, crop_h, crop_w = crop_box(rng, height, width, crop.scale, crop.ratio)
    view: torch.Tensor = tv_functional.resized_crop(
        image, top, left, crop_h, crop_w, [crop.size, crop.size], antialias=True
    )
    if crop.flip and float(rng.uniform()) < 0.5:
        view = view.flip(-1)
    return view.contiguous()


def augment_pixels(
    view: torch.Tensor, pixels: PixelAugment, rng: np.random.Generator
) -> torch.Tensor:
    """RandAugment, then random erasing, on a uint8 view; every draw from `rng`."""
    if pixels.randaugment_layers > 0:
        randaugment = transforms_v2.RandAugment(
            num_ops=pixels.randaugment_layers, magnitude=pixels.randaugment_magnitude
        )
        # torchvision draws from torch's global generator: give it this sample's seed, and
        # give the caller's state back (the trainer's RNG is part of its checkpoints).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(rng.integers(0, 2**63 - 1)))
            view = randaugment(view)
    if pixels.erasing_prob > 0 and float(rng.uniform()) < pixels.erasing_prob:
        view = _erase(view, rng)
    return view


def _erase(view: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """One box of random uint8 pixels: area share and log-aspect uniform, up to 10 tries."""
    channels, height, width = view.shape
    for _ in range(10):
        area = height * width * float(rng.uniform(*ERASE_AREA))
        aspect = math.exp(float(rng.uniform(*ERASE_LOG_RATIO)))
        box_h, box_w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if box_w < width and box_h < height:
            top = int(rng.integers(0, height - box_h + 1))
            left = int(rng.integers(0, width - box_w + 1))
            noise = rng.integers(0, 256, (channels, box_h, box_w), dtype=np.uint8)
            erased = view.clone()
            erased[:, top : top + box_h, left : left + box_w] = torch.from_numpy(noise)
            return erased
    return view


def eval_view(image: torch.Tensor, size: int, crop_pct: float | None) -> torch.Tensor:
    """uint8 (3, H, W) -> (3, size, size): the short side resized to floor(size / crop_pct),
    then the centre crop (timm's eval view); crop_pct None squashes the whole image instead."""
    if crop_pct is None:
        resized: torch.Tensor = tv_functional.resize(image, [size, size], antialias=True)
        return resized.contiguous()
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    short = math.floor(size / crop_pct)
    height, width = image.shape[-2], image.shape[-1]
    if min(height, width) != short:
        image = tv_functional.resize(image, short, antialias=True)
    cropped: torch.Tensor = tv_functional.center_crop(image, [size, size])
    return cropped.contiguous()


class Samples(Protocol):
    """Indexable `(image, label, sample_id)` samples: an `ImageSet`, or a list of them."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Sample: ...


class ViewKey(NamedTuple):
    """Which sample to cut, and for which step and position in its batch."""

    step: int
    position: int
    sample_id: int


class ViewBatch(NamedTuple):
    """A collated training batch: the student's views, the teacher's own views (None: the
    teacher sees the student's), labels and sample ids."""

    views: torch.Tensor
    teacher_views: torch.Tensor | None
    labels: torch.Tensor
    sample_ids: torch.Tensor


ViewSample = tuple[torch.Tensor, torch.Tensor | None, int, int]


class TrainViews(Dataset[ViewSample]):
    """Training views of `images`, indexed by `ViewKey`; `independent`: the teacher gets a
    crop of its own from another stream of the same sample's seed."""

    def __init__(
        self,
        images: Samples,
        crop: CropSettings,
        *,
        seed: int,
        rank: int,
        independent: bool = False,
        pixels: PixelAugment | None = None,
    ) -> None:
        self.images = images
        self.crop = crop
        self.pixels = pixels or PixelAugment()
        self.seed = seed
        self.rank = rank
        self.independent = independent

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: ViewKey) -> ViewSample:
        image, label, sample_id = self.images[key.sample_id]
        view = self._view(image, key, STUDENT_STREAM)
        teacher_view = self._view(image, key, TEACHER_STREAM) if self.independent else None
        return view, teacher_view, label, sample_id

    def _view(self, image: torch.Tensor, key: ViewKey, stream: int) -> torch.Tensor:
        rng = sample_generator(self.seed, self.rank, key.step, key.position, stream)
        view = random_view(image, self.crop, rng)
        return augment_pixels(view, self.pixels, rng) if self.pixels.active else view


def collate_views(samples: Sequence[ViewSample]) -> ViewBatch:
    """DataLoader collate of `TrainViews` samples."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    teacher_views = [teacher for _, teacher, _, _ in samples]
    return ViewBatch(
        torch.stack([view for view, _, _, _ in samples]),
        None if teacher_views[0] is None else torch.stack(teacher_views),  # type: ignore[arg-type]
        torch.tensor([label for _, _, label, _ in samples], dtype=torch.int64),
        torch.tensor([sample_id for _, _, _, sample_id in samples], dtype=torch.int64),
    )


class EvalViews(Dataset[tuple[torch.Tensor, int, int]]):
    """`images` as evaluation views: `(view, label, sample_id)`, a plain uint8 sample."""

    def __init__(
        self, images: Dataset[tuple[torch.Tensor, int, int]], size: int, crop_pct: float | None
    ) -> None:
        self.images = images
        self.size = size
        self.crop_pct = crop_pct

    def __len__(self) -> int:
        return len(self.images)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        image, label, sample_id = self.images[index]
        return eval_view(image, self.size, self.crop_pct), label, sample_id


class StepBatches:
    """The batch sampler of the trainer's one DataLoader: the keys of the steps to cut next.

    The loader (and its persistent workers) lives for the whole run; before each epoch the
    trainer sets the epoch's remaining batches here and iterates the loader again.
    """

    def __init__(self) -> None:
        self.batches: list[list[ViewKey]] = []

    def set(self, first_step: int, batches: Sequence[Sequence[int]]) -> None:
        """Batches of sample ids for steps first_step, first_step + 1, ..."""
        self.batches = [
            [
                ViewKey(first_step + index, position, int(sample_id))
                for position, sample_id in enumerate(batch)
            ]
            for index, batch in enumerate(batches)
        ]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[ViewKey]]:
        return iter(self.batches)
