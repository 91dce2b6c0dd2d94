"""CIFAR VGGs with BatchNorm of the KD literature (vgg8, vgg11, vgg13, vgg16, vgg19).

Five blocks of 3x3 conv + BN + ReLU; max-pooling after the first three blocks (and after
the fourth for 64 px inputs), global average pooling, one linear classifier on 512 features.
"""

from __future__ import annotations

import torch
from torch import nn

# Output channels of each conv, per block.
LAYOUTS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


class CifarVGG(nn.Module):
    """VGG with BatchNorm for small images."""

    def __init__(self, layout: tuple[tuple[int, ...], ...], num_classes: int) -> None:
        super().__init__()
        blocks, in_channels = [], 3
        for channels in layout:
            blocks.append(_block(in_channels, channels))
            in_channels = channels[-1]
        self.blocks = nn.ModuleList(blocks)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_channels, num_classes)
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
        for index, block in enumerate(self.blocks):
            x = self.relu(block(x))
            if index < 3 or (index == 3 and height == 64):
                x = self.pool(x)
        logits: torch.Tensor = self.classifier(torch.flatten(self.avgpool(x), 1))
        return logits


def _block(in_channels: int, channels: tuple[int, ...]) -> nn.Sequential:
    """Conv-BN-ReLU per entry, without the last ReLU (the network applies it)."""
    layers: list[nn.Module] = []
    for out_channels in channels:
        layers += [
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        ]
        in_channels = out_channels
    return nn.Sequential(*layers[:-1])
