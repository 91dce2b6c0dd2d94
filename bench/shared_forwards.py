"""What a sweep of same-seed students costs the teacher, with shared forwards and without.

A `kdserve-teacher` process (kdserve:resnet32, random weights, one thread) serves N student
processes (`kdserve-student`, KD, kdserve:resnet8, one thread each, the same seed and so
the same data order and views) started together, in three ways per round:
- `1 student`: the baseline, one run alone;
- `N students, shared`: N runs at once on a teacher with `share_forwards: true` (the default);
- `N students, unshared`: the same on a teacher with `share_forwards: false`.
The cost is the images the teacher's forwards computed (`executed_images` in /v1/stats, the
runs' evaluation included), as a ratio to one student's in the same round. Target
(docs/architecture.md): N shared students <= 1.3x one. The script also checks that every
shared run's loss curve equals the lone run's, step for step.

Run (the README records the results):
    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 \
        .venv/bin/python bench/shared_forwards.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import teacher_throughput as throughput

from student_worker.runlog import RunLog

TEACHER = "kdserve:resnet32"
STUDENT = "kdserve:resnet8"
BATCH = 64


def executed_images(url: str) -> int:
    stats = httpx.get(f"{url}/v1/stats", timeout=30).json()
    return int(stats["models"]["teacher"]["executed_images"])


def sweep(ports: dict[str, Any], out: Path, students: int, steps: int) -> tuple[int, float]:
    """`students` same-seed runs at once; the teacher's computed images and the wall time."""
    before = executed_images(ports["http_url"])
    started = time.monotonic()
    runs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "student_worker",
                "--teacher",
                ports["grpc_url"],
                "--teacher-model",
                "teacher",
                "--loss",
                "kd",
                "--arch",
                STUDENT,
                "--max-steps",
                str(steps),
                "--batch-size",
                str(BATCH),
                "--threads",
                "1",
                "--seed",
                "0",
                "--output-dir",
                str(out / f"student-{index}"),
                "--log-level",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
        )
        for index in range(students)
    ]
    for run in runs:
        if run.wait() != 0:
            raise RuntimeError(f"a student run exited with {run.returncode}")
    return executed_images(ports["http_url"]) - before, time.monotonic() - started


def losses(out: Path) -> list[float]:
    return [record["loss"] for record in RunLog(out).records("train")]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--students", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    case = throughput.random_case(TEACHER, BATCH)
    ways = ("1 student", f"{args.students} students, shared", f"{args.students} students, unshared")
    ratios: dict[str, list[float]] = {way: [] for way in ways}
    seconds: dict[str, list[float]] = {way: [] for way in ways}
    identical = True
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        teachers = {}
        for share in (True, False):
            place = workdir / f"share-{share}"
            place.mkdir()
            server = {"threads_per_replica": 1, "max_batch_size": 256, "share_forwards": share}
            teachers[share] = throughput.start_server(place, case, server)
        try:
            for round_index in range(args.rounds):
                base = workdir / f"round-{round_index}"
                alone, alone_s = sweep(teachers[True][1], base / "alone", 1, args.steps)
                shared, shared_s = sweep(
                    teachers[True][1], base / "shared", args.students, args.steps
                )
                unshared, unshared_s = sweep(
                    teachers[False][1], base / "unshared", args.students, args.steps
                )
                for way, images, wall in zip(
                    ways, (alone, shared, unshared), (alone_s, shared_s, unshared_s), strict=True
                ):
                    ratios[way].append(images / alone)
                    seconds[way].append(wall)
                curve = losses(base / "alone" / "student-0")
                identical &= all(
                    losses(base / "shared" / f"student-{index}") == curve
                    for index in range(args.students)
                )
                print(
                    json.dumps(
                        {
                            "round": round_index + 1,
                            "alone": alone,
                            "shared": shared,
                            "unshared": unshared,
                        }
                    ),
                    flush=True,
                )
        finally:
            for process, _ in teachers.values():
                process.terminate()
                process.wait(timeout=30)
    print(
        f"\nteacher {TEACHER}, students {STUDENT} (KD, batch {BATCH}, {args.steps} steps, seed 0), "
        f"{args.rounds} rounds; shared runs' loss curves equal the lone run's: {identical}\n"
    )
    print("| way | images the teacher computed, ratio to one student | per round | wall s |")
    print("|---|---|---|---|")
    for way in ways:
        per_round = ", ".join(f"{r:.2f}" for r in ratios[way])
        print(
            f"| {way} | {statistics.median(ratios[way]):.2f} | {per_round} | "
            f"{statistics.median(seconds[way]):.1f} |"
        )


if __name__ == "__main__":
    main()
