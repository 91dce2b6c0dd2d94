"""A student on an ImageFolder of JPEGs of many sizes: views cut in worker processes, at
the teacher's resolution when it is higher than the student's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from student_worker.augment import student_input
from student_worker.config import available_cores, load_run_config
from student_worker.runlog import RunLog
from student_worker.trainer import Trainer
from student_worker.views import CropSettings, TrainViews, ViewKey
from teacher_server.server.serve import ServerThread
from tests.student.recording import record_steps, record_training_inputs

pytestmark = pytest.mark.slow


def photo_folder(root: Path, count: int, seed: int, classes: int = 2) -> Path:
    """JPEGs of assorted sizes in `classes` classes, smooth like photographs plus noise."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        height, width = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        y, x = np.mgrid[0:height, 0:width]
        label = index % classes
        base = np.stack([x * (3 + 3 * label), y * 4, (x + y) * 2], axis=-1) % 256
        pixels = (base + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)
        name = ("ramps", "stripes")[label] if classes == 2 else f"class_{label}"
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{index}.jpg", quality=90)
    return root


def test_workers_change_nothing_and_eval_views_are_centre_crops(tmp_path: Path) -> None:
    train = photo_folder(tmp_path / "train", 48, seed=0)
    val = photo_folder(tmp_path / "val", 12, seed=1)

    def run(workers: int) -> list[float]:
        out = tmp_path / f"workers-{workers}"
        config = load_run_config(
            None,
            {
                "data.name": "imagefolder",
                "data.root": str(train),
                "data.eval_root": str(val),
                "data.image_size": 24,
                "data.workers": workers,
                "augment.crop_scale": [0.08, 1.0],
                "loss.name": "ce",
                "batch_size": 8,
                "epochs": 2,
                "threads": 1,
                "output_dir": str(out),
            },
        )
        trainer = Trainer(config)
        assert config.data.eval_crop_pct == 0.875
        unset = load_run_config(None, {"data.name": "imagefolder", "loss.name": "ce"})
        assert unset.data.loader_workers == max(1, min(4, available_cores() - 1))
        assert load_run_config(None, {"loss.name": "ce"}).data.loader_workers == 0
        metrics = trainer.fit()
        assert metrics["samples"] == 12
        records = RunLog(out).records("train")
        assert len(records) == 12 and all(0 <= r["data_wait_share"] <= 1 for r in records)
        return [r["loss"] for r in records]

    assert run(0) == run(2)


def test_a_student_below_the_teachers_resolution_learns_from_crops_at_the_teachers(
    server: ServerThread,
    teachers: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 16 px student of a 32 px served teacher: each crop is cut from the original JPEG
    at 32 px (FunMatch's one crop, resized per model), the teacher answers on that view, and
    the student downsamples the same view, mixed the same way, for itself."""
    train = photo_folder(tmp_path / "train", 40, seed=2, classes=10)  # the teacher's 10
    val = photo_folder(tmp_path / "val", 10, seed=3, classes=10)
    config = load_run_config(
        None,
        {
            "data.name": "imagefolder",
            "data.root": str(train),
            "data.eval_root": str(val),
            "data.image_size": 16,
            "data.workers": 0,
            "augment.crop_scale": [0.08, 1.0],
            "augment.mixup_alpha": 0.4,
            "augment.mix_prob": 1.0,
            "teacher.endpoints": [server.endpoints.grpc_url],
            "teacher.model": "small",
            "loss.name": "kd",
            "batch_size": 8,
            "max_steps": 2,
            "threads": 1,
            "output_dir": str(tmp_path / "run"),
        },
    )
    trained = record_steps(monkeypatch)
    trainer = Trainer(config)
    assert trainer.view_size == 32, "the view is cut at the larger of the two resolutions"
    student_inputs = record_training_inputs(trainer)
    trainer.fit()
    originals = TrainViews(
        trainer.train_set, CropSettings(32, scale=(0.08, 1.0)), seed=config.seed, rank=0
    )
    teacher = teachers["small"]
    teacher_mean, teacher_std = torch.tensor(teacher["mean"]), torch.tensor(teacher["std"])
    mean, std = torch.tensor(config.student.mean), torch.tensor(config.student.std)
    assert len(trained) == len(student_inputs) == 2
    for (step, logits), student_in in zip(trained, student_inputs, strict=True):
        view, mix = step.batch.view, step.batch.mix
        assert mix is not None and tuple(view.shape[-2:]) == (32, 32)
        cut = torch.stack(
            [
                originals[ViewKey(step.index, position, int(sample_id))][0]
                for position, sample_id in enumerate(step.sample_ids)
            ]
        )
        assert torch.equal(view, cut), "cut at 32 px from the original, not upsampled"
        assert torch.equal(student_in, student_input(view, mix, (16, 16), mean, std))
        with torch.no_grad():
            expected = teacher["module"](
                student_input(view, mix, (32, 32), teacher_mean, teacher_std)
            )
        assert logits is not None
        torch.testing.assert_close(logits.float(), expected, rtol=1e-2, atol=1e-2)
