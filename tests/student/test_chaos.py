"""Chaos: the teacher process is SIGKILLed mid-run and restarted on the same ports.

The student waits it out (`RetryPolicy.patient()`) and finishes exactly the run it would have
trained without the outage: the same steps, the same losses, the same weights, bit for bit.
One uninterrupted reference run over gRPC serves both transports' chaos runs: served logits
do not depend on the protocol, so the HTTP run must match it too.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from student_worker.checkpoint import load_checkpoint
from student_worker.runlog import RunLog
from tests.helpers import BIN, ENV, TeacherProcess, wait_until

pytestmark = pytest.mark.slow

BATCH_SIZE = 16
TOTAL_STEPS = 60
KILL_AFTER_STEP = 4
TIMING_FIELDS = ("images_per_s", "teacher_ms", "data_wait_share")
UNAVAILABLE = "teacher unavailable"
ANSWERED_AGAIN = "teacher answered"


def teacher_process(root: Path, weights: Path) -> TeacherProcess:
    """The one-model teacher the students ask, as a process that can be killed."""
    config = {
        "server": {
            # One request per pass: an answer does not depend on what it was batched with.
            "max_batch_size": BATCH_SIZE,
            "threads_per_replica": 1,
        },
        "models": [
            {
                "name": "small",
                "arch": "kdserve:resnet8",
                "weights": str(weights),
                "num_classes": 10,
                "input_size": 32,
            }
        ],
    }
    return TeacherProcess(root, config)


@pytest.fixture
def teacher(tmp_path: Path, teachers: dict[str, Any]) -> Iterator[TeacherProcess]:
    served = teacher_process(tmp_path, teachers["root"] / "small.safetensors")
    served.start()
    try:
        yield served
    finally:
        served.stop()


@pytest.fixture(scope="module")
def reference_out(tmp_path_factory: pytest.TempPathFactory, teachers: dict[str, Any]) -> Path:
    """The run without an outage, trained over gRPC by a teacher of its own."""
    root = tmp_path_factory.mktemp("reference")
    served = teacher_process(root, teachers["root"] / "small.safetensors")
    served.start()
    try:
        out = root / "reference"
        process, log = start_student(served.url("grpc"), out)
        finish(process, log)
    finally:
        served.stop()
    assert UNAVAILABLE not in log.read_text()
    return out


def start_student(url: str, out: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """A `kdserve-student` KD run of TOTAL_STEPS steps; its stdout and stderr go to a file."""
    log_path = out.with_suffix(".log")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                str(BIN / "kdserve-student"),
                "--teacher",
                url,
                "--teacher-model",
                "small",
                "--loss",
                "kd",
                "--batch-size",
                str(BATCH_SIZE),
                "--max-steps",
                str(TOTAL_STEPS),
                "--threads",
                "1",
                "--device",
                "cpu",
                "--output-dir",
                str(out),
            ],
            env=ENV,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return process, log_path


def finish(process: subprocess.Popen[bytes], log: Path) -> None:
    try:
        returncode = process.wait(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert returncode == 0, log.read_text()


def steps_logged(out: Path) -> list[int]:
    log = RunLog(out)
    return [r["step"] for r in log.records("train")] if log.exists() else []


def comparable(out: Path) -> list[str]:
    """Every record but its timings, as JSON (so a NaN metric equals a NaN metric)."""
    return [
        json.dumps({k: v for k, v in r.items() if k not in TIMING_FIELDS}, sort_keys=True)
        for r in RunLog(out).records()
    ]


def checkpoint_leaves(out: Path) -> dict[str, Any]:
    """The run's final checkpoint (weights, optimizer, scheduler, RNG, config) flattened to
    {path: tensor or value}, less the output directory and the teacher's address, the only
    things two runs may differ in."""
    leaves: dict[str, Any] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{path}/{key}" if path else str(key))
        elif isinstance(node, list | tuple):
            for index, value in enumerate(node):
                walk(value, f"{path}/{index}")
        else:
            leaves[path] = node

    state = load_checkpoint(out)
    del state["config"]["output_dir"]
    del state["config"]["teacher"]["endpoints"]
    walk(state, "")
    return leaves


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_student_outlives_a_killed_teacher_and_trains_the_same_run(
    teacher: TeacherProcess, reference_out: Path, tmp_path: Path, transport: str
) -> None:
    url = teacher.url(transport)
    chaos_out = tmp_path / "chaos"
    student, student_log = start_student(url, chaos_out)
    try:
        wait_until(lambda: KILL_AFTER_STEP in steps_logged(chaos_out), "the first steps", student)
        teacher.kill()
        steps_at_kill = steps_logged(chaos_out)
        wait_until(lambda: UNAVAILABLE in student_log.read_text(), "the student to notice", student)
        steps_at_restart = steps_logged(chaos_out)
        teacher.start()
        finish(student, student_log)
    finally:
        if student.poll() is None:
            student.kill()
            student.wait()

    # Killed and restarted mid-run: the student waited for the teacher and was answered again.
    assert steps_at_kill[-1] < TOTAL_STEPS and steps_at_restart[-1] < TOTAL_STEPS
    output = student_log.read_text()
    assert ANSWERED_AGAIN in output and output.index(UNAVAILABLE) < output.index(ANSWERED_AGAIN)

    assert steps_logged(chaos_out) == list(range(1, TOTAL_STEPS + 1))
    assert steps_logged(chaos_out) == steps_logged(reference_out)
    assert comparable(chaos_out) == comparable(reference_out)
    survived, uninterrupted = checkpoint_leaves(chaos_out), checkpoint_leaves(reference_out)
    assert survived["step"] == uninterrupted["step"] == TOTAL_STEPS
    assert survived.keys() == uninterrupted.keys()
    for path, value in uninterrupted.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(survived[path], value), path
        else:
            assert survived[path] == value, path
