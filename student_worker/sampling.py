"""Which samples each rank trains on per epoch: shuffled by (seed, epoch) alone.

Repeated augmentation (Hoffer et al. 2020; DeiT's RASampler): each epoch shuffles the set,
repeats every index `repeats` times in a row and deals the list to the ranks in turn, so the
copies of an image land on different ranks (or, on one rank, in the same batch) and each gets
its own crop; an epoch keeps its usual length, so it sees about 1 / repeats of the images.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class RepeatedAugmentSampler(Sampler[int]):
    """Indices 0..size-1 for one rank, each drawn `repeats` times, DeiT's way."""

    def __init__(self, size: int, *, repeats: int, num_replicas: int, rank: int, seed: int) -> None:
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside the {num_replicas} replicas")
        self.size = size
        self.repeats = repeats
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size // self.num_replicas

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator)
        repeated = order.repeat_interleave(self.repeats)
        total = -(-len(repeated) // self.num_replicas) * self.num_replicas
        padded = torch.cat([repeated, repeated[: total - len(repeated)]])
        mine = padded[self.rank : total : self.num_replicas]
        return iter(mine[: len(self)].tolist())
