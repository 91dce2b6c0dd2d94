"""The papers' recipe fields: Adam, schedules, drop path, interpolated init, EMA, RandAugment,
random erasing and repeated augmentation, unit by unit and through training runs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch

from student_worker.checkpoint import load_checkpoint
from student_worker.cli import main as student_main
from student_worker.config import OptimizerConfig, ScheduleConfig, load_run_config
from student_worker.ema import WeightsAverage
from student_worker.models import init_from_weights
from student_worker.optim import build_optimizer, lr_factor
from student_worker.runlog import RunLog
from student_worker.sampling import RepeatedAugmentSampler
from student_worker.trainer import Trainer, TrainingError
from student_worker.views import PixelAugment, augment_pixels
from teacher_server.shared.archs import NoStochasticDepth, create_model
from teacher_server.shared.archs.vit import drop_path
from teacher_server.shared.settings import ConfigError


def test_adam_and_adamw_take_their_betas_and_decay() -> None:
    model = torch.nn.Linear(3, 2)
    adam = build_optimizer(
        OptimizerConfig(name="adam", lr=1e-3, betas=(0.8, 0.99), weight_decay=0.0), model
    )
    assert type(adam) is torch.optim.Adam
    assert adam.param_groups[0]["betas"] == (0.8, 0.99) and adam.param_groups[0]["lr"] == 1e-3
    adamw = build_optimizer(OptimizerConfig(name="adamw", weight_decay=0.05), model)
    assert type(adamw) is torch.optim.AdamW and adamw.param_groups[0]["weight_decay"] == 0.05


def test_rmsprop_tf_follows_tensorflows_formula_by_hand() -> None:
    """v = alpha v + (1 - alpha) g^2 from v = 1; b = m b + lr g / sqrt(v + eps); w -= b;
    g carries L2 decay. Two steps on w = [1, -2], worked out by hand."""
    weight = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    settings = OptimizerConfig(
        name="rmsprop_tf", lr=0.1, alpha=0.5, eps=0.25, momentum=0.5, weight_decay=0.5
    )
    model = torch.nn.Module()
    model.weight = weight
    optimizer = build_optimizer(settings, model)

    # Loss sum(w^2) / 2 + w . [1, 1]: gradient w + 1, plus 0.5 w of decay: 1.5 w + 1.
    def step() -> None:
        optimizer.zero_grad()
        (weight.pow(2).sum() / 2 + weight.sum()).backward()
        optimizer.step()

    # Step 1: g = [2.5, -2], v = 0.5 + 0.5 g^2 = [3.625, 2.5], b = 0.1 g / sqrt(v + 0.25).
    step()
    first = [1 - 0.25 / math.sqrt(3.875), -2 + 0.2 / math.sqrt(2.75)]
    assert weight.tolist() == pytest.approx(first, rel=1e-12)
    assert first == pytest.approx([0.872999, -1.879395], abs=1e-6)
    # Step 2 from there: the buffer keeps half of step 1's b.
    g = [1.5 * w + 1 for w in first]
    v = [0.5 * 3.625 + 0.5 * g[0] ** 2, 0.5 * 2.5 + 0.5 * g[1] ** 2]
    b1 = [1 - first[0], -2 - first[1]]
    b2 = [0.5 * b1[i] + 0.1 * g[i] / math.sqrt(v[i] + 0.25) for i in range(2)]
    step()
    assert weight.tolist() == pytest.approx([first[i] - b2[i] for i in range(2)], rel=1e-12)
    expected_w = weight.tolist()
    # Torch's RMSprop (v from 0, eps outside the root, lr outside the buffer) lands elsewhere.
    torch_weight = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    torch_rmsprop = torch.optim.RMSprop(
        [torch_weight], lr=0.1, alpha=0.5, eps=0.25, momentum=0.5, weight_decay=0.5
    )
    for _ in range(2):
        torch_rmsprop.zero_grad()
        (torch_weight.pow(2).sum() / 2 + torch_weight.sum()).backward()
        torch_rmsprop.step()
    assert torch_weight.tolist() != pytest.approx(expected_w, rel=1e-3)


def test_exclude_from_decay_spares_biases_norms_and_a_vits_tokens() -> None:
    vit = create_model("kdserve:deit_nano", 10, (32, 32))
    settings = OptimizerConfig(name="adamw", weight_decay=0.05, exclude_from_decay=True)
    decayed, spared = build_optimizer(settings, vit).param_groups
    assert decayed["weight_decay"] == 0.05 and spared["weight_decay"] == 0.0
    names = {id(p): name for name, p in vit.named_parameters()}
    spared_names = {names[id(p)] for p in spared["params"]}
    decayed_names = {names[id(p)] for p in decayed["params"]}
    assert {"cls_token", "dist_token", "pos_embed", "head.bias", "norm.weight"} <= spared_names
    assert {"patch_embed.weight", "head.weight", "head_dist.weight"} <= decayed_names
    assert all(vit.get_parameter(name).ndim >= 2 for name in decayed_names)
    assert len(spared_names) + len(decayed_names) == len(names)
    resnet = create_model("kdserve:resnet8", 10, (32, 32))
    (plain,) = build_optimizer(OptimizerConfig(weight_decay=5e-4), resnet).param_groups
    assert len(plain["params"]) == len(list(resnet.parameters()))
    decayed, spared = build_optimizer(
        OptimizerConfig(weight_decay=5e-4, exclude_from_decay=True), resnet
    ).param_groups
    assert all(p.ndim == 4 or p.ndim == 2 for p in decayed["params"])
    assert spared["params"] and all(p.ndim == 1 for p in spared["params"])


def test_schedules_warm_up_per_step_then_decay() -> None:
    # 10 steps per epoch, 100 in all, half an epoch of warm-up: 5 steps, per step.
    cosine = ScheduleConfig(name="cosine", warmup_epochs=0.5, min_lr=1e-4)
    assert [lr_factor(cosine, s, 10, 100, 1e-3) for s in range(5)] == pytest.approx(
        [0.2, 0.4, 0.6, 0.8, 1.0]
    )
    assert lr_factor(cosine, 5, 10, 100, 1e-3) == pytest.approx(1.0)
    assert lr_factor(cosine, 100, 10, 100, 1e-3) == pytest.approx(0.1)  # min_lr / lr
    halfway = 5 + (100 - 5) / 2
    assert lr_factor(cosine, math.ceil(halfway), 10, 100, 1e-3) == pytest.approx(0.55, abs=0.02)
    step = ScheduleConfig(name="step", step_epochs=3, gamma=0.5)
    assert [lr_factor(step, e * 10, 10, 100) for e in range(7)] == [1, 1, 1, 0.5, 0.5, 0.5, 0.25]
    # x0.5 every 2.4 epochs of 10 steps: at steps 24, 48, 72, not a step early or late.
    fractional = ScheduleConfig(name="step", step_epochs=2.4, gamma=0.5)
    factors = [lr_factor(fractional, s, 10, 100) for s in range(80)]
    assert [s for s in range(1, 80) if factors[s] != factors[s - 1]] == [24, 48, 72]
    assert factors[23] == 1 and factors[24] == 0.5 and factors[79] == 0.125
    multistep = ScheduleConfig(name="multistep", milestones=[2, 4], gamma=0.1)
    assert [lr_factor(multistep, e * 10, 10, 100) for e in range(5)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01]
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"schedule.name": "step"}, "needs schedule.step_epochs"),
        ({"schedule.name": "multistep"}, "needs schedule.milestones"),
        ({"schedule.min_lr": 1.0}, "schedule.min_lr 1.0 is above optimizer.lr"),
        ({"optimizer.betas": [0.9, 1.0]}, r"optimizer.betas must be in \[0, 1\)"),
        ({"optimizer.name": "lamb"}, "optimizer.name"),
        ({"optimizer.name": "adamw", "optimizer.nesterov": True}, "applies to sgd only"),
        ({"optimizer.eps": 0}, "optimizer.eps"),
        ({"schedule.name": "step", "schedule.step_epochs": 0}, "schedule.step_epochs"),
        ({"student.init_interpolation": 0.5}, "needs student.init_weights"),
        (
            {"student.init_interpolation": 1.5, "student.init_weights": "w.safetensors"},
            "student.init_interpolation",
        ),
        ({"student.drop_path": 1.0}, "student.drop_path"),
        ({"ema.decay": 1.0}, "ema.decay"),
        ({"augment.randaugment_magnitude": 31}, "augment.randaugment_magnitude"),
        ({"augment.erasing_prob": -0.1}, "augment.erasing_prob"),
        ({"data.repeated_augment": 0}, "data.repeated_augment"),
        ({"augment.rand_augment": 2}, "rand_augment"),
    ],
)
def test_bad_recipe_fields_name_the_field(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_run_config(None, {"loss.name": "ce", **overrides})


def test_drop_path_grows_with_depth_and_vanishes_at_evaluation() -> None:
    torch.manual_seed(0)
    model = create_model("kdserve:deit_nano", 10, (32, 32), drop_path=0.1)
    rates = [layer.drop_path_rate for layer in model.blocks.layers]
    assert rates == pytest.approx([0.0, 0.1 / 3, 0.2 / 3, 0.1])
    plain = create_model("kdserve:deit_nano", 10, (32, 32))
    plain.load_state_dict(model.state_dict())  # the same parameters, by name
    images = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(images), plain.eval()(images))
        model.train()
        torch.manual_seed(1)
        first = model(images)
        torch.manual_seed(2)
        assert not torch.allclose(first, model(images))
    branch = torch.ones(10000, 4)
    dropped = drop_path(branch, 0.25, training=True)
    kept = dropped[:, 0] != 0
    assert torch.equal(dropped[kept], torch.full_like(dropped[kept], 1 / 0.75))
    assert 0.7 < float(kept.float().mean()) < 0.8, "one draw per sample, rows kept whole"
    with pytest.raises(NoStochasticDepth, match="kdserve:resnet8 has no stochastic depth"):
        create_model("kdserve:resnet8", 10, drop_path=0.1)
    with pytest.raises(NoStochasticDepth, match="torchvision:vit_b_16"):
        create_model("torchvision:vit_b_16", 10, drop_path=0.1)
    convnext = create_model("torchvision:convnext_tiny", 10, drop_path=0.2)
    assert max(m.p for m in convnext.modules() if hasattr(m, "p") and m.p) == pytest.approx(0.2)


def test_interpolated_init_is_lambda_weights_plus_the_rest_random(tmp_path: Path) -> None:
    torch.manual_seed(3)
    teacher = create_model("kdserve:resnet8", 10)
    path = tmp_path / "teacher.safetensors"
    safetensors.torch.save_file(dict(teacher.state_dict()), str(path))
    for interpolation in (0.0, 0.3, 1.0):
        torch.manual_seed(4)
        student = create_model("kdserve:resnet8", 10)
        random_start = {k: v.clone() for k, v in student.state_dict().items()}
        init_from_weights(student, path, interpolation)
        for name, value in student.state_dict().items():
            wanted = teacher.state_dict()[name]
            if value.is_floating_point():
                wanted = interpolation * wanted + (1 - interpolation) * random_start[name]
            torch.testing.assert_close(value, wanted, rtol=0, atol=1e-6)


def test_the_moving_average_is_decay_weighted() -> None:
    model = torch.nn.BatchNorm1d(2)
    with torch.no_grad():
        model.weight.fill_(1.0)
    average = WeightsAverage(model, decay=0.75)
    with torch.no_grad():
        model.weight.fill_(5.0)
        model.num_batches_tracked.fill_(7)
    average.update(model)
    assert torch.equal(average.module.weight, torch.full((2,), 2.0))  # 0.75 * 1 + 0.25 * 5
    assert int(average.module.num_batches_tracked) == 7
    assert not average.module.weight.requires_grad and not average.module.training


def test_randaugment_and_erasing_are_seeded_per_sample_and_leave_torch_rng_alone() -> None:
    view = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    pixels = PixelAugment(randaugment_layers=2, randaugment_magnitude=9, erasing_prob=1.0)
    before = torch.random.get_rng_state()
    first = augment_pixels(view, pixels, np.random.default_rng(5))
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(first, augment_pixels(view, pixels, np.random.default_rng(5)))
    assert not torch.equal(first, augment_pixels(view, pixels, np.random.default_rng(6)))
    assert first.dtype == torch.uint8 and first.shape == view.shape
    erase_only = PixelAugment(erasing_prob=1.0)
    flat = torch.full((3, 40, 40), 128, dtype=torch.uint8)
    erased = augment_pixels(flat, erase_only, np.random.default_rng(0))
    changed = (erased != 128).any(0)
    rows, cols = torch.nonzero(changed, as_tuple=True)
    box = (int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1))
    area = box[0] * box[1] / (40 * 40)
    assert 0.02 * 0.9 <= area <= 1 / 3 + 0.05, "timm's area range"
    assert float(changed.float().sum()) / (box[0] * box[1]) > 0.95, "one box of noise"
    assert torch.equal(augment_pixels(flat, PixelAugment(), np.random.default_rng(0)), flat)


def test_repeated_augmentation_repeats_each_image_and_deals_the_copies_to_ranks() -> None:
    one = RepeatedAugmentSampler(12, repeats=3, num_replicas=1, rank=0, seed=0)
    order = list(one)
    assert len(order) == len(one) == 12
    assert all(order[i] == order[i + 1] == order[i + 2] for i in range(0, 12, 3))
    assert order == list(RepeatedAugmentSampler(12, repeats=3, num_replicas=1, rank=0, seed=0))
    one.set_epoch(1)
    assert list(one) != order
    ranks = [
        list(RepeatedAugmentSampler(12, repeats=3, num_replicas=3, rank=r, seed=0))
        for r in range(3)
    ]
    assert all(len(indices) == 4 for indices in ranks)
    # The three copies of an image go to the three ranks, at the same position.
    assert ranks[0] == ranks[1] == ranks[2]
    assert len(set(ranks[0])) == 4


def base_run(out: Path, **overrides: Any) -> Any:
    return load_run_config(
        None,
        {
            "loss.name": "ce",
            "batch_size": 32,
            "threads": 1,
            "checkpoint_every": 4,
            "output_dir": str(out),
            **overrides,
        },
    )


@pytest.mark.slow
def test_a_deit_style_recipe_trains_and_its_ema_resumes_bit_exact(tmp_path: Path) -> None:
    """RandAugment, erasing, repeated augmentation, drop path, AdamW, cosine with warm-up and
    EMA in one short run; stopped after 4 steps (where the whole run evaluates, which the cut
    run's stop skips) and resumed, the weights and the EMA equal a whole run's."""
    recipe = {
        "student.arch": "kdserve:deit_nano",
        "student.drop_path": 0.1,
        "augment.randaugment_layers": 2,
        "augment.erasing_prob": 0.25,
        "data.repeated_augment": 3,
        "data.workers": 1,
        "optimizer.name": "adamw",
        "optimizer.lr": 5e-4,
        "optimizer.weight_decay": 0.05,
        "schedule.warmup_epochs": 0.1,
        "schedule.min_lr": 1e-5,
        "loss.label_smoothing": 0.1,
        "ema.decay": 0.9,
        "max_steps": 8,
        "eval_every": 4,
    }
    Trainer(base_run(tmp_path / "whole", **recipe)).fit()
    interrupted = Trainer(base_run(tmp_path / "cut", **recipe))
    train_step = interrupted._train_step

    def stop_at_step_four(*args: Any) -> Any:
        result = train_step(*args)
        interrupted._stop_requested = interrupted.step == 3  # as a SIGTERM would
        return result

    interrupted._train_step = stop_at_step_four  # type: ignore[method-assign]
    interrupted.fit()
    assert load_checkpoint(tmp_path / "cut")["step"] == 4
    Trainer(base_run(tmp_path / "cut", **recipe), resume=True).fit()
    whole, cut = load_checkpoint(tmp_path / "whole"), load_checkpoint(tmp_path / "cut")
    assert whole["ema"].keys() == whole["model"].keys()
    for name, value in whole["ema"].items():
        assert torch.equal(value, cut["ema"][name]), name
    for name, value in whole["model"].items():
        assert torch.equal(value, cut["model"][name]), name
    for name in ("head.weight", "patch_embed.weight", "pos_embed"):
        assert not torch.equal(whole["ema"][name], whole["model"][name]), f"{name}: not averaged"
    evaluation = RunLog(tmp_path / "whole").records("eval")[-1]
    assert {"student_accuracy", "ema_student_accuracy", "ema_nll"} <= set(evaluation)
    out = tmp_path / "ema.safetensors"
    assert student_main(["export", str(tmp_path / "whole"), "--out", str(out), "--ema"]) == 0
    exported = safetensors.torch.load_file(str(out))
    assert all(torch.equal(exported[k], v) for k, v in whole["ema"].items())
    with pytest.raises(TrainingError, match="trained without ema"):
        no_ema = {k: v for k, v in recipe.items() if k != "ema.decay"}
        Trainer(base_run(tmp_path / "plain", **{**no_ema, "max_steps": 2})).fit()
        Trainer(base_run(tmp_path / "plain", **recipe), resume=True)


@pytest.mark.slow
def test_a_student_starts_from_interpolated_teacher_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = create_model("kdserve:resnet8", 10)
    path = tmp_path / "teacher.safetensors"
    safetensors.torch.save_file(dict(teacher.state_dict()), str(path))
    config = base_run(
        tmp_path / "run",
        **{"student.init_weights": str(path), "student.init_interpolation": 0.5, "max_steps": 1},
    )
    trainer = Trainer(config)
    torch.manual_seed(config.seed)
    random_start = create_model("kdserve:resnet8", 10, (32, 32)).state_dict()
    name = "conv1.weight"
    expected = 0.5 * teacher.state_dict()[name] + 0.5 * random_start[name]
    torch.testing.assert_close(trainer.model.state_dict()[name], expected, rtol=0, atol=1e-6)
    with pytest.raises(TrainingError, match=r"student.drop_path: .*no stochastic depth"):
        Trainer(base_run(tmp_path / "other", **{"student.drop_path": 0.1}))
