"""One quick digits teacher, trained once by `kdserve-demo teacher` for the demo and compose
tests: each copies it where its command looks, so the command finds it cached."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TEACHER_EPOCHS = "1"


@pytest.fixture(scope="session")
def quick_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`kdserve-demo teacher --teacher-epochs 1`'s teacher folder (seed 0), trained here."""
    run_dir = tmp_path_factory.mktemp("quick-teacher")
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("kdserve-demo")),
            "teacher",
            "--run-dir",
            str(run_dir),
            "--teacher-epochs",
            TEACHER_EPOCHS,
        ],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "teacher: trained in" in result.stdout and "on the held-out digits" in result.stdout
    return run_dir / "teacher"


def copy_teacher(teacher: Path, run_dir: Path) -> None:
    """Put the trained teacher in `run_dir`/teacher, where the demo's cache looks."""
    shutil.copytree(teacher, run_dir / "teacher")
