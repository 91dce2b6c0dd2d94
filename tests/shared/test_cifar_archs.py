"""The CIFAR nets of the KD literature: shapes, parameter counts and checkpoint key layout."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from teacher_server.shared.archs.cifar import CIFAR_ARCHS
from teacher_server.shared.archs.cifar.resnet import NARROW, CifarResNet
from teacher_server.shared.archs.cifar.wrn import WideResNet

NAMES = [
    *(f"resnet{d}" for d in (8, 14, 20, 32, 44, 56, 110)),
    "resnet8x4",
    "resnet32x4",
    "wrn_16_1",
    "wrn_16_2",
    "wrn_40_1",
    "wrn_40_2",
    *(f"vgg{d}" for d in (8, 11, 13, 16, 19)),
]

# At 100 classes; the CRD paper (Tian et al., ICLR 2020) reports the rounded figures.
PARAMETERS_100_CLASSES = {
    "resnet20": 278_324,  # 0.28M
    "resnet32": 472_756,  # 0.47M
    "resnet56": 861_620,  # 0.86M
    "resnet110": 1_736_564,  # 1.74M
    "resnet8x4": 1_233_540,  # 1.23M
    "resnet32x4": 7_433_860,  # 7.43M
    "wrn_16_2": 703_284,  # 0.70M
    "wrn_40_1": 569_780,  # 0.57M
    "wrn_40_2": 2_255_156,  # 2.26M
    "vgg8": 3_965_028,  # 3.96M
    "vgg13": 9_462_180,  # 9.46M
}

# Keys of the published CRD / mdistiller checkpoints that a renaming would break.
CHECKPOINT_KEYS = {
    "resnet8x4": ["conv1.weight", "layer1.0.downsample.0.weight", "layer3.0.bn2.running_var"],
    "resnet56": ["layer1.8.conv2.weight", "layer2.0.downsample.1.bias", "fc.weight"],
    "wrn_40_2": ["block1.layer.0.convShortcut.weight", "block3.layer.5.bn2.bias", "bn1.weight"],
    "vgg13": ["block0.0.bias", "block0.4.running_mean", "block4.3.weight", "classifier.bias"],
}


def test_registry_has_exactly_the_literature_names() -> None:
    assert sorted(CIFAR_ARCHS) == sorted(NAMES)


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("name", NAMES)
def test_logits_for_any_input_size_from_8_px(name: str, num_classes: int) -> None:
    model = CIFAR_ARCHS[name](num_classes).eval()
    with torch.no_grad():
        for size in (32, 16, 8):
            logits = model(torch.randn(2, 3, size, size))
            assert logits.shape == (2, num_classes)
            assert torch.isfinite(logits).all()


def test_num_classes_by_keyword() -> None:
    build: Callable[..., torch.nn.Module] = CIFAR_ARCHS["resnet8"]
    with torch.no_grad():
        assert build(num_classes=3)(torch.randn(1, 3, 32, 32)).shape == (1, 3)


@pytest.mark.parametrize(("name", "count"), PARAMETERS_100_CLASSES.items())
def test_parameter_counts_match_the_literature(name: str, count: int) -> None:
    model = CIFAR_ARCHS[name](100)
    assert sum(p.numel() for p in model.parameters()) == count


@pytest.mark.parametrize(("name", "keys"), CHECKPOINT_KEYS.items())
def test_state_dict_keys_follow_the_published_checkpoints(name: str, keys: list[str]) -> None:
    state = CIFAR_ARCHS[name](100).state_dict()
    assert set(keys) <= set(state)


def test_batchnorm_starts_as_identity() -> None:
    model = CIFAR_ARCHS["wrn_16_1"](10)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(bool((m.weight == 1).all() and (m.bias == 0).all()) for m in norms)


def test_depths_outside_the_family_are_refused() -> None:
    with pytest.raises(ValueError, match="6n \\+ 2"):
        CifarResNet(21, NARROW, num_classes=10)
    with pytest.raises(ValueError, match="6n \\+ 4"):
        WideResNet(20, widen_factor=2, num_classes=10)
