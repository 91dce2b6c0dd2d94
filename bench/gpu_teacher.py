"""Served against in-process float16 on a GPU: torchvision resnet50 and vit_b_16 at 224 px.

For each model (seeded random weights) and each server variant (`eager`: every pass at its own
size; `padded`: fixed pass sizes and two replicas on their own CUDA streams, one's upload beside
the other's forward; `graphs`: padded, one CUDA graph per pass size), a `kdserve-teacher`
process on `--device` (the model's config: dtype float16, channels_last, pinned uploads)
answers 1, 8 and 32 client processes, each a closed loop of 32-image uint8 requests over gRPC.
The baselines are the same model in this process on the same device, measured in the same run:
the uint8 batch uploaded from pinned memory, normalized there, the forward under float16
autocast in channels_last, synchronized per batch; once at the request's size (`x req`: a
student with the teacher inside) and once at the server's largest pass (`x limit`). While
the clients run, nvidia-smi samples the GPU's busy share.
Target (ARCHITECTURE.md): served >= 0.9x in-process fp16.

One command on a machine with a GPU (the README records the results):
    .venv/bin/python bench/gpu_teacher.py
The script itself is checked on a CPU with
    .venv/bin/python bench/gpu_teacher.py --device cpu --dtype bfloat16 --models resnet18 \\
        --clients 1 2 --seconds 2 --max-batch-size 64
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import teacher_throughput as throughput

from teacher_server.server.engine import TORCH_DTYPES
from teacher_server.server.registry import RANDOM_INIT_SEED
from teacher_server.shared.archs import create_model
from teacher_server.shared.views import normalize

MODELS = {"resnet50": "torchvision:resnet50", "vit_b_16": "torchvision:vit_b_16"}
EXTRA_MODELS = {"resnet18": "torchvision:resnet18"}
"""For a quick check of the script (a CPU run)."""


def pass_sizes(batch: int, largest: int) -> list[int]:
    """Powers of two times the request size up to the largest pass (which is always one)."""
    sizes = []
    size = batch
    while size < largest:
        sizes.append(size)
        size *= 2
    return [*sizes, largest]


def _eager(batch: int, largest: int) -> tuple[dict[str, object], dict[str, object]]:
    return {}, {}


def _padded(batch: int, largest: int) -> tuple[dict[str, object], dict[str, object]]:
    """Fixed pass sizes, two replicas (one's upload and preprocessing beside the other's
    forward, each on its own stream)."""
    return {"pass_sizes": pass_sizes(batch, largest)}, {"replicas_per_device": 2}


def _graphs(batch: int, largest: int) -> tuple[dict[str, object], dict[str, object]]:
    model, server = _padded(batch, largest)
    return {**model, "cuda_graphs": True}, server


VARIANTS = {"eager": _eager, "padded": _padded, "graphs": _graphs}
"""Server configurations measured: (model fields, server fields) for a request size and the
largest pass."""


def case_of(name: str, batch: int, dtype: str) -> throughput.Case:
    entry = {
        "name": name,
        "arch": {**MODELS, **EXTRA_MODELS}[name],
        "random_init": True,
        "num_classes": 1000,
        "input_size": 224,
        "mean": list(throughput.MEAN),
        "std": list(throughput.STD),
        "dtype": dtype,
        "channels_last": True,
    }
    return throughput.Case(name, entry, 224, batch)


def in_process(
    case: throughput.Case, device: str, dtype: str, batch: int, seconds: float
) -> throughput.InProcess:
    """The model in this process: pinned uint8 upload, normalize, autocast forward, synced."""
    torch.manual_seed(RANDOM_INIT_SEED)
    model = create_model(case.model_entry["arch"], num_classes=1000).eval().to(device)
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    on_gpu = device.startswith("cuda")
    images = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8)
    images = images.pin_memory() if on_gpu else images
    mean = torch.tensor(throughput.MEAN, device=device)
    std = torch.tensor(throughput.STD, device=device)
    autocast = torch.autocast(torch.device(device).type, dtype=TORCH_DTYPES[dtype])

    def step() -> None:
        with torch.inference_mode(), autocast:
            views = normalize(images.to(device, non_blocking=True), mean, std)
            model(views.contiguous(memory_format=torch.channels_last))
        if on_gpu:
            torch.cuda.synchronize(device)

    return throughput.timed_steps(step, batch, seconds, warm_up=5)


class BusySampler:
    """The GPU's utilization (nvidia-smi, every 200 ms) while running; None without one."""

    def __init__(self, device: str) -> None:
        self.samples: list[float] = []
        smi = shutil.which("nvidia-smi")
        self._process = None
        if device.startswith("cuda") and smi is not None:
            index = torch.device(device).index or 0
            self._process = subprocess.Popen(
                [
                    smi,
                    "-i",
                    str(index),
                    "--query-gpu=utilization.gpu",
                    "--format=csv,noheader,nounits",
                    "-lms",
                    "200",
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            if line.strip().isdigit():
                self.samples.append(float(line))

    def stop(self) -> float | None:
        if self._process is None:
            return None
        self._process.terminate()
        self._process.wait()
        return statistics.fmean(self.samples) / 100 if self.samples else None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument(
        "--models", nargs="+", default=list(MODELS), choices=[*MODELS, *EXTRA_MODELS]
    )
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--batch", type=int, default=32, help="images per request")
    parser.add_argument("--max-batch-size", type=int, default=256, help="the server's largest pass")
    parser.add_argument("--seconds", type=float, default=10.0, help="measuring time per point")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        help="server configurations to measure (default: eager graphs on a GPU, eager padded "
        "on a CPU)",
    )
    args = parser.parse_args()
    on_gpu = args.device.startswith("cuda")
    if on_gpu and not torch.cuda.is_available():
        sys.exit(
            f"--device {args.device}: no CUDA device here (pass --device cpu to check the script)"
        )
    variants = args.variants or (["eager", "graphs"] if on_gpu else ["eager", "padded"])
    if "graphs" in variants and not on_gpu:
        sys.exit("--variants graphs needs a CUDA device")
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    print(
        f"device {args.device} ({name}), torch {torch.__version__}, {args.dtype}, "
        f"{os.cpu_count()} cores"
    )
    print(
        f"{'model':10} {'server':>7} {'clients':>7} {'img/s':>8} {'x req':>6} {'x limit':>7} "
        f"{'p50 ms':>7} {'GPU busy':>8}"
    )
    verdicts = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for model in args.models:
            case = case_of(model, args.batch, args.dtype)
            request = in_process(case, args.device, args.dtype, args.batch, args.seconds)
            limit = in_process(case, args.device, args.dtype, args.max_batch_size, args.seconds)
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()  # the baselines' memory, before the server takes its own
            print(
                f"{model}: in process {request.images_per_s:.0f} img/s at {args.batch} "
                f"(p50 {request.p50_s * 1e3:.1f} ms), {limit.images_per_s:.0f} at "
                f"{args.max_batch_size}",
                flush=True,
            )
            for variant in variants:
                model_fields, server_fields = VARIANTS[variant](args.batch, args.max_batch_size)
                served = throughput.Case(
                    case.name, {**case.model_entry, **model_fields}, case.size, case.batch
                )
                server = {
                    "device": args.device,
                    "max_batch_size": args.max_batch_size,
                    "max_delay_ms": 2,
                    **server_fields,
                }
                process, ports = throughput.start_server(workdir, served, server)
                try:
                    for clients in args.clients:
                        busy = BusySampler(args.device)
                        run = throughput.measure_served(
                            ports["grpc_url"], process.pid, served, clients, args.seconds
                        )
                        share = busy.stop()
                        rate = run.images_per_s
                        p50 = throughput.percentile(run.latencies, 0.5)
                        shown = "n/a" if share is None else f"{share:.0%}"
                        print(
                            f"{model:10} {variant:>7} {clients:>7} {rate:>8.0f} "
                            f"{rate / request.images_per_s:>6.2f} "
                            f"{rate / limit.images_per_s:>7.2f} {p50 * 1e3:>7.1f} {shown:>8}",
                            flush=True,
                        )
                        best = max(request.images_per_s, limit.images_per_s)
                        verdicts.append((model, variant, clients, rate / best))
                finally:
                    process.terminate()
                    process.wait()
    for model, variant, clients, ratio in verdicts:
        verdict = "met" if ratio >= 0.9 else "MISSED"
        print(
            f"target served >= 0.9 x in-process {args.dtype} (the faster of x req and x limit) "
            f"({model}, {variant}, {clients} client(s)): {ratio:.2f}, {verdict}"
        )


if __name__ == "__main__":
    main()
