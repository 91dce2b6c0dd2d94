"""DeiT-style vision transformers with a distillation token (Touvron et al., ICML 2021).

A class token and a distillation token go through pre-norm transformer blocks; each has its
own linear head. `forward` answers the mean of the two heads (DeiT's evaluation rule), so the
model serves like any classifier; the trainer reads both heads with `forward_heads`.
"""

from __future__ import annotations

import torch
from torch import nn

SIZES: dict[str, tuple[int, int, int]] = {
    "deit_nano": (96, 4, 3),  # not in the paper: small enough to train on a CPU (demo, tests)
    "deit_tiny": (192, 12, 3),
    "deit_small": (384, 12, 6),
    "deit_base": (768, 12, 12),
}


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth (Huang et al. 2016): drop a residual branch per sample, rescale the rest."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


class DropPathBlock(nn.TransformerEncoderLayer):
    """A pre-norm encoder block whose attention and MLP branches are dropped at `drop_path`
    per sample in training (DeiT's stochastic depth); the same parameters as its base."""

    drop_path_rate: float = 0.0

    def _sa_block(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        branch: torch.Tensor = super()._sa_block(x, *args, **kwargs)  # type: ignore[arg-type]
        return drop_path(branch, self.drop_path_rate, self.training)

    def _ff_block(self, x: torch.Tensor) -> torch.Tensor:
        branch: torch.Tensor = super()._ff_block(x)
        return drop_path(branch, self.drop_path_rate, self.training)


class DistilledViT(nn.Module):
    """ViT with class and distillation tokens; patches of 16 px (4 px for images <= 64 px)."""

    def __init__(
        self,
        num_classes: int,
        *,
        image_size: tuple[int, int] = (224, 224),
        patch_size: int | None = None,
        dim: int = 192,
        depth: int = 12,
        heads: int = 3,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        patch = patch_size or (4 if max(image_size) <= 64 else 16)
        if image_size[0] % patch or image_size[1] % patch:
            raise ValueError(
                f"image size {list(image_size)} is not a multiple of the patch size {patch}"
            )
        self.image_size = image_size
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        patches = (image_size[0] // patch) * (image_size[1] // patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, patches + 2, dim))
        block = DropPathBlock(
            dim,
            heads,
            dim_feedforward=4 * dim,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(block, depth, enable_nested_tensor=False)
        # DeiT's rule: the rate grows linearly with depth, from 0 to drop_path_rate.
        for index, layer in enumerate(self.blocks.layers):
            layer.drop_path_rate = drop_path_rate * index / max(1, depth - 1)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.head_dist = nn.Linear(dim, num_classes)
        for parameter in (self.cls_token, self.dist_token, self.pos_embed):
            nn.init.trunc_normal_(parameter, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def no_weight_decay(self) -> set[str]:
        """The parameters DeiT keeps from weight decay besides biases and norms."""
        return {"cls_token", "dist_token", "pos_embed"}

    def forward_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class-head logits, distillation-head logits)."""
        if tuple(x.shape[-2:]) != self.image_size:
            raise ValueError(f"expects {list(self.image_size)} px images, got {list(x.shape[-2:])}")
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        batch = tokens.shape[0]
        tokens = torch.cat(
            [self.cls_token.expand(batch, -1, -1), self.dist_token.expand(batch, -1, -1), tokens],
            dim=1,
        )
        encoded = self.norm(self.blocks(tokens + self.pos_embed))
        cls_logits: torch.Tensor = self.head(encoded[:, 0])
        dist_logits: torch.Tensor = self.head_dist(encoded[:, 1])
        return cls_logits, dist_logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls_logits, dist_logits = self.forward_heads(x)
        return (cls_logits + dist_logits) / 2


def deit(
    name: str, num_classes: int, image_size: tuple[int, int], drop_path_rate: float = 0.0
) -> DistilledViT:
    """`deit_tiny`, `deit_small`, `deit_base` (the paper's) or `deit_nano` (ours, for CPUs)."""
    dim, depth, heads = SIZES[name]
    return DistilledViT(
        num_classes,
        image_size=image_size,
        dim=dim,
        depth=depth,
        heads=heads,
        drop_path_rate=drop_path_rate,
    )
