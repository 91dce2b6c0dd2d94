"""The scale-out deploy/k8s describes, simulated on loopback: teacher replicas on 127.0.0.1,
.2 and .3 behind one name, which a DNS server on loopback resolves as the cluster's DNS
resolves the headless Service `kdserve-teacher-grpc`; two `kdserve-sweep` processes of four
students each reach them through that one name (`dns://127.0.0.1:PORT/NAME:PORT`); one
replica is killed mid-run (its address leaves the name, as a deleted pod leaves the Service's
endpoints), and one added on 127.0.0.4 (a scale-up).

What must hold: every student trains every step, with none skipped and none waiting for the
teacher, until the test stops the sweeps with SIGTERM (each run saves its last step); while a set
of replicas is live, each answers within 20% of their mean; the added replica gets its share
once the students' connections roll over (`grpc_max_connection_age_s`). Run with `-s` to see
the figures.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import statistics
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from student_worker.checkpoint import load_checkpoint
from student_worker.runlog import RunLog
from student_worker.sweep import RUN_LOG
from tests.deploy.dns import DnsServer
from tests.helpers import BIN, ENV, TeacherProcess, teacher_config, wait_until

NAME = "kdserve-teacher-grpc.kdserve.svc.cluster.test"
HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4")
CONNECTION_AGE_S = 3.0
"""The replicas' grpc_max_connection_age_s: short, so the added replica's share comes in
seconds (60 s by default); not shorter, since a connection rolling over is skipped by its
channel's round robin for a moment, which shows in the spread."""
STEPS = 100_000
"""Each student's max_steps: more than the phases take; the test stops the sweeps with
SIGTERM once it has measured them, as a preemption would (each run checkpoints its last
step and could resume)."""
WINDOW = 210
"""Requests answered (all replicas together) over which one phase's spread is measured."""
SPREAD = 0.2
SWEEPS = {
    "sweep-a": {"loss.name": ["kd", "dkd"], "seed": [1, 2]},
    "sweep-b": {"loss.name": ["dist", "kd"], "optimizer.lr": [0.05, 0.1]},
}


def shared_port(hosts: tuple[str, ...]) -> int:
    """A TCP port free on every one of `hosts` at once (replicas behind one name share it)."""
    for _ in range(100):
        with contextlib.ExitStack() as stack:
            first = stack.enter_context(socket.socket())
            first.bind((hosts[0], 0))
            port = int(first.getsockname()[1])
            try:
                for host in hosts[1:]:
                    stack.enter_context(socket.socket()).bind((host, port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no port free on all of {hosts}")


def answered(replica: TeacherProcess) -> int:
    """Requests the replica has answered."""
    stats = httpx.get(f"{replica.url('http')}/v1/stats", timeout=5).json()
    return int(stats["models"]["small"]["requests"].get("ok", 0))


class Phase:
    """Requests each live replica answered over one window of the run."""

    def __init__(self, name: str, counts: dict[str, int], seconds: float) -> None:
        self.name, self.counts, self.seconds = name, counts, seconds

    @property
    def spread(self) -> float:
        """The largest distance of one replica's count from their mean, over the mean."""
        mean = sum(self.counts.values()) / len(self.counts)
        return max(abs(count - mean) for count in self.counts.values()) / mean

    def __str__(self) -> str:
        counts = ", ".join(f"{name} {count}" for name, count in self.counts.items())
        rate = sum(self.counts.values()) / self.seconds
        return f"{self.name}: {counts} (spread {self.spread:.1%}; {rate:.0f} requests/s in all)"


@pytest.fixture
def cluster(tmp_path: Path, teachers: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Four replica processes (three started), the name resolving to the three."""
    config = teacher_config(
        teachers, threads_per_replica=1, grpc_max_connection_age_s=CONNECTION_AGE_S
    )
    config["models"], config["ensembles"] = config["models"][:1], []
    port = shared_port(HOSTS)
    replicas = [
        TeacherProcess(tmp_path, config, name=f"replica-{i}", host=host, grpc_port=port)
        for i, host in enumerate(HOSTS)
    ]
    with DnsServer({NAME: list(HOSTS[:3])}) as dns:
        try:
            for replica in replicas[:3]:
                replica.start()
            for replica in replicas[:3]:
                replica.wait_ready()
            yield {"dns": dns, "replicas": replicas, "target": dns.target(NAME, port)}
        finally:
            for replica in replicas:
                replica.stop()


def start_sweep(root: Path, name: str, grid: dict[str, list[Any]], target: str) -> Any:
    base = {
        "teacher": {"model": "small"},
        "batch_size": 8,
        "data": {"image_size": 8},  # small steps: the test measures requests, not training
        "max_steps": STEPS,
        "epochs": 1000,
        "eval_every": 10 * STEPS,  # one evaluation, at the end
        "threads": 1,
    }
    (root / f"{name}-student.yaml").write_text(yaml.safe_dump(base))
    sweep = {
        "base": f"{name}-student.yaml",
        "output_dir": str(root / name),
        "parallel": 4,
        "grid": grid,
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    with open(root / f"{name}.log", "wb") as log:
        return subprocess.Popen(
            [str(BIN / "kdserve-sweep"), str(path), "--teacher", target],
            env={**ENV, "GRPC_DNS_RESOLVER": "ares"},  # the one that takes a DNS server's address
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def poll(condition: Any, what: str, sweeps: list[Any]) -> None:
    """`wait_until` on the sweeps, four looks a second: each look asks every replica for its
    stats, which must not load the replicas it measures."""
    wait_until(condition, what, *sweeps, timeout_s=180, interval_s=0.25)


def run_dirs(root: Path) -> list[Path]:
    return sorted(path.parent for name in SWEEPS for path in (root / name).glob(f"*/{RUN_LOG}"))


@pytest.mark.slow
@pytest.mark.timeout(480)  # its waits add up past the default 300 s only when it fails
def test_students_ride_out_a_replica_killed_and_one_added(
    cluster: dict[str, Any], tmp_path: Path
) -> None:
    dns: DnsServer = cluster["dns"]
    replicas: list[TeacherProcess] = cluster["replicas"]
    sweeps = [start_sweep(tmp_path, n, grid, cluster["target"]) for n, grid in SWEEPS.items()]
    names = {id(r): r.host for r in replicas}
    began = time.monotonic()

    def window(name: str, live: list[TeacherProcess], requests: int = WINDOW) -> Phase:
        before = {names[id(r)]: answered(r) for r in live}
        started = time.monotonic()
        poll(
            lambda: sum(answered(r) for r in live) - sum(before.values()) >= requests,
            f"{requests} requests answered in phase {name!r} (do the runs end first?)",
            sweeps,
        )
        after = {names[id(r)]: answered(r) for r in live}
        seconds = time.monotonic() - started
        return Phase(name, {host: after[host] - before[host] for host in before}, seconds)

    try:
        poll(
            lambda: (
                len(run_dirs(tmp_path)) == 8
                and all((d / "metrics.jsonl").is_file() for d in run_dirs(tmp_path))
            ),
            "all eight students to train",
            sweeps,
        )
        training_s = time.monotonic() - began
        window("warm-up", replicas[:3], requests=45)  # every channel has all three by then
        three = window("3 replicas", replicas[:3])
        killed = replicas[1]
        killed.kill()
        dns.set(NAME, [HOSTS[0], HOSTS[2]])
        window("after the kill", [replicas[0], replicas[2]], requests=40)
        two = window("2 replicas", [replicas[0], replicas[2]])
        added = replicas[3]
        starting = time.monotonic()
        added.start()
        added.wait_ready()
        start_s = time.monotonic() - starting
        dns.set(NAME, [HOSTS[0], HOSTS[2], HOSTS[3]])
        listed = time.monotonic()
        poll(lambda: answered(added) > 0, "the added replica's first request", sweeps)
        first_request_s = time.monotonic() - listed
        # every connection the students hold is older than the age by then (+10% jitter)
        time.sleep(max(0.0, listed + 1.1 * CONNECTION_AGE_S + 1.5 - time.monotonic()))
        rolled_s = time.monotonic() - listed
        three_again = window("3 replicas, one added", [replicas[0], replicas[2], added])
        for sweep in sweeps:
            sweep.send_signal(signal.SIGTERM)
        for sweep in sweeps:
            assert sweep.wait(timeout=120) == 128 + signal.SIGTERM, "see the sweep's log"
    finally:
        for sweep in sweeps:
            if sweep.poll() is None:
                sweep.kill()
                sweep.wait()

    runs = run_dirs(tmp_path)
    assert len(runs) == 8
    waits: list[float] = []
    trained: list[int] = []
    for run in runs:
        steps = [record["step"] for record in RunLog(run).records("train")]
        assert steps == list(range(1, len(steps) + 1)), f"{run.name} skipped a step"
        assert load_checkpoint(run)["step"] == steps[-1], f"{run.name}: last step not saved"
        trained.append(steps[-1])
        log = (run / RUN_LOG).read_text()
        assert "teacher unavailable" not in log, f"{run.name} waited for the teacher:\n{log}"
        # the sweep exits 143 on SIGTERM whatever its runs did: each must have been running
        assert f"stopped by SIGTERM at step {steps[-1]}" in log, f"{run.name} ended early:\n{log}"
        waits += [record["teacher_ms"] for record in RunLog(run).records("train")]
    print(
        f"\n8 students, {min(trained)} to {max(trained)} steps each, replicas' connection age "
        f"{CONNECTION_AGE_S} s; all training {training_s:.1f} s after the sweeps started",
        *(str(phase) for phase in (three, two, three_again)),
        f"added replica: ready {start_s:.1f} s after its start, first request "
        f"{first_request_s:.2f} s after it was listed, its phase measured from {rolled_s:.1f} s",
        f"teacher round trips logged by the steps: median {statistics.median(waits):.0f} ms, "
        f"slowest {max(waits):.0f} ms",
        sep="\n",
    )
    for phase in (three, two, three_again):
        assert phase.spread <= SPREAD, f"load not spread within {SPREAD:.0%}: {phase}"


def test_the_dns_server_answers_a_records_and_refuses_the_rest() -> None:
    """The stand-in resolver itself: A records for its names, no AAAA, NXDOMAIN for others,
    FORMERR for a malformed question, nothing for bytes that are not a query."""

    def query(name: str, qtype: int = 1) -> bytes:
        labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
        return (
            struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0)
            + labels
            + b"\0"
            + struct.pack("!HH", qtype, 1)
        )

    with DnsServer({"teacher.test": ["127.0.0.2", "127.0.0.3"]}) as server:
        answer = server.answer(query("Teacher.TEST"))
        assert answer is not None
        ident, flags, _, count = struct.unpack("!HHHH", answer[:8])
        assert (ident, flags & 0x800F, count) == (7, 0x8000, 2)
        assert answer.endswith(
            bytes([127, 0, 0, 2])
            + struct.pack("!HHHIH", 0xC00C, 1, 1, 0, 4)
            + bytes([127, 0, 0, 3])
        )
        server.set("teacher.test", ["127.0.0.4"])
        assert struct.unpack("!H", server.answer(query("teacher.test"))[6:8]) == (1,)
        assert server.answer(query("teacher.test", 28))[3] & 0xF == 0
        assert struct.unpack("!H", server.answer(query("teacher.test", 28))[6:8]) == (0,)
        assert server.answer(query("other.test"))[3] & 0xF == 3  # NXDOMAIN
        assert server.answer(query("teacher.test")[:-3])[3] & 0xF == 1  # FORMERR
        assert server.answer(b"\0\1") is None
        assert server.answer(struct.pack("!HHHHHH", 7, 0x8000, 1, 0, 0, 0)) is None
