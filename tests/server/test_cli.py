"""`kdserve-teacher` as a user runs it: a real process, ports from a port file, clean shutdown."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import msgpack
import pytest
import torch
import yaml

from teacher_server.client import RetryPolicy, TeacherClient
from teacher_server.shared._proto import teacher_pb2 as pb
from tests.archives import save_slow

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def write_config(tmp_path: Path, teachers: dict[str, Any], **model: Any) -> Path:
    config = {
        "server": {"max_batch_size": 32},
        "models": [
            {
                "name": "small",
                "arch": "kdserve:resnet8",
                "weights": "small.safetensors",
                "num_classes": 10,
                "input_size": 32,
                **model,
            }
        ],
    }
    (tmp_path / "small.safetensors").write_bytes(
        (teachers["root"] / "small.safetensors").read_bytes()
    )
    path = tmp_path / "teacher.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def wait_for_port_file(
    path: Path, process: subprocess.Popen[str], timeout_s: float = 60
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, "server did not start listening"
        time.sleep(0.05)
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def is_listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("command", [["kdserve-teacher"], ["python", "-m", "teacher_server"]])
def test_serves_until_sigterm_then_frees_its_ports(
    tmp_path: Path, teachers: dict[str, Any], command: list[str]
) -> None:
    config = write_config(tmp_path, teachers)
    port_file = tmp_path / "ports.json"
    executable = [str(BIN / command[0]), *command[1:]]
    process = subprocess.Popen(
        [
            *executable,
            "--config",
            str(config),
            "--http-port",
            "0",
            "--grpc-port",
            "0",
            "--max-batch-size",
            "8",
            "--port-file",
            str(port_file),
        ],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ports = wait_for_port_file(port_file, process)
        with TeacherClient.connect(
            ports["grpc_url"], model="small", retry=RetryPolicy(attempts=200)
        ) as client:
            logits = client.infer(torch.zeros(3, 3, 32, 32, dtype=torch.uint8))
        assert logits.shape == (3, 10)
        assert httpx.get(f"{ports['http_url']}/readyz").status_code == 200
        assert httpx.get(f"{ports['http_url']}/v1/models").json()["limits"]["max_batch_size"] == 8
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    assert "stopping" in stderr
    assert not is_listening(ports["http_port"]) and not is_listening(ports["grpc_port"])


def test_bad_config_exits_2_naming_the_field(tmp_path: Path, teachers: dict[str, Any]) -> None:
    config = write_config(tmp_path, teachers, num_classes=0)
    result = subprocess.run(
        [str(BIN / "kdserve-teacher"), "--config", str(config)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "models.0.num_classes" in result.stderr and "got 0" in result.stderr


def test_weights_that_do_not_fit_stop_the_server(tmp_path: Path, teachers: dict[str, Any]) -> None:
    config = write_config(tmp_path, teachers, arch="kdserve:resnet14")
    result = subprocess.run(
        [
            str(BIN / "kdserve-teacher"),
            "--config",
            str(config),
            "--http-port",
            "0",
            "--grpc-port",
            "0",
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "does not fit the model" in result.stderr and "small.safetensors" in result.stderr


def start_slow_teacher(
    tmp_path: Path, grace_s: float
) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """A teacher process serving only a slow model (passes of 4 images, about 45 ms each on 2
    cores: 100 images outlast a 0.3 s grace period), ready."""
    config = {
        "server": {"max_batch_size": 4, "shutdown_grace_s": grace_s},
        "models": [
            {
                "name": "slow",
                "arch": f"file:{save_slow(tmp_path / 'slow.pt', 120)}",
                "num_classes": 10,
                "input_size": 8,
            }
        ],
    }
    (tmp_path / "teacher.yaml").write_text(yaml.safe_dump(config))
    port_file = tmp_path / "ports.json"
    process = subprocess.Popen(
        [
            str(BIN / "kdserve-teacher"),
            "--config",
            str(tmp_path / "teacher.yaml"),
            "--http-port",
            "0",
            "--grpc-port",
            "0",
            "--port-file",
            str(port_file),
        ],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ports = wait_for_port_file(port_file, process)
    deadline = time.monotonic() + 60
    while httpx.get(f"{ports['http_url']}/readyz").status_code != 200:
        assert time.monotonic() < deadline, "the teacher never became ready"
        time.sleep(0.05)
    return process, ports


def slow_body(images: int) -> bytes:
    tensor = torch.zeros(images, 3, 8, 8, dtype=torch.uint8)
    return msgpack.packb(
        {
            "model": "slow",
            "images": {
                "dtype": "uint8",
                "shape": list(tensor.shape),
                "data": tensor.numpy().tobytes(),
            },
        },
        use_bin_type=True,
    )


def http_infer(ports: dict[str, Any], images: int) -> httpx.Response:
    return httpx.post(
        f"{ports['http_url']}/v1/models/slow/infer",
        content=slow_body(images),
        headers={"content-type": "application/msgpack"},
        timeout=60,
    )


@pytest.mark.parametrize(
    ("grace_s", "finished"), [(60.0, True), (0.3, False)], ids=["drained", "cut"]
)
def test_sigterm_answers_every_request_then_exits(
    tmp_path: Path, grace_s: float, finished: bool
) -> None:
    """The one shutdown behaviour: new requests get a JSON 503 / UNAVAILABLE at once, the one
    in flight is computed within the grace period or gets a JSON 503 saying how far it got,
    then the ports close and the process exits 0 with nothing in its log but the stop."""
    process, ports = start_slow_teacher(tmp_path, grace_s)
    try:
        answers: list[httpx.Response] = []
        long = threading.Thread(target=lambda: answers.append(http_infer(ports, 100)))
        long.start()
        stats_url = f"{ports['http_url']}/v1/stats"
        while httpx.get(stats_url).json()["models"]["slow"]["executions"] < 2:
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)

        late = http_infer(ports, 1)
        assert late.status_code == 503, late.text
        assert late.json()["error"]["name"] == "not_ready"
        with grpc.insecure_channel(f"127.0.0.1:{ports['grpc_port']}") as channel:
            body = pb.InferRequest(
                model="slow",
                images=pb.Tensor(dtype="uint8", shape=[1, 3, 8, 8], data=bytes(192)),
            ).SerializeToString()
            with pytest.raises(grpc.RpcError) as refused:
                channel.unary_unary("/kdserve.v1.Teacher/Infer", None, None)(body, timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
        assert dict(refused.value.trailing_metadata())["kdserve-error"] == "not_ready"  # type: ignore[attr-defined]

        long.join(60)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    (answer,) = answers
    if finished:
        assert answer.status_code == 200
    else:
        assert answer.status_code == 503
        error = answer.json()["error"]
        assert error["name"] == "not_ready"
        assert "of this request's 100 images were started" in error["message"]
    assert process.returncode == 0, stderr
    for noise in ("Traceback", "Task exception was never retrieved", "Internal Server Error"):
        assert noise not in stderr, stderr
    assert not is_listening(ports["http_port"]) and not is_listening(ports["grpc_port"])
