"""Keep the server's RSS near the memory it uses: hand glibc's free heap back as RSS grows.

Passes of ever-new batch sizes make oneDNN create (and cache, keyed by shape) new primitives;
their small long-lived allocations land between the large buffers that earlier passes freed,
and glibc keeps those holes resident: under 1..256-image requests the server's RSS grew by
~500 MiB in 30 s while the heap in use stayed flat. A trimmer thread calls malloc_trim(0)
each time RSS has grown `slack_bytes` past its level after the previous trim
(ServerConfig.heap_trim_mib; bench/teacher_soak.py measures it against no trimming).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)
DEFAULT_SLACK_BYTES = 32 * 2**20
DEFAULT_CHECK_EVERY_S = 2.0

MallocTrim = Callable[[int], int]


def resident_bytes() -> int:
    """This process's resident set size (Linux /proc/self/statm)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def glibc_malloc_trim() -> MallocTrim | None:
    """glibc's `malloc_trim(pad)`, or None where the C library is not glibc."""
    try:
        version = os.confstr("CS_GNU_LIBC_VERSION")
    except (AttributeError, ValueError, OSError):
        return None
    if not version or not version.startswith("glibc"):
        return None
    trim = ctypes.CDLL("libc.so.6").malloc_trim
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    result: MallocTrim = trim
    return result


class HeapTrimmer(Collector):
    """A daemon thread that trims the heap whenever RSS is `slack_bytes` over its last level.

    As a Prometheus collector it counts its trims and the bytes they gave back.
    """

    def __init__(
        self,
        malloc_trim: MallocTrim,
        *,
        slack_bytes: int = DEFAULT_SLACK_BYTES,
        check_every_s: float = DEFAULT_CHECK_EVERY_S,
    ) -> None:
        if slack_bytes < 0:
            raise ValueError(f"slack_bytes must be >= 0, got {slack_bytes}")
        if check_every_s <= 0:
            raise ValueError(f"check_every_s must be > 0, got {check_every_s}")
        self.slack_bytes = slack_bytes
        self.check_every_s = check_every_s
        self.trims = 0
        self.released_bytes = 0
        self._malloc_trim = malloc_trim
        self._level = resident_bytes()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kdserve-heap-trimmer", daemon=True)

    def start(self) -> HeapTrimmer:
        self._thread.start()
        return self

    def check(self) -> bool:
        """Trim if RSS grew more than the slack since the last trim; whether it trimmed.

        The level is only reset by a trim, so memory the server really uses costs one trim
        that frees little, not a trim every check.
        """
        resident = resident_bytes()
        if resident <= self._level + self.slack_bytes:
            return False
        self._malloc_trim(0)
        self._level = resident_bytes()
        self.trims += 1
        self.released_bytes += max(0, resident - self._level)
        log.debug("malloc_trim: RSS %.0f -> %.0f MiB", resident / 2**20, self._level / 2**20)
        return True

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(
            "kdserve_heap_trims", "malloc_trim calls by the heap trimmer", value=self.trims
        )
        yield CounterMetricFamily(
            "kdserve_heap_trimmed_bytes",
            "resident bytes the heap trimmer's malloc_trim calls gave back",
            value=self.released_bytes,
        )

    def _run(self) -> None:
        while not self._stopped.wait(self.check_every_s):
            self.check()


def start_heap_trimmer(
    *, slack_bytes: int = DEFAULT_SLACK_BYTES, check_every_s: float = DEFAULT_CHECK_EVERY_S
) -> HeapTrimmer | None:
    """Start a HeapTrimmer where glibc and /proc are there; None elsewhere (logged once)."""
    malloc_trim = glibc_malloc_trim()
    if malloc_trim is None or not Path("/proc/self/statm").exists():
        log.info("not glibc on Linux: the heap is left to the C library's own trimming")
        return None
    return HeapTrimmer(malloc_trim, slack_bytes=slack_bytes, check_every_s=check_every_s).start()
