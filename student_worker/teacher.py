"""The student's teacher: a served model (or ensemble) checked against the data, asked per step.

Each step's view goes to the teacher once and comes back as raw logits (temperature 1; each
loss applies its own). At start-up the student waits up to `teacher.startup_wait_s` for a
teacher that is unreachable or still loading (a pod scheduled before the teacher's), then
fails with TeacherUnreachable; a teacher that answers but does not serve the model, or serves
other classes, fails the run at once (NoTeacher). From then on the client waits out a teacher
that is restarting, unreachable or overloaded (`RetryPolicy.patient()`): training pauses with
a log line and no batch is skipped.
"""

from __future__ import annotations

import time
import uuid
from typing import Protocol

import torch

from student_worker.config import TeacherSettings
from teacher_server.client import RetryPolicy, TeacherClient
from teacher_server.client.retry import RETRYABLE
from teacher_server.shared.contract import Mix, ModelInfo
from teacher_server.shared.errors import TeacherError


class NoTeacher(ValueError):
    """The run has no usable teacher: not served there, other classes, or unreachable."""


class TeacherUnreachable(NoTeacher):
    """No teacher answered within `teacher.startup_wait_s`: trying again later may work."""


class Teacher(Protocol):
    """Where the trainer gets a view's raw logits: a teacher server, or a model in-process."""

    round_trip_s: float

    def logits(self, tag: str, view: torch.Tensor, mix: Mix | None) -> torch.Tensor:
        """Raw logits for `view` (mixed by `mix`); `tag` names the request, e.g. "step-12"."""
        ...


class TeacherRequests:
    """Asks one served teacher for the raw logits of each view (request id run-id/tag)."""

    def __init__(self, client: TeacherClient, model: str, *, run_id: str) -> None:
        self.client = client
        self.model = model
        self.run_id = run_id
        self.round_trip_s = 0.0

    def logits(self, tag: str, view: torch.Tensor, mix: Mix | None) -> torch.Tensor:
        started = time.monotonic()
        logits = self.client.infer(
            view, model=self.model, mix=mix, request_id=f"{self.run_id}/{tag}"
        )
        self.round_trip_s = time.monotonic() - started
        return logits

    def close(self) -> None:
        self.client.close()


def connect_teacher(
    settings: TeacherSettings, *, num_classes: int, data_name: str, run_name: str
) -> tuple[TeacherRequests, tuple[int, int]]:
    """The teacher named in `settings` and its input size; NoTeacher if it cannot teach."""
    token = settings.token.get_secret_value() if settings.token else None
    run_id = f"{run_name}-{uuid.uuid4().hex[:8]}"
    client = TeacherClient.connect(
        settings.endpoints,
        token=token,
        timeout_s=settings.timeout_s,
        tls=settings.tls(),
        allow_insecure_token=settings.allow_insecure_token,
        client_id=run_id,
        retry=_startup_retry(settings.startup_wait_s),
    )
    try:
        info = _served_teacher(client, settings, num_classes=num_classes, data_name=data_name)
    except BaseException:
        client.close()
        raise
    client.retry = RetryPolicy.patient()
    return TeacherRequests(client, info.name, run_id=run_id), info.input_size


def _startup_retry(wait_s: float) -> RetryPolicy:
    """Retry an unreachable or loading teacher for `wait_s` in all (0: one try)."""
    if wait_s == 0:
        return RetryPolicy(attempts=0)
    return RetryPolicy(attempts=None, max_backoff_s=2.0, patience_s=wait_s)


def _served_teacher(
    client: TeacherClient, settings: TeacherSettings, *, num_classes: int, data_name: str
) -> ModelInfo:
    wait_s = settings.startup_wait_s
    try_s = min(settings.timeout_s, wait_s) if wait_s else settings.timeout_s
    try:
        served = {m.name: m for m in client.list_models(try_s)}
    except TeacherError as error:
        message = f"cannot ask {settings.endpoints} for their models: {error}"
        if isinstance(error, RETRYABLE):
            raise TeacherUnreachable(
                f"{message} (waited teacher.startup_wait_s = {wait_s:g} s)"
            ) from error
        raise NoTeacher(message) from error
    name = settings.model or (next(iter(served)) if len(served) == 1 else None)
    if name not in served:
        raise NoTeacher(
            f"teacher model {name!r} is not served at {settings.endpoints}; "
            f"available: {sorted(served)}"
        )
    info = served[name]
    if info.num_classes != num_classes:
        raise NoTeacher(
            f"the teacher {name!r} has {info.num_classes} classes but the data set "
            f"{data_name!r} has {num_classes}"
        )
    return info
