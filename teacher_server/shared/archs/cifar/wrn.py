"""Wide ResNets WRN-depth-widen_factor of the KD literature (wrn_16_1 ... wrn_40_2).

Pre-activation blocks (BN, ReLU, conv), n = (depth - 4) / 6 blocks per stage, widths
[16, 16k, 32k, 64k], a final BN + ReLU, global average pooling and a linear classifier.
Attribute names follow the published CRD / mdistiller checkpoints, so their state dicts load
without renaming.
"""

from __future__ import annotations

import torch
from torch import nn


class PreActBlock(nn.Module):
    """BN-ReLU-conv twice; when the width changes, the 1x1 shortcut reads the activated input."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.convShortcut: nn.Conv2d | None = None
        if stride != 1 or in_channels != channels:
            self.convShortcut = nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu1(self.bn1(x))
        out: torch.Tensor = self.conv2(self.relu2(self.bn2(self.conv1(activated))))
        if self.convShortcut is None:
            return out + x
        shortcut: torch.Tensor = self.convShortcut(activated)
        return out + shortcut


class WideStage(nn.Module):
    """`blocks` pre-activation blocks; only the first changes width or resolution."""

    def __init__(self, in_channels: int, channels: int, blocks: int, stride: int) -> None:
        super().__init__()
        first = PreActBlock(in_channels, channels, stride)
        rest = (PreActBlock(channels, channels, 1) for _ in range(blocks - 1))
        self.layer = nn.Sequential(first, *rest)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layer(x)
        return out


class WideResNet(nn.Module):
    """WRN-depth-widen_factor for small images."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"depth must be 6n + 4 with n >= 1, got {depth}")
        blocks = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.block1 = WideStage(widths[0], widths[1], blocks, stride=1)
        self.block2 = WideStage(widths[1], widths[2], blocks, stride=2)
        self.block3 = WideStage(widths[2], widths[3], blocks, stride=2)
        self.bn1 = nn.BatchNorm2d(widths[3])
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
        x = self.relu(self.bn1(x))
        logits: torch.Tensor = self.fc(torch.flatten(self.avgpool(x), 1))
        return logits
