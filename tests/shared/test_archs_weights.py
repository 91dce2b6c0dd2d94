"""The arch registry (kdserve:, torchvision:, file:) and the real weights loaders on small files."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch

from teacher_server.shared.archs import UnknownArch, create_model, list_archs, load_archive
from teacher_server.shared.tv import import_torchvision
from teacher_server.shared.weights import WeightsError, load_weights, read_state_dict, save_weights
from tests.archives import save_slow


def test_torchvision_models_by_name() -> None:
    names = list_archs()
    assert (
        "kdserve:resnet8x4" in names
        and "torchvision:resnet50" in names
        and "torchvision:vit_b_16" in names
    )
    model = create_model("torchvision:mobilenet_v3_small", num_classes=5)
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 64)).shape == (1, 5)


def test_torchvision_imports_beside_cpu_torch() -> None:
    torchvision = import_torchvision()
    from torchvision.transforms import v2

    assert hasattr(torchvision.models, "resnet18")
    crop = v2.RandomResizedCrop(8)(torch.zeros(3, 16, 16, dtype=torch.uint8))
    assert crop.shape == (3, 8, 8)


def test_unknown_archs_suggest_close_names() -> None:
    with pytest.raises(UnknownArch, match="did you mean kdserve:resnet8x4"):
        create_model("kdserve:resnet8x5", num_classes=10)
    with pytest.raises(UnknownArch, match="torchvision:resnet50"):
        create_model("torchvision:resnet5O", num_classes=10)
    with pytest.raises(UnknownArch, match="'torchvision:NAME', 'kdserve:NAME' or 'file:PATH'"):
        create_model("timm:resnet50", num_classes=10)


@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
def test_file_archives_load_ready_for_inference(tmp_path: Path, suffix: str) -> None:
    path = save_slow(tmp_path / f"model{suffix}", 1)
    model = load_archive(path)
    with torch.no_grad():
        assert model(torch.rand(3, 3, 8, 8)).shape == (3, 10)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_archive(tmp_path / "missing.pt2")


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("kdserve:resnet8", num_classes=10)


def test_safetensors_round_trip(tmp_path: Path) -> None:
    source = _model()
    save_weights(source, tmp_path / "w.safetensors")
    target = create_model("kdserve:resnet8", num_classes=10)
    load_weights(target, tmp_path / "w.safetensors")
    for key, value in source.state_dict().items():
        assert torch.equal(value, target.state_dict()[key])


@pytest.mark.parametrize("wrapper", ["plain", "state_dict", "model", "ddp"])
def test_torch_state_dict_files_in_common_wrappers(tmp_path: Path, wrapper: str) -> None:
    """torchvision .pth, mdistiller/torchdistill checkpoints and DDP prefixes load as they are."""
    source = _model()
    state = source.state_dict()
    saved: object = {
        "plain": state,
        "state_dict": {"state_dict": state, "epoch": 3},
        "model": {"model": state, "best_acc": 70.1},
        "ddp": {f"module.{k}": v for k, v in state.items()},
    }[wrapper]
    torch.save(saved, tmp_path / "w.pth")
    target = create_model("kdserve:resnet8", num_classes=10)
    load_weights(target, tmp_path / "w.pth")
    assert torch.equal(target.fc.weight, source.fc.weight)


def test_weights_that_do_not_fit_are_refused_with_the_keys(tmp_path: Path) -> None:
    save_weights(_model(), tmp_path / "w.safetensors")
    with pytest.raises(
        WeightsError, match=r"shape mismatch \[fc.bias: file \[10\] vs model \[5\], fc.weight"
    ):
        load_weights(create_model("kdserve:resnet8", num_classes=5), tmp_path / "w.safetensors")
    with pytest.raises(WeightsError, match=r"missing \[layer1\.1\."):
        load_weights(create_model("kdserve:resnet14", num_classes=10), tmp_path / "w.safetensors")


def test_pickled_objects_are_never_loaded(tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("unpickled!",))

    torch.save({"fc.weight": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="cannot read weights file"):
        read_state_dict(tmp_path / "evil.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="cannot read weights file"):
        read_state_dict(tmp_path / "junk.safetensors")
    with pytest.raises(WeightsError, match="does not exist"):
        read_state_dict(tmp_path / "nope.safetensors")
    safetensors.torch.save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(WeightsError, match="missing"):
        load_weights(_model(), tmp_path / "other.safetensors")


@pytest.mark.parametrize(("name", "count"), [("deit_tiny", 5_910_800), ("deit_base", 87_338_192)])
def test_deit_parameter_counts_match_the_distilled_models(name: str, count: int) -> None:
    """DeiT-Ti and DeiT-B with distillation token at 224 px, 1000 classes (5.91M and 87.34M)."""
    model = create_model(f"kdserve:{name}", num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == count


def test_deit_answers_the_mean_of_its_two_heads_at_any_registered_size() -> None:
    torch.manual_seed(0)
    model = create_model("kdserve:deit_small", num_classes=10, image_size=(32, 32))
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        cls_logits, dist_logits = model.forward_heads(images)  # type: ignore[operator]
        assert torch.allclose(model(images), (cls_logits + dist_logits) / 2)
    assert not torch.allclose(cls_logits, dist_logits)
    with pytest.raises(ValueError, match=r"expects \[32, 32\] px images"):
        model(torch.rand(1, 3, 48, 48))
    assert create_model("torchvision:vit_b_16", 10, (32, 32))(torch.rand(1, 3, 32, 32)).shape == (
        1,
        10,
    )
