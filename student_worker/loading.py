"""What each rank trains on per epoch, and the one DataLoader that cuts its views.

The order depends on (seed, epoch) alone, so a resumed run sees the same batches; the loader's
workers (persistent across epochs) decode the images and cut each step's views (`views`).
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from student_worker.augment import AugmentSettings
from student_worker.config import RunConfig
from student_worker.data import ImageSet
from student_worker.distributed import World
from student_worker.sampling import RepeatedAugmentSampler
from student_worker.views import StepBatches, TrainViews, ViewBatch, collate_views

EpochSampler = DistributedSampler[int] | RepeatedAugmentSampler


class NotEnoughImages(ValueError):
    """A rank's share of an epoch is smaller than one batch."""


def training_subset(train_set: ImageSet, distills: bool) -> Subset[tuple[torch.Tensor, int, int]]:
    """Every training image for a distilling student; the labeled ones for CE alone."""
    indices = range(len(train_set)) if distills else train_set.labeled_indices().tolist()
    return Subset(train_set, indices)


def epoch_sampler(config: RunConfig, size: int, world: World) -> EpochSampler:
    """This rank's share of each epoch of `size` samples, shuffled by (seed, epoch) alone
    (`data.repeated_augment` > 1: DeiT's repeated augmentation)."""
    sampler: EpochSampler
    if config.data.repeated_augment > 1:
        sampler = RepeatedAugmentSampler(
            size,
            repeats=config.data.repeated_augment,
            num_replicas=world.size,
            rank=world.rank,
            seed=config.seed,
        )
    else:
        sampler = DistributedSampler(
            range(size),  # type: ignore[arg-type]
            num_replicas=world.size,
            rank=world.rank,
            shuffle=True,
            seed=config.seed,
            drop_last=True,
        )
    if len(sampler) < config.batch_size:
        raise NotEnoughImages(
            f"batch_size {config.batch_size} is larger than the {len(sampler)} "
            f"training images of each of the {world.size} rank(s)"
        )
    return sampler


def train_loader(
    config: RunConfig,
    train_set: ImageSet,
    augment: AugmentSettings,
    batches: StepBatches,
    rank: int,
    device: torch.device,
) -> DataLoader[ViewBatch]:
    """The run's one loader: its workers (persistent) cut each step's views from the
    originals, in the order `batches` holds (set by the trainer before each epoch)."""
    workers = config.data.loader_workers
    views = TrainViews(
        train_set,
        augment.crop_settings,
        seed=config.seed,
        rank=rank,
        independent=config.teaching.mode == "independent",
        pixels=augment.pixels,
    )
    return DataLoader(
        views,  # type: ignore[arg-type]
        batch_sampler=batches,
        collate_fn=collate_views,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=device.type == "cuda",
        # Its own generator for the loader's base seed, so the global RNG (saved in
        # checkpoints) is not drawn from at each epoch's start.
        generator=torch.Generator().manual_seed(config.seed),
    )
