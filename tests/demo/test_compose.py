"""The compose files: valid for docker compose, the fields that matter, and commands that work.

No Docker engine runs here, so the cluster's commands are started as local processes on
loopback, each volume a temporary folder, `teacher` resolved to 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from student_worker.runlog import RunLog
from tests.demo.conftest import TEACHER_EPOCHS, copy_teacher

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SETUPS = {
    "cluster on GPUs": ["docker-compose.yml", "docker-compose.override.yml"],
    "cluster on CPUs": ["docker-compose.yml"],
    "teacher alone": ["docker/compose.teacher.yml"],
    "students alone": ["docker/compose.students.yml"],
    "ensemble of two teacher services": ["docker/compose.ensemble.yml"],
}
COMPOSE_ENV = {"KDSERVE_TEACHER_URL": "grpc://teacher.example:50051"}
STUDENTS = ("student-a", "student-b")


def merge(base: Any, override: Any) -> Any:
    """docker compose's merge for the keys these files use: mappings merge, the rest replaces."""
    if isinstance(base, dict) and isinstance(override, dict):
        return {k: merge(base[k], v) if k in base else v for k, v in override.items()} | {
            k: v for k, v in base.items() if k not in override
        }
    return override


def services(setup: str) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for name in SETUPS[setup]:
        merged = merge(merged, yaml.safe_load((ROOT / name).read_text()))
    return merged["services"]  # type: ignore[no-any-return]


def gpu_ids(service: dict[str, Any]) -> list[str]:
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert all(d["driver"] == "nvidia" and d["capabilities"] == ["gpu"] for d in devices)
    return [i for d in devices for i in d["device_ids"]]


def compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


@pytest.mark.parametrize("setup", list(SETUPS))
def test_docker_compose_config_accepts_the_files(setup: str) -> None:
    command = compose_command()
    if command is None:
        pytest.skip(
            "neither docker-compose nor the docker compose plugin is installed "
            "(Debian's docker-compose package validates compose files offline)"
        )
    files = [arg for name in SETUPS[setup] for arg in ("-f", str(ROOT / name))]
    result = subprocess.run(
        [*command, *files, "config"],
        capture_output=True,
        text=True,
        env={**os.environ, **COMPOSE_ENV},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def test_the_gpu_cluster_reserves_one_gpu_per_service() -> None:
    cluster = services("cluster on GPUs")
    assert set(cluster) == {"teacher-weights", "teacher", *STUDENTS}
    for service in cluster.values():
        assert service["image"] == "kdserve:gpu"
        assert service["build"]["args"]["BASE"].startswith("nvidia/cuda:")
        assert service["build"]["args"]["LOCK"] == "requirements/gpu.lock.txt"
        assert service["env_file"] == "docker/kdserve.env"
    reserved = [gpu_ids(cluster[name]) for name in ("teacher", *STUDENTS)]
    assert reserved == [["0"], ["1"], ["2"]]
    assert cluster["teacher"]["environment"]["KDSERVE_SERVER__DEVICE"] == "cuda"


def test_the_cluster_wires_teacher_and_students() -> None:
    for setup in ("cluster on GPUs", "cluster on CPUs"):
        cluster = services(setup)
        teacher = cluster["teacher"]
        assert teacher["command"][0] == "kdserve-teacher"
        assert teacher["ports"] == ["8000:8000", "50051:50051"]
        assert "/readyz" in " ".join(teacher["healthcheck"]["test"])
        assert teacher["volumes"] == ["weights:/weights:ro"]
        assert cluster["teacher-weights"]["volumes"] == ["weights:/weights"]
        assert teacher["depends_on"]["teacher-weights"]["condition"] == (
            "service_completed_successfully"
        )
        for name in STUDENTS:
            student = cluster[name]
            assert student["command"][0] == "kdserve-student"
            assert "grpc://teacher:50051" in student["command"]
            assert "--auto-resume" in student["command"], "a restarted student continues"
            assert student["depends_on"]["teacher"]["condition"] == "service_healthy"
            assert "checkpoints:/checkpoints" in student["volumes"]
            assert "data:/data" in student["volumes"]
    cpu = services("cluster on CPUs")
    assert all(s["image"] == "kdserve:cpu" and "deploy" not in s for s in cpu.values())
    assert all("args" not in s["build"] for s in cpu.values()), "the Dockerfile defaults are CPU"


def test_teacher_alone_serves_an_ensemble_and_students_alone_take_its_address() -> None:
    teacher = services("teacher alone")
    assert "--ensemble" in teacher["teacher-weights"]["command"]
    assert gpu_ids(teacher["teacher"]) == ["0"]
    assert "/readyz" in " ".join(teacher["teacher"]["healthcheck"]["test"])
    students = services("students alone")
    assert set(students) == set(STUDENTS)
    for student in students.values():
        assert any("${KDSERVE_TEACHER_URL:?" in arg for arg in student["command"])
        assert "--auto-resume" in student["command"]
        assert gpu_ids(student)


def test_the_images_install_the_readme_pins() -> None:
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert "ARG LOCK=requirements/cpu.lock.txt" in dockerfile
    assert '-c "$LOCK" .' in dockerfile
    for name in ("cpu.txt", "gpu.txt"):
        pins = (ROOT / "requirements" / name).read_text().split()
        assert "torch==2.13.0" in pins and "torchvision==0.28.0" in pins
    for name, torch_pin in (
        ("cpu.lock.txt", "torch==2.13.0+cpu"),
        ("gpu.lock.txt", "torch==2.13.0"),
    ):
        pins = (ROOT / "requirements" / name).read_text().split()
        assert torch_pin in pins and "torchvision==0.28.0" in pins
    readme = (ROOT / "README.md").read_text()
    assert "torch==2.13.0" in readme and "torchvision==0.28.0" in readme


# ---- the cluster's commands, run here ---------------------------------------------------


def train_steps(run_dir: Path) -> list[int]:
    return [record["step"] for record in RunLog(run_dir).records("train")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def env_file(path: Path) -> dict[str, str]:
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return dict(line.split("=", 1) for line in lines)


class LocalCluster:
    """Maps a compose service's command onto this machine: volumes, ports, host names."""

    def __init__(self, tmp_path: Path, cluster: dict[str, Any]) -> None:
        self.cluster = cluster
        self.volumes = {
            "weights": tmp_path / "weights",
            "data": tmp_path / "data",
            "checkpoints": tmp_path / "checkpoints",
        }
        self.http_port, self.grpc_port = free_port(), free_port()
        self.env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            **env_file(ROOT / "docker" / "kdserve.env"),
        }

    def mounts(self, service: str) -> list[tuple[str, Path]]:
        pairs = []
        for volume in self.cluster[service].get("volumes", []):
            source, target = volume.split(":")[:2]
            local = ROOT / source[2:] if source.startswith("./") else self.volumes[source]
            local.mkdir(parents=True, exist_ok=True)
            pairs.append((target, local))
        return pairs

    def argv(self, service: str, *extra: str) -> list[str]:
        replacements = {
            "0.0.0.0": "127.0.0.1",
            "8000": str(self.http_port),
            "50051": str(self.grpc_port),
            "grpc://teacher:50051": f"grpc://127.0.0.1:{self.grpc_port}",
        }
        command = [replacements.get(arg, arg) for arg in self.cluster[service]["command"]]
        for target, local in self.mounts(service):
            command = [arg.replace(target, str(local), 1) for arg in command]
        return [str(BIN / command[0]), *command[1:], *extra]

    def healthy(self) -> bool:
        test = self.cluster["teacher"]["healthcheck"]["test"]
        assert test[:2] == ["CMD", "python3"]
        command = [sys.executable, *(arg.replace("8000", str(self.http_port)) for arg in test[2:])]
        return subprocess.run(command, capture_output=True, timeout=10).returncode == 0


@pytest.fixture
def local_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    yield LocalCluster(tmp_path, services("cluster on CPUs"))


@pytest.mark.slow
def test_the_cluster_commands_train_two_students_against_one_teacher(
    local_cluster: LocalCluster, quick_teacher: Path
) -> None:
    cluster = local_cluster
    # the init command with the quick fixture's settings finds its teacher trained
    copy_teacher(quick_teacher, cluster.volumes["weights"])
    init = subprocess.run(
        cluster.argv("teacher-weights", "--teacher-epochs", TEACHER_EPOCHS),
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert init.returncode == 0, init.stderr[-3000:]
    assert "teacher: cached weights" in init.stdout
    assert (cluster.volumes["weights"] / "teacher" / "teacher.yaml").is_file()
    teacher = subprocess.Popen(
        cluster.argv("teacher"), env=cluster.env, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while not cluster.healthy():
            assert teacher.poll() is None, teacher.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the healthcheck never passed"
            time.sleep(0.5)
        unauthenticated = httpx.get(f"http://127.0.0.1:{cluster.http_port}/v1/models")
        assert unauthenticated.status_code == 401, "the env file's token should be required"
        students = [
            subprocess.Popen(
                cluster.argv(name, "--max-steps", "3", "--threads", "1"),
                env=cluster.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for name in STUDENTS
        ]
        for name, student in zip(STUDENTS, students, strict=True):
            _, stderr = student.communicate(timeout=300)
            assert student.returncode == 0, f"{name}: {stderr[-3000:]}"
            assert train_steps(cluster.volumes["checkpoints"] / name) == [1, 2, 3]
        restarted = subprocess.run(
            cluster.argv("student-a", "--max-steps", "5", "--threads", "1"),
            env=cluster.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert restarted.returncode == 0, restarted.stderr[-3000:]
        assert train_steps(cluster.volumes["checkpoints"] / "student-a") == [1, 2, 3, 4, 5]
    finally:
        teacher.terminate()
        teacher.wait(timeout=30)
    assert teacher.returncode == 0
