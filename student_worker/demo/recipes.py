"""What the demo trains: the digits teacher(s), the teacher server's config, one student per loss.

Every file here is an ordinary config of `kdserve-student` or `kdserve-teacher`, written into
the run directory, so each step of the demo can be rerun by hand from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from student_worker import losses
from teacher_server.shared.views import IMAGENET_MEAN, IMAGENET_STD

LOSSES = tuple(losses.names())
"""One student per registered loss."""
IMAGE_SIZE = 32
DIGITS_TRAIN_IMAGES = 1437  # scikit-learn's 1,797 digits less the 20% held out
BATCH_SIZE = 64
SGD_LR = 0.05
SGD_LR_BY_LOSS = {"dist": 0.02}
"""DIST's loss is tau^2 * (beta + gamma) = 64 times its correlation gaps at the CIFAR defaults;
at the others' rate it overshoots (measured on this demo: 34% at 0.1, 91% at 0.05, 96% at 0.02)."""
# Digits must not be mirrored (a flipped 2 is no 2); a gentle crop keeps the stroke in view.
AUGMENT = {"flip": False, "crop_scale": [0.6, 1.0]}


@dataclass(frozen=True)
class Member:
    """One teacher network: its served name and its architecture."""

    name: str
    arch: str


SINGLE = (Member("resnet20", "kdserve:resnet20"),)
ENSEMBLE = (*SINGLE, Member("wrn_16_1", "kdserve:wrn_16_1"))
ENSEMBLE_NAME = "digits-ensemble"


def served_name(members: tuple[Member, ...]) -> str:
    """The model or ensemble the students learn from."""
    return members[0].name if len(members) == 1 else ENSEMBLE_NAME


def teacher_run_config(member: Member, *, epochs: int, seed: int, threads: int) -> dict[str, Any]:
    """A teacher is a CE run on every label of the digits training split."""
    return {
        "data": {"name": "digits", "image_size": IMAGE_SIZE, "labeled_fraction": 1.0},
        "augment": AUGMENT,
        "loss": {"name": "ce"},
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
        "schedule": {"name": "cosine"},
        "student": {"arch": member.arch},
        "epochs": epochs,
        "batch_size": BATCH_SIZE,
        "seed": seed,
        "threads": threads,
        "checkpoint_every": 10**6,
    }


def server_config(members: tuple[Member, ...]) -> dict[str, Any]:
    """The teacher server on loopback (any free ports), one thread: the students have the rest."""
    config: dict[str, Any] = {
        "server": {
            "host": "127.0.0.1",
            "http_port": 0,
            "grpc_port": 0,
            "threads_per_replica": 1,
        },
        "models": [
            {
                "name": member.name,
                "arch": member.arch,
                "weights": f"{member.name}.safetensors",
                "num_classes": 10,
                "input_size": IMAGE_SIZE,
                "mean": list(IMAGENET_MEAN),
                "std": list(IMAGENET_STD),
            }
            for member in members
        ],
    }
    if len(members) > 1:
        config["ensembles"] = [
            {
                "name": ENSEMBLE_NAME,
                "members": [member.name for member in members],
                "combine": "mean_probs",
            }
        ]
    return config


STUDENT_ARCH = "kdserve:resnet8"
VIT_ARCH = "kdserve:deit_nano"
TEACHING_MODES = ("consistent", "function_matching", "fixed", "independent")
TEACHING_CROP_SCALE = [0.25, 1.0]
"""The teaching demo's crops: small enough that what the teacher sees matters (FunMatch uses
the inception crop, 8-100%; on 8x8 digits upsampled to 32 px, 25% still shows a stroke)."""


@dataclass(frozen=True)
class StudentRun:
    """One demo student: its loss, architecture and teaching mode (and so its run name)."""

    name: str
    loss: str
    arch: str
    teaching: str = "consistent"
    labels: bool = True


def loss_runs(chosen_losses: list[str]) -> list[StudentRun]:
    """One student per loss (`deit` on the ViT, the rest on resnet8) and, with `ce`, a CE
    baseline for each architecture present, so every row has its own arch's baseline."""
    runs = [
        StudentRun(loss, loss, VIT_ARCH if loss == "deit" else STUDENT_ARCH)
        for loss in chosen_losses
    ]
    if "ce" in chosen_losses and any(run.arch == VIT_ARCH for run in runs):
        index = chosen_losses.index("ce") + 1
        runs.insert(index, StudentRun("ce-vit", "ce", VIT_ARCH))
    return runs


def teaching_runs() -> list[StudentRun]:
    """FunMatch's comparison: one KD student per teaching mode, without labels."""
    return [
        StudentRun(mode, "kd", STUDENT_ARCH, teaching=mode, labels=False) for mode in TEACHING_MODES
    ]


def baseline_of(runs: list[StudentRun]) -> dict[str, str]:
    """Each distilling run's CE baseline of the same architecture, where the demo has one."""
    baselines = {run.arch: run.name for run in runs if run.loss == "ce"}
    return {
        run.name: baselines[run.arch] for run in runs if run.loss != "ce" and run.arch in baselines
    }


def student_run_config(
    run: StudentRun,
    *,
    teacher_url: str | None,
    teacher_model: str,
    steps: int,
    eval_every: int,
    labeled_fraction: float,
    seed: int,
) -> dict[str, Any]:
    """One student: the same views, steps and seed for all; a ViT gets DeiT's AdamW."""
    vit = run.arch == VIT_ARCH
    augment: dict[str, Any] = {**AUGMENT, "mixup_alpha": 0.2}
    if run.teaching != "consistent" or not run.labels:
        augment = {**AUGMENT, "crop_scale": TEACHING_CROP_SCALE}
    config: dict[str, Any] = {
        "data": {"name": "digits", "image_size": IMAGE_SIZE, "labeled_fraction": labeled_fraction},
        "augment": augment,
        "teaching": run.teaching,
        "loss": {"name": run.loss},
        "optimizer": (
            {"name": "adamw", "lr": 5e-4, "weight_decay": 0.05}
            if vit
            else {
                "name": "sgd",
                "lr": SGD_LR_BY_LOSS.get(run.loss, SGD_LR),
                "momentum": 0.9,
                "weight_decay": 5e-4,
            }
        ),
        "schedule": {"name": "cosine", "warmup_epochs": 1.0 if vit else 0.0},
        "student": {"arch": run.arch},
        "max_steps": steps,
        "eval_every": eval_every,
        "batch_size": BATCH_SIZE,
        "seed": seed,
        "threads": 1,
        "checkpoint_every": 100,
    }
    if not run.labels:
        # FunMatch distills without labels: the teacher's answers are the only target.
        config["loss"].update(ce_weight=0.0, kd_weight=1.0)
    if run.loss == "dkd":
        # mdistiller ramps DKD over 20 of 240 epochs; the demo is a dozen epochs long.
        config["loss"]["warmup_epochs"] = 1
    if losses.get(run.loss).needs_teacher and teacher_url is not None:
        config["teacher"] = {"endpoints": [teacher_url], "model": teacher_model}
    return config


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
