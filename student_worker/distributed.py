"""One student over several processes (`torchrun`): which rank this is and what ranks agree on.

Each rank trains on its own shard of every epoch and talks to the teacher itself; DDP
averages the gradients. Rank 0 alone evaluates, writes metrics and checkpoints. Without
torchrun's environment the world is one process and nothing here opens a process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

PROCESS_GROUP_TIMEOUT = timedelta(minutes=30)
"""Rank 0 evaluates while the others wait at a barrier: long enough for a big eval split."""


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of one student."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_env() -> World:
    """The world torchrun describes in RANK / LOCAL_RANK / WORLD_SIZE (one process without)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    return World(rank=int(os.environ["RANK"]), local_rank=int(os.environ["LOCAL_RANK"]), size=size)


def rank_device(world: World, setting: str) -> torch.device:
    """The device this rank trains on: `auto` is CUDA when present; `cuda` is the rank's GPU."""
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {setting!r} was asked for but torch sees no CUDA device")
    if world.distributed and setting.startswith("cuda:"):
        raise ValueError(
            f"device {setting!r} would put every rank on one GPU; under torchrun use "
            "device: cuda (each rank takes the GPU of its local rank)"
        )
    if setting == "cuda":
        device = torch.device("cuda", world.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    return torch.device(setting)


def join(world: World, device: torch.device) -> None:
    """Open the process group: NCCL between GPUs, gloo between CPU processes."""
    if world.distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=PROCESS_GROUP_TIMEOUT)


def leave(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def any_rank(world: World, flag: bool, device: torch.device) -> bool:
    """True on every rank when it is true on one (a SIGTERM seen by any rank stops them all)."""
    if not world.distributed:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()
