"""The client's one retry policy: what is retried, how long apart, and when it gives up."""

from __future__ import annotations

import math

import pytest

from teacher_server.client import RetryPolicy
from teacher_server.client.connections import TimedOut, Unreachable
from teacher_server.shared.errors import (
    DeadlineExceeded,
    InvalidRequest,
    ModelFailure,
    ModelNotFound,
    NotReady,
    QueueFull,
    RequestTooLarge,
    Unauthenticated,
)


@pytest.mark.parametrize(
    "error",
    [NotReady("loading"), Unreachable("refused"), QueueFull("full"), TimedOut("no answer")],
    ids=lambda e: type(e).__name__,
)
def test_unavailable_busy_and_late_answers_are_retried(error: Exception) -> None:
    delay = RetryPolicy().delay_s(0, error, time_left_s=10.0)  # type: ignore[arg-type]
    assert delay is not None and 0.025 <= delay <= 0.05


@pytest.mark.parametrize(
    "error",
    [
        InvalidRequest("bad"),
        ModelNotFound("nope"),
        Unauthenticated("token"),
        RequestTooLarge("big"),
        ModelFailure("boom"),
        DeadlineExceeded("expired in the server's queue"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_errors_of_the_request_itself_are_not_retried(error: Exception) -> None:
    assert RetryPolicy().delay_s(0, error, time_left_s=10.0) is None  # type: ignore[arg-type]


def test_backoff_doubles_up_to_its_cap_with_jitter() -> None:
    policy = RetryPolicy(attempts=None, backoff_s=0.1, max_backoff_s=0.5)
    for attempt, ceiling in [(0, 0.1), (1, 0.2), (2, 0.4), (3, 0.5), (30, 0.5), (10**6, 0.5)]:
        delay = policy.delay_s(attempt, NotReady("x"), time_left_s=60.0)
        assert delay is not None and ceiling / 2 <= delay <= ceiling, (attempt, delay)


def test_the_servers_retry_hint_is_a_floor() -> None:
    delay = RetryPolicy().delay_s(0, QueueFull("full", retry_after_s=1.5), time_left_s=10.0)
    assert delay == 1.5


def test_no_retry_past_the_attempts_or_the_calls_time() -> None:
    policy = RetryPolicy(attempts=2)
    assert policy.delay_s(1, NotReady("x"), time_left_s=10.0) is not None
    assert policy.delay_s(2, NotReady("x"), time_left_s=10.0) is None
    assert policy.delay_s(0, QueueFull("x", retry_after_s=2.0), time_left_s=1.0) is None


def test_a_patient_policy_waits_without_end_and_its_tries_keep_their_timeout() -> None:
    patient = RetryPolicy.patient(max_backoff_s=30.0)
    assert patient.budget_s(60.0) == math.inf
    assert patient.delay_s(10**6, Unreachable("gone"), time_left_s=math.inf) is not None
    assert patient.delay_s(0, DeadlineExceeded("expired"), time_left_s=math.inf) is not None
    assert patient.delay_s(0, InvalidRequest("bad"), time_left_s=math.inf) is None
    assert RetryPolicy().budget_s(60.0) == 60.0


@pytest.mark.parametrize(
    "settings",
    [{"attempts": -1}, {"backoff_s": 3.0, "max_backoff_s": 2.0}, {"patience_s": 0.0}],
)
def test_bad_settings_are_refused(settings: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**settings)  # type: ignore[arg-type]
