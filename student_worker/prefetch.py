"""Hide the teacher's round trip: keep K teacher requests in flight ahead of the training step.

Batches come out in the order they went in, each with the answer to its own request (the
request id is checked). An unreachable teacher pauses training with a log line and the
same request is tried again until the teacher answers; no batch is ever skipped.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, Protocol, TypeVar

import torch

from teacher_server.client import TeacherClient
from teacher_server.errors import DeadlineExceeded, NotReady, QueueFull
from teacher_server.views import Mix

log = logging.getLogger(__name__)
Item = TypeVar("Item")
WAIT_ERRORS = (NotReady, QueueFull, DeadlineExceeded)


class Teacher(Protocol):
    """Where the trainer gets a view's raw logits: a teacher server, or a model in-process."""

    round_trip_s: float

    def logits(self, step: int, view: torch.Tensor, mix: Mix | None) -> torch.Tensor: ...


class TeacherRequests:
    """Asks one teacher for raw logits (T = 1) of a view, waiting out an unreachable teacher."""

    def __init__(
        self, client: TeacherClient, model: str, *, run_id: str, max_wait_s: float = float("inf")
    ) -> None:
        self.client = client
        self.model = model
        self.run_id = run_id
        self.max_wait_s = max_wait_s
        self.round_trip_s = 0.0

    def logits(self, step: int, view: torch.Tensor, mix: Mix | None) -> torch.Tensor:
        """The teacher's raw logits for this step's view; retries until the teacher is back."""
        request_id = f"{self.run_id}/{step}"
        started = waiting_since = time.monotonic()
        pause = 1.0
        while True:
            try:
                reply = self.client.request(view, model=self.model, mix=mix, request_id=request_id)
                break
            except WAIT_ERRORS as error:
                waited = time.monotonic() - waiting_since
                if waited > self.max_wait_s:
                    raise
                log.warning(
                    "teacher unavailable for step %d (%s); training paused %.0fs, "
                    "retrying in %.0fs",
                    step,
                    error,
                    waited,
                    pause,
                )
                time.sleep(pause)
                pause = min(pause * 2, 30.0)
        if reply.request_id != request_id or reply.logits is None:
            raise RuntimeError(f"step {step} got the answer to {reply.request_id!r}")
        if pause > 1.0:
            log.warning("teacher is back; training resumes at step %d", step)
        self.round_trip_s = time.monotonic() - started
        return reply.logits


class Prefetcher(Generic[Item]):
    """Runs `fetch(item)` for up to `depth` items ahead, in worker threads; yields in order."""

    def __init__(self, fetch: Callable[[Item], torch.Tensor], depth: int = 3) -> None:
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}")
        self.fetch = fetch
        self.depth = depth

    def __call__(self, items: Iterable[Item]) -> Iterator[tuple[Item, torch.Tensor]]:
        if self.depth == 0:
            for item in items:
                yield item, self.fetch(item)
            return
        pending: deque[tuple[Item, Future[torch.Tensor]]] = deque()
        source = iter(items)
        with ThreadPoolExecutor(self.depth, thread_name_prefix="kdserve-prefetch") as pool:
            try:
                for item in source:
                    pending.append((item, pool.submit(self.fetch, item)))
                    if len(pending) > self.depth:
                        done, future = pending.popleft()
                        yield done, future.result()
                while pending:
                    done, future = pending.popleft()
                    yield done, future.result()
            finally:
                for _, future in pending:
                    future.cancel()
