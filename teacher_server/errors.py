"""The one error table shared by both transports and the client (ARCHITECTURE.md, "Errors")."""

from __future__ import annotations

from typing import ClassVar

import grpc


class TeacherError(Exception):
    """Base of every error the teacher server answers with; carries its HTTP and gRPC status."""

    http_status: ClassVar[int] = 500
    grpc_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s

    @property
    def code_name(self) -> str:
        return self.grpc_code.name


class InvalidRequest(TeacherError):
    """Malformed body, bad dtype/shape/length, bad temperature or any other bad field."""

    http_status = 400
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


class Unauthenticated(TeacherError):
    """Missing or wrong bearer token."""

    http_status = 401
    grpc_code = grpc.StatusCode.UNAUTHENTICATED


class ModelNotFound(TeacherError):
    """The request names a model or ensemble the server does not serve."""

    http_status = 404
    grpc_code = grpc.StatusCode.NOT_FOUND


class RequestTooLarge(TeacherError):
    """The body is over the server's max_request_bytes."""

    http_status = 413
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class QueueFull(TeacherError):
    """Backpressure: the model's queue holds max_queue_images already; retry after a while."""

    http_status = 429
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(TeacherError):
    """The request's deadline passed while it waited in the queue; it was never computed."""

    http_status = 504
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotReady(TeacherError):
    """Models are still loading or the server is shutting down."""

    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE


class ModelFailure(TeacherError):
    """The model raised while computing this request; the server keeps serving."""

    http_status = 500
    grpc_code = grpc.StatusCode.INTERNAL


ERROR_TABLE: tuple[type[TeacherError], ...] = (
    InvalidRequest,
    Unauthenticated,
    ModelNotFound,
    RequestTooLarge,
    QueueFull,
    DeadlineExceeded,
    NotReady,
    ModelFailure,
)

_BY_HTTP_STATUS = {cls.http_status: cls for cls in ERROR_TABLE}


def error_from_http(status: int, message: str, retry_after_s: float | None) -> TeacherError:
    """Rebuild the server's exception from an HTTP error answer (used by the client)."""
    cls = _BY_HTTP_STATUS.get(status, TeacherError)
    return cls(f"HTTP {status}: {message}", retry_after_s=retry_after_s)


def error_from_grpc(
    code: grpc.StatusCode, message: str, retry_after_s: float | None
) -> TeacherError:
    """Rebuild the server's exception from a gRPC status (used by the client).

    RESOURCE_EXHAUSTED means a full queue when the server sent a retry hint, else an
    oversized message; DEADLINE_EXCEEDED and UNAVAILABLE may also come from the channel.
    """
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        cls: type[TeacherError] = QueueFull if retry_after_s is not None else RequestTooLarge
    else:
        cls = next((c for c in ERROR_TABLE if c.grpc_code == code), TeacherError)
    return cls(f"gRPC {code.name}: {message}", retry_after_s=retry_after_s)
