"""The student-facing client: endpoints, failover, retries, timeouts, chunking, request ids."""

from __future__ import annotations

import socket
from typing import Any

import httpx
import pytest
import torch

from teacher_server.client import TeacherClient, _assemble, _Part
from teacher_server.codec import tensor_to_wire
from teacher_server.errors import (
    DeadlineExceeded,
    InvalidRequest,
    ModelNotFound,
    NotReady,
    TeacherError,
)
from teacher_server.server import ServerThread
from teacher_server.views import Mix
from tests.conftest import TOKEN, model_stats, occupy_slow_model, running_server, teacher_config
from tests.test_serving import in_process


def dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ok_requests(
    server: ServerThread, model: str = "small", headers: dict[str, str] | None = None
) -> int:
    stats = httpx.get(f"{server.endpoints.http_url}/v1/stats", headers=headers or {}).json()
    return int(stats["models"][model]["requests"].get("ok", 0))


def images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def test_round_robin_over_endpoints(server: ServerThread, teachers: dict[str, Any]) -> None:
    with running_server(teacher_config(teachers)) as second:
        before = (ok_requests(server), ok_requests(second))
        urls = [server.endpoints.grpc_url, second.endpoints.http_url]
        with TeacherClient.connect(urls, model="small") as client:
            answers = [client.infer(images(2)) for _ in range(6)]
        after = (ok_requests(server), ok_requests(second))
    assert (after[0] - before[0], after[1] - before[1]) == (3, 3)
    assert all(torch.equal(a, answers[0]) for a in answers)


@pytest.mark.parametrize("scheme", ["http", "grpc"])
def test_failover_past_a_dead_endpoint(server: ServerThread, scheme: str) -> None:
    live = server.endpoints.http_url if scheme == "http" else server.endpoints.grpc_url
    dead = f"{scheme}://127.0.0.1:{dead_port()}"
    with TeacherClient.connect([dead, live], model="small", timeout_s=20) as client:
        for _ in range(4):
            assert client.infer(images(2)).shape == (2, 10)


def test_unreachable_teacher_gives_up_after_retries() -> None:
    with (
        TeacherClient.connect(
            f"http://127.0.0.1:{dead_port()}", model="small", retries=2, backoff_s=0.01
        ) as client,
        pytest.raises(NotReady, match="cannot reach"),
    ):
        client.infer(images(1))


def test_client_errors_are_not_retried(server: ServerThread) -> None:
    with TeacherClient.connect(server.endpoints.grpc_url) as client:
        with pytest.raises(ModelNotFound):
            client.infer(images(1), model="nope")
        with pytest.raises(InvalidRequest, match="temperature"):
            client.infer(images(1), model="small", temperature=-1.0)
        with pytest.raises(ValueError, match="no model named"):
            client.infer(images(1))
    stats = httpx.get(f"{server.endpoints.http_url}/v1/stats").json()["models"]["small"]["requests"]
    assert stats.get("invalid", 0) >= 1


def test_queue_full_is_retried_with_backoff(strict_server: ServerThread) -> None:
    before = model_stats(strict_server)["slow"]["requests"].get("queue_full", 0)
    busy = occupy_slow_model(strict_server, 96)
    try:
        with TeacherClient.connect(
            strict_server.endpoints.grpc_url, token=TOKEN, model="slow"
        ) as client:
            assert client.infer(torch.zeros(32, 3, 8, 8, dtype=torch.uint8)).shape == (32, 10)
    finally:
        busy.join()
    assert model_stats(strict_server)["slow"]["requests"]["queue_full"] > before


def test_call_timeout(strict_server: ServerThread) -> None:
    busy = occupy_slow_model(strict_server, 80)
    try:
        with (
            TeacherClient.connect(
                strict_server.endpoints.http_url, token=TOKEN, model="slow"
            ) as client,
            pytest.raises(DeadlineExceeded),
        ):
            client.infer(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), timeout_s=0.2)
    finally:
        busy.join()


@pytest.mark.parametrize("scheme", ["http", "grpc"])
@pytest.mark.parametrize(
    "mix",
    [
        None,
        Mix("mixup", tuple(reversed(range(80))), lam=0.35),
        Mix.cutmix(tuple((i * 7) % 80 for i in range(80)), (3, 5, 20, 29), 32, 32),
    ],
    ids=["plain", "mixup", "cutmix"],
)
def test_batches_over_the_message_limit_are_chunked(
    strict_server: ServerThread, teachers: dict[str, Any], scheme: str, mix: Mix | None
) -> None:
    batch = images(80, seed=21)
    assert batch.numel() > 200_000, "must be over the strict server's max_request_bytes"
    url = strict_server.endpoints.http_url if scheme == "http" else strict_server.endpoints.grpc_url
    with TeacherClient.connect(url, token=TOKEN, model="small") as client:
        reply = client.request(batch, mix=mix)
    assert reply.logits is not None and reply.logits.shape == (80, 10)
    assert len(reply.timings) > 1, "the batch should have needed several messages"
    as_dict = (
        None
        if mix is None
        else {"mode": mix.mode, "perm": list(mix.perm), "lam": mix.lam, "box": mix.box}
    )
    expected = in_process(teachers["small"], batch, as_dict)
    assert (reply.logits - expected).abs().max().item() < 1e-4


def test_answers_for_another_request_are_refused() -> None:
    part = _Part({"request_id": "abc"}, rows=1)
    body = {
        "request_id": "xyz",
        "model": "m",
        "timings": {"queue_ms": 0, "compute_ms": 0, "total_ms": 0, "batch_sizes": []},
        "logits": tensor_to_wire(torch.zeros(1, 10)),
    }
    with pytest.raises(TeacherError, match="expected 'abc'"):
        _assemble([part], [body], "abc")
