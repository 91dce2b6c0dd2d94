"""Shared fixtures: small seeded teachers saved as weights files, and real servers on loopback."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

from teacher_server.server.serve import ServerThread  # noqa: E402
from tests.archives import save_flaky, save_slow  # noqa: E402
from tests.helpers import (  # noqa: E402
    CIFAR_MEAN,
    CIFAR_STD,
    SLOW_BATCH,
    TOKEN,
    make_weights,
    running_server,
    teacher_config,
)


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


@pytest.fixture(scope="session")
def server(teachers: dict[str, Any]) -> Iterator[ServerThread]:
    """The shared teacher server: two models and two ensembles on loopback ports."""
    with running_server(teacher_config(teachers)) as running:
        yield running


@pytest.fixture(params=["http", "grpc"])
def url(request: pytest.FixtureRequest, server: ServerThread) -> str:
    """The shared server's URL, once per transport."""
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
            # About 20 ms a pass on 2 cores: busy requests outlast the tests' short deadlines.
            "arch": f"file:{save_slow(root / 'slow.pt2', 60)}",
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
