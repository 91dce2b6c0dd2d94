"""The CIFAR-style networks of the KD literature (CRD / mdistiller model zoo), by name."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from teacher_server.shared.archs.cifar.resnet import NARROW, WIDE, CifarResNet
from teacher_server.shared.archs.cifar.vgg import LAYOUTS, CifarVGG
from teacher_server.shared.archs.cifar.wrn import WideResNet

CIFAR_ARCHS: dict[str, Callable[[int], nn.Module]] = {
    **{f"resnet{d}": partial(CifarResNet, d, NARROW) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": partial(CifarResNet, 8, WIDE),
    "resnet32x4": partial(CifarResNet, 32, WIDE),
    **{f"wrn_{d}_{k}": partial(WideResNet, d, k) for d, k in ((16, 1), (16, 2), (40, 1), (40, 2))},
    **{name: partial(CifarVGG, layout) for name, layout in LAYOUTS.items()},
}
