"""Training checkpoints: written atomically, read back with `torch.load(weights_only=True)`.

A checkpoint holds plain data only (tensors, numbers, strings, lists, dicts): model,
optimizer, scheduler and grad-scaler state, the step, the RNG states and the run's config,
so a resumed run continues where it stopped and no pickled object is ever executed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

LATEST = "checkpoint.pt"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or corrupt; the message names the file."""


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> Path:
    """Write `state` to run_dir/checkpoint.pt: a temporary file, fsync, then an atomic rename."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LATEST
    tmp = path.with_name(f".{LATEST}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)
    return path


def load_checkpoint(run_dir: Path) -> dict[str, Any]:
    """The latest checkpoint of a run, as plain data (nothing pickled is executed)."""
    path = run_dir / LATEST
    if not path.is_file():
        raise CheckpointError(f"no checkpoint to resume from: {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable: {exc}") from exc
    if not isinstance(state, dict) or "step" not in state or "model" not in state:
        raise CheckpointError(f"checkpoint {path} lacks the step or the model state")
    return state


def rng_state() -> dict[str, Any]:
    """torch's CPU (and CUDA, when present) generator states."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
