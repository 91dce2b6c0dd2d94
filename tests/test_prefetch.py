"""The prefetcher keeps requests in flight, keeps order, and waits out an absent teacher."""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

import pytest
import torch

from student_worker.prefetch import Prefetcher, TeacherRequests
from teacher_server.client import TeacherClient
from teacher_server.server import ServerThread
from tests.conftest import running_server, teacher_config
from tests.test_serving import in_process


def views(count: int) -> list[tuple[int, torch.Tensor]]:
    return [
        (
            step,
            torch.randint(
                0,
                256,
                (4, 3, 32, 32),
                dtype=torch.uint8,
                generator=torch.Generator().manual_seed(step),
            ),
        )
        for step in range(count)
    ]


def test_batches_come_back_in_order_with_their_own_answers(
    server: ServerThread, teachers: dict[str, Any]
) -> None:
    in_flight, most = 0, 0
    lock = threading.Lock()
    with TeacherClient.connect(server.endpoints.grpc_url) as client:
        requests = TeacherRequests(client, "small", run_id="run")

        def fetch(item: tuple[int, torch.Tensor]) -> torch.Tensor:
            nonlocal in_flight, most
            with lock:
                in_flight += 1
                most = max(most, in_flight)
            try:
                return requests.logits(item[0], item[1], None)
            finally:
                with lock:
                    in_flight -= 1

        results = []
        for (step, view), logits in Prefetcher(fetch, depth=3)(views(10)):
            time.sleep(0.02)
            results.append(step)
            assert (logits - in_process(teachers["small"], view)).abs().max().item() < 1e-4
    assert results == list(range(10))
    assert 2 <= most <= 4


def test_depth_zero_fetches_inline() -> None:
    calls: list[int] = []
    out = list(Prefetcher(lambda item: calls.append(item) or torch.zeros(1), depth=0)(range(3)))
    assert [item for item, _ in out] == [0, 1, 2] and calls == [0, 1, 2]
    with pytest.raises(ValueError, match="depth must be >= 0"):
        Prefetcher(lambda item: torch.zeros(1), depth=-1)


def test_training_pauses_while_the_teacher_is_away(
    teachers: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = TeacherClient.connect(
        f"http://127.0.0.1:{port}", retries=1, backoff_s=0.01, timeout_s=5
    )
    requests = TeacherRequests(client, "small", run_id="away")
    answers: list[torch.Tensor] = []
    worker = threading.Thread(
        target=lambda: answers.append(requests.logits(0, views(1)[0][1], None))
    )
    with caplog.at_level(logging.WARNING, logger="student_worker.prefetch"):
        worker.start()
        time.sleep(1.5)
        assert not answers
        with running_server(teacher_config(teachers, http_port=port)):
            worker.join(timeout=30)
    client.close()
    assert answers and answers[0].shape == (4, 10)
    assert "teacher unavailable for step 0" in caplog.text
    assert "training resumes at step 0" in caplog.text
