"""Student runs through the real trainer and CLI against a real teacher server on loopback."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from student_worker import losses
from student_worker.checkpoint import CheckpointError, load_checkpoint
from student_worker.config import load_run_config
from student_worker.losses import Hyperparameters, Recipe
from student_worker.objective import ObjectiveWeights
from student_worker.runlog import RunLog
from student_worker.teacher import TeacherUnreachable
from student_worker.trainer import Trainer, TrainingError
from teacher_server.client import TeacherClient
from teacher_server.server.serve import ServerThread
from teacher_server.shared.settings import ConfigError
from tests.helpers import model_stats, refusing_port, running_server, teacher_config, wait_until

pytestmark = pytest.mark.slow


def run_config(server: ServerThread, out: Path, **overrides: Any) -> Any:
    base = {
        "teacher.endpoints": [server.endpoints.grpc_url],
        "teacher.model": "small",
        "batch_size": 32,
        "max_steps": 16,
        "output_dir": str(out),
        "threads": 1,
        "checkpoint_every": 4,
    }
    return load_run_config(None, {**base, **overrides})


def train_losses(out: Path) -> list[float]:
    return [r["loss"] for r in RunLog(out).records("train")]


def test_two_students_train_at_once_on_one_teacher(server: ServerThread, tmp_path: Path) -> None:
    results: dict[str, Any] = {}

    def student(loss: str) -> None:
        trainer = Trainer(
            run_config(server, tmp_path / loss, **{"loss.name": loss, "max_steps": 24})
        )
        results[loss] = trainer.fit()

    threads = [threading.Thread(target=student, args=(loss,)) for loss in ("dkd", "dist")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for loss in ("dkd", "dist"):
        losses = train_losses(tmp_path / loss)
        assert len(losses) == 24
        assert sum(losses[-5:]) < sum(losses[:5]), f"{loss} did not decrease: {losses}"
        metrics = results[loss]
        assert 0.0 <= metrics["agreement"] <= 1.0 and metrics["kl"] >= 0.0
        evaluations = RunLog(tmp_path / loss).records("eval")
        expected = {
            "student_accuracy",
            "teacher_accuracy",
            "ece",
            "nll",
            "train_agreement",
            "train_kl",
        }
        assert evaluations and expected <= set(evaluations[-1])


def test_resume_continues_the_same_loss_curve(teachers: dict[str, Any], tmp_path: Path) -> None:
    """Stopped by SIGTERM part-way, resumed: the remaining steps match an uninterrupted run,
    bit for bit. The teacher computes each request in a pass of its own (max_batch_size is the
    batch size), so its answers do not depend on which requests happened to be batched."""
    with running_server(teacher_config(teachers, max_batch_size=32)) as server:
        Trainer(run_config(server, tmp_path / "whole", **{"loss.name": "dkd"})).fit()
        reference = train_losses(tmp_path / "whole")
        interrupted = Trainer(run_config(server, tmp_path / "cut", **{"loss.name": "dkd"}))

        def stop_after_some_steps() -> None:
            log = RunLog(tmp_path / "cut")
            while not log.exists() or len(log.records("train")) < 6:
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGTERM)

        stopper = threading.Thread(target=stop_after_some_steps)
        stopper.start()
        interrupted.fit()
        stopper.join()
        done = len(train_losses(tmp_path / "cut"))
        assert 6 <= done < 16, "SIGTERM should stop the run part-way"
        Trainer(run_config(server, tmp_path / "cut", **{"loss.name": "dkd"}), resume=True).fit()
        resumed = train_losses(tmp_path / "cut")
        assert len(resumed) == 16
        assert resumed == reference, "resuming on the CPU must be bit-exact"
        with pytest.raises(TrainingError, match="already holds a run; pass --resume"):
            Trainer(run_config(server, tmp_path / "cut", **{"loss.name": "dkd"}))


def test_bad_settings_are_clear_errors(
    server: ServerThread, tmp_path: Path, teachers: dict[str, Any]
) -> None:
    with pytest.raises(TrainingError, match=r"'ghost' is not served .*available: \['pair_logits'"):
        Trainer(run_config(server, tmp_path / "a", **{"teacher.model": "ghost"}))
    with refusing_port() as port, pytest.raises(TeacherUnreachable, match="for their models"):
        started = time.monotonic()
        Trainer(
            run_config(
                server,
                tmp_path / "e",
                **{"teacher.endpoints": [f"grpc://127.0.0.1:{port}"], "teacher.startup_wait_s": 1},
            )
        )
    # retried for most of the second (it gives up when the next backoff would not fit), no longer
    assert 0.25 <= time.monotonic() - started < 10
    five = {
        "server": {"http_port": 0, "grpc_port": 0},
        "models": [
            {
                "name": "five",
                "arch": "kdserve:resnet8",
                "random_init": True,
                "num_classes": 5,
                "input_size": 32,
            }
        ],
    }
    mismatch = "has 5 classes but the data set 'digits' has 10"
    with running_server(five) as other, pytest.raises(TrainingError, match=mismatch):
        Trainer(run_config(other, tmp_path / "d", **{"teacher.model": "five"}))
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        Trainer(run_config(server, tmp_path / "b"), resume=True)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        Trainer(run_config(server, tmp_path / "c"), resume=True)


def student_command(teacher_url: str, out: Path, *extra: str) -> list[str]:
    """kdserve-student's arguments for a KD run of the shared test teacher."""
    return [
        "--teacher",
        teacher_url,
        "--teacher-model",
        "small",
        "--loss",
        "kd",
        "--batch-size",
        "16",
        "--threads",
        "1",
        "--output-dir",
        str(out),
        *extra,
    ]


def test_a_student_started_before_its_teacher_waits_for_it(
    server: ServerThread, teachers: dict[str, Any], tmp_path: Path
) -> None:
    """A student pod scheduled before the teacher's: it waits (teacher.startup_wait_s) and
    trains once the teacher listens; with no teacher at all the CLI exits 69, not 2."""
    with refusing_port() as port:
        pass  # free again: the late teacher listens on it
    config = teacher_config(teachers, grpc_port=port)
    late: dict[str, Any] = {}
    delay_s = 1.5

    def teacher_after_a_while() -> None:
        time.sleep(delay_s)
        with running_server(config) as late["server"]:
            late["stop"].wait(60)

    late["stop"] = threading.Event()
    thread = threading.Thread(target=teacher_after_a_while, daemon=True)
    endpoints = [f"grpc://127.0.0.1:{port}"]
    overrides = {"teacher.endpoints": endpoints, "max_steps": 2}
    started = time.monotonic()
    thread.start()
    try:
        trainer = Trainer(run_config(server, tmp_path / "late", **overrides))
        assert time.monotonic() - started >= delay_s, "built before its teacher listened"
        wait_until(lambda: "server" in late, "the late teacher's ServerThread", timeout_s=30)
        assert model_stats(late["server"])["small"]["requests"].get("ok", 0) == 0
        trainer.fit()
        assert model_stats(late["server"])["small"]["requests"]["ok"] > 0
    finally:
        late["stop"].set()
        thread.join(60)
    with refusing_port() as port:
        gone = kdserve_student(
            "--loss",
            "kd",
            "--teacher",
            f"grpc://127.0.0.1:{port}",
            "--teacher-wait",
            "0.5",
            "--output-dir",
            str(tmp_path / "gone"),
        )
    assert gone.returncode == 69, gone.stderr
    assert "startup_wait_s = 0.5 s" in gone.stderr


def kdserve_student(*arguments: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the installed `kdserve-student` with one thread."""
    return subprocess.run(
        [str(Path(sys.executable).with_name("kdserve-student")), *arguments],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def test_cli_trains_and_exports_a_student_the_server_can_serve(
    server: ServerThread, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    result = kdserve_student(
        *student_command(server.endpoints.http_url, out, "--max-steps", "4"), timeout_s=300
    )
    assert result.returncode == 0, result.stderr
    assert "agreement=" in result.stdout
    weights = tmp_path / "student.safetensors"
    exported = kdserve_student("export", str(out), "--out", str(weights))
    assert exported.returncode == 0, exported.stderr
    reported = kdserve_student("report", str(out))
    assert reported.returncode == 0, reported.stderr
    header, _, row = reported.stdout.splitlines()[:3]
    assert "agreement (%)" in header and row.split()[0] == "run" and row.split()[-1] == "4"
    assert (out / "curves.png").read_bytes().startswith(b"\x89PNG")
    served = {
        "server": {"http_port": 0, "grpc_port": 0},
        "models": [
            {
                "name": "student",
                "arch": "kdserve:resnet8",
                "weights": str(weights),
                "num_classes": 10,
                "input_size": 32,
            }
        ],
    }
    with (
        running_server(served) as chain,
        TeacherClient.connect(chain.endpoints.grpc_url, model="student") as client,
    ):
        assert client.infer(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape == (2, 10)
    bad = kdserve_student("--loss", "kd", "--output-dir", str(tmp_path / "x"))
    assert bad.returncode == 2 and "needs a teacher" in bad.stderr


def test_deit_student_trains_its_distillation_head_and_reports_each_head(
    server: ServerThread, tmp_path: Path
) -> None:
    overrides = {
        "loss.name": "deit",
        "student.arch": "kdserve:deit_nano",
        "max_steps": 3,
        "batch_size": 16,
        "optimizer.name": "adamw",
        "optimizer.lr": 5e-4,
    }
    metrics = Trainer(run_config(server, tmp_path / "deit", **overrides)).fit()
    assert 0.0 <= metrics["class_head_accuracy"] <= 1.0
    assert 0.0 <= metrics["distillation_head_accuracy"] <= 1.0
    assert len(RunLog(tmp_path / "deit").records("train")) == 3


def test_torchrun_trains_one_student_on_two_gloo_ranks(
    server: ServerThread, tmp_path: Path
) -> None:
    """Each rank asks the teacher for its own shard; rank 0 alone logs and checkpoints."""
    bin_dir = Path(sys.executable).parent
    out = tmp_path / "ddp"

    def torchrun(*extra: str) -> None:
        result = subprocess.run(
            [
                str(bin_dir / "torchrun"),
                "--standalone",
                "--nproc-per-node",
                "2",
                "--no-python",
                str(bin_dir / "kdserve-student"),
                *student_command(server.endpoints.grpc_url, out, *extra),
            ],
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]

    before = model_stats(server)["small"]["images"]
    torchrun("--max-steps", "4")
    records = RunLog(out).records()
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    assert [r["kind"] for r in records].count("eval") == 1
    served = model_stats(server)["small"]["images"] - before
    eval_images = 360 + 512  # the held-out digits and the training probe, asked by rank 0 once
    assert served == 2 * 4 * 16 + eval_images, "each rank fetches its own soft targets, no more"
    torchrun("--max-steps", "6", "--resume")
    steps = [r["step"] for r in RunLog(out).records("train")]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert load_checkpoint(out)["step"] == 6


def test_bfloat16_autocast_and_grad_clip_train_on_the_cpu(
    server: ServerThread, tmp_path: Path
) -> None:
    overrides = {"loss.name": "kd", "amp": "bfloat16", "grad_clip": 1.0, "max_steps": 12}
    trainer = Trainer(run_config(server, tmp_path / "bf16", **overrides))
    assert trainer.amp_dtype == torch.bfloat16 and not trainer.scaler.is_enabled()
    trainer.fit()
    losses = train_losses(tmp_path / "bf16")
    assert all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-4:]) < sum(losses[:4])
    assert Trainer(run_config(server, tmp_path / "auto")).amp_dtype is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_asking_for_cuda_without_one_is_a_clear_error(server: ServerThread, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="device 'cuda' was asked for but torch sees no CUDA"):
        Trainer(run_config(server, tmp_path / "gpu", device="cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_float16_autocast_with_a_grad_scaler_on_cuda(server: ServerThread, tmp_path: Path) -> None:
    trainer = Trainer(run_config(server, tmp_path / "cuda", **{"loss.name": "dkd"}))
    assert trainer.device.type == "cuda" and trainer.amp_dtype == torch.float16
    assert trainer.scaler.is_enabled()
    trainer.fit()
    losses = train_losses(tmp_path / "cuda")
    assert all(math.isfinite(loss) for loss in losses)
    assert "scaler" in load_checkpoint(tmp_path / "cuda")


def test_eval_every_evaluates_mid_epoch_and_once_at_the_end(
    server: ServerThread, tmp_path: Path
) -> None:
    overrides = {"loss.name": "ce", "max_steps": 10, "eval_every": 4, "batch_size": 16}
    Trainer(run_config(server, tmp_path / "ce", **overrides)).fit()
    evaluations = RunLog(tmp_path / "ce").records("eval")
    assert [r["step"] for r in evaluations] == [4, 8, 10]
    assert "teacher_accuracy" not in evaluations[-1]


def test_resume_forgets_steps_logged_after_the_checkpoint(
    server: ServerThread, tmp_path: Path
) -> None:
    """A run killed between checkpoints logged steps it will train again: they go."""
    out = tmp_path / "killed"
    Trainer(run_config(server, out, **{"loss.name": "ce", "max_steps": 6})).fit()
    for step in (7, 8, 9):
        RunLog(out).append({"kind": "train", "step": step, "epoch": 1, "loss": 9.0})
    Trainer(run_config(server, out, **{"loss.name": "ce", "max_steps": 8}), resume=True).fit()
    steps = [r["step"] for r in RunLog(out).records("train")]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]
    assert 9.0 not in train_losses(out)


class Scale(Hyperparameters):
    scale: float = Field(gt=0.0)


def squared_logit_gap(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, *, params: Scale
) -> Tensor:
    """A throwaway loss: the mean squared gap between the two logits, scaled."""
    return params.scale * F.mse_loss(student_logits.float(), teacher_logits.float())


def test_a_loss_is_one_registration_and_trains_by_name(
    server: ServerThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new loss needs no edit elsewhere: registered, it is validated, trained and logged."""
    monkeypatch.setattr(losses, "_REGISTRY", dict(losses._REGISTRY))
    weights = ObjectiveWeights(ce_weight=0.5, kd_weight=1.0, warmup_epochs=0, label_smoothing=0.0)
    losses.register("logit_gap", Scale, small_images=Recipe(weights, Scale(scale=1.0)))(
        squared_logit_gap
    )
    assert "logit_gap" in losses.names()
    with pytest.raises(ConfigError, match="scale"):
        run_config(
            server,
            tmp_path / "bad",
            **{"loss.name": "logit_gap", "loss.hyperparameters": {"scale": -1.0}},
        )
    overrides = {"loss.name": "logit_gap", "loss.hyperparameters": {"scale": 2.0}, "max_steps": 1}
    trainer = Trainer(run_config(server, tmp_path / "gap", **overrides))
    assert trainer.teacher is not None
    trainer.fit()
    [step] = RunLog(tmp_path / "gap").records("train")
    assert step["distill"] > 0 and step["loss"] == pytest.approx(
        0.5 * step["ce"] + 1.0 * step["distill"], rel=1e-5
    )


def test_a_student_stopped_by_sigterm_says_so_and_exits_143(
    server: ServerThread, tmp_path: Path
) -> None:
    """A stopped run is not a finished one: 128 + SIGTERM, so a sweep or a Job resumes it."""
    out = tmp_path / "run"
    student = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("kdserve-student")),
            *student_command(server.endpoints.grpc_url, out, "--max-steps", "100000"),
        ],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        log = RunLog(out)
        deadline = time.monotonic() + 120
        while not (log.exists() and log.records("train")):
            assert student.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        student.send_signal(signal.SIGTERM)
        _, stderr = student.communicate(timeout=60)
    finally:
        if student.poll() is None:
            student.kill()
    assert student.returncode == 143, stderr[-2000:]
    assert "stopped by SIGTERM at step" in stderr and "--auto-resume" in stderr
    assert load_checkpoint(out)["step"] == RunLog(out).records("train")[-1]["step"]
