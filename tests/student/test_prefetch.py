"""The prefetcher keeps requests in flight and in order; an absent teacher is waited for."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from student_worker.prefetch import Prefetcher
from student_worker.teacher import TeacherRequests
from teacher_server.client import RetryPolicy, TeacherClient
from teacher_server.server import registry
from teacher_server.server.serve import ServerThread
from tests.helpers import in_process, random_images, running_server, teacher_config

WAIT_S = 30.0


def test_depth_requests_are_in_flight_at_once_and_no_more() -> None:
    """Every fetch blocks until released: `depth` start, the next waits for a free slot."""
    started: list[int] = []
    running, most = 0, 0
    changed = threading.Condition()
    release = {item: threading.Event() for item in range(8)}

    def fetch(item: int) -> torch.Tensor:
        nonlocal running, most
        with changed:
            started.append(item)
            running += 1
            most = max(most, running)
            changed.notify_all()
        assert release[item].wait(WAIT_S)
        with changed:
            running -= 1
        return torch.tensor([item])

    results: list[tuple[int, int]] = []
    consumer = threading.Thread(
        target=lambda: results.extend((i, int(t)) for i, t in Prefetcher(fetch, depth=3)(range(8)))
    )
    consumer.start()
    with changed:
        assert changed.wait_for(lambda: len(started) == 3, WAIT_S)
        assert sorted(started) == [0, 1, 2]
    release[0].set()
    with changed:
        assert changed.wait_for(lambda: len(started) == 4, WAIT_S)
        assert started[3] == 3
    for event in release.values():
        event.set()
    consumer.join(WAIT_S)
    assert results == [(i, i) for i in range(8)]
    assert most == 3, f"{most} fetches ran at once with depth 3"


def test_items_come_out_in_order_even_when_answers_do_not() -> None:
    """Later items finish first; each still comes out in its turn with its own answer."""
    finished = {item: threading.Event() for item in range(4)}

    def fetch(item: int) -> torch.Tensor:
        if item < 3:
            assert finished[item + 1].wait(WAIT_S)  # item i finishes after item i + 1
        finished[item].set()
        return torch.tensor([item * 10])

    out = [(item, int(answer)) for item, answer in Prefetcher(fetch, depth=4)(range(4))]
    assert out == [(0, 0), (1, 10), (2, 20), (3, 30)]


def test_depth_zero_fetches_inline() -> None:
    calls: list[int] = []
    out = list(Prefetcher(lambda item: calls.append(item) or torch.zeros(1), depth=0)(range(3)))
    assert [item for item, _ in out] == [0, 1, 2] and calls == [0, 1, 2]
    with pytest.raises(ValueError, match="depth must be >= 0"):
        Prefetcher(lambda item: torch.zeros(1), depth=-1)


def test_each_step_gets_the_teachers_answer_for_its_own_view(
    server: ServerThread, teachers: dict[str, Any]
) -> None:
    views = [(step, random_images(4, 32, seed=step)) for step in range(10)]
    with TeacherClient.connect(server.endpoints.grpc_url) as client:
        teacher = TeacherRequests(client, "small", run_id="run")
        fetched = Prefetcher(lambda item: teacher.logits(item[0], item[1], None), depth=3)
        for (step, view), logits in fetched(iter(views)):
            assert (logits - in_process(teachers["small"], view)).abs().max().item() < 1e-4, step
    assert teacher.round_trip_s > 0


class _Records(logging.Handler):
    """Sets an event when a log message contains `text`."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.WARNING)
        self.text = text
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()


@pytest.fixture
def slow_loading(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Models of servers started now load only once the event is set."""
    loaded = threading.Event()
    build = registry.build_module

    def wait_then_build(config: Any) -> torch.nn.Module:
        assert loaded.wait(WAIT_S)
        return build(config)

    monkeypatch.setattr(registry, "build_module", wait_then_build)
    yield loaded
    loaded.set()


def test_training_pauses_while_the_teacher_is_away_and_resumes(
    teachers: dict[str, Any], slow_loading: threading.Event
) -> None:
    """A teacher still loading answers 503: the step waits (logged), then gets its answer."""
    waiting = _Records("teacher unavailable for request 'away/0'")
    back = _Records("teacher answered request 'away/0'")
    client_log = logging.getLogger("teacher_server.client.teacher_client")
    client_log.addHandler(waiting)
    client_log.addHandler(back)
    answers: list[torch.Tensor] = []
    try:
        with running_server(teacher_config(teachers), wait_ready=False) as loading:
            retry = RetryPolicy(attempts=None, backoff_s=0.05, max_backoff_s=0.2, patience_s=60)
            with TeacherClient.connect(loading.endpoints.http_url, retry=retry) as client:
                teacher = TeacherRequests(client, "small", run_id="away")
                step = threading.Thread(
                    target=lambda: answers.append(teacher.logits(0, random_images(4), None))
                )
                step.start()
                assert waiting.seen.wait(WAIT_S), "the paused step was not logged"
                assert not answers
                slow_loading.set()
                step.join(WAIT_S)
    finally:
        client_log.removeHandler(waiting)
        client_log.removeHandler(back)
    assert answers and answers[0].shape == (4, 10)
    assert back.seen.is_set()
