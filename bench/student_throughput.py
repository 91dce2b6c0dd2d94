"""Student images/s with a remote teacher against plain cross-entropy, measured in one run.

The same student (kdserve:resnet20 on digits at 32 px, batch 64, one thread pinned to core 0)
trains with the real Trainer in four ways, in rounds so that drift on the machine hits every
way alike:
- `ce`: cross-entropy only, no teacher (the baseline);
- `remote`: KD against a `kdserve-teacher` process (kdserve:resnet32, one thread pinned to
  core 1) over gRPC, prefetching `--prefetch` requests ahead;
- `remote, no prefetch`: the same with prefetch 0 (every step waits for its round trip);
- `in-process`: KD with the same teacher model run inside the student on the student's thread,
  as KD scripts do today.
Images/s is each epoch's training throughput (evaluation excluded), the first epoch dropped as
warm-up; ratios are against `ce` of the same round. Target (docs/architecture.md): `remote`
>= 0.95x.

Then the client's own cost, the CPU a student spends per request (taken from its step): the
student's process (core 0) sends `--client-requests` requests of 16 uint8 views at 224 px
(2.4 MB) one after another to the wire-bound teacher of `teacher_throughput.py` (core 1) with
`TeacherClient` over HTTP (framed bodies, http.client) and gRPC, and, side by side, two
clients of before: httpx with the framed body, and httpx with the msgpack body the client
sent before framing; CPU is the whole process's (grpcio's threads included) per request.

Run (the README records the results):
    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 \
        .venv/bin/python bench/student_throughput.py
The client cost alone: `--rounds 0`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import teacher_throughput as throughput

from student_worker.augment import student_input
from student_worker.config import load_run_config
from student_worker.runlog import RunLog
from student_worker.trainer import Trainer
from teacher_server.server.registry import RANDOM_INIT_SEED
from teacher_server.shared.archs import create_model
from teacher_server.shared.contract import Mix

STUDENT = "kdserve:resnet20"
TEACHER = "kdserve:resnet32"
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
WAYS = ("ce", "remote", "remote, no prefetch", "in-process")


class InProcessTeacher:
    """The teacher model in the student's own process: what KD scripts do today."""

    def __init__(self, num_classes: int) -> None:
        torch.manual_seed(RANDOM_INIT_SEED)
        self.module = create_model(TEACHER, num_classes).eval()
        self.mean, self.std = torch.tensor(MEAN), torch.tensor(STD)
        self.round_trip_s = 0.0

    @torch.no_grad()
    def logits(self, tag: str, view: torch.Tensor, mix: Mix | None) -> torch.Tensor:
        started = time.monotonic()
        logits: torch.Tensor = self.module(student_input(view, mix, (32, 32), self.mean, self.std))
        self.round_trip_s = time.monotonic() - started
        return logits


def train(way: str, grpc_url: str, out: Path, epochs: int, prefetch: int) -> float:
    """Train one way; the mean training images/s of its epochs after the first."""
    overrides: dict[str, Any] = {
        "loss.name": "ce" if way == "ce" else "kd",
        "student.arch": STUDENT,
        "teacher.endpoints": [grpc_url],
        "teacher.model": "teacher",
        "teacher.prefetch": 0 if way == "remote, no prefetch" else prefetch,
        "epochs": epochs,
        "batch_size": 64,
        "threads": 1,
        "output_dir": str(out),
        "checkpoint_every": 10**6,
    }
    config = load_run_config(None, overrides)
    teacher = InProcessTeacher(num_classes=10) if way == "in-process" else None
    Trainer(config, teacher=teacher).fit()
    records = [r for r in RunLog(out).records("train") if r["epoch"] > 1]
    last_of_epoch = {r["epoch"]: r["images_per_s"] for r in records}
    return statistics.fmean(last_of_epoch.values())


def teacher_forward_ms(repeats: int = 10) -> float:
    """The teacher's forward on one batch on one thread: it keeps up when below a CE step."""
    teacher = InProcessTeacher(10)
    batch = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    times = []
    for _ in range(repeats + 1):
        teacher.logits("forward", batch, None)
        times.append(teacher.round_trip_s * 1e3)
    return statistics.median(times[1:])


def client_cost(workdir: Path, requests: int) -> None:
    """The student's CPU per 2.4 MB request: TeacherClient over HTTP and gRPC, and the msgpack
    HTTP body of before, in rounds against one wire-bound teacher."""
    import httpx

    from teacher_server.client import TeacherClient
    from teacher_server.shared import wire
    from teacher_server.shared.contract import InferRequest

    case = next(c for c in throughput.build_cases(workdir) if c.name == "wire-bound")
    model = case.model_entry["name"]
    os.sched_setaffinity(0, {1})
    server, ports = throughput.start_server(workdir, case, {"threads_per_replica": 1})
    os.sched_setaffinity(0, {0})
    images = torch.randint(0, 256, (case.batch, 3, case.size, case.size), dtype=torch.uint8)
    plain = httpx.Client(base_url=ports["http_url"])
    headers = {"content-type": wire.MSGPACK_CONTENT_TYPE}

    def httpx_framed() -> None:
        pieces = wire.request_to_framed(InferRequest(model, images, output_dtype="float16"))
        answer = plain.post(
            f"/v1/models/{model}/infer",
            content=iter(pieces),  # type: ignore[arg-type]
            headers={
                "content-type": wire.FRAMED_CONTENT_TYPE,
                "content-length": str(sum(len(piece) for piece in pieces)),
            },
        )
        answer.raise_for_status()
        wire.result_from_framed(answer.content)

    def msgpack_body() -> None:
        request = InferRequest(model, images, output_dtype="float16")
        answer = plain.post(
            f"/v1/models/{model}/infer", content=wire.request_to_msgpack(request), headers=headers
        )
        answer.raise_for_status()
        wire.result_from_msgpack(answer.content)

    clients = {
        wire_name: TeacherClient.connect(ports[f"{wire_name}_url"], model=model)
        for wire_name in ("http", "grpc")
    }
    ways = {
        "TeacherClient, HTTP (framed)": lambda: clients["http"].infer(
            images, output_dtype="float16"
        ),
        "TeacherClient, gRPC": lambda: clients["grpc"].infer(images, output_dtype="float16"),
        "httpx, framed body (TeacherClient's HTTP until 2026-12-07)": httpx_framed,
        "HTTP, msgpack body (before)": msgpack_body,
    }
    cpu_ms: dict[str, list[float]] = {way: [] for way in ways}
    try:
        for _ in range(3):
            for way, call in ways.items():
                for _ in range(10):
                    call()
                started = time.process_time()
                for _ in range(requests):
                    call()
                cpu_ms[way].append((time.process_time() - started) / requests * 1e3)
    finally:
        for client in clients.values():
            client.close()
        plain.close()
        server.terminate()
        server.wait(timeout=30)
    before = statistics.median(cpu_ms["HTTP, msgpack body (before)"])
    print(f"\nclient CPU per request of {case.batch} x 3 x {case.size} x {case.size} uint8")
    print("| way | CPU ms/request (median of 3 rounds) | vs msgpack body |")
    print("|---|---|---|")
    for way, values in cpu_ms.items():
        median = statistics.median(values)
        print(f"| {way} | {median:.2f} | {median / before:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2, help="0: the client cost alone")
    parser.add_argument("--epochs", type=int, default=3, help="per way and round (>= 2)")
    parser.add_argument("--prefetch", type=int, default=3)
    parser.add_argument(
        "--client-requests", type=int, default=300, help="per way of the client cost; 0: skip"
    )
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("this benchmark needs 2 cores: the student on one, the teacher on the other")
    torch.set_num_threads(1)
    if args.rounds == 0:  # the client cost alone
        with tempfile.TemporaryDirectory() as tmp:
            client_cost(Path(tmp), args.client_requests)
        return
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        case = throughput.Case(
            "teacher",
            {
                "name": "teacher",
                "arch": TEACHER,
                "random_init": True,
                "num_classes": 10,
                "input_size": 32,
                "mean": list(MEAN),
                "std": list(STD),
            },
            32,
            64,
        )
        os.sched_setaffinity(0, {1})  # the teacher process inherits core 1 ...
        server, ports = throughput.start_server(workdir, case, {"threads_per_replica": 1})
        os.sched_setaffinity(0, {0})  # ... and the student keeps core 0
        try:
            rates: dict[str, list[float]] = {way: [] for way in WAYS}
            ratios: dict[str, list[float]] = {way: [] for way in WAYS}
            for round_index in range(args.rounds):
                measured = {
                    way: train(
                        way,
                        ports["grpc_url"],
                        workdir / f"{round_index}-{way}",
                        args.epochs,
                        args.prefetch,
                    )
                    for way in WAYS
                }
                for way in WAYS:
                    rates[way].append(measured[way])
                    ratios[way].append(measured[way] / measured["ce"])
                print(
                    f"round {round_index + 1}: "
                    + ", ".join(f"{way} {rate:.0f} img/s" for way, rate in measured.items()),
                    flush=True,
                )
        finally:
            server.terminate()
            server.wait(timeout=30)
        if args.client_requests:
            client_cost(workdir, args.client_requests)
    forward_ms = teacher_forward_ms()
    step_ms = 64 / statistics.median(rates["ce"]) * 1e3
    print(
        f"\nstudent {STUDENT}, teacher {TEACHER}, batch 64, digits at 32 px, "
        f"{args.rounds} rounds x {args.epochs} epochs; teacher forward {forward_ms:.0f} ms "
        f"per batch vs student CE step {step_ms:.0f} ms\n"
    )
    print("| way | img/s (median) | ratio to ce (median) | ratios per round |")
    print("|---|---|---|---|")
    for way in WAYS:
        per_round = ", ".join(f"{r:.2f}" for r in ratios[way])
        print(
            f"| {way} | {statistics.median(rates[way]):.0f} | "
            f"{statistics.median(ratios[way]):.2f} | {per_round} |"
        )


if __name__ == "__main__":
    main()
