"""docker/compose.ensemble.yml: an ensemble whose members are two teacher services.

No Docker engine runs here (`docker compose config` validates the file in test_compose.py
where it is installed), so the services' commands are started as local processes on
loopback, each with its own ports, the volumes temporary folders, and the front's member
URLs pointed at those ports.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import yaml

from teacher_server.client import TeacherClient
from tests.demo.test_compose import BIN, ROOT, env_file, free_port, train_steps
from tests.helpers import wait_until

FILE = ROOT / "docker" / "compose.ensemble.yml"
FRONT_CONFIG = ROOT / "docker" / "config" / "ensemble-front.yaml"
MEMBERS = ("teacher-resnet20", "teacher-wrn")
SERVERS = (*MEMBERS, "teacher")
ENSEMBLE = "digits-ensemble"


def services() -> dict[str, Any]:
    return yaml.safe_load(FILE.read_text())["services"]  # type: ignore[no-any-return]


def front_config() -> dict[str, Any]:
    return yaml.safe_load(FRONT_CONFIG.read_text())  # type: ignore[no-any-return]


def test_the_front_serves_the_member_services_ensemble() -> None:
    cluster = services()
    assert set(cluster) == {"teacher-weights", *SERVERS, "student"}
    assert "--ensemble" in cluster["teacher-weights"]["command"]
    front = cluster["teacher"]
    assert front["command"][:3] == ["kdserve-teacher", "--config", "/config/ensemble-front.yaml"]
    assert front["ports"] == ["8000:8000", "50051:50051"]
    assert all("ports" not in cluster[name] for name in MEMBERS), "members stay private"
    config = front_config()
    assert config["models"] == [] and config["remote"]["allow_insecure_token"] is True
    (ensemble,) = config["ensembles"]
    assert ensemble["name"] == ENSEMBLE
    for url, name in zip(ensemble["members"], MEMBERS, strict=True):
        assert url.startswith(f"grpc://{name}:50051/")
        member = cluster[name]
        assert member["command"][2] == f"/weights/teacher/member-{url.rsplit('/', 1)[1]}.yaml"
        assert "/readyz" in " ".join(member["healthcheck"]["test"])
        assert front["depends_on"][name]["condition"] == "service_healthy"
    student = cluster["student"]["command"]
    assert "grpc://teacher:50051" in student and ENSEMBLE in student
    assert "KDSERVE_REMOTE_TOKEN" in env_file(ROOT / "docker" / "kdserve.env")


class Replay:
    """The compose services' commands as processes: ports, volumes and host names mapped."""

    def __init__(self, tmp_path: Path) -> None:
        self.cluster = services()
        self.root = tmp_path
        self.ports = {name: (free_port(), free_port()) for name in SERVERS}
        self.env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            **env_file(ROOT / "docker" / "kdserve.env"),
        }
        self.token = self.env["KDSERVE_AUTH_TOKEN"]
        front = front_config()
        members = front["ensembles"][0]["members"]
        front["ensembles"][0]["members"] = [
            url.replace(f"{name}:50051", f"127.0.0.1:{self.ports[name][1]}")
            for url, name in zip(members, MEMBERS, strict=True)
        ]
        (tmp_path / "config").mkdir()
        (tmp_path / "config" / "ensemble-front.yaml").write_text(yaml.safe_dump(front))
        (tmp_path / "config" / "student-a.yaml").write_text(
            (ROOT / "docker" / "config" / "student-a.yaml").read_text()
        )

    def argv(self, service: str, *extra: str) -> list[str]:
        http, grpc = self.ports.get(service, self.ports["teacher"])
        mapped = {
            "0.0.0.0": "127.0.0.1",
            "8000": str(http),
            "50051": str(grpc),
            "grpc://teacher:50051": f"grpc://127.0.0.1:{self.ports['teacher'][1]}",
        }
        command = [mapped.get(arg, arg) for arg in self.cluster[service]["command"]]
        for mount in ("/weights", "/config", "/checkpoints"):
            command = [
                str(self.root / mount[1:]) + arg[len(mount) :] if arg.startswith(mount) else arg
                for arg in command
            ]
        return [str(BIN / command[0]), *command[1:], *extra]

    def url(self, service: str, transport: str) -> str:
        http, grpc = self.ports[service]
        return f"{transport}://127.0.0.1:{http if transport == 'http' else grpc}"

    def wait_ready(self, service: str, process: subprocess.Popen[str]) -> None:
        def ready() -> bool:
            try:
                return httpx.get(f"{self.url(service, 'http')}/readyz").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, f"{service} to be ready (log: {self.root / service}.log)", process)


@pytest.mark.slow
def test_the_ensemble_commands_answer_the_members_combination(tmp_path: Path) -> None:
    replay = Replay(tmp_path)
    init = subprocess.run(
        replay.argv("teacher-weights", "--teacher-epochs", "1"),
        env=replay.env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert init.returncode == 0, init.stderr[-3000:]
    processes: list[subprocess.Popen[str]] = []
    try:
        for service in SERVERS:  # the front after its members, as depends_on says
            with open(tmp_path / f"{service}.log", "w") as log:
                process = subprocess.Popen(
                    replay.argv(service), env=replay.env, stderr=log, stdout=log, text=True
                )
            processes.append(process)
            replay.wait_ready(service, process)
        images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
        answers = []
        for service in MEMBERS:
            with TeacherClient.connect(replay.url(service, "grpc"), token=replay.token) as c:
                answers.append(c.infer(images, model=c.list_models()[0].name))
        with TeacherClient.connect(replay.url("teacher", "grpc"), token=replay.token) as client:
            reply = client.request(images, model=ENSEMBLE)
        expected = torch.log((answers[0].softmax(-1) + answers[1].softmax(-1)) / 2)
        assert reply.logits is not None
        assert (reply.logits - expected).abs().max().item() < 1e-5
        student = subprocess.run(
            replay.argv("student", "--max-steps", "3", "--threads", "1"),
            env=replay.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert student.returncode == 0, student.stderr[-3000:]
        assert train_steps(tmp_path / "checkpoints" / "student") == [1, 2, 3]
    finally:
        for process in reversed(processes):
            process.terminate()
            process.wait(timeout=30)
