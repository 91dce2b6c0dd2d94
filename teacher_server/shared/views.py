"""Pixel arithmetic both sides must do bit-identically: unit float, mixup/cutmix, resize, normalize.

The student builds its float view with these functions and the server rebuilds the same view
from the same uint8 pixels and mix parameters, so teacher and student see one image.
"""

from __future__ import annotations

import torch

from teacher_server.shared.contract import Mix

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
"""The usual per-channel normalization, the default of both sides' configs."""


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels in [0, 255] -> float32 in [0, 1]; float pixels -> float32."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    return images.to(torch.float32)


def apply_mix(views: torch.Tensor, partners: torch.Tensor, mix: Mix) -> torch.Tensor:
    """Mix unit-float `views` with their `partners` (partners[i] is x_perm[i], same shape)."""
    if mix.mode == "mixup":
        return views * mix.lam + partners * (1.0 - mix.lam)
    if mix.box is None:
        raise ValueError("cutmix needs a box")
    y0, x0, y1, x1 = mix.box
    mixed = views.clone()
    mixed[:, :, y0:y1, x0:x1] = partners[:, :, y0:y1, x0:x1]
    return mixed


def mix_views(views: torch.Tensor, mix: Mix) -> torch.Tensor:
    """Mix a whole request's unit-float views (the server mixes each pass's rows the same way)."""
    perm = torch.as_tensor(mix.perm, dtype=torch.long, device=views.device)
    return apply_mix(views, views.index_select(0, perm), mix)


def resize_views(views: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize unit-float views to a model's (H, W): bilinear with antialias; no-op when equal."""
    if tuple(views.shape[-2:]) == tuple(size):
        return views
    return torch.nn.functional.interpolate(
        views, size=size, mode="bilinear", antialias=True, align_corners=False
    )


def normalize(
    images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """(x - mean) / std per channel, as one in-place multiply-add: x * (1 / std) - mean / std.

    `images` are uint8 pixels (the /255 is folded into the scale) or unit floats; mean and std
    are (3,) tensors on the images' device. Writes into `out` (e.g. a slice of a batch) if given.
    """
    scale = std.reciprocal().view(1, 3, 1, 1)
    if images.dtype == torch.uint8:
        scale = scale / 255.0
    shift = (-mean / std).view(1, 3, 1, 1)
    if out is None:
        out = images.to(torch.float32, copy=True)
    else:
        out.copy_(images)
    return out.mul_(scale).add_(shift)
