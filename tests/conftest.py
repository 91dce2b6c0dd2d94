"""Shared fixtures: small seeded teachers saved as weights files, and real servers on loopback."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

from teacher_server.archs import create_model  # noqa: E402
from teacher_server.codec import tensor_to_wire  # noqa: E402
from teacher_server.config import load_config  # noqa: E402
from teacher_server.server import ServerThread  # noqa: E402
from teacher_server.weights import save_weights  # noqa: E402
from tests.archives import save_flaky, save_slow  # noqa: E402

TOKEN = "s3cret-token"
SLOW_BATCH = 4
CIFAR_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR_STD = (0.2673, 0.2564, 0.2762)


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


@pytest.fixture(scope="session")
def teachers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two small teachers (different archs, resolutions and normalizations) and their weights."""
    root = tmp_path_factory.mktemp("teachers")
    small = make_weights(root / "small.safetensors", "kdserve:resnet8", 10, seed=1)
    wide = make_weights(root / "wide.safetensors", "kdserve:wrn_16_1", 10, seed=2)
    return {
        "root": root,
        "small": {"module": small, "size": (32, 32), "mean": CIFAR_MEAN, "std": CIFAR_STD},
        "wide": {
            "module": wide,
            "size": (40, 40),
            "mean": (0.5, 0.5, 0.5),
            "std": (0.25, 0.25, 0.25),
        },
    }


def teacher_config(teachers: dict[str, Any], **server: Any) -> dict[str, Any]:
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
    with ServerThread(load_config(data=raw_config, environ={}), wait_ready=wait_ready) as server:
        yield server


@pytest.fixture(scope="session")
def server(teachers: dict[str, Any]) -> Iterator[ServerThread]:
    """The shared teacher server: two models and two ensembles on loopback ports."""
    with running_server(teacher_config(teachers)) as running:
        yield running


@pytest.fixture(params=["http", "grpc"])
def url(request: pytest.FixtureRequest, server: ServerThread) -> str:
    return server.endpoints.http_url if request.param == "http" else server.endpoints.grpc_url


@pytest.fixture(scope="session")
def strict_server(
    teachers: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerThread]:
    """A server with a token, a small size limit, a short queue, a slow model and a flaky one."""
    root = tmp_path_factory.mktemp("archives")
    config = teacher_config(
        teachers,
        auth_token=TOKEN,
        max_request_bytes=200_000,
        max_batch_size=SLOW_BATCH,
        max_queue_images=100,
        max_delay_ms=1,
    )
    config["models"] += [
        {
            "name": "slow",
            "arch": f"file:{save_slow(root / 'slow.pt2', 30)}",
            "num_classes": 10,
            "input_size": 8,
        },
        {
            "name": "flaky",
            "arch": f"file:{save_flaky(root / 'flaky.pt')}",
            "num_classes": 10,
            "input_size": 8,
            "mean": [0, 0, 0],
            "std": [0.01, 0.01, 0.01],
        },
    ]
    with running_server(config) as running:
        yield running


def model_stats(server: ServerThread) -> dict[str, Any]:
    """Per-model stats of a server (sends the strict server's token; others ignore it)."""
    response = httpx.get(
        f"{server.endpoints.http_url}/v1/stats", headers={"authorization": f"Bearer {TOKEN}"}
    )
    return response.json()["models"]  # type: ignore[no-any-return]


def occupy_slow_model(server: ServerThread, images: int) -> threading.Thread:
    """Queue one big request on the strict server's slow model (images / SLOW_BATCH passes)."""
    body = msgpack.packb(
        {"model": "slow", "images": tensor_to_wire(torch.zeros(images, 3, 8, 8, dtype=torch.uint8))}
    )
    thread = threading.Thread(
        target=httpx.post,
        args=(f"{server.endpoints.http_url}/v1/models/slow/infer",),
        kwargs={
            "content": body,
            "headers": {"content-type": "application/msgpack", "authorization": f"Bearer {TOKEN}"},
            "timeout": 60,
        },
    )
    thread.start()
    deadline = time.monotonic() + 10
    while model_stats(server)["slow"]["pending_images"] == 0:
        assert time.monotonic() < deadline, "the slow model never queued the request"
        time.sleep(0.005)
    return thread
