"""The teacher server's memory under sustained load: RSS sampled while students of both protocols
send requests of varied sizes, so the server's passes take many batch sizes.

Target (docs/architecture.md): the server's RSS stays within 10% of its level after warm-up
(5 minutes, 8 clients, both protocols, several students). The clients take the wires in turn:
our HTTP and gRPC (`TeacherClient`) and the Open Inference Protocol's REST and gRPC
(tritonclient: `v2-http`, `v2-grpc`); each draws its request size uniformly from --images
(seeded per client).

Two servers run one after the other under the same load: one with `heap_trim_mib: 0` (no
heap trimmer: glibc's own behaviour) and one with the default `heap_trim_mib`; the last
lines compare their RSS and throughput. Inside each server a probe logs glibc's mallinfo2()
(heap in use / free / mmapped); at the end it calls malloc_trim(0) once, to show how much of
the RSS was free heap that malloc kept. The servers' environment is this script's: run it
without the MALLOC_* variables to see what users get (they turn glibc's trimming off);
--server-env adds variables for the servers alone.

Run:
    .venv/bin/python bench/teacher_soak.py --seconds 300
Options: --seconds S (measured time per server, default 300), --clients N (default 8, taking
the wires in turn), --wires W [W ...] (of http grpc v2-http v2-grpc, default all four),
--images LO HI (request sizes, default 1 256), --warm-up S (default 60), --every S
(sampling period, default 5), --window S (the levels after warm-up and at the end are
medians over S seconds, default 30), --trim-mib N [N ...] (the servers' heap_trim_mib,
default 0 and the default), --server-env KEY=VALUE ... (e.g. MALLOC_ARENA_MAX=2),
--pass-sizes N ... (the model's pass_sizes: every pass padded to one of a few sizes, so oneDNN
caches a few primitives; they must include 256, the servers' max_batch_size).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing as mp
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx
import teacher_throughput as throughput
from prometheus_client.parser import text_string_to_metric_families

from teacher_server.server.config import ServerConfig

TARGET = 0.10
MALLINFO2_FIELDS = (
    "arena",
    "ordblks",
    "smblks",
    "hblks",
    "hblkhd",
    "usmblks",
    "fsmblks",
    "uordblks",
    "fordblks",
    "keepcost",
)


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in MALLINFO2_FIELDS]


def proc_status_mib(pid: int) -> dict[str, float]:
    """VmRSS, RssAnon, RssFile and VmHWM of a process in MiB, and its thread count."""
    values: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
        elif key == "Threads":
            values[key] = int(rest)
    if "VmRSS" not in values:
        raise RuntimeError(f"no VmRSS for process {pid}")
    return values


def serve_probed(argv: list[str]) -> None:
    """The server process: a mallinfo2 probe thread, malloc_trim on SIGUSR1, then the CLI."""
    probe = Path(argv[argv.index("--probe-file") + 1])
    argv = argv[: argv.index("--probe-file")] + argv[argv.index("--probe-file") + 2 :]
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _Mallinfo2

    def record(**extra: Any) -> None:
        info = libc.mallinfo2()
        line = {"at": time.monotonic(), **{f: getattr(info, f) for f in MALLINFO2_FIELDS}}
        with probe.open("a") as out:
            out.write(json.dumps({**line, **extra}) + "\n")

    def sample() -> None:
        while True:
            record()
            time.sleep(5.0)

    def trim(signum: int, frame: object) -> None:
        before = proc_status_mib(os.getpid())["VmRSS"]
        libc.malloc_trim(0)
        after = proc_status_mib(os.getpid())["VmRSS"]
        record(trimmed_from=before, trimmed_to=after)

    signal.signal(signal.SIGUSR1, trim)
    threading.Thread(target=sample, daemon=True).start()
    from teacher_server.server.cli import main

    raise SystemExit(main(argv))


def start_server(
    workdir: Path, case: throughput.Case, extra_env: dict[str, str], trim_mib: int
) -> tuple[subprocess.Popen[bytes], dict[str, Any], Path]:
    server = {"http_port": 0, "grpc_port": 0, "max_batch_size": 256, "max_delay_ms": 2}
    config = {"server": {**server, "heap_trim_mib": trim_mib}, "models": [case.model_entry]}
    path, port_file = workdir / "teacher.json", workdir / "ports.json"
    probe = workdir / f"probe-{trim_mib}"
    path.write_text(json.dumps(config))
    port_file.unlink(missing_ok=True)
    command = [sys.executable, __file__, "--serve", "--config", str(path)]
    command += ["--port-file", str(port_file), "--log-level", "warning", "--probe-file", str(probe)]
    process = subprocess.Popen(command, env={**os.environ, **extra_env})
    while not port_file.exists():
        if process.poll() is not None:
            raise RuntimeError("teacher server exited during start-up")
        time.sleep(0.05)
    ports = json.loads(port_file.read_text())
    while httpx.get(f"{ports['http_url']}/readyz").status_code != 200:
        time.sleep(0.1)
    return process, ports, probe


def client_loop(
    url: str,
    model: str,
    size: int,
    sizes: tuple[int, int],
    seed: int,
    seconds: float,
    ready: Any,
    start: Any,
    out: Any,
) -> None:
    """One student: a closed loop of requests whose sizes are drawn from `sizes` (inclusive)."""
    import torch

    torch.set_num_threads(1)
    from teacher_server.client import TeacherClient

    draw = random.Random(seed)
    images = torch.randint(0, 256, (sizes[1], 3, size, size), dtype=torch.uint8)
    requests = sent = 0
    if url.startswith("v2+"):
        infer, close = throughput.v2_client(url.removeprefix("v2+"), model)
    else:
        client = TeacherClient.connect(url, model=model, max_request_bytes=1 << 30)
        close = client.close

        def infer(views: torch.Tensor) -> None:
            client.infer(views, output_dtype="float16")

    try:
        for count in sizes:
            infer(images[:count])
        ready.put(os.getpid())
        start.wait()
        stop = time.perf_counter() + seconds
        while time.perf_counter() < stop:
            count = draw.randint(*sizes)
            infer(images[:count])
            requests += 1
            sent += count
    finally:
        close()
    out.put((url.split(":")[0].replace("+", "-"), requests, sent))


@dataclass(frozen=True)
class Sample:
    """The server's /proc/<pid>/status at `t` seconds into the measured time."""

    at: float
    t: float
    status: dict[str, float]


@dataclass(frozen=True)
class Phase:
    """One server's run under the load: its samples, the clients' counts, its heap probe."""

    trim_mib: int
    loaded: dict[str, float]
    samples: list[Sample]
    results: list[tuple[str, int, int]]
    heap: list[dict[str, Any]]
    trims: float

    def levels(self, warm_up: float, window: float) -> tuple[float, float, float]:
        """Median RSS in the first and last `window` s after the warm-up, and the maximum."""
        warm = [s for s in self.samples if s.t >= warm_up]
        if len(warm) < 2:
            raise SystemExit(f"under two samples after the {warm_up:.0f} s warm-up; run longer")
        first = [s.status["VmRSS"] for s in warm if s.t < warm[0].t + window]
        last = [s.status["VmRSS"] for s in warm if s.t > warm[-1].t - window]
        top = max(s.status["VmRSS"] for s in warm)
        return statistics.median(first), statistics.median(last), top

    def images_per_s(self, seconds: float) -> float:
        return sum(r[2] for r in self.results) / seconds


def run_phase(
    args: argparse.Namespace,
    workdir: Path,
    case: throughput.Case,
    wires: list[str],
    extra_env: dict[str, str],
    trim_mib: int,
) -> Phase:
    process, ports, probe = start_server(workdir, case, extra_env, trim_mib)
    samples: list[Sample] = []
    done = threading.Event()
    ctx = mp.get_context("spawn")
    ready, start, out = ctx.Queue(), ctx.Event(), ctx.Queue()
    try:
        procs = [
            ctx.Process(
                target=client_loop,
                args=(
                    wire_url(ports, wires[i % len(wires)]),
                    case.model_entry["name"],
                    case.size,
                    tuple(args.images),
                    i,
                    args.seconds,
                    ready,
                    start,
                    out,
                ),
            )
            for i in range(args.clients)
        ]
        for proc in procs:
            proc.start()
        for _ in procs:
            ready.get(timeout=300)
        loaded = proc_status_mib(process.pid)

        def sample() -> None:
            started = time.monotonic()
            while not done.wait(args.every):
                now = time.monotonic()
                samples.append(Sample(now, now - started, proc_status_mib(process.pid)))

        sampler = threading.Thread(target=sample)
        sampler.start()
        start.set()
        results = [out.get() for _ in procs]
        done.set()
        sampler.join()
        for proc in procs:
            proc.join()
        trims = heap_trims(ports["http_url"])
        os.kill(process.pid, signal.SIGUSR1)
        time.sleep(2.0)
    finally:
        done.set()
        process.terminate()
        process.wait()
    heap = [json.loads(line) for line in probe.read_text().splitlines()]
    return Phase(trim_mib, loaded, samples, results, heap, trims)


def wire_url(ports: dict[str, str], wire: str) -> str:
    """The URL a client of `wire` (http, grpc, v2-http, v2-grpc) is given."""
    if wire.startswith("v2-"):
        return "v2+" + ports[f"{wire.removeprefix('v2-')}_url"]
    return ports[f"{wire}_url"]


def heap_trims(http_url: str) -> float:
    """The server's kdserve_heap_trims_total from /metrics (0 without a trimmer)."""
    page = httpx.get(f"{http_url}/metrics").text
    for family in text_string_to_metric_families(page):
        if family.name == "kdserve_heap_trims":
            return family.samples[0].value
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default_trim = ServerConfig().heap_trim_mib
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--wires", nargs="+", choices=throughput.WIRES, default=throughput.WIRES)
    parser.add_argument("--images", type=int, nargs=2, default=[1, 256], metavar=("LO", "HI"))
    parser.add_argument("--warm-up", type=float, default=60.0)
    parser.add_argument("--every", type=float, default=5.0)
    parser.add_argument("--window", type=float, default=30.0)
    parser.add_argument("--trim-mib", type=int, nargs="+", default=[0, default_trim])
    parser.add_argument("--server-env", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--pass-sizes", type=int, nargs="*", default=[], metavar="N")
    args = parser.parse_args()
    extra_env = dict(item.split("=", 1) for item in args.server_env)
    malloc_env = {k: v for k, v in {**os.environ, **extra_env}.items() if k.startswith("MALLOC_")}
    wires = args.wires
    env = " ".join(f"{k}={v}" for k, v in sorted(malloc_env.items())) or "no MALLOC_* variables"
    lo, hi = args.images
    print(
        f"compute-bound resnet18 at 32 px, {args.clients} clients ({'/'.join(wires)}), "
        f"requests of {lo}..{hi} images, {args.seconds:.0f} s per server; servers: {env}"
        + (f"; pass_sizes {args.pass_sizes}" if args.pass_sizes else "")
    )
    phases = []
    with tempfile.TemporaryDirectory() as tmp:
        case = throughput.build_cases(Path(tmp))[0]
        if args.pass_sizes:
            entry = {**case.model_entry, "pass_sizes": args.pass_sizes}
            case = throughput.Case(case.name, entry, case.size, case.batch)
        for trim_mib in args.trim_mib:
            phase = run_phase(args, Path(tmp), case, wires, extra_env, trim_mib)
            report(args, wires, phase)
            phases.append(phase)
    if len(phases) > 1:
        base = phases[0]
        base_rss = base.levels(args.warm_up, args.window)[1]
        for phase in phases[1:]:
            rss = phase.levels(args.warm_up, args.window)[1]
            speed = phase.images_per_s(args.seconds) / base.images_per_s(args.seconds)
            print(
                f"heap_trim_mib {phase.trim_mib} against {base.trim_mib}: RSS at the end "
                f"{rss / base_rss:.2f}x ({rss:.0f} / {base_rss:.0f} MiB), throughput "
                f"{speed:.3f}x"
            )


def report(args: argparse.Namespace, wires: list[str], phase: Phase) -> None:
    print(f"heap_trim_mib {phase.trim_mib}:")
    for wire in wires:
        mine = [r for r in phase.results if r[0] == wire]
        print(
            f"  {wire}: {len(mine)} clients, {sum(r[1] for r in mine)} requests, "
            f"{sum(r[2] for r in mine) / args.seconds:.0f} img/s"
        )
    loaded = phase.loaded
    print(f"  loaded and warm: RSS {loaded['VmRSS']:.0f} MiB (anon {loaded['RssAnon']:.0f})")
    probed = [h for h in phase.heap if "trimmed_from" not in h]
    print(
        f"  {'t s':>5} {'RSS':>6} {'anon':>6} {'threads':>7}   heap: {'in use':>6} {'free':>6} "
        f"{'mmap':>6}  (MiB)"
    )
    samples = phase.samples
    step = max(1, len(samples) // 20)
    for s in samples[::step] + ([samples[-1]] if samples[::step][-1:] != samples[-1:] else []):
        h = min(probed, key=lambda line: abs(line["at"] - s.at))
        print(
            f"  {s.t:>5.0f} {s.status['VmRSS']:>6.0f} {s.status['RssAnon']:>6.0f} "
            f"{s.status['Threads']:>7.0f}         {h['uordblks'] / 2**20:>6.0f} "
            f"{h['fordblks'] / 2**20:>6.0f} {h['hblkhd'] / 2**20:>6.0f}"
        )
    base, end, top = phase.levels(args.warm_up, args.window)
    flat = abs(end / base - 1) <= TARGET
    print(
        f"  RSS (medians of the first and last {args.window:.0f} s after the "
        f"{args.warm_up:.0f} s warm-up): after warm-up {base:.0f} MiB, at the end {end:.0f} MiB; "
        f"end / after warm-up {end / base:.3f}: {'within' if flat else 'OUTSIDE'} the "
        f"{TARGET:.0%} target (the level, not a single sample: the highest sample is "
        f"{top:.0f} MiB, {top / base:.3f}x)"
    )
    trims = [h for h in phase.heap if "trimmed_from" in h]
    if trims:
        print(
            f"  malloc_trim(0) at the end: RSS {trims[0]['trimmed_from']:.0f} -> "
            f"{trims[0]['trimmed_to']:.0f} MiB (free heap kept by malloc: "
            f"{trims[0]['trimmed_from'] - trims[0]['trimmed_to']:.0f} MiB); the heap trimmer "
            f"had trimmed {phase.trims:.0f} times"
        )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        serve_probed(sys.argv[2:])
    mp.set_start_method("spawn")
    main()
