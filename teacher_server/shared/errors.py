"""The error table: every error a teacher answers with, its HTTP status and its gRPC code.

Pure Python, so the engine, the batcher and the client's callers import it without a
transport library. Each transport maps an error to its answer with `status_of`, and the
client rebuilds the same exception with `error_from_answer`: by the error's `name`, which
every kdserve answer carries, else (an answer from a proxy or from grpcio itself) by status.
"""

from __future__ import annotations

from dataclasses import dataclass


class TeacherError(Exception):
    """Base of every error a teacher answers with; `retry_after_s` is a back-off hint."""

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class InvalidRequest(TeacherError):
    """Malformed body, bad dtype/shape/length, bad temperature or any other bad field.

    `model` is the model the request named, when it could be read (for the server's stats).
    """

    def __init__(
        self, message: str, *, model: str | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message, retry_after_s=retry_after_s)
        self.model = model


class Unauthenticated(TeacherError):
    """Missing or wrong bearer token."""


class ModelNotFound(TeacherError):
    """The request names a model or ensemble the server does not serve."""


class RequestTooLarge(TeacherError):
    """The body is over max_request_bytes, or asks more work than one request may cause
    (max_request_images, max_request_pixels, max_queue_images)."""


class QueueFull(TeacherError):
    """Backpressure: the model's queue holds max_queue_images already; retry after a while."""


class RequestTimeout(TeacherError):
    """The client sent its request head or body too slowly (header_timeout_s, body_timeout_s)."""


class DeadlineExceeded(TeacherError):
    """The request's deadline passed before it was computed (or the client's call timed out)."""


class NotReady(TeacherError):
    """Models are still loading or the server is shutting down."""


class ModelFailure(TeacherError):
    """The model raised while computing this request; the server keeps serving."""


@dataclass(frozen=True)
class Status:
    """How one error travels: its stable name, its HTTP status and its gRPC status code name."""

    name: str
    http: int
    grpc: str


ERROR_TABLE: dict[type[TeacherError], Status] = {
    InvalidRequest: Status("invalid_request", 400, "INVALID_ARGUMENT"),
    Unauthenticated: Status("unauthenticated", 401, "UNAUTHENTICATED"),
    ModelNotFound: Status("model_not_found", 404, "NOT_FOUND"),
    RequestTooLarge: Status("request_too_large", 413, "RESOURCE_EXHAUSTED"),
    QueueFull: Status("queue_full", 429, "RESOURCE_EXHAUSTED"),
    DeadlineExceeded: Status("deadline_exceeded", 504, "DEADLINE_EXCEEDED"),
    RequestTimeout: Status("request_timeout", 408, "DEADLINE_EXCEEDED"),
    NotReady: Status("not_ready", 503, "UNAVAILABLE"),
    ModelFailure: Status("model_failure", 500, "INTERNAL"),
    TeacherError: Status("internal", 500, "INTERNAL"),
}
"""One row per error class. Rows are in order: an answer without a name maps to the first row
with its status (a bare RESOURCE_EXHAUSTED is grpcio's own message-size refusal)."""


def status_of(error: TeacherError) -> Status:
    """The row of an error; a subclass the table does not list takes its nearest ancestor's."""
    for cls in type(error).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls]
    raise AssertionError("unreachable: TeacherError is in the table")


def error_from_answer(
    message: str,
    *,
    name: str | None,
    http: int | None = None,
    grpc: str | None = None,
    retry_after_s: float | None = None,
) -> TeacherError:
    """The exception the server raised, rebuilt from its answer (used by the client)."""
    rows = list(ERROR_TABLE.items())
    by_name = next((cls for cls, row in rows if row.name == name), None)
    by_status = next(
        (cls for cls, row in rows if row.http == http or (grpc is not None and row.grpc == grpc)),
        TeacherError,
    )
    return (by_name or by_status)(message, retry_after_s=retry_after_s)
