"""Each student's share of one teacher when a greedy student keeps many requests in flight.

A greedy client (many threads over one connection, each a closed loop of requests: a
student with a deep prefetch) and a polite one (two threads: a student with a short
prefetch) ask one teacher model for the same number of images per request. The script
reports each one's share of the images the teacher answered in the timed window, and the
polite client's latency, in two ways side by side:
- `fair`: each client sends its own `client_id`, so passes take them in turn and a full
  queue makes room for the client under its share;
- `first come`: both send one `client_id`, so the server sees one client and serves in
  arrival order (what a server without fairness does).
With `--greedy 8 --polite 2` the greedy client keeps 4x as many requests in flight: first
come gives the polite client about a fifth of the images, fair about half. (A client
with one request in flight gets less than half even when fair: between its answer and its
next request, passes run without it.)

Run (the README records the results):
    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 \
        .venv/bin/python bench/fairness.py [--greedy 8] [--polite 2] [--seconds 10]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import teacher_throughput as throughput

from teacher_server.client import RetryPolicy, TeacherClient

ROLES = ("greedy", "polite")


@dataclass(frozen=True)
class Shares:
    images: dict[str, int]
    """Images answered per role in the timed window."""
    polite_latency_s: list[float]

    def share(self, role: str) -> float:
        return self.images[role] / max(1, sum(self.images.values()))


def measure_shares(
    url: str,
    model: str,
    *,
    greedy_threads: int,
    polite_threads: int,
    images: torch.Tensor,
    seconds: float,
    fair: bool,
    warmup_s: float = 0.5,
) -> Shares:
    """Run the greedy client's `greedy_threads` loops and the polite client's against
    `url` for `warmup_s + seconds`; count what was answered after the warm-up."""
    clients = {
        role: TeacherClient.connect(
            url,
            model=model,
            client_id=role if fair else "one-client",
            retry=RetryPolicy.patient(max_backoff_s=0.5),
        )
        for role in ROLES
    }
    counted = {role: 0 for role in ROLES}
    latencies: list[float] = []
    lock = threading.Lock()
    start = time.monotonic() + warmup_s
    stop = start + seconds
    errors: list[BaseException] = []

    def loop(role: str) -> None:
        try:
            while (began := time.monotonic()) < stop:
                clients[role].infer(images)
                answered = time.monotonic()
                if began >= start and answered <= stop:
                    with lock:
                        counted[role] += images.shape[0]
                        if role == "polite":
                            latencies.append(answered - began)
        except BaseException as error:  # reported by the caller
            errors.append(error)

    roles = ["greedy"] * greedy_threads + ["polite"] * polite_threads
    threads = [threading.Thread(target=loop, args=(role,), daemon=True) for role in roles]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(warmup_s + seconds + 60)
    finally:
        for client in clients.values():
            client.close()
    if errors:
        raise RuntimeError(f"{len(errors)} client loops failed, the first: {errors[0]!r}")
    return Shares(counted, latencies)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--greedy", type=int, default=8, help="the greedy client's threads")
    parser.add_argument("--polite", type=int, default=2, help="the polite client's threads")
    parser.add_argument("--images", type=int, default=16, help="images per request")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("teacher_server.client").setLevel(logging.ERROR)  # the waits are the point
    case = throughput.random_case("kdserve:resnet32", args.images)
    images = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8)
    server = {
        "threads_per_replica": 1,
        "max_batch_size": 2 * args.images,
        "max_queue_images": 4 * args.images,
        "share_forwards": False,
    }
    results: dict[str, list[Shares]] = {"fair": [], "first come": []}
    with tempfile.TemporaryDirectory() as tmp:
        process, ports = throughput.start_server(Path(tmp), case, server)
        try:
            for _ in range(args.rounds):
                for way, fair in (("fair", True), ("first come", False)):
                    results[way].append(
                        measure_shares(
                            ports["grpc_url"],
                            "teacher",
                            greedy_threads=args.greedy,
                            polite_threads=args.polite,
                            images=images,
                            seconds=args.seconds,
                            fair=fair,
                        )
                    )
        finally:
            process.terminate()
            process.wait(30)
    print(
        f"kdserve:resnet32 at 32 px, one replica of one thread, max_batch_size "
        f"{server['max_batch_size']}, max_queue_images {server['max_queue_images']}; "
        f"{args.images}-image requests over gRPC; greedy: {args.greedy} threads, "
        f"polite: {args.polite}; "
        f"{args.rounds} rounds of {args.seconds:.0f} s"
    )
    print(f"{'way':<12}{'greedy share':>14}{'polite share':>14}{'polite p50 ms':>15}{'img/s':>9}")
    for way, rounds in results.items():
        greedy = statistics.mean(r.share("greedy") for r in rounds)
        polite = statistics.mean(r.share("polite") for r in rounds)
        latencies = [t for r in rounds for t in r.polite_latency_s]
        p50 = statistics.median(latencies) * 1000 if latencies else float("nan")  # starved
        rate = statistics.mean(sum(r.images.values()) for r in rounds) / args.seconds
        print(f"{way:<12}{greedy:>14.2f}{polite:>14.2f}{p50:>15.1f}{rate:>9.0f}")


if __name__ == "__main__":
    main()
