"""Wide ResNets WRN-d-k of the KD literature (wrn_16_1 ... wrn_40_2).

Pre-activation blocks (BN -> ReLU -> conv), n = (d - 4) / 6 blocks per stage, widths
[16, 16k, 32k, 64k], a final BN + ReLU, global average pooling and a linear classifier.
"""

from __future__ import annotations

import torch
from torch import nn


class PreActBlock(nn.Module):
    """BN-ReLU-conv twice; a projection shortcut (shape change) reads the activated input."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module | None = None
        if in_channels != channels:
            self.shortcut = nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu(self.bn1(x))
        out: torch.Tensor = self.conv2(self.relu(self.bn2(self.conv1(activated))))
        shortcut: torch.Tensor = x if self.shortcut is None else self.shortcut(activated)
        return out + shortcut


class WideResNet(nn.Module):
    """WRN-depth-widen_factor for small images."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"depth must be 6n + 4, got {depth}")
        blocks = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.block1 = _stage(widths[0], widths[1], blocks, stride=1)
        self.block2 = _stage(widths[1], widths[2], blocks, stride=2)
        self.block3 = _stage(widths[2], widths[3], blocks, stride=2)
        self.bn = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn(x))
        logits: torch.Tensor = self.fc(torch.flatten(self.avgpool(x), 1))
        return logits


def _stage(in_channels: int, channels: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [PreActBlock(in_channels, channels, stride)]
    layers += [PreActBlock(channels, channels, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)
