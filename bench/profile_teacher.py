"""Where the teacher server's time goes: py-spy samples the server under a bench load.

Starts `kdserve-teacher` (one replica with every core's threads, as `teacher_throughput.py`'s
default layout) under `py-spy record` (Python frames; `--native` adds C/C++ ones), runs
`--clients` client processes of one of `teacher_throughput.py`'s cases over one wire for
`--seconds` after they are warm, stops the server and prints what its threads were doing: the
top functions by self time (the innermost frame of each sample) and by total time (anywhere
on the stack), as shares of the samples. Samples taken while the server imported its modules
(any stack through `_find_and_load`) are left out and counted apart.

py-spy is not a dependency of kdserve: `pip install py-spy`, or pass `--py-spy PATH`.

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 \\
        .venv/bin/python bench/profile_teacher.py --case wire-bound --wire http --clients 8
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import teacher_throughput as throughput

IMPORTING = "_find_and_load"


def start_profiled_server(
    workdir: Path, case: throughput.Case, py_spy: str, rate: int, native: bool
) -> tuple[subprocess.Popen[bytes], int, dict[str, str], Path]:
    """py-spy recording a teacher server it started; (py-spy, the server's pid, ports, out)."""
    threads = os.cpu_count() or 1
    server = {
        "max_batch_size": 256,
        "max_delay_ms": 2,
        "replicas_per_device": 1,
        "threads_per_replica": threads,
    }
    out = workdir / "profile.txt"
    record = [py_spy, "record", "--format", "raw", "--rate", str(rate)]
    record += [*(["--native"] if native else []), "--output", str(out), "--"]
    spy, ports = throughput.start_server(workdir, case, server, prefix=record)
    children = Path(f"/proc/{spy.pid}/task/{spy.pid}/children").read_text().split()
    if len(children) != 1:
        raise RuntimeError(f"expected py-spy to have one child, the server: {children}")
    return spy, int(children[0]), ports, out


def read_stacks(path: Path) -> tuple[collections.Counter[tuple[str, ...]], int]:
    """py-spy's raw output: one `frame;frame;... count` line per distinct stack, outermost
    first; (stacks not under an import and their counts, samples taken while importing)."""
    stacks: collections.Counter[tuple[str, ...]] = collections.Counter()
    importing = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = tuple(stack.split(";"))
        if any(IMPORTING in frame for frame in frames):
            importing += int(count)
        else:
            stacks[frames] += int(count)
    return stacks, importing


def function_of(frame: str) -> str:
    """A py-spy frame `name (file:line)` as `name (file)`: lines of one function merged."""
    name, _, where = frame.partition(" (")
    file = where.rsplit(":", 1)[0].rstrip(")")
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{name} ({file})" if file else name


def summarize(stacks: collections.Counter[tuple[str, ...]], top: int) -> list[str]:
    """The top functions by self and by total share of the samples."""
    total = sum(stacks.values()) or 1
    self_time: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    for frames, count in stacks.items():
        functions = [function_of(frame) for frame in frames]
        self_time[functions[-1]] += count
        for function in set(functions):
            inclusive[function] += count
    lines = [f"{total} samples", "", "self time (the innermost frame):"]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in self_time.most_common(top)]
    lines += ["", "total time (anywhere on the stack):"]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in inclusive.most_common(top)]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--case", choices=["compute-bound", "wire-bound"], default="wire-bound")
    parser.add_argument("--wire", choices=throughput.WIRES, default="http")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--py-spy", default=shutil.which("py-spy"), help="the py-spy binary")
    parser.add_argument("--keep", type=Path, help="copy py-spy's raw stacks here")
    parser.add_argument(
        "--native",
        action="store_true",
        help="C/C++ frames too (slows the server about 2x, and its waits in epoll_wait or on "
        "locks count as busy)",
    )
    args = parser.parse_args()
    if not args.py_spy:
        sys.exit("profile_teacher: py-spy not found: pip install py-spy, or pass --py-spy PATH")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        case = next(c for c in throughput.build_cases(workdir) if c.name == args.case)
        spy, server_pid, ports, out = start_profiled_server(
            workdir, case, args.py_spy, args.rate, args.native
        )
        try:
            url = ports[f"{args.wire.removeprefix('v2-')}_url"]
            url = f"v2+{url}" if args.wire.startswith("v2-") else url
            run = throughput.measure_served(url, server_pid, case, args.clients, args.seconds)
        finally:
            os.kill(server_pid, 15)
            spy.wait(timeout=120)
        if args.keep:
            shutil.copyfile(out, args.keep)
        stacks, importing = read_stacks(out)
    print(
        f"{args.case}, {args.wire}, {args.clients} clients, {args.seconds:g} s: "
        f"{run.images_per_s:.0f} img/s, server CPU {run.server_cpu_ms:.1f} ms/request, "
        f"clients {run.client_cpu_ms:.1f} ms/request (under py-spy at {args.rate} Hz; "
        f"{importing} samples while importing left out)"
    )
    print("\n".join(summarize(stacks, args.top)))


if __name__ == "__main__":
    main()
