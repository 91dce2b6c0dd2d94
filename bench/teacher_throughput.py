"""Teacher server throughput and latency against the in-process forward, measured in one run.

Prints, for a compute-bound teacher (seeded torchvision resnet18 at 32 px, 32-image uint8
requests) and a wire-bound one (pool + linear on 224 px views, 16-image requests):
served images/s with 1, 4 and 8 concurrent client processes over our HTTP and gRPC and over
the Open Inference Protocol (tritonclient's HTTP with binary tensors, and its gRPC: the
`v2-http` and `v2-grpc` rows), each against three in-process forwards of the same model
measured in the same run: at the request's batch size (`x req`: what a student with the
teacher inside pays), at the server's largest pass, max_batch_size (`x limit`: the model's
limit on this machine, which merged passes can approach but not pass), and at the request's
size with torchvision's preprocessing (`x tv`: KD scripts today); per-request latency p50
(also over the in-process batch's p50) and p99; the server's and the clients' CPU per
request; each target met or missed; a lone client's p50 against an unbatched server; bytes
on the wire per image.

Run (the README records the results):
    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 \
        .venv/bin/python bench/teacher_throughput.py [--cases wire-bound] [--clients 8] \
        [--wires http grpc v2-http v2-grpc] [--layouts one split] [--max-batch-size 256]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from teacher_server.server.registry import RANDOM_INIT_SEED
from teacher_server.shared import wire
from teacher_server.shared.archs import create_model
from teacher_server.shared.contract import InferRequest, InferResult, Timings
from teacher_server.shared.tv import import_torchvision
from teacher_server.shared.views import normalize

import_torchvision()
from torchvision.transforms.v2 import functional as tv_functional  # noqa: E402

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Case:
    name: str
    model_entry: dict[str, Any]
    size: int
    batch: int


class PoolLinear(torch.nn.Module):
    """A teacher whose forward is cheap next to moving its 224 px input."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


def random_case(arch: str, batch: int, name: str = "teacher") -> Case:
    """A seeded random-weights 10-class model at 32 px, asked `batch` images at a time."""
    entry = {
        "name": name,
        "arch": arch,
        "random_init": True,
        "num_classes": 10,
        "input_size": 32,
        "mean": list(MEAN),
        "std": list(STD),
    }
    return Case(name, entry, 32, batch)


WIRES = ["http", "grpc", "v2-http", "v2-grpc"]
"""Our protocol over HTTP and gRPC, and the Open Inference Protocol's REST and gRPC."""


def build_cases(workdir: Path) -> list[Case]:
    torch.manual_seed(0)
    archive = workdir / "pool_linear.pt"
    torch.jit.script(PoolLinear().eval()).save(str(archive))
    compute = random_case("torchvision:resnet18", 32, name="resnet18").model_entry
    wire = {
        "name": "pool_linear",
        "arch": f"file:{archive}",
        "num_classes": 1000,
        "input_size": 224,
        "mean": list(MEAN),
        "std": list(STD),
    }
    return [Case("compute-bound", compute, 32, 32), Case("wire-bound", wire, 224, 16)]


@dataclass(frozen=True)
class InProcess:
    """The same model's forward in the student's process: images/s and one batch's p50."""

    batch: int
    images_per_s: float
    p50_s: float


def in_process(
    case: Case, seconds: float, threads: int, preprocess: str, batch: int | None = None
) -> InProcess:
    """The student's alternative: the same model in process on `batch` images (the request's
    size unless told), preprocessing included.

    preprocess "kdserve": the fused normalize the server uses; "torchvision": ToDtype(scale=True)
    + Normalize, as KD scripts do today.
    """
    batch = batch or case.batch
    torch.set_num_threads(threads)
    if case.model_entry["arch"].startswith("file:"):
        model = torch.jit.load(case.model_entry["arch"][5:])
    else:
        torch.manual_seed(RANDOM_INIT_SEED)
        model = create_model(case.model_entry["arch"], num_classes=case.model_entry["num_classes"])
    mean, std = torch.tensor(MEAN), torch.tensor(STD)
    images = torch.randint(0, 256, (batch, 3, case.size, case.size), dtype=torch.uint8)

    def step() -> None:
        with torch.inference_mode():
            if preprocess == "kdserve":
                model(normalize(images, mean, std))
            else:
                unit = tv_functional.to_dtype(images, torch.float32, scale=True)
                model(tv_functional.normalize(unit, list(MEAN), list(STD)))

    return timed_steps(step, batch, seconds)


def timed_steps(
    step: Callable[[], None], batch: int, seconds: float, warm_up: int = 3
) -> InProcess:
    """`step` (one batch of `batch` images) after `warm_up` untimed ones, for `seconds` and at
    least 5 times: images/s and the median step."""
    for _ in range(warm_up):
        step()
    times: list[float] = []
    started = time.perf_counter()
    while time.perf_counter() - started < seconds or len(times) < 5:
        began = time.perf_counter()
        step()
        times.append(time.perf_counter() - began)
    return InProcess(batch, len(times) * batch / sum(times), statistics.median(times))


def start_server(
    workdir: Path, case: Case, server: dict[str, Any], *, prefix: Sequence[str] = ()
) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """`kdserve-teacher` serving `case` with `server` settings, ready; `prefix` runs it under
    another command (py-spy, which then is the process returned)."""
    config = {"server": {"http_port": 0, "grpc_port": 0, **server}, "models": [case.model_entry]}
    path = workdir / "teacher.json"
    path.write_text(json.dumps(config))
    port_file = workdir / "ports.json"
    port_file.unlink(missing_ok=True)
    process = subprocess.Popen(
        [
            *prefix,
            sys.executable,
            "-m",
            "teacher_server",
            "--config",
            str(path),
            "--port-file",
            str(port_file),
            "--log-level",
            "warning",
        ]
    )
    while not port_file.exists():
        if process.poll() is not None:
            raise RuntimeError(f"{' '.join(prefix) or 'teacher server'} exited during start-up")
        time.sleep(0.05)
    ports = json.loads(port_file.read_text())
    import httpx

    while httpx.get(f"{ports['http_url']}/readyz").status_code != 200:
        time.sleep(0.1)
    return process, ports


def client_loop(
    url: str, model: str, size: int, batch: int, seconds: float, ready: Any, start: Any, out: Any
) -> None:
    """One student: a closed loop of requests, timed only once every client is warmed up.

    `url` is one of the server's; `v2+http://` and `v2+grpc://` send the same request in the
    Open Inference Protocol with tritonclient (binary tensors over HTTP, raw contents over
    gRPC), as a Triton user's student would.
    """
    torch.set_num_threads(1)
    from teacher_server.client import TeacherClient

    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    latencies: list[float] = []
    if url.startswith("v2+"):
        v2_infer, close = v2_client(url.removeprefix("v2+"), model)

        def infer() -> None:
            v2_infer(images)
    else:
        client = TeacherClient.connect(url, model=model, max_request_bytes=1 << 30)

        def infer() -> None:
            client.infer(images, output_dtype="float16")

        close = client.close
    try:
        for _ in range(3):
            infer()
        ready.put(os.getpid())
        start.wait()
        stop = time.perf_counter() + seconds
        while time.perf_counter() < stop:
            began = time.perf_counter()
            infer()
            latencies.append(time.perf_counter() - began)
    finally:
        close()
    out.put(latencies)


def v2_client(url: str, model: str) -> tuple[Any, Any]:
    """tritonclient's call of `model` on given images (float16 logits answered), and its close;
    `url` is the server's http:// or grpc:// URL."""
    scheme, address = url.split("://", 1)
    if scheme == "http":
        import tritonclient.http as triton
    else:
        import tritonclient.grpc as triton  # type: ignore[no-redef]
    client = triton.InferenceServerClient(address)
    parameters = {"output_dtype": "FP16"}

    def infer(images: torch.Tensor) -> None:
        array = images.numpy()
        tensor = triton.InferInput("images", list(array.shape), "UINT8")
        tensor.set_data_from_numpy(array)
        client.infer(model, [tensor], parameters=parameters).as_numpy("logits")

    return infer, client.close


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Served:
    images_per_s: float
    latencies: list[float]
    server_cpu_ms: float
    client_cpu_ms: float


def measure_served(url: str, server_pid: int, case: Case, clients: int, seconds: float) -> Served:
    """Start `clients` student processes, wait until all are warm, then time them together."""
    ctx = mp.get_context("spawn")
    ready, start, out = ctx.Queue(), ctx.Event(), ctx.Queue()
    args = (url, case.model_entry["name"], case.size, case.batch, seconds, ready, start, out)
    procs = [ctx.Process(target=client_loop, args=args) for _ in range(clients)]
    for proc in procs:
        proc.start()
    pids = [ready.get(timeout=300) for _ in procs]
    cpu_before = cpu_seconds(server_pid), sum(cpu_seconds(pid) for pid in pids)
    start.set()
    latencies: list[float] = []
    for _ in procs:
        latencies.extend(out.get())
    cpu_after = cpu_seconds(server_pid), sum(cpu_seconds(pid) for pid in pids)
    for proc in procs:
        proc.join()
    requests = max(1, len(latencies))
    return Served(
        len(latencies) * case.batch / seconds,
        latencies,
        (cpu_after[0] - cpu_before[0]) / requests * 1e3,
        (cpu_after[1] - cpu_before[1]) / requests * 1e3,
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def wire_bytes(case: Case) -> dict[str, float]:
    """Bytes per image of one request + its float16 answer, as TeacherClient sends them
    (framed over HTTP, protobuf over gRPC)."""
    images = torch.zeros(case.batch, 3, case.size, case.size, dtype=torch.uint8)
    classes = case.model_entry["num_classes"]
    name = case.model_entry["name"]
    request = InferRequest(name, images, output_dtype="float16", request_id="0" * 32)
    answer = InferResult(
        name,
        "0" * 32,
        logits=torch.zeros(case.batch, classes, dtype=torch.float16),
        timings=Timings(1.0, 1.0, 1.0, (case.batch,)),
    )
    framed = wire.request_to_framed(request) + wire.result_to_framed(answer)
    http = sum(len(piece) for piece in framed)
    grpc_bytes = len(wire.request_to_protobuf(request)) + len(wire.result_to_protobuf(answer))
    floor = 3 * case.size * case.size + 2 * classes
    return {"floor": floor, "http": http / case.batch, "grpc": grpc_bytes / case.batch}


LAYOUTS = ["one", "split"]
"""`one`: one replica with every core's threads (the default); `split`: one replica per
core, one thread each."""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=6.0, help="measuring time per point")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--cases", nargs="+", default=["compute-bound", "wire-bound"])
    parser.add_argument("--wires", nargs="+", default=WIRES, choices=WIRES)
    parser.add_argument("--layouts", nargs="+", default=LAYOUTS, choices=LAYOUTS)
    parser.add_argument("--max-batch-size", type=int, default=256, help="the server's largest pass")
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    print(
        f"machine: {threads} cores, torch {torch.__version__}; MALLOC_MMAP_THRESHOLD_="
        f"{os.environ.get('MALLOC_MMAP_THRESHOLD_', 'unset')}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for case in build_cases(workdir):
            if case.name in args.cases:
                run_case(
                    workdir,
                    case,
                    args.clients,
                    args.seconds,
                    threads,
                    args.wires,
                    layouts=args.layouts,
                    max_batch_size=args.max_batch_size,
                )


@dataclass(frozen=True)
class Row:
    layout: str
    wire: str
    clients: int
    served: Served


def run_case(
    workdir: Path,
    case: Case,
    client_counts: list[int],
    seconds: float,
    threads: int,
    wires: list[str] = WIRES,
    *,
    layouts: list[str] = LAYOUTS,
    max_batch_size: int = 256,
) -> None:
    """Each served figure against the in-process forward at the request's size (what a
    student with the teacher inside pays), at the server's largest pass (the model's limit on
    this machine) and, at the request's size, with torchvision's preprocessing."""
    request = in_process(case, seconds, threads, "kdserve")
    limit = in_process(case, seconds, threads, "kdserve", max_batch_size)
    request_tv = in_process(case, seconds, threads, "torchvision")
    print(
        f"\n== {case.name}: {case.model_entry['arch'].split('/')[-1]} at {case.size} px, "
        f"{case.batch}-image uint8 requests; in process with {threads} threads: "
        f"{request.images_per_s:.0f} img/s at {case.batch} images (x req; p50 "
        f"{request.p50_s * 1e3:.1f} ms), {limit.images_per_s:.0f} img/s at {max_batch_size} "
        f"(x limit), {request_tv.images_per_s:.0f} img/s at {case.batch} with torchvision's "
        "ToDtype + Normalize (x tv)"
    )
    settings = {
        "one": (
            f"1 replica x {threads} threads",
            {"replicas_per_device": 1, "threads_per_replica": threads},
        ),
        "split": (
            f"{threads} replicas x 1 thread",
            {"replicas_per_device": threads, "threads_per_replica": 1},
        ),
    }
    print(
        f"{'server':24} {'wire':7} {'clients':>7} {'img/s':>8} {'x limit':>7} {'x req':>6} "
        f"{'x tv':>5} {'p50 ms':>7} {'p50/req':>7} {'p99 ms':>7} "
        f"{'CPU ms/request: server':>23} {'clients':>8}"
    )
    rows: list[Row] = []
    for layout in layouts:
        label, placement = settings[layout]
        server = {"max_batch_size": max_batch_size, "max_delay_ms": 2, **placement}
        process, ports = start_server(workdir, case, server)
        try:
            for wire in wires:
                url = ports[f"{wire.removeprefix('v2-')}_url"]
                url = f"v2+{url}" if wire.startswith("v2-") else url
                for clients in client_counts:
                    run = measure_served(url, process.pid, case, clients, seconds)
                    rows.append(Row(label, wire, clients, run))
                    p50, p99 = percentile(run.latencies, 0.5), percentile(run.latencies, 0.99)
                    rate = run.images_per_s
                    print(
                        f"{label:24} {wire:7} {clients:>7} {rate:>8.0f} "
                        f"{rate / limit.images_per_s:>7.2f} {rate / request.images_per_s:>6.2f} "
                        f"{rate / request_tv.images_per_s:>5.2f} {p50 * 1e3:>7.1f} "
                        f"{p50 / request.p50_s:>7.2f} {p99 * 1e3:>7.1f} "
                        f"{run.server_cpu_ms:>23.1f} {run.client_cpu_ms:>8.1f}",
                        flush=True,
                    )
        finally:
            process.terminate()
            process.wait()
    print_targets(case, rows, request, limit, request_tv)
    lone = {}
    for label, server in (
        ("batching", {"max_batch_size": max_batch_size, "max_delay_ms": 2}),
        ("unbatched", {"max_batch_size": case.batch, "max_delay_ms": 0}),
    ):
        process, ports = start_server(workdir, case, server)
        try:
            run = measure_served(ports["grpc_url"], process.pid, case, 1, seconds)
            lone[label] = statistics.median(run.latencies)
        finally:
            process.terminate()
            process.wait()
    print(
        f"lone client p50: batching server {lone['batching'] * 1e3:.1f} ms, unbatched "
        f"{lone['unbatched'] * 1e3:.1f} ms (ratio {lone['batching'] / lone['unbatched']:.2f}); "
        f"in process {request.p50_s * 1e3:.1f} ms"
    )
    sizes = wire_bytes(case)
    print(
        f"bytes per image (request + float16 answer): HTTP {sizes['http']:.0f}, "
        f"gRPC {sizes['grpc']:.0f}; "
        f"uint8 view + 2 x classes = {sizes['floor']:.0f}"
    )


def print_targets(
    case: Case, rows: list[Row], request: InProcess, limit: InProcess, request_tv: InProcess
) -> None:
    """Each target of docs/architecture.md and issue 16 this case has, met or missed, row by
    row (8 clients: the most in this run; 1 client: a lone student)."""
    most = max((row.clients for row in rows), default=0)

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    for row in rows:
        run, rate = row.served, row.served.images_per_s
        where = f"{row.layout}, {row.wire}, {row.clients} client(s)"
        if case.name == "compute-bound" and row.clients == most and most > 1:
            ratio = rate / limit.images_per_s
            print(
                f"target >= 0.90 x limit at {most} clients ({where}): {ratio:.2f}, "
                f"{verdict(ratio >= 0.9)}"
            )
        if case.name == "compute-bound" and row.clients == 1:
            ratio = rate / request.images_per_s
            p50 = percentile(run.latencies, 0.5) / request.p50_s
            ok = ratio >= 0.85 and p50 <= 1.15
            print(
                f"target >= 0.85 x req and p50 <= 1.15 x in process ({where}): {ratio:.2f}, "
                f"p50 {p50:.2f}, {verdict(ok)}"
            )
        if case.name == "wire-bound" and row.clients == most:
            ratio = rate / request_tv.images_per_s
            ok = ratio >= 0.5 and run.server_cpu_ms <= 2.5
            print(
                f"target >= 0.5 x tv and server CPU <= 2.5 ms/request ({where}): {ratio:.2f}, "
                f"{run.server_cpu_ms:.1f} ms, {verdict(ok)}"
            )


if __name__ == "__main__":
    main()
