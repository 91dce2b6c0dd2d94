"""The student-facing client: endpoints, failover, retries, timeouts, chunking, request ids."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from teacher_server.client import RetryPolicy, TeacherClient
from teacher_server.client.connections import Unreachable
from teacher_server.server.serve import ServerThread
from teacher_server.shared.contract import Mix
from teacher_server.shared.errors import DeadlineExceeded, InvalidRequest, ModelNotFound
from tests.helpers import (
    BUSY_CLIENT,
    TOKEN,
    free_ports,
    in_process,
    model_stats,
    occupy_slow_model,
    random_images,
    refusing_port,
    running_server,
    teacher_config,
)


def ok_requests(server: ServerThread, model: str = "small") -> int:
    return int(model_stats(server)[model]["requests"].get("ok", 0))


def test_round_robin_over_endpoints(server: ServerThread, teachers: dict[str, Any]) -> None:
    with running_server(teacher_config(teachers)) as second:
        before = (ok_requests(server), ok_requests(second))
        urls = [server.endpoints.grpc_url, second.endpoints.http_url]
        with TeacherClient.connect(urls, model="small") as client:
            answers = [client.infer(random_images(2)) for _ in range(6)]
        after = (ok_requests(server), ok_requests(second))
    assert (after[0] - before[0], after[1] - before[1]) == (3, 3)
    assert all(torch.equal(a, answers[0]) for a in answers)


@pytest.mark.parametrize("scheme", ["http", "grpc"])
def test_failover_past_a_dead_endpoint(server: ServerThread, scheme: str) -> None:
    live = server.endpoints.http_url if scheme == "http" else server.endpoints.grpc_url
    with (
        refusing_port() as port,
        TeacherClient.connect([f"{scheme}://127.0.0.1:{port}", live], model="small") as client,
    ):
        for _ in range(4):
            assert client.infer(random_images(2)).shape == (2, 10)


@pytest.mark.parametrize("scheme", ["http", "grpc"])
def test_unreachable_teacher_gives_up_after_retries(scheme: str) -> None:
    with (
        refusing_port() as port,
        TeacherClient.connect(
            f"{scheme}://127.0.0.1:{port}",
            model="small",
            retry=RetryPolicy(attempts=2, backoff_s=0.01),
        ) as client,
        pytest.raises(Unreachable, match="cannot reach"),
    ):
        client.infer(random_images(1))


@pytest.mark.parametrize("scheme", ["http", "grpc"])
def test_client_errors_are_not_retried(server: ServerThread, scheme: str) -> None:
    url = server.endpoints.http_url if scheme == "http" else server.endpoints.grpc_url
    before = model_stats(server)["small"]["requests"].get("invalid", 0)
    with TeacherClient.connect(url) as client:
        with pytest.raises(ModelNotFound):
            client.infer(random_images(1), model="nope")
        with pytest.raises(InvalidRequest, match="temperature"):
            client.infer(random_images(1), model="small", temperature=-1.0)
        with pytest.raises(ValueError, match="no model named"):
            client.infer(random_images(1))
    assert model_stats(server)["small"]["requests"]["invalid"] == before + 1


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
                strict_server.endpoints.http_url, token=TOKEN, model="slow", client_id=BUSY_CLIENT
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
    batch = random_images(80, seed=21)
    assert batch.numel() > 200_000, "must be over the strict server's max_request_bytes"
    url = strict_server.endpoints.http_url if scheme == "http" else strict_server.endpoints.grpc_url
    with TeacherClient.connect(url, token=TOKEN, model="small") as client:
        reply = client.request(batch, mix=mix)
    assert reply.logits is not None and reply.logits.shape == (80, 10)
    assert len(reply.parts) > 1, "the batch should have needed several messages"
    assert [r.request_id for r in reply.parts] == [
        f"{reply.request_id}/{i}" for i in range(len(reply.parts))
    ]
    as_dict = (
        None
        if mix is None
        else {"mode": mix.mode, "perm": list(mix.perm), "lam": mix.lam, "box": mix.box}
    )
    expected = in_process(teachers["small"], batch, as_dict)
    assert (reply.logits - expected).abs().max().item() < 1e-4


def test_a_kept_alive_http_connection_to_a_restarted_teacher_is_replaced_at_once(
    teachers: dict[str, Any],
) -> None:
    """The server behind a pooled keep-alive connection restarts: the next request goes out on
    a fresh connection within the same try (no retry of the policy's is left to spend)."""
    (port,) = free_ports(1)
    config = teacher_config(teachers, http_port=port)
    images = random_images(3, 32, seed=91)
    expected = in_process(teachers["small"], images)
    with TeacherClient.connect(
        f"http://127.0.0.1:{port}", model="small", retry=RetryPolicy(attempts=0)
    ) as client:
        for _ in range(2):
            with running_server(config):
                for _ in range(2):
                    assert (client.infer(images) - expected).abs().max().item() < 1e-4
