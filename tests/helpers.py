"""Helpers the test modules share: seeded images and teachers, the reference view, raw requests.

Fixtures that use them (the teachers, the shared servers) are in conftest.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import msgpack
import torch
import yaml

from teacher_server.server.config import load_config
from teacher_server.server.serve import ServerThread
from teacher_server.shared._proto import teacher_pb2 as pb
from teacher_server.shared.archs import create_model
from teacher_server.shared.weights import save_weights

TOKEN = "s3cret-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
GRPC_AUTH = (("authorization", f"Bearer {TOKEN}"),)
SLOW_BATCH = 4
CIFAR_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR_STD = (0.2673, 0.2564, 0.2762)
INFER_METHOD = "/kdserve.v1.Teacher/Infer"
BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
"""For the processes tests start: one intra-op thread each, logs written as they come."""


@contextlib.contextmanager
def refusing_port() -> Iterator[int]:
    """A loopback port held bound but not listening: every connection to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def random_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """n seeded uint8 images (n, 3, size, size)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)


def make_weights(path: Path, arch: str, num_classes: int, seed: int) -> torch.nn.Module:
    """A seeded model with non-trivial BatchNorm statistics, saved as safetensors at `path`."""
    torch.manual_seed(seed)
    model = create_model(arch, num_classes=num_classes)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(16, 3, 32, 32))
    model.eval()
    save_weights(model, path)
    return model


def reference_view(
    images: torch.Tensor,
    size: tuple[int, int],
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    mix: dict[str, Any] | None = None,
) -> torch.Tensor:
    """The student's float view written out with plain torch ops, independent of the server code."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    if mix is not None:
        partners = x[torch.tensor(mix["perm"])]
        if mix["mode"] == "mixup":
            x = mix["lam"] * x + (1 - mix["lam"]) * partners
        else:
            y0, x0, y1, x1 = mix["box"]
            x = x.clone()
            x[:, :, y0:y1, x0:x1] = partners[:, :, y0:y1, x0:x1]
    if tuple(x.shape[-2:]) != size:
        x = torch.nn.functional.interpolate(
            x, size=size, mode="bilinear", antialias=True, align_corners=False
        )
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def in_process(
    teacher: dict[str, Any], images: torch.Tensor, mix: dict[str, Any] | None = None
) -> torch.Tensor:
    """The teacher's logits computed here, on the reference view (what a served answer must be)."""
    view = reference_view(images, teacher["size"], teacher["mean"], teacher["std"], mix)
    with torch.no_grad():
        return teacher["module"](view)  # type: ignore[no-any-return]


def teacher_config(teachers: dict[str, Any], **server: Any) -> dict[str, Any]:
    """A server config of the two test teachers and two ensembles of them, on free ports."""
    root = teachers["root"]
    return {
        "server": {
            "http_port": 0,
            "grpc_port": 0,
            "max_batch_size": 64,
            "max_delay_ms": 5,
            **server,
        },
        "models": [
            {
                "name": "small",
                "arch": "kdserve:resnet8",
                "weights": str(root / "small.safetensors"),
                "num_classes": 10,
                "input_size": 32,
                "mean": list(CIFAR_MEAN),
                "std": list(CIFAR_STD),
            },
            {
                "name": "wide",
                "arch": "kdserve:wrn_16_1",
                "weights": str(root / "wide.safetensors"),
                "num_classes": 10,
                "input_size": [40, 40],
                "mean": [0.5, 0.5, 0.5],
                "std": [0.25, 0.25, 0.25],
            },
        ],
        "ensembles": [
            {
                "name": "pair_logits",
                "members": ["small", "wide"],
                "weights": [1.0, 3.0],
                "combine": "mean_logits",
            },
            {"name": "pair_probs", "members": ["small", "wide"], "combine": "mean_probs"},
        ],
    }


@contextlib.contextmanager
def running_server(
    raw_config: dict[str, Any], *, wait_ready: bool = True
) -> Iterator[ServerThread]:
    """A teacher server from a config dict, in a background thread, stopped on exit."""
    with ServerThread(load_config(data=raw_config, environ={}), wait_ready=wait_ready) as server:
        yield server


def model_stats(server: ServerThread) -> dict[str, Any]:
    """Per-model stats of a server (sends the strict server's token; others ignore it)."""
    response = httpx.get(f"{server.endpoints.http_url}/v1/stats", headers=AUTH)
    return response.json()["models"]  # type: ignore[no-any-return]


def tensor_map(tensor: torch.Tensor) -> dict[str, Any]:
    """A tensor as the wire's map of dtype, shape and raw bytes."""
    dtype = str(tensor.dtype).removeprefix("torch.")
    data = tensor.contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
    return {"dtype": dtype, "shape": list(tensor.shape), "data": data}


def post(
    server: ServerThread,
    fields: Any,
    *,
    model: str = "small",
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
    timeout: float = 30,
) -> httpx.Response:
    """A raw HTTP infer call with a msgpack body made of `fields` (or the `raw` bytes)."""
    body = raw if raw is not None else msgpack.packb(fields, use_bin_type=True)
    all_headers = {"content-type": "application/msgpack", **AUTH, **(headers or {})}
    return httpx.post(
        f"{server.endpoints.http_url}/v1/models/{model}/infer",
        content=body,
        headers=all_headers,
        timeout=timeout,
    )


def protobuf_request(fields: dict[str, Any]) -> bytes:
    """The protobuf InferRequest holding the same fields as a msgpack request map."""
    message = pb.InferRequest()
    for name, value in fields.items():
        if name == "images":
            message.images.CopyFrom(pb.Tensor(**value))
        elif name == "mix":
            message.mix.CopyFrom(pb.Mix(**value))
        elif value is not None:
            setattr(message, name, value)
    return message.SerializeToString()


def grpc_call(
    server: ServerThread,
    fields: dict[str, Any] | None = None,
    *,
    raw: bytes | None = None,
    metadata: Any = GRPC_AUTH,
    timeout: float = 30,
) -> grpc.RpcError | None:
    """A raw gRPC Infer call of `fields` (or the `raw` message bytes): its error, None if OK."""
    body = raw if raw is not None else protobuf_request(fields or {})
    with grpc.insecure_channel(f"127.0.0.1:{server.endpoints.grpc_port}") as channel:
        infer = channel.unary_unary(INFER_METHOD, None, None)
        try:
            infer(body, metadata=metadata, timeout=timeout)
        except grpc.RpcError as exc:
            return exc
    return None


def grpc_status(server: ServerThread, fields: dict[str, Any], **options: Any) -> grpc.StatusCode:
    """The status code of a raw gRPC Infer call (OK when it answered)."""
    error = grpc_call(server, fields, **options)
    return grpc.StatusCode.OK if error is None else error.code()  # type: ignore[attr-defined]


BUSY_CLIENT = "busy-test-client"
"""The client_id of `occupy_slow_model`'s request. A request meant to wait behind it sends the
same id: passes take different clients in turn, so another client's request goes first."""


def occupy_slow_model(
    server: ServerThread, images: int, client_id: str | None = BUSY_CLIENT
) -> threading.Thread:
    """Queue one big request on the strict server's slow model (images / SLOW_BATCH passes);
    `client_id` None: batched by its connection."""
    fields: dict[str, Any] = {
        "model": "slow",
        "images": tensor_map(torch.zeros(images, 3, 8, 8, dtype=torch.uint8)),
    }
    if client_id is not None:
        fields["client_id"] = client_id
    thread = threading.Thread(
        target=post, args=(server, fields), kwargs={"model": "slow", "timeout": 60}
    )
    thread.start()
    deadline = time.monotonic() + 10
    while model_stats(server)["slow"]["pending_images"] == 0:
        assert time.monotonic() < deadline, "the slow model never queued the request"
        time.sleep(0.005)
    return thread


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports free now (all held at once, so never the same twice)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def wait_until(
    condition: Callable[[], bool],
    what: str,
    *watched: subprocess.Popen[bytes],
    timeout_s: float = 120,
    interval_s: float = 0.02,
) -> None:
    """Poll `condition()` until it is true; fail if a watched process exits first."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        for process in watched:
            assert process.poll() is None, f"exited {process.returncode} before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval_s)


class TeacherProcess:
    """`kdserve-teacher` as a process on fixed ports, which can be killed and started again."""

    def __init__(
        self,
        root: Path,
        config: dict[str, Any],
        name: str = "teacher",
        host: str = "127.0.0.1",
        grpc_port: int | None = None,
    ) -> None:
        """`grpc_port`: this one (replicas on several addresses behind one name share it)
        rather than a free one."""
        self.root = root
        self.name = name
        self.host = host
        self.http_port, self.grpc_port = free_ports(2)
        if grpc_port is not None:
            self.grpc_port = grpc_port
        server = {**config.get("server", {}), "host": host, "http_port": self.http_port}
        server["grpc_port"] = self.grpc_port
        self.config = root / f"{name}.yaml"
        self.config.write_text(yaml.safe_dump({**config, "server": server}))
        self.port_file = root / f"{name}-ports.json"
        self.starts = 0
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, transport: str) -> str:
        port = self.http_port if transport == "http" else self.grpc_port
        return f"{transport}://{self.host}:{port}"

    def start(self) -> None:
        """Start the process and wait until it listens on its ports (models may still load)."""
        self.port_file.unlink(missing_ok=True)
        self.starts += 1
        with open(self.root / f"{self.name}-{self.starts}.log", "wb") as log:
            self.process = subprocess.Popen(
                [
                    str(BIN / "kdserve-teacher"),
                    "--config",
                    str(self.config),
                    "--port-file",
                    str(self.port_file),
                ],
                env=ENV,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until(self.port_file.exists, f"{self.name} to listen", self.process)
        ports = json.loads(self.port_file.read_text())
        assert (ports["http_port"], ports["grpc_port"]) == (self.http_port, self.grpc_port)

    def wait_ready(self) -> None:
        def ready() -> bool:
            try:
                return httpx.get(f"{self.url('http')}/readyz", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        assert self.process is not None
        wait_until(ready, f"{self.name} to be ready", self.process)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        assert self.process.wait(timeout=30) == -signal.SIGKILL

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
