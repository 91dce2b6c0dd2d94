"""User models exported as archives (`file:` archs), with behaviour the error tests need."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class Flaky(nn.Module):
    """Fails on any image whose first pixel is far above the others (a model bug to survive)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x[:, 0, 0, 0] > 50.0).any()):
            raise RuntimeError("flaky model refuses this image")
        return self.fc(x.mean(dim=(2, 3)))


class Slow(nn.Module):
    """Spends a fixed amount of work per forward pass, whatever the batch size."""

    def __init__(self, iterations: int) -> None:
        super().__init__()
        self.iterations = iterations
        self.fc = nn.Linear(3, 10)
        self.register_buffer("work", torch.randn(384, 384) / 20.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.work
        for _ in range(self.iterations):
            w = torch.tanh(w @ self.work)
        return self.fc(x.mean(dim=(2, 3))) + 0.0 * w.sum()


def save_flaky(path: Path) -> Path:
    torch.manual_seed(0)
    torch.jit.script(Flaky()).save(str(path))
    return path


def save_slow(path: Path, iterations: int) -> Path:
    """A TorchScript (.pt) or torch.export (.pt2) archive of Slow, by the path's suffix."""
    torch.manual_seed(0)
    model = Slow(iterations).eval()
    if path.suffix == ".pt2":
        batch = torch.export.Dim("batch", min=1, max=4096)
        exported = torch.export.export(
            model, (torch.rand(2, 3, 8, 8),), dynamic_shapes={"x": {0: batch}}
        )
        torch.export.save(exported, str(path))
    else:
        torch.jit.script(model).save(str(path))
    return path


class Truncating(nn.Module):
    """A model bug: answers at most two rows, whatever the batch size."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))[:2]


def save_truncating(path: Path) -> Path:
    torch.manual_seed(0)
    torch.jit.script(Truncating()).save(str(path))
    return path
