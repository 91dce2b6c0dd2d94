"""The demo's child processes: started so that none outlives the demo, stopped gently first.

Each child gets its own session (a Ctrl-C in the terminal reaches the demo alone, which then
stops the children in order) and, on Linux, a parent-death signal, so even a demo killed with
SIGKILL leaves no orphan behind.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1


class ChildFailed(RuntimeError):
    """A child process exited with an error; the message holds the end of its log."""


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]

    def log_tail(self, lines: int = 25) -> str:
        self.log_file.flush()
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


class Children:
    """Started processes by name; stopping sends SIGTERM, waits, then kills what is left."""

    def __init__(self) -> None:
        self.running: dict[str, Child] = {}

    def start(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        threads: int = 1,
    ) -> Child:
        """Start `argv` with its output in `log_path`, limited to `threads` compute threads."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        environment = {
            **os.environ,
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "PYTHONUNBUFFERED": "1",
        }
        log_file = open(log_path, "wb")  # noqa: SIM115 (closed in stop_all / wait)
        process = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=environment,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # the demo starts children from its main thread only
        )
        child = Child(name, process, log_path, log_file)
        self.running[name] = child
        return child

    def check(self) -> None:
        """Forget the children that exited 0; raise if one failed."""
        for name, child in list(self.running.items()):
            code = child.process.poll()
            if code is None:
                continue
            del self.running[name]
            child.log_file.close()
            if code != 0:
                raise ChildFailed(
                    f"{name} exited with code {code}; the end of {child.log_path}:\n"
                    f"{child.log_tail()}"
                )

    def wait_all(self, poll_s: float = 0.5) -> None:
        while self.running:
            self.check()
            time.sleep(poll_s)

    def stop(self, name: str, timeout_s: float = 15.0) -> None:
        self._stop([self.running.pop(name)], timeout_s)

    def stop_all(self, keep_last: str | None = None, timeout_s: float = 15.0) -> None:
        """Stop every child at once, but `keep_last` only after the others (the server that
        the students still talk to while they finish their step)."""
        last = self.running.pop(keep_last, None) if keep_last else None
        children, self.running = list(self.running.values()), {}
        self._stop(children, timeout_s)
        if last is not None:
            self._stop([last], timeout_s)

    def _stop(self, children: list[Child], timeout_s: float) -> None:
        for child in children:
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for child in children:
            try:
                child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0fs; killing it", child.name, timeout_s)
                child.process.kill()
                child.process.wait()
            child.log_file.close()
