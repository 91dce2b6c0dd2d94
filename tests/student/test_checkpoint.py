"""Checkpoints: atomic writes, plain-data reads, clear errors for missing or corrupt files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from student_worker.checkpoint import (
    CheckpointError,
    load_checkpoint,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)


def training_state() -> dict[str, object]:
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    model(torch.rand(2, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    return {
        "step": 7,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "augment_rng": np.random.default_rng(3).bit_generator.state,
        "config": {"loss": {"name": "kd", "temperature": 4.0}, "epochs": [1, 2]},
    }


def test_round_trip_keeps_every_part(tmp_path: Path) -> None:
    state = training_state()
    path = save_checkpoint(tmp_path / "run", state)
    assert path.name == "checkpoint.pt" and not list(path.parent.glob(".*.tmp"))
    loaded = load_checkpoint(tmp_path / "run")
    assert loaded["step"] == 7 and loaded["config"] == state["config"]
    for key, value in state["model"].items():  # type: ignore[attr-defined]
        assert torch.equal(loaded["model"][key], value)
    assert loaded["optimizer"]["param_groups"][0]["momentum"] == 0.9
    generator = np.random.default_rng(0)
    generator.bit_generator.state = loaded["augment_rng"]
    assert generator.uniform() == np.random.default_rng(3).uniform()


def test_rng_state_restores_the_same_draws() -> None:
    saved = rng_state()
    first = torch.rand(3)
    restore_rng_state(saved)
    assert torch.equal(torch.rand(3), first)


def test_missing_and_corrupt_checkpoints_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path)
    (tmp_path / "checkpoint.pt").write_bytes(b"half a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        load_checkpoint(tmp_path)
    torch.save({"epoch": 1}, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="lacks the step"):
        load_checkpoint(tmp_path)


def test_pickled_objects_in_a_checkpoint_are_refused(tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("executed!",))

    torch.save({"step": 1, "model": {}, "evil": Payload()}, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        load_checkpoint(tmp_path)
