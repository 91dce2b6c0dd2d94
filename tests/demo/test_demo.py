"""`kdserve-demo` as a newcomer runs it: real processes, a real table, nothing left behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from student_worker import losses
from student_worker.checkpoint import load_checkpoint
from student_worker.data import build_datasets
from student_worker.demo import recipes
from student_worker.runlog import RunLog
from tests.demo.conftest import TEACHER_EPOCHS, copy_teacher

pytestmark = pytest.mark.slow

DEMO = str(Path(sys.executable).with_name("kdserve-demo"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
QUICK = ["--steps", "6", "--eval-every", "3", "--teacher-epochs", TEACHER_EPOCHS]


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention `text` (the run directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = next(
                line
                for line in (entry / "status").read_text().splitlines()
                if line.startswith("State:")
            )
        except (OSError, StopIteration):
            continue
        if text in command and "zombie" not in state:
            found.append(command)
    return found


def is_listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def assert_all_stopped(run_dir: Path) -> None:
    deadline = time.monotonic() + 10
    while processes_mentioning(str(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not processes_mentioning(str(run_dir))
    ports = json.loads((run_dir / "ports.json").read_text())
    assert not is_listening(ports["http_port"]) and not is_listening(ports["grpc_port"])


@pytest.fixture(scope="module")
def demo_run(
    tmp_path_factory: pytest.TempPathFactory, quick_teacher: Path
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """The demo with QUICK settings, its teacher (trained by `kdserve-demo teacher`) cached."""
    run_dir = tmp_path_factory.mktemp("demo") / "run"
    copy_teacher(quick_teacher, run_dir)
    result = subprocess.run(
        [DEMO, "--run-dir", str(run_dir), *QUICK],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=400,
    )
    return run_dir, result


def test_the_demo_trains_serves_and_distills_every_loss(
    demo_run: tuple[Path, subprocess.CompletedProcess[str]], quick_teacher: Path
) -> None:
    run_dir, result = demo_run
    assert result.returncode == 0, result.stderr[-4000:]
    out = result.stdout
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("run "))
    heading = lines[header - 1]
    assert heading.startswith("kdserve demo:") and "(seed 0)" in heading
    assert "labels on 10% of the 1437 training images" in heading
    assert ", ".join(losses.names()) == "ce, deit, dist, dkd, kd"  # one student per loss
    students = "ce, ce-vit, deit, dist, dkd, kd"  # and a CE baseline per architecture
    assert f"6 steps of 64 per student ({students}; ce-vit is CE on the ViT" in heading
    assert "0.3 epochs" in heading
    assert lines[header].split()[-4:] == ["CE,", "same", "arch", "(pts)"]
    rows = {line.split()[0]: line.split() for line in lines[header + 2 : header + 8]}
    assert set(rows) == {"ce", "ce-vit", "kd", "dkd", "dist", "deit"}
    for loss, cells in rows.items():
        assert cells[-2] == "6", f"{loss} should have trained 6 steps: {cells}"
        student_accuracy = float(cells[1])
        assert 0.0 <= student_accuracy <= 100.0
    assert rows["ce"][2] == "-" and rows["kd"][2] != "-"  # teacher accuracy: distilled only
    # Each distilled row's gain is over the CE student of its own architecture.
    accuracy = {name: float(cells[1]) for name, cells in rows.items()}
    assert float(rows["deit"][-1]) == pytest.approx(accuracy["deit"] - accuracy["ce-vit"], abs=0.02)
    assert float(rows["kd"][-1]) == pytest.approx(accuracy["kd"] - accuracy["ce"], abs=0.02)
    assert rows["ce"][-1] == rows["ce-vit"][-1] == "-"
    assert "mean batch" in out and "forward passes" in out
    assert (run_dir / "curves.png").read_bytes().startswith(b"\x89PNG")
    # the weights `kdserve-demo teacher` trained (the quick_teacher fixture) were reused as
    # they were: not trained again, not rewritten
    assert "teacher: cached weights" in out
    weights = run_dir / "teacher" / "resnet20.safetensors"
    assert weights.read_bytes() == (quick_teacher / "resnet20.safetensors").read_bytes()
    assert weights.stat().st_mtime_ns == (quick_teacher / "resnet20.safetensors").stat().st_mtime_ns
    assert (run_dir / "students" / "kd" / "checkpoint.pt").is_file()
    assert_all_stopped(run_dir)


def test_ctrl_c_stops_every_process_and_frees_the_ports(
    demo_run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    run_dir, first = demo_run
    assert first.returncode == 0, first.stderr[-4000:]
    demo = subprocess.Popen(
        [
            DEMO,
            "--run-dir",
            str(run_dir),
            *QUICK,
            "--steps",
            "100000",
            "--losses",
            "kd",
            "--full-labels",
        ],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A shell's background job (`make test &`) ignores SIGINT, and children inherit it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert demo.stdout is not None
    before_students = []
    for line in demo.stdout:
        before_students.append(line)
        if line.startswith("students:"):
            break
    assert any(line.startswith("teacher: cached weights") for line in before_students)
    assert any(
        "students with every label of the 1437 training images" in line for line in before_students
    )
    assert not (run_dir / "students" / "ce").exists(), "a new run starts from no students"
    metrics = [RunLog(run_dir / "students" / "kd")]
    while not all(log.exists() for log in metrics):
        assert demo.poll() is None, demo.communicate()[1]
        time.sleep(0.2)
    demo.send_signal(signal.SIGINT)
    _, stderr = demo.communicate(timeout=60)
    assert demo.returncode == 130, stderr
    assert "interrupted; stopping" in stderr
    assert_all_stopped(run_dir)
    for loss, log in zip(("kd",), metrics, strict=True):
        steps = [record["step"] for record in log.records()]
        checkpoint = load_checkpoint(run_dir / "students" / loss)
        assert checkpoint["step"] == steps[-1], f"{loss}: SIGTERM checkpoints the last step"


def test_the_teaching_demo_runs_the_four_modes_side_by_side(
    demo_run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    run_dir, first = demo_run
    assert first.returncode == 0, first.stderr[-4000:]
    result = subprocess.run(
        [DEMO, "--run-dir", str(run_dir), *QUICK, "--teaching"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("run "))
    heading = lines[header - 1]
    assert heading.startswith("kdserve demo, teaching modes (FunMatch)")
    assert "without labels, crops of 25-100% of each image" in heading
    modes = ("consistent", "function_matching", "fixed", "independent")
    rows = {line.split()[0]: line.split() for line in lines[header + 2 : header + 6]}
    assert set(rows) == set(modes)
    for cells in rows.values():
        assert 0.0 <= float(cells[3]) <= 100.0  # agreement
    for mode in modes:
        config = (run_dir / "students" / f"{mode}.yaml").read_text()
        assert f"teaching: {mode}" in config and "ce_weight: 0.0" in config
    assert (run_dir / "students" / "fixed" / "fixed_teacher.safetensors").is_file()
    assert not (run_dir / "students" / "consistent" / "fixed_teacher.safetensors").exists()
    assert_all_stopped(run_dir)


def test_the_title_counts_the_real_training_split() -> None:
    assert len(build_datasets("digits")[0]) == recipes.DIGITS_TRAIN_IMAGES


def test_bad_arguments_exit_2() -> None:
    bad = subprocess.run(
        [DEMO, "--losses", "kd,fitnets"], env=ENV, capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and "fitnets" in bad.stderr
