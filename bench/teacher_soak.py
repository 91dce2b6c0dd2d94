"""The teacher server's memory under sustained load: RSS sampled over a long run at 8 clients.

Target (docs/architecture.md): RSS stays within 10% of its level after warm-up over 5 minutes.
Run:
    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 \
        .venv/bin/python bench/teacher_soak.py --seconds 300
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import teacher_throughput as throughput


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--wire", choices=["http", "grpc"], default="grpc")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        case = throughput.build_cases(workdir)[0]
        process, ports = throughput.start_server(
            workdir, case, {"max_batch_size": 256, "max_delay_ms": 2}
        )
        samples: list[tuple[float, float]] = []
        done = threading.Event()

        def sample() -> None:
            started = time.monotonic()
            while not done.wait(5.0):
                samples.append((time.monotonic() - started, rss_mib(process.pid)))

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            run = throughput.measure_served(
                ports[f"{args.wire}_url"], process.pid, case, args.clients, args.seconds
            )
        finally:
            done.set()
            sampler.join()
            process.terminate()
            process.wait()
    warm = [rss for t, rss in samples if t >= 30.0] or [rss for _, rss in samples]
    rate = run.images_per_s
    print(
        f"{case.name}, {args.clients} {args.wire} clients, {args.seconds:.0f} s: {rate:.0f} img/s"
    )
    print(
        f"server RSS after warm-up {warm[0]:.0f} MiB, at the end {warm[-1]:.0f} MiB, "
        f"max {max(warm):.0f} MiB (end / start {warm[-1] / warm[0]:.3f})"
    )


if __name__ == "__main__":
    mp.set_start_method("spawn")
    main()
