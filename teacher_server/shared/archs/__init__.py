"""Model architectures by registry name: the same names in YAML, on the CLI and in Python.

- `torchvision:NAME`: every torchvision classification model (`torchvision:resnet50`, ...);
- `kdserve:NAME`: the CIFAR-style nets of the KD literature (`kdserve:resnet8x4`, ...) and
  DeiT-style ViTs with a distillation token (`kdserve:deit_tiny`, `deit_small`, `deit_base`);
- `file:PATH`: a TorchScript archive (`.pt`, `.ts`) or a `torch.export` archive (`.pt2`),
  which carries its own weights.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import torch

from teacher_server.shared.archs.cifar import CIFAR_ARCHS
from teacher_server.shared.archs.vit import SIZES as DEIT_SIZES
from teacher_server.shared.archs.vit import deit
from teacher_server.shared.tv import import_torchvision


class UnknownArch(ValueError):
    """The arch name is not in the registry; the message lists close matches."""


def torchvision_names() -> list[str]:
    """Every torchvision classification model name."""
    models = import_torchvision().models
    return sorted(models.list_models(module=models))


def kdserve_names() -> list[str]:
    """The project's own archs: the KD literature's CIFAR nets and the DeiT distilled ViTs."""
    return sorted([*CIFAR_ARCHS, *DEIT_SIZES])


def list_archs() -> list[str]:
    """Every registry name except `file:` archives."""
    return [f"kdserve:{name}" for name in kdserve_names()] + [
        f"torchvision:{name}" for name in torchvision_names()
    ]


class NoStochasticDepth(ValueError):
    """A drop-path rate was asked of an architecture that has no stochastic depth."""


def create_model(
    arch: str,
    num_classes: int,
    image_size: tuple[int, int] | None = None,
    *,
    drop_path: float = 0.0,
) -> torch.nn.Module:
    """A fresh model in eval mode (random weights; `file:` archives bring their own).

    `image_size` matters to vision transformers only (their position embeddings); CNNs take
    any size. It defaults to 224 px. `drop_path` is the stochastic depth rate of the archs
    that have it (the DeiT ViTs; torchvision's `stochastic_depth_prob` models).
    """
    prefix, _, name = arch.partition(":")
    size = image_size or (224, 224)
    if prefix == "kdserve":
        if name in DEIT_SIZES:
            return deit(name, num_classes, size, drop_path_rate=drop_path).eval()
        if name not in CIFAR_ARCHS:
            raise UnknownArch(_unknown(arch, [f"kdserve:{n}" for n in kdserve_names()]))
        _no_drop_path(arch, drop_path)
        return CIFAR_ARCHS[name](num_classes).eval()
    if prefix == "torchvision":
        names = torchvision_names()
        if name not in names:
            raise UnknownArch(_unknown(arch, [f"torchvision:{n}" for n in names]))
        models = import_torchvision().models
        extra: dict[str, object] = {"image_size": size[0]} if name.startswith("vit_") else {}
        if drop_path:
            extra["stochastic_depth_prob"] = drop_path
        try:
            module: torch.nn.Module = models.get_model(
                name, weights=None, num_classes=num_classes, **extra
            )
        except TypeError as exc:
            if "stochastic_depth_prob" not in str(exc):
                raise
            _no_drop_path(arch, drop_path)
            raise
        return module.eval()
    if prefix == "file":
        _no_drop_path(arch, drop_path)
        return load_archive(Path(name))
    raise UnknownArch(
        f"arch must be 'torchvision:NAME', 'kdserve:NAME' or 'file:PATH', got {arch!r}"
    )


def load_archive(path: Path) -> torch.nn.Module:
    """A TorchScript (.pt, .ts) or torch.export (.pt2) archive, ready for inference."""
    if not path.is_file():
        raise FileNotFoundError(f"model archive {path} does not exist")
    if path.suffix == ".pt2":
        exported: torch.nn.Module = torch.export.load(str(path)).module()
        return exported
    scripted: torch.nn.Module = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
    return scripted.eval()


def _no_drop_path(arch: str, drop_path: float) -> None:
    if drop_path:
        raise NoStochasticDepth(
            f"drop_path {drop_path}: {arch} has no stochastic depth (the kdserve:deit_* ViTs "
            "and torchvision's convnext, efficientnet, swin and maxvit models do)"
        )


def _unknown(arch: str, known: list[str]) -> str:
    close = difflib.get_close_matches(arch, known, n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown arch {arch!r}{hint} (kdserve archs: {', '.join(kdserve_names())})"
