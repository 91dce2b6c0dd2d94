"""Teaching modes: what the teacher is shown, per mode, through real training runs."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from student_worker.augment import student_input
from student_worker.config import load_run_config
from student_worker.data import build_datasets
from student_worker.teaching import CHECK_IMAGES
from student_worker.trainer import Step, Trainer, TrainingError
from student_worker.views import TrainViews, ViewKey, eval_view
from teacher_server.server.serve import ServerThread
from teacher_server.shared.contract import Mix
from teacher_server.shared.settings import ConfigError
from tests.helpers import model_stats
from tests.student.recording import record_steps, record_training_inputs

pytestmark = pytest.mark.slow
UNUSED_ENDPOINT = "grpc://127.0.0.1:9"  # the recording teacher stands in for it


class RecordingTeacher:
    """An in-process teacher that keeps every (tag, view, mix) it is asked about."""

    model = "recorder"

    def __init__(self, teacher: dict[str, Any]) -> None:
        self.module = teacher["module"].eval()
        self.size = teacher["size"]
        self.mean, self.std = torch.tensor(teacher["mean"]), torch.tensor(teacher["std"])
        self.asked: list[tuple[str, torch.Tensor, Mix | None]] = []
        self.round_trip_s = 0.0
        self.trainer: Trainer | None = None
        self.student_inputs: list[torch.Tensor] = []

    @torch.no_grad()
    def logits(self, tag: str, view: torch.Tensor, mix: Mix | None) -> torch.Tensor:
        self.asked.append((tag, view.clone(), mix))
        answer: torch.Tensor = self.module(student_input(view, mix, self.size, self.mean, self.std))
        return answer


def teaching_run(
    teachers: dict[str, Any], out: Path, monkeypatch: pytest.MonkeyPatch, **overrides: Any
) -> tuple[RecordingTeacher, list[tuple[Step, torch.Tensor | None]]]:
    """Train with a recording teacher; the teacher's requests and the steps as trained."""
    config = load_run_config(
        None,
        {
            "teacher.endpoints": [UNUSED_ENDPOINT],
            "batch_size": 128,
            "max_steps": 4,
            "threads": 1,
            "output_dir": str(out),
            **overrides,
        },
    )
    teacher = RecordingTeacher(teachers["small"])
    trained = record_steps(monkeypatch)
    trainer = Trainer(config, teacher=teacher)
    teacher.trainer = trainer
    teacher.student_inputs = record_training_inputs(trainer)
    trainer.fit()
    return teacher, trained


def assert_the_teacher_saw_the_students_own_pixels(
    teacher: RecordingTeacher, trained: list[tuple[Step, torch.Tensor | None]]
) -> None:
    """Each step's teacher view is the crop of (seed, rank, step, position) cut afresh from
    the original images, and the student trained on exactly that view, mixed the same way."""
    trainer = teacher.trainer
    assert trainer is not None
    views = TrainViews(
        trainer.train_set,
        trainer.augment.crop_settings,
        seed=trainer.config.seed,
        rank=0,
        pixels=trainer.augment.pixels,
    )
    student = trainer.config.student
    mean, std = torch.tensor(student.mean), torch.tensor(student.std)
    asked = step_requests(teacher)
    assert len(asked) == len(trained) == len(teacher.student_inputs) == 4
    for (tag, view, mix), (step, _), trained_on in zip(
        asked, trained, teacher.student_inputs, strict=True
    ):
        assert tag == f"step-{step.index}"
        cut = torch.stack(
            [
                views[ViewKey(step.index, position, int(sample_id))][0]
                for position, sample_id in enumerate(step.sample_ids)
            ]
        )
        assert torch.equal(view, cut), f"{tag}: not the crop keyed by (seed, rank, step)"
        size = tuple(trained_on.shape[-2:])
        assert torch.equal(trained_on, student_input(view, mix, size, mean, std)), tag


def step_requests(teacher: RecordingTeacher) -> list[tuple[str, torch.Tensor, Mix | None]]:
    return [asked for asked in teacher.asked if asked[0].startswith("step-")]


def test_consistent_shows_the_teacher_the_students_view(
    teachers: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    teacher, trained = teaching_run(
        teachers, tmp_path, monkeypatch, **{"augment.mixup_alpha": 0.5, "augment.mix_prob": 0.5}
    )
    assert_the_teacher_saw_the_students_own_pixels(teacher, trained)
    assert {mix is None for _, _, mix in step_requests(teacher)} == {True, False}


def test_function_matching_mixes_every_batch(
    teachers: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    teacher, trained = teaching_run(
        teachers, tmp_path, monkeypatch, **{"teaching.mode": "function_matching"}
    )
    assert_the_teacher_saw_the_students_own_pixels(teacher, trained)
    lams = set()
    for _, _, mix in step_requests(teacher):
        assert mix is not None and mix.mode == "mixup"
        lams.add(mix.lam)
    assert len(lams) == 4, "lam ~ Beta(1, 1), drawn per step"


def test_independent_gives_the_teacher_a_crop_of_its_own(
    teachers: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    teacher, trained = teaching_run(
        teachers,
        tmp_path,
        monkeypatch,
        **{"teaching.mode": "independent", "augment.crop_scale": [0.2, 0.5]},
    )
    asked = step_requests(teacher)
    assert len(asked) == len(trained) == 4
    for (_, view, mix), (step, _) in zip(asked, trained, strict=True):
        assert view.shape == step.batch.view.shape and mix == step.batch.mix
        assert step.batch.teacher_view is not None and torch.equal(view, step.batch.teacher_view)
        differs = (view != step.batch.view).flatten(1).any(1)
        assert bool(differs.all()), "every image gets two independent crops"


def test_fixed_asks_the_teacher_once_per_image_and_keeps_the_answers(
    teachers: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    train_set, _, _ = build_datasets("digits")
    steps = 2 * (len(train_set) // 128)  # two epochs
    fixed = {"teaching.mode": "fixed", "max_steps": steps}
    teacher, trained = teaching_run(teachers, tmp_path / "first", monkeypatch, **fixed)
    asked = [asked for asked in teacher.asked if asked[0].startswith("fixed-")]
    assert not step_requests(teacher), "no teacher request per step"
    assert sum(len(view) for _, view, _ in asked) == len(train_set)
    assert all(mix is None for _, _, mix in asked)
    assert len(trained) == steps
    # Each step trains on random crops against the kept answers about each image's fixed view.
    step, logits = trained[-1]
    assert logits is not None
    sample = int(step.sample_ids[5])
    centre = eval_view(train_set[sample][0], 32, 1.0).unsqueeze(0)
    expected = teacher.module(student_input(centre, None, (32, 32), teacher.mean, teacher.std))
    torch.testing.assert_close(logits[5], expected[0].detach(), rtol=1e-4, atol=1e-4)
    assert not torch.equal(step.batch.view[5], centre[0])

    cache = tmp_path / "first" / "fixed_teacher.safetensors"
    again, _ = teaching_run(
        teachers, tmp_path / "second", monkeypatch, **fixed, **{"teaching.cache": str(cache)}
    )
    rechecked = [(tag, len(view)) for tag, view, _ in again.asked if tag.startswith("fixed-")]
    assert rechecked == [("fixed-check", CHECK_IMAGES)], "a few kept answers asked again"
    assert not step_requests(again)

    # The same name, other weights (a retrained teacher): its kept answers are refused.
    retrained = copy.deepcopy(teachers["small"]["module"])
    with torch.no_grad():
        next(
            module for module in retrained.modules() if isinstance(module, torch.nn.Linear)
        ).bias.add_(1.0)
    with pytest.raises(TrainingError, match="the teacher changed"):
        teaching_run(
            {"small": {**teachers["small"], "module": retrained}},
            tmp_path / "retrained",
            monkeypatch,
            **fixed,
            **{"teaching.cache": str(cache)},
        )

    mismatch = "computed for fixed_view 'center_crop', but this run has fixed_view 'resize'"
    with pytest.raises(TrainingError, match=mismatch):
        teaching_run(
            teachers,
            tmp_path / "third",
            monkeypatch,
            **fixed,
            **{"teaching.cache": str(cache), "teaching.fixed_view": "resize"},
        )
    with pytest.raises(TrainingError, match="computed for image_digest"):
        teaching_run(
            teachers,
            tmp_path / "fourth",
            monkeypatch,
            **fixed,
            **{"teaching.cache": str(cache), "data.image_size": 24},
        )


def test_fixed_with_a_served_teacher_computes_each_image_once(
    server: ServerThread, tmp_path: Path
) -> None:
    train_set, eval_set, _ = build_datasets("digits")
    config = load_run_config(
        None,
        {
            "teacher.endpoints": [server.endpoints.grpc_url],
            "teacher.model": "small",
            "teaching": "fixed",
            "batch_size": 128,
            "epochs": 2,
            "threads": 1,
            "output_dir": str(tmp_path),
        },
    )
    before = model_stats(server)["small"]["images"]
    Trainer(config).fit()
    served = model_stats(server)["small"]["images"] - before
    # The fixed views once, then the evaluation split and the training probe once each.
    assert served == len(train_set) + len(eval_set) + 512


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"augment.crop_scale": [0.0, 1.0]}, r"augment.crop_scale must be .* got \[0.0, 1.0\]"),
        ({"augment.crop_scale": [0.5, 1.2]}, r"got \[0.5, 1.2\]"),
        ({"augment.crop_ratio": [1.5, 1.0]}, r"augment.crop_ratio must be"),
        ({"teaching.mode": "fixed", "augment.mixup_alpha": 0.2}, "augment.mixup_alpha"),
        ({"teaching.cache": "x.safetensors"}, "teaching.cache is for teaching 'fixed'"),
        ({"teaching.mode": "funmatch"}, "teaching.mode"),
        (
            {"teaching.mode": "function_matching", "augment.cutmix_alpha": 1.0},
            "set augment.cutmix_alpha to 0",
        ),
        ({"teaching.mode": "fixed", "loss.name": "ce"}, "needs a distillation loss"),
        ({"data.crop_pct": 1.5}, "data.crop_pct"),
    ],
)
def test_bad_teaching_and_crop_settings_name_the_field(
    overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_run_config(None, {"teacher.endpoints": [UNUSED_ENDPOINT], **overrides})


def test_teaching_is_a_name_or_a_mapping(tmp_path: Path) -> None:
    config_file = tmp_path / "student.yaml"
    config_file.write_text(f"teaching: fixed\nteacher:\n  endpoints: [{UNUSED_ENDPOINT}]\n")
    assert load_run_config(config_file).teaching.mode == "fixed"
    overridden = load_run_config(
        config_file, {"teaching.mode": "independent", "augment.mix_prob": 0.5}
    )
    assert overridden.teaching.mode == "independent"
    assert overridden.augment_settings(32).mix_prob == 0.5, "only function_matching forces it"
    matching = load_run_config(config_file, {"teaching.mode": "function_matching"})
    settings = matching.augment_settings(32)
    assert (settings.mixup_alpha, settings.mix_prob) == (1.0, 1.0)
