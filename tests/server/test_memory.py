"""The heap trimmer: trims only past the slack, and really gives glibc's free heap back."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import httpx
import pytest

from teacher_server.server import memory
from teacher_server.server.memory import HeapTrimmer, glibc_malloc_trim
from tests.helpers import running_server, teacher_config

MiB = 2**20


def test_trims_only_when_rss_grew_past_the_slack() -> None:
    calls: list[int] = []

    def fake_trim(pad: int) -> int:
        calls.append(pad)
        return 0

    relaxed = HeapTrimmer(fake_trim, slack_bytes=1 << 40)
    strict = HeapTrimmer(fake_trim, slack_bytes=8 * MiB)
    grown = bytearray(64 * MiB)
    grown[:: os.sysconf("SC_PAGE_SIZE")] = b"\1" * (len(grown) // os.sysconf("SC_PAGE_SIZE"))
    assert not relaxed.check()
    assert strict.check() and calls == [0] and strict.trims == 1
    assert not strict.check(), "the level after a trim is the new reference"
    del grown


def test_rejects_a_negative_slack_and_a_zero_period() -> None:
    with pytest.raises(ValueError, match="slack_bytes"):
        HeapTrimmer(lambda pad: 0, slack_bytes=-1)
    with pytest.raises(ValueError, match="check_every_s"):
        HeapTrimmer(lambda pad: 0, check_every_s=0)


def test_no_trimmer_without_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_glibc(name: str) -> str:
        raise ValueError(name)

    monkeypatch.setattr(memory.os, "confstr", not_glibc)
    assert glibc_malloc_trim() is None
    assert memory.start_heap_trimmer() is None


HOLES = """
import ctypes, time
from teacher_server.server.memory import HeapTrimmer, glibc_malloc_trim, resident_bytes
MiB = 2**20
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
blocks, pins = [], []
for _ in range(2048):  # 64 KiB blocks, each followed by a live 64-byte pin
    block = libc.malloc(64 * 1024)
    ctypes.memset(block, 1, 64 * 1024)
    blocks.append(block)
    pins.append(libc.malloc(64))
for block in blocks:
    libc.free(block)
holding = resident_bytes()
trimmer = HeapTrimmer(glibc_malloc_trim(), slack_bytes=0, check_every_s=0.05).start()
deadline = time.monotonic() + 20.0
while trimmer.trims == 0 and time.monotonic() < deadline:
    time.sleep(0.05)
trimmer.stop()
print(holding // MiB, resident_bytes() // MiB, trimmer.trims, trimmer.released_bytes // MiB)
"""


@pytest.mark.skipif(glibc_malloc_trim() is None, reason="needs glibc's malloc_trim")
def test_the_trimmer_returns_heap_holes_to_the_os() -> None:
    """128 MiB of freed blocks held between live pins: glibc keeps them resident until a trim.

    In a fresh interpreter, so that other tests' threads and heaps do not move its RSS.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    run = subprocess.run(
        [sys.executable, "-c", HOLES], capture_output=True, text=True, timeout=120, env=env
    )
    assert run.returncode == 0, run.stderr
    holding, after, trims, released = map(int, run.stdout.split())
    assert trims >= 1 and released >= 64, run.stdout
    assert after <= holding - 64, f"RSS {after} MiB after the trim, {holding} MiB before"


def test_a_server_with_trimming_off_has_no_trimmer(teachers: dict[str, Any]) -> None:
    with running_server(teacher_config(teachers, heap_trim_mib=0)) as server:
        page = httpx.get(f"{server.endpoints.http_url}/metrics").text
        assert "process_resident_memory_bytes" in page and "kdserve_heap_trims" not in page
