"""The client's one retry policy: which answers are tried again, how often, and how long apart.

Retried: a full queue (after the server's hint), a teacher that is loading, stopping or
unreachable, and a try this client stopped waiting for while the call still has time; a
patient policy also retries a request the server let expire in its queue (504). Everything
else (a bad request, an unknown model, a wrong token, a model failure) is raised at once.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from teacher_server.client.connections import TimedOut
from teacher_server.shared.errors import DeadlineExceeded, NotReady, QueueFull, TeacherError

RETRYABLE: tuple[type[TeacherError], ...] = (NotReady, QueueFull, TimedOut)


@dataclass(frozen=True)
class RetryPolicy:
    """How a call retries.

    `attempts`: retries after the first try (None: as many as `patience_s` allows).
    `patience_s`: how long a call may take in all, retries included (None: the call's own
    timeout; each try gets at most the call's timeout either way). `retry_expired`: also
    retry a request the server let expire in its queue. A student that must wait out a
    restarting or overloaded teacher uses `RetryPolicy.patient()`.
    """

    attempts: int | None = 8
    backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    patience_s: float | None = None
    retry_expired: bool = False

    def __post_init__(self) -> None:
        if self.attempts is not None and self.attempts < 0:
            raise ValueError(f"attempts must be >= 0 or None, got {self.attempts}")
        if not 0 <= self.backoff_s <= self.max_backoff_s:
            raise ValueError(
                f"need 0 <= backoff_s <= max_backoff_s, got {self.backoff_s}, {self.max_backoff_s}"
            )
        if self.patience_s is not None and not self.patience_s > 0:
            raise ValueError(f"patience_s must be > 0 or None, got {self.patience_s}")

    @classmethod
    def patient(cls, max_backoff_s: float = 30.0) -> RetryPolicy:
        """Retry without end: a training run pauses until its teacher answers again."""
        return cls(
            attempts=None, max_backoff_s=max_backoff_s, patience_s=math.inf, retry_expired=True
        )

    def budget_s(self, timeout_s: float) -> float:
        """How long a call with this per-call timeout may take, retries included."""
        return timeout_s if self.patience_s is None else max(timeout_s, self.patience_s)

    def delay_s(self, attempt: int, error: TeacherError, time_left_s: float) -> float | None:
        """Seconds to wait before retry number `attempt` (0-based), or None to give up."""
        retried = isinstance(error, RETRYABLE) or (
            self.retry_expired and isinstance(error, DeadlineExceeded)
        )
        if not retried or (self.attempts is not None and attempt >= self.attempts):
            return None
        backoff = min(self.max_backoff_s, self.backoff_s * 2.0 ** min(attempt, 64))
        delay = max(backoff * random.uniform(0.5, 1.0), error.retry_after_s or 0.0)
        return delay if delay < time_left_s else None
