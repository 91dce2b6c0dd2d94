"""CIFAR VGGs with BatchNorm of the KD literature (vgg8, vgg11, vgg13, vgg16, vgg19).

Five blocks of 3x3 conv + BN + ReLU with max-pooling after the first three (and after the
fourth for 64 px inputs, as the references do for Tiny-ImageNet), global average pooling and
one linear classifier. Attribute names and Sequential indices follow the published CRD /
mdistiller checkpoints, so their state dicts load without renaming.
"""

from __future__ import annotations

import torch
from torch import nn

Layout = tuple[tuple[int, ...], ...]

LAYOUTS: dict[str, Layout] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256,) * 3, (512,) * 3, (512,) * 3),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


class CifarVGG(nn.Module):
    """VGG with BatchNorm for small images; `layout` lists each block's conv widths."""

    def __init__(self, layout: Layout, num_classes: int) -> None:
        super().__init__()
        if len(layout) != 5:
            raise ValueError(f"a VGG layout has 5 blocks, got {len(layout)}")
        in_channels = (3, *(convs[-1] for convs in layout[:-1]))
        self.block0, self.block1, self.block2, self.block3, self.block4 = (
            _block(start, convs) for start, convs in zip(in_channels, layout, strict=True)
        )
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(layout[-1][-1], num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height = x.shape[2]
        x = self.pool(self.relu(self.block0(x)))
        x = self.pool(self.relu(self.block1(x)))
        x = self.pool(self.relu(self.block2(x)))
        x = self.relu(self.block3(x))
        if height == 64:
            x = self.pool(x)
        x = self.relu(self.block4(x))
        logits: torch.Tensor = self.classifier(torch.flatten(self.avgpool(x), 1))
        return logits


def _block(in_channels: int, widths: tuple[int, ...]) -> nn.Sequential:
    """Conv-BN-ReLU per width, without the last ReLU (the network applies it)."""
    layers: list[nn.Module] = []
    for out_channels in widths:
        layers += [
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        ]
        in_channels = out_channels
    return nn.Sequential(*layers[:-1])
