"""`kdserve-sweep`: the plan (grid, list, names, validation), dry runs, and a real sweep of
students against the shared teacher, stopped by SIGTERM and resumed."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from student_worker.config import load_run_config
from student_worker.runlog import RunLog
from student_worker.sweep import DONE, RUN_LOG, config_digest, main, swept_cells, teacher_token
from student_worker.sweep_plan import MAX_NAME, config_text, load_sweep, run_name
from teacher_server.server.serve import ServerThread
from tests.helpers import wait_until

TEACHER = "grpc://127.0.0.1:50051"
"""The teacher of the plans that are validated only, never run."""
BASE = {"teacher": {"model": "small"}, "batch_size": 32, "max_steps": 8, "threads": 1}
GRID = {"loss.name": ["kd", "dkd"], "optimizer.lr": [0.05, 0.1]}
GRID_NAMES = [
    "loss.name=kd,optimizer.lr=0.05",
    "loss.name=kd,optimizer.lr=0.1",
    "loss.name=dkd,optimizer.lr=0.05",
    "loss.name=dkd,optimizer.lr=0.1",
]


def write_sweep(root: Path, base: dict[str, Any] = BASE, **fields: Any) -> Path:
    """A sweep file over `student.yaml` (`base`) beside it, into root/out unless told."""
    (root / "student.yaml").write_text(yaml.safe_dump(base))
    sweep = {"base": "student.yaml", "output_dir": str(root / "out"), **fields}
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def test_a_grid_is_the_product_in_file_order_with_stable_names(tmp_path: Path) -> None:
    path = write_sweep(tmp_path, teacher=TEACHER, grid=GRID)
    sweep = load_sweep(path)
    assert [run.name for run in sweep.runs] == GRID_NAMES
    assert [run.name for run in load_sweep(path).runs] == GRID_NAMES
    assert sweep.swept_keys == ["loss.name", "optimizer.lr"]
    last = sweep.runs[-1].config
    assert (last.loss.name, last.optimizer.lr) == ("dkd", 0.1)
    assert last.batch_size == 32 and last.teacher.endpoints == [TEACHER]
    assert last.output_dir == tmp_path / "out" / GRID_NAMES[-1]


def test_listed_runs_follow_the_grid_and_show_the_keys_they_leave(tmp_path: Path) -> None:
    runs = [{"loss.name": "dist", "epochs": 2}, {}]
    sweep = load_sweep(
        write_sweep(tmp_path, teacher=TEACHER, grid={"loss.name": ["kd"]}, runs=runs)
    )
    assert [run.name for run in sweep.runs] == ["loss.name=kd", "loss.name=dist,epochs=2", "base"]
    assert sweep.swept_keys == ["loss.name", "epochs"]
    kd, dist, base = sweep.runs
    assert swept_cells(sweep, kd) == ["kd", "10"]  # the default epochs, for a run not setting it
    assert swept_cells(sweep, dist) == ["dist", "2"]
    assert base.config.loss.name == "kd" and base.overrides == {}


def test_run_names_are_safe_directory_names_and_bounded() -> None:
    name = run_name({"data.root": "/data/my set", "augment.crop_scale": [0.08, 1.0]})
    assert name == "data.root=_data_my_set,augment.crop_scale=_0.08,1.0_"
    long = {f"loss.hyperparameters.key_{i}": 0.5 for i in range(10)}
    other = {**long, "loss.hyperparameters.key_9": 0.25}
    assert len(run_name(long)) == MAX_NAME and run_name(long) != run_name(other)


def test_the_run_config_round_trips_without_the_token(tmp_path: Path) -> None:
    base = {**BASE, "teacher": {"model": "small", "token": "s3cret"}}
    sweep = load_sweep(write_sweep(tmp_path, base, teacher=TEACHER, runs=[{"loss.name": "dkd"}]))
    (run,) = sweep.runs
    text = config_text(run)
    assert "s3cret" not in text
    written = tmp_path / "config.yaml"
    written.write_text(text)
    assert load_run_config(written, {"teacher.token": "s3cret"}) == run.config
    assert teacher_token(sweep) == "s3cret"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"grid": GRID, "gird": {}}, "gird: Extra inputs are not permitted"),
        ({"grid": {}}, "has no runs: give a grid, a list of runs, or both"),
        ({"grid": {"loss.name": "kd"}}, "grid.loss.name: Input should be a valid list (got 'kd')"),
        ({"grid": {"loss.name": []}}, "grid.loss.name lists no values"),
        ({"runs": [{"output_dir": "x"}]}, "output_dir cannot be swept"),
        ({"grid": {"teacher.token": ["a", "b"]}}, "teacher.token cannot be swept"),
        ({"runs": [{"loss.name": "kd"}, {"loss.name": "kd"}]}, "are both named 'loss.name=kd'"),
        (
            {"grid": {"loss.name": ["kd", "nope"]}},
            "run loss.name=nope: invalid configuration in",
        ),
        (
            {"runs": [{"loss.name": "kd"}, {"optimizer.lr": -1}]},
            "run optimizer.lr=-1: invalid configuration",
        ),
        (  # found by building the student on the meta device, not by its run failing
            {"runs": [{"loss.name": "kd"}, {"student.drop_path": 0.1}]},
            "run student.drop_path=0.1: student.drop_path: drop_path 0.1: kdserve:resnet8 has no "
            "stochastic depth",
        ),
        (
            {"runs": [{"student.init_weights": "missing.safetensors"}]},
            "student.init_weights 'missing.safetensors': no such file",
        ),
    ],
)
def test_a_bad_sweep_is_a_clear_error_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fields: dict[str, Any], message: str
) -> None:
    path = write_sweep(tmp_path, teacher=TEACHER, **fields)
    assert main([str(path)]) == 2
    error = capsys.readouterr().err
    assert message in error
    assert not (tmp_path / "out").exists()


def test_a_bad_field_names_the_field_and_a_bad_flag_names_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_sweep(tmp_path, teacher=TEACHER, runs=[{"optimizer.lr": -1}])
    assert main([str(path)]) == 2
    assert "optimizer.lr: Input should be greater than 0 (got -1)" in capsys.readouterr().err
    path = write_sweep(tmp_path, grid=GRID)
    assert main([str(path)]) == 2
    assert "loss 'kd' needs a teacher" in capsys.readouterr().err
    assert main([str(path), "--teacher", TEACHER, "--parallel", "0"]) == 2
    assert f"{path} with --parallel 0 --teacher {TEACHER}:" in capsys.readouterr().err


def test_dry_run_prints_each_run_state_and_starts_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_sweep(tmp_path, teacher=TEACHER, grid=GRID)
    sweep = load_sweep(path)
    complete, resumable, changed = (run.directory for run in sweep.runs[:3])
    for directory in (complete, resumable, changed):
        directory.mkdir(parents=True)
    (complete / DONE).write_text(config_digest(sweep.runs[0]))
    (resumable / "checkpoint.pt").write_bytes(b"")
    (changed / DONE).write_text("the digest of another config")
    assert main([str(path), "--dry-run", "--parallel", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"4 run(s) of {path}, 2 at a time, into {tmp_path / 'out'}:"
    states = [line.split()[:2] for line in lines[1:]]
    assert states == [
        ["complete", GRID_NAMES[0]],
        ["resume", GRID_NAMES[1]],
        ["start", GRID_NAMES[2]],
        ["start", GRID_NAMES[3]],
    ]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(GRID_NAMES[:3])
    assert not (tmp_path / "out" / GRID_NAMES[3]).exists()


def kdserve_sweep(*arguments: str) -> list[str]:
    return [str(Path(sys.executable).with_name("kdserve-sweep")), *arguments]


def train_steps(run_dir: Path) -> list[int]:
    log = RunLog(run_dir)
    return [r["step"] for r in log.records("train")] if log.exists() else []


@pytest.mark.slow
def test_a_grid_sweep_stopped_by_sigterm_resumes_and_reports(
    server: ServerThread, tmp_path: Path
) -> None:
    """Stopped after its first run, the sweep leaves the second checkpointed; run again, it
    skips the first, resumes the second, starts the rest, and reports one failing run."""
    ghost = {"teacher.model": "ghost"}
    path = write_sweep(
        tmp_path, teacher=server.endpoints.grpc_url, parallel=2, grid=GRID, runs=[ghost]
    )
    out = tmp_path / "out"
    first, second, *_ = (out / name for name in GRID_NAMES)
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    sweep = subprocess.Popen(
        kdserve_sweep(str(path), "--parallel", "1"),
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_until(
        lambda: (first / DONE).is_file() and len(train_steps(second)) >= 1,
        "the first run to finish and the second to train",
        sweep,
    )
    sweep.send_signal(signal.SIGTERM)
    _, stderr = sweep.communicate(timeout=60)
    assert sweep.returncode == 128 + signal.SIGTERM, stderr
    assert (
        f"stopped by SIGTERM; 4 run(s) left to resume with the same command: {GRID_NAMES[1]}"
        in (stderr)
    )
    assert (second / "checkpoint.pt").is_file() and not (second / DONE).exists()
    assert sorted(p.name for p in out.iterdir()) == GRID_NAMES[:2]
    kept = (first / "metrics.jsonl").read_bytes(), (first / "metrics.jsonl").stat().st_mtime_ns

    again = subprocess.run(
        kdserve_sweep(str(path)), env=environment, capture_output=True, text=True, timeout=240
    )
    assert again.returncode == 1, again.stderr
    assert "skipped 1 complete run(s)" in again.stdout
    assert f"resumed {GRID_NAMES[1]}" in again.stdout
    assert f"started {GRID_NAMES[2]}" in again.stdout
    assert "FAILED  teacher.model=ghost (exit code 2)" in again.stdout
    ghost_log = out / "teacher.model=ghost" / RUN_LOG
    assert f"teacher.model=ghost failed; see {ghost_log}" in again.stderr
    assert "'ghost' is not served" in ghost_log.read_text()
    assert (
        (first / "metrics.jsonl").read_bytes(),
        (first / "metrics.jsonl").stat().st_mtime_ns,
    ) == (kept)
    assert "resumed" in (second / RUN_LOG).read_text()
    for name in GRID_NAMES:
        assert train_steps(out / name) == list(range(1, 9)), name
        assert [r["step"] for r in RunLog(out / name).records("eval")] == [8]
        assert (out / name / DONE).is_file()

    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["name"] for row in rows] == [*GRID_NAMES, "teacher.model=ghost"]
    assert [(row["loss.name"], row["optimizer.lr"]) for row in rows[:4]] == [
        ("kd", "0.05"),
        ("kd", "0.1"),
        ("dkd", "0.05"),
        ("dkd", "0.1"),
    ]
    assert [row["status"] for row in rows] == ["complete"] * 4 + ["failed"]
    for row in rows[:4]:
        assert 0.0 <= float(row["student_accuracy"]) <= 1.0 and float(row["kl"]) >= 0.0
        assert float(row["images_per_s"]) > 0 and row["steps"] == "8"
    assert rows[4]["student_accuracy"] == "" and rows[4]["teacher.model"] == "ghost"
    assert (out / "curves.png").read_bytes().startswith(b"\x89PNG")

    table = again.stdout[again.stdout.index("run  ") :].splitlines()
    header = table[0].split("  ")
    assert [cell for cell in header if cell][:4] == [
        "run",
        "loss.name",
        "optimizer.lr",
        "teacher.model",
    ]
    assert "agreement (%)" in table[0]
    cells = [line.split() for line in table[2:7]]
    assert [row[0] for row in cells] == [*GRID_NAMES, "teacher.model=ghost"]
    assert [row[-1] for row in cells] == ["8", "8", "8", "8", "-"]
