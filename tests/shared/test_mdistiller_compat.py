"""mdistiller's CIFAR checkpoints load strictly into kdserve's nets and give the same logits.

The reference below re-implements mdistiller's (megvii-research/mdistiller) module names and
forward independently of kdserve's classes: a checkpoint saved from it is what a user downloads.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from teacher_server.shared.archs import create_model
from teacher_server.shared.weights import load_weights

NUM_CLASSES = 100


class ResNetBlock(nn.Module):
    """mdistiller's CIFAR ResNet BasicBlock: conv-BN-ReLU, conv-BN, add the shortcut, ReLU."""

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x if self.downsample is None else self.downsample(x)
        return F.relu(out)


class ResNet(nn.Module):
    """mdistiller's CIFAR ResNet(depth, num_filters) with basic blocks."""

    def __init__(self, depth: int, num_filters: list[int], num_classes: int):
        super().__init__()
        blocks = (depth - 2) // 6
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(3, num_filters[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(num_filters[1], blocks, stride=1)
        self.layer2 = self._make_layer(num_filters[2], blocks, stride=2)
        self.layer3 = self._make_layer(num_filters[3], blocks, stride=2)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(num_filters[3], num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        layers = [ResNetBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [ResNetBlock(planes, planes, 1, None) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


class WideBlock(nn.Module):
    """mdistiller's WideResNet BasicBlock: pre-activation; a 1x1 shortcut when widths differ."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = (
            None
            if self.equal_in_out
            else nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)
        )

    def forward(self, x):
        if self.equal_in_out:
            out = self.relu1(self.bn1(x))
            out = self.conv2(self.relu2(self.bn2(self.conv1(out))))
            return x + out
        x = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(x))))
        return self.convShortcut(x) + out


class NetworkBlock(nn.Module):
    """mdistiller's WideResNet stage: `layer` holds its blocks; the first one takes the stride."""

    def __init__(self, blocks: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(
            WideBlock(in_planes, out_planes, stride),
            *(WideBlock(out_planes, out_planes, 1) for _ in range(1, blocks)),
        )

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    """mdistiller's WideResNet(depth, num_classes, widen_factor)."""

    def __init__(self, depth: int, num_classes: int, widen_factor: int):
        super().__init__()
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        blocks = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, channels[0], 3, padding=1, bias=False)
        self.block1 = NetworkBlock(blocks, channels[0], channels[1], 1)
        self.block2 = NetworkBlock(blocks, channels[1], channels[2], 2)
        self.block3 = NetworkBlock(blocks, channels[2], channels[3], 2)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(channels[3], num_classes)

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.avg_pool2d(self.relu(self.bn1(out)), 8)
        return self.fc(out.flatten(1))


REFERENCES: dict[str, Callable[[], nn.Module]] = {
    "resnet8x4": lambda: ResNet(8, [32, 64, 128, 256], NUM_CLASSES),
    "resnet20": lambda: ResNet(20, [16, 16, 32, 64], NUM_CLASSES),
    "wrn_16_1": lambda: WideResNet(16, NUM_CLASSES, widen_factor=1),
    "wrn_40_2": lambda: WideResNet(40, NUM_CLASSES, widen_factor=2),
}


def trained_looking(name: str) -> nn.Module:
    """A seeded reference in eval mode whose BatchNorms are far from identities."""
    torch.manual_seed(0)
    model = REFERENCES[name]()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
                module.running_mean.normal_(0.0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.num_batches_tracked.fill_(1000)
            elif isinstance(module, nn.Linear):
                module.bias.normal_(0.0, 0.2)
    return model.eval()


def save_checkpoint(state: dict[str, torch.Tensor], path: Path, form: str) -> None:
    """Save a state_dict as mdistiller/CRD teachers are saved, or as a bare DDP state_dict."""
    if form == "mdistiller":
        optimizer = {"state": {}, "param_groups": [{"lr": 0.05, "momentum": 0.9, "params": [0]}]}
        checkpoint = {"model": state, "optimizer": optimizer, "accuracy": 79.42, "epoch": 240}
        torch.save(checkpoint, path)
    else:
        torch.save({f"module.{key}": value for key, value in state.items()}, path)


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_parameter_names_and_shapes_match_mdistiller(name):
    reference = REFERENCES[name]().state_dict()
    kdserve = create_model(f"kdserve:{name}", num_classes=NUM_CLASSES).state_dict()
    assert sorted(kdserve) == sorted(reference)
    assert {k: list(v.shape) for k, v in kdserve.items()} == {
        k: list(v.shape) for k, v in reference.items()
    }


@pytest.mark.parametrize("form", ["mdistiller", "ddp"])
@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_mdistiller_checkpoint_loads_strictly_and_computes_the_same(name, form, tmp_path):
    reference = trained_looking(name)
    path = tmp_path / "ckpt_epoch_240.pth"
    save_checkpoint(reference.state_dict(), path, form)
    kdserve = create_model(f"kdserve:{name}", num_classes=NUM_CLASSES)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    with torch.no_grad():
        expected = reference(images)
        assert expected.std() > 0.5, "the reference's logits are too flat to tell nets apart"
        assert not torch.allclose(kdserve(images), expected, rtol=1e-2, atol=1e-2)
        load_weights(kdserve, path)
        assert not kdserve.training
        # kdserve pools with AdaptiveAvgPool2d(1), mdistiller with AvgPool2d(8): the same mean
        # summed in another order, so the tolerance follows the logits' scale.
        scale = expected.abs().max().item()
        torch.testing.assert_close(kdserve(images), expected, rtol=1e-5, atol=1e-5 * scale)
