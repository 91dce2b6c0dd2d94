"""The papers' recipes in examples/recipes/: each loads, keeps its paper's numbers, names a
teacher config that serves what it needs, and trains two steps with every field it sets."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from student_worker.config import RunConfig, load_run_config
from student_worker.optim import RMSpropTF, lr_factor
from student_worker.runlog import RunLog
from student_worker.sampling import RepeatedAugmentSampler
from student_worker.trainer import Trainer
from teacher_server.server.config import load_config
from teacher_server.server.serve import ServerThread

RECIPES = Path(__file__).resolve().parents[2] / "examples" / "recipes"
TEACHERS = RECIPES / "teachers"

MDISTILLER_NORMALIZATION = {
    "student.mean": [0.5071, 0.4867, 0.4408],
    "student.std": [0.2675, 0.2565, 0.2761],
}
MDISTILLER_CIFAR100 = {
    # mdistiller configs/cifar100/*.yaml and dataset/cifar100.py; DIST_KD's dist_cifar.yaml.
    "data.name": "cifar100",
    "data.image_size": 32,
    "augment.crop": "padded",
    "augment.crop_padding": 4,
    "augment.flip": True,
    "augment.randaugment_layers": 0,
    "augment.erasing_prob": 0.0,
    "augment.mixup_alpha": 0.0,
    "augment.cutmix_alpha": 0.0,
    "data.repeated_augment": 1,
    "teaching.mode": "consistent",
    "optimizer.name": "sgd",
    "optimizer.lr": 0.05,
    "optimizer.momentum": 0.9,
    "optimizer.nesterov": False,
    "optimizer.weight_decay": 5e-4,
    "optimizer.exclude_from_decay": False,  # mdistiller decays every parameter
    "schedule.name": "multistep",
    "schedule.milestones": [150, 180, 210],
    "schedule.gamma": 0.1,
    "schedule.warmup_epochs": 0.0,
    "ema.decay": None,
    "epochs": 240,
    "batch_size": 64,
    "student.arch": "kdserve:resnet8x4",
    "teacher.model": "resnet32x4",
    **MDISTILLER_NORMALIZATION,
}
IMAGENET_CROP = {
    # RandomResizedCrop(224) at torchvision's and timm's default scale; resize 256, crop 224.
    "data.name": "imagefolder",
    "data.image_size": 224,
    "data.crop_pct": 0.875,
    "augment.crop": "resized",
    "augment.crop_scale": [0.08, 1.0],
    "augment.crop_ratio": [0.75, 4 / 3],
    "augment.flip": True,
}
DIST_IMAGENET = {
    # image_classification_sota `kd: dist`: DIST(beta 1, gamma 1, tau 1) x 2, plus CE x 1.
    **IMAGENET_CROP,
    "loss.name": "dist",
    "objective.ce_weight": 1.0,
    "objective.kd_weight": 2.0,
    "objective.warmup_epochs": 0,
    "params.beta": 1.0,
    "params.gamma": 1.0,
    "params.tau": 1.0,
    "teaching.mode": "consistent",
    "student.arch": "torchvision:resnet18",
}
DEIT_HARD = {
    # DeiT's ingredients table and main.py defaults, README_deit.md's batch 4 x 256.
    **IMAGENET_CROP,
    "epochs": 300,
    "batch_size": 1024,
    "optimizer.name": "adamw",
    "optimizer.lr": 5e-4 * 1024 / 512,
    "optimizer.weight_decay": 0.05,
    "optimizer.exclude_from_decay": True,
    "optimizer.betas": [0.9, 0.999],
    "schedule.name": "cosine",
    "schedule.warmup_epochs": 5.0,
    "schedule.min_lr": 1e-5,
    "augment.randaugment_layers": 2,
    "augment.randaugment_magnitude": 27,  # timm's m9 of 10 on torchvision's 0..30
    "augment.erasing_prob": 0.25,
    "augment.mixup_alpha": 0.8,
    "augment.cutmix_alpha": 1.0,
    "augment.mix_prob": 1.0,
    "augment.switch_prob": 0.5,
    "data.repeated_augment": 3,
    "student.drop_path": 0.1,
    "ema.decay": 0.99996,
    "grad_clip": None,
    "teaching.mode": "consistent",
    "loss.name": "deit",
    "params.mode": "hard",
    "objective.ce_weight": 0.5,
    "objective.kd_weight": 0.5,
    "objective.label_smoothing": 0.1,
    "objective.warmup_epochs": 0,
    "teacher.model": "regnety_16gf",
}

PAPERS: dict[str, dict[str, Any]] = {
    "cifar100_kd_resnet32x4_resnet8x4.yaml": {
        "teacher_config": "cifar100_resnet32x4.yaml",
        **MDISTILLER_CIFAR100,
        "loss.name": "kd",
        "objective.ce_weight": 0.1,
        "objective.kd_weight": 0.9,
        "objective.warmup_epochs": 0,
        "objective.label_smoothing": 0.0,
        "params.temperature": 4.0,
    },
    "cifar100_dkd_resnet32x4_resnet8x4.yaml": {
        "teacher_config": "cifar100_resnet32x4.yaml",
        **MDISTILLER_CIFAR100,
        "loss.name": "dkd",
        "objective.ce_weight": 1.0,
        "objective.kd_weight": 1.0,
        "objective.warmup_epochs": 20,
        "objective.label_smoothing": 0.0,
        "params.alpha": 1.0,
        "params.beta": 8.0,
        "params.temperature": 4.0,
    },
    "cifar100_dist_resnet32x4_resnet8x4.yaml": {
        "teacher_config": "cifar100_resnet32x4.yaml",
        **MDISTILLER_CIFAR100,
        "loss.name": "dist",  # `kd: dist_t4`, ori_loss_weight 1, kd_loss_weight 2
        "objective.ce_weight": 1.0,
        "objective.kd_weight": 2.0,
        "objective.warmup_epochs": 0,
        "objective.label_smoothing": 0.0,
        "params.beta": 1.0,
        "params.gamma": 1.0,
        "params.tau": 4.0,
    },
    "imagenet_dist_b1_resnet34_resnet18.yaml": {
        "teacher_config": "imagenet_resnet34.yaml",
        **DIST_IMAGENET,
        "epochs": 100,
        "batch_size": 256,
        "optimizer.name": "sgd",
        "optimizer.lr": 0.1,
        "optimizer.momentum": 0.9,
        "optimizer.nesterov": True,
        "optimizer.weight_decay": 1e-4,
        "optimizer.exclude_from_decay": True,
        "schedule.name": "step",
        "schedule.step_epochs": 30,
        "schedule.gamma": 0.1,
        "schedule.warmup_epochs": 0.0,
        "objective.label_smoothing": 0.0,
        "augment.randaugment_layers": 0,
        "augment.erasing_prob": 0.0,
        "augment.mixup_alpha": 0.0,
        "ema.decay": None,
        "teacher.model": "resnet34",
    },
    "imagenet_dist_b2_resnet50sb_resnet18.yaml": {
        "teacher_config": "imagenet_resnet50_sb.yaml",
        **DIST_IMAGENET,
        "epochs": 450,
        "batch_size": 768,
        "optimizer.name": "rmsprop_tf",
        "optimizer.lr": 0.048,
        "optimizer.alpha": 0.9,
        "optimizer.eps": 1e-3,
        "optimizer.momentum": 0.9,
        "optimizer.nesterov": False,
        "optimizer.weight_decay": 1e-5,
        "optimizer.exclude_from_decay": True,
        "schedule.name": "step",
        "schedule.warmup_epochs": 3.0,
        "schedule.step_epochs": 2.4,
        "schedule.gamma": 0.97,
        "objective.label_smoothing": 0.1,
        "augment.randaugment_layers": 2,
        "augment.randaugment_magnitude": 27,
        "augment.erasing_prob": 0.2,
        "augment.mixup_alpha": 0.0,
        "augment.cutmix_alpha": 0.0,
        "ema.decay": 0.9999,
        "teacher.model": "resnet50_sb",
    },
    "imagenet_deit_tiny_regnety16gf.yaml": {
        "teacher_config": "imagenet_regnet_y_16gf.yaml",
        **DEIT_HARD,
        "student.arch": "kdserve:deit_tiny",
    },
    "imagenet_deit_small_regnety16gf.yaml": {
        "teacher_config": "imagenet_regnet_y_16gf.yaml",
        **DEIT_HARD,
        "student.arch": "kdserve:deit_small",
    },
    "imagenet_funmatch_bit152x2_resnet50.yaml": {
        # big_vision configs/proj/distill/bit_i1k.py
        "teacher_config": "imagenet_bit_r152x2.yaml",
        "data.name": "imagefolder",
        "data.image_size": 224,
        "data.crop_pct": 0.875,
        "augment.crop": "resized",
        "augment.crop_scale": [0.05, 1.0],  # inception_crop's area_min 5 (%)
        "augment.crop_ratio": [0.75, 1.33],
        "augment.flip": True,
        "augment.mixup_alpha": 1.0,
        "augment.cutmix_alpha": 0.0,
        "augment.randaugment_layers": 0,
        "augment.erasing_prob": 0.0,
        "teaching.mode": "function_matching",
        "loss.name": "kd",
        "objective.ce_weight": 0.0,
        "objective.kd_weight": 1.0,
        "objective.warmup_epochs": 0,
        "params.temperature": 1.0,
        "optimizer.name": "adamw",
        "optimizer.lr": 0.03,
        "optimizer.betas": [0.9, 0.999],
        "optimizer.weight_decay": 3e-4 / 0.03,  # big_vision's decay is not multiplied by lr
        "optimizer.exclude_from_decay": True,  # kernels only
        "schedule.name": "cosine",
        "schedule.warmup_epochs": pytest.approx(5000 / (1_281_167 // 4096), abs=0.1),
        "schedule.min_lr": 0.0,
        "grad_clip": 1.0,
        "epochs": 1200,
        "batch_size": 4096,
        "student.arch": "torchvision:resnet50",
        "student.mean": [0.5, 0.5, 0.5],
        "student.std": [0.5, 0.5, 0.5],
        "teacher.model": "bit_r152x2",
        "ema.decay": None,
    },
}


def recipe_files() -> list[Path]:
    return sorted(RECIPES.glob("*.yaml"))


def load_recipe(path: Path) -> RunConfig:
    return load_run_config(path, environ={})


def value_at(config: RunConfig, dotted: str) -> Any:
    """A config field by its dotted name; `objective.*` and `params.*` read the objective the
    run trains with (unset loss values resolved by image scale), not the file."""
    root, *names = dotted.split(".")
    node: Any
    if root in ("objective", "params"):
        objective = config.loss.objective(config.data.image_size or 224)
        node = objective.weights if root == "objective" else objective.distill.keywords["params"]
    else:
        node = getattr(config, root)
    for name in names:
        node = getattr(node, name)
    return list(node) if isinstance(node, tuple) else node


def test_every_recipe_has_its_paper_row_and_every_teacher_config_a_recipe() -> None:
    assert {path.name for path in recipe_files()} == set(PAPERS)
    used = {row["teacher_config"] for row in PAPERS.values()}
    assert used == {path.name for path in TEACHERS.glob("*.yaml")}


@pytest.mark.parametrize("name", sorted(PAPERS))
def test_a_recipe_keeps_its_papers_numbers(name: str) -> None:
    config = load_recipe(RECIPES / name)
    expected = {k: v for k, v in PAPERS[name].items() if k != "teacher_config"}
    drifted = {}
    for dotted, wanted in expected.items():
        actual = value_at(config, dotted)
        if isinstance(wanted, float | list):
            wanted = pytest.approx(wanted, rel=1e-6)
        if actual != wanted:
            drifted[dotted] = (actual, wanted)
    assert not drifted, f"{name} drifted from its paper (actual, paper): {drifted}"


@pytest.mark.parametrize("name", sorted(PAPERS))
def test_a_recipe_has_placeholders_for_its_teacher_and_data(name: str) -> None:
    config = load_recipe(RECIPES / name)
    assert config.teacher.endpoints == ["grpc://teacher:50051"]
    assert config.data.root is not None and str(config.data.root).startswith("/data/")
    if config.data.name == "imagefolder":
        assert config.data.eval_root is not None
    assert config.output_dir == Path("runs") / Path(name).stem
    lines = (RECIPES / name).read_text().splitlines()
    header = "\n".join(line for line in lines[: lines.index("data:")] if line.startswith("#"))
    for part in ("Paper:", "Numbers from:", "Reproduces:", "Differences from", "kdserve-teacher"):
        assert part in header, f"{name}'s header lacks {part!r}"


@pytest.mark.parametrize("path", sorted(TEACHERS.glob("*.yaml")), ids=lambda p: p.name)
def test_a_teacher_config_validates(path: Path) -> None:
    assert load_config(path, environ={}).models


@pytest.mark.parametrize("name", sorted(PAPERS))
def test_a_recipes_teacher_config_serves_what_it_asks_for(name: str) -> None:
    config = load_recipe(RECIPES / name)
    served = load_config(TEACHERS / PAPERS[name]["teacher_config"], environ={})
    model = next((m for m in served.models if m.name == config.teacher.model), None)
    assert model is not None, f"{name} asks for {config.teacher.model!r}"
    classes = {"cifar100": 100, "imagefolder": 1000}[config.data.name]  # ImageNet-1k
    assert model.num_classes == classes
    assert model.input_size == (config.data.image_size,) * 2
    assert model.mean == pytest.approx(config.student.mean), "teacher and student normalize alike"
    assert model.std == pytest.approx(config.student.std)


def merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) else value
    return out


def smoke_config(recipe: RunConfig, server: ServerThread, out: Path) -> RunConfig:
    """The recipe with the embedded digits, a small student of its kind and the test teacher;
    every other field (augmentation, teaching, loss, optimizer, schedule, EMA) as it is."""
    vit = recipe.student.arch.startswith("kdserve:deit_")
    return RunConfig.model_validate(
        merged(
            recipe.model_dump(),
            {
                "data": {
                    "name": "digits",
                    "root": None,
                    "eval_root": None,
                    "image_size": 32,
                    "workers": 0,
                },
                "student": {"arch": "kdserve:deit_nano" if vit else "kdserve:resnet8"},
                "teacher": {"endpoints": [server.endpoints.grpc_url], "model": "small"},
                "max_steps": 2,
                "batch_size": 16,
                "threads": 1,
                "output_dir": out,
            },
        )
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PAPERS))
def test_a_recipe_trains_two_steps_with_all_its_fields(
    name: str, server: ServerThread, tmp_path: Path
) -> None:
    recipe = load_recipe(RECIPES / name)
    config = smoke_config(recipe, server, tmp_path / "run")
    trainer = Trainer(config)
    assert trainer.augment.randaugment_layers == recipe.augment.randaugment_layers
    assert trainer.augment.erasing_prob == recipe.augment.erasing_prob
    if recipe.teaching.mode == "function_matching":
        assert trainer.augment.mix_prob == 1.0 and trainer.augment.mixup_alpha > 0
    assert isinstance(trainer.sampler, RepeatedAugmentSampler) == (recipe.data.repeated_augment > 1)
    assert (trainer.ema is not None) == (recipe.ema.decay is not None)
    optimizer = {
        "sgd": torch.optim.SGD,
        "adam": torch.optim.Adam,
        "adamw": torch.optim.AdamW,
        "rmsprop_tf": RMSpropTF,
    }
    assert type(trainer.optimizer) is optimizer[recipe.optimizer.name]
    groups = trainer.optimizer.param_groups
    assert len(groups) == (2 if recipe.optimizer.exclude_from_decay else 1)
    assert groups[0]["weight_decay"] == recipe.optimizer.weight_decay
    trainer.fit()
    steps = RunLog(config.output_dir).records("train")
    assert len(steps) == 2 and all(math.isfinite(step["loss"]) for step in steps)
    # Each step's record holds the rate the schedule set after it: steps 1 and 2 of the recipe's.
    rates = [
        config.optimizer.lr
        * lr_factor(
            config.schedule, step, trainer.steps_per_epoch, trainer.total_steps, config.optimizer.lr
        )
        for step in (1, 2)
    ]
    assert [record["lr"] for record in steps] == pytest.approx(rates)
    evaluation = RunLog(config.output_dir).records("eval")[-1]
    assert 0.0 <= evaluation["student_accuracy"] <= 1.0
    assert ("ema_student_accuracy" in evaluation) == (recipe.ema.decay is not None)
