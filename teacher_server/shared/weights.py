"""Weights files: safetensors, or a state_dict read with `torch.load(weights_only=True)`.

Nothing here unpickles arbitrary objects; torchvision's `.pth` files and mdistiller/DDP
checkpoints ({"model": ...}, {"state_dict": ...}, "module." prefixes) load as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import safetensors.torch
import torch

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "model_ema")


class WeightsError(ValueError):
    """A weights file is missing, unreadable or does not fit the model."""


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors by parameter name from a .safetensors file or a torch state_dict file."""
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            state: object = safetensors.torch.load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"cannot read weights file {path}: {exc}") from exc
    return _unwrap(state, path)


def _unwrap(state: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(state, Mapping):
        for key in _WRAPPER_KEYS:
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise WeightsError(f"weights file {path} does not hold a state_dict of tensors")
    tensors = {str(k): v for k, v in state.items()}
    if tensors and all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


def load_weights(module: torch.nn.Module, path: Path) -> None:
    """Load a weights file into `module`, strictly: every key must match, by name and shape."""
    state = read_state_dict(path)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: file {list(state[k].shape)} vs model {list(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        raise WeightsError(
            f"weights file {path} does not fit the model: "
            f"missing {_few(missing)}, unexpected {_few(unexpected)}, "
            f"shape mismatch {_few(mismatched)}"
        )
    module.load_state_dict(state)


def save_weights(module: torch.nn.Module, path: Path) -> None:
    """Write a module's weights as safetensors (atomically), the form the server loads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    safetensors.torch.save_file(state, str(tmp))
    tmp.replace(path)


def _few(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return f"[{shown}]{more}"
