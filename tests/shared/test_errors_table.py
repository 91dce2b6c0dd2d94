"""The error table: one row per error, and the client rebuilds exactly what the server raised."""

from __future__ import annotations

import pytest

from teacher_server.client.connections import Unreachable
from teacher_server.shared.errors import (
    ERROR_TABLE,
    DeadlineExceeded,
    InvalidRequest,
    ModelFailure,
    ModelNotFound,
    NotReady,
    QueueFull,
    RequestTimeout,
    RequestTooLarge,
    TeacherError,
    Unauthenticated,
    error_from_answer,
    status_of,
)

ROWS = [
    (InvalidRequest, 400, "INVALID_ARGUMENT"),
    (Unauthenticated, 401, "UNAUTHENTICATED"),
    (ModelNotFound, 404, "NOT_FOUND"),
    (RequestTooLarge, 413, "RESOURCE_EXHAUSTED"),
    (QueueFull, 429, "RESOURCE_EXHAUSTED"),
    (DeadlineExceeded, 504, "DEADLINE_EXCEEDED"),
    (RequestTimeout, 408, "DEADLINE_EXCEEDED"),
    (NotReady, 503, "UNAVAILABLE"),
    (ModelFailure, 500, "INTERNAL"),
]


def test_the_table_is_the_documented_one() -> None:
    assert [(cls, row.http, row.grpc) for cls, row in ERROR_TABLE.items()][:-1] == ROWS
    names = [row.name for row in ERROR_TABLE.values()]
    assert len(set(names)) == len(names)


@pytest.mark.parametrize(("cls", "http", "grpc"), ROWS, ids=[c.__name__ for c, _, _ in ROWS])
def test_an_answer_with_its_name_rebuilds_the_same_error(
    cls: type[TeacherError], http: int, grpc: str
) -> None:
    status = status_of(cls("what was wrong"))
    for rebuilt in (
        error_from_answer("what was wrong", name=status.name, http=http, retry_after_s=0.5),
        error_from_answer("what was wrong", name=status.name, grpc=grpc, retry_after_s=0.5),
    ):
        assert type(rebuilt) is cls
        assert rebuilt.message == "what was wrong" and rebuilt.retry_after_s == 0.5


def test_answers_without_a_name_map_by_status() -> None:
    """From a proxy or grpcio itself: the first row of the status."""
    assert type(error_from_answer("x", name=None, grpc="RESOURCE_EXHAUSTED")) is RequestTooLarge
    assert type(error_from_answer("x", name=None, http=429)) is QueueFull
    assert type(error_from_answer("x", name=None, http=500)) is ModelFailure
    assert type(error_from_answer("x", name=None, grpc="DEADLINE_EXCEEDED")) is DeadlineExceeded
    assert type(error_from_answer("x", name=None, http=408)) is RequestTimeout
    assert type(error_from_answer("x", name=None, http=502)) is TeacherError
    assert type(error_from_answer("x", name="from-the-future", http=404)) is ModelNotFound


def test_a_subclass_takes_its_ancestors_row() -> None:
    assert status_of(Unreachable("refused")) == ERROR_TABLE[NotReady]
    assert status_of(TeacherError("unexpected")).http == 500
