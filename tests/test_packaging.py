"""Installs are locked, and kdserve works beside tritonclient in one environment."""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import torch

from teacher_server.client import TeacherClient
from teacher_server.server.serve import ServerThread
from tests.helpers import random_images

ROOT = Path(__file__).resolve().parents[1]
LOCKS = ("requirements/cpu.lock.txt", "requirements/gpu.lock.txt")


def pins(lock: str) -> dict[str, str]:
    lines = (ROOT / lock).read_text().splitlines()
    found = (re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", line.strip()) for line in lines)
    return {_normal(m[1]): m[2] for m in found if m}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_dependency_is_pinned_in_both_locks() -> None:
    """A dependency added to pyproject.toml without `make lock` fails here."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    names = {_normal(re.split(r"[\[<>=!~; ]", spec, maxsplit=1)[0]) for spec in wanted}
    for lock in LOCKS:
        missing = sorted(names - set(pins(lock)))
        assert not missing, f"{lock} lacks {missing}: run `make lock`"
    assert pins(LOCKS[0])["torch"] == "2.13.0+cpu" and pins(LOCKS[1])["torch"] == "2.13.0"
    assert "nvidia-cublas" in pins(LOCKS[1]) and "nvidia-cublas" not in pins(LOCKS[0])


def test_this_environment_is_the_lock() -> None:
    """`make setup` installed exactly its lock (the GPU one where nvidia-smi is found)."""
    lock = LOCKS[1] if shutil.which("nvidia-smi") else LOCKS[0]
    differing = {
        name: (version, importlib.metadata.version(name))
        for name, version in pins(lock).items()
        if importlib.metadata.version(name) != version
    }
    assert not differing, differing


def test_tritonclient_and_kdserve_import_together_in_a_fresh_interpreter() -> None:
    code = (
        "import warnings; warnings.simplefilter('error')\n"
        "import tritonclient.grpc, tritonclient.http\n"
        "from tritonclient.grpc import service_pb2\n"
        "from grpc_health.v1 import health_pb2\n"
        "import teacher_server.server.serve, teacher_server.client\n"
        "from teacher_server.shared._proto import teacher_pb2\n"
        "request = service_pb2.ModelInferRequest(model_name='m')\n"
        "assert service_pb2.ModelInferRequest.FromString(request.SerializeToString()) == request\n"
        "message = teacher_pb2.InferRequest(model='m')\n"
        "assert teacher_pb2.InferRequest.FromString(message.SerializeToString()) == message\n"
        "import google.protobuf; print(google.protobuf.__version__)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("6.")


def test_a_script_with_tritonclient_loaded_is_served_by_kdserve(server: ServerThread) -> None:
    import tritonclient.grpc
    import tritonclient.http

    triton_grpc = tritonclient.grpc.InferenceServerClient(url="127.0.0.1:1")
    triton_http = tritonclient.http.InferenceServerClient(url="127.0.0.1:1")
    try:
        with TeacherClient.connect(server.endpoints.grpc_url, model="small") as client:
            logits = client.infer(random_images(2))
        assert logits.shape == (2, 10) and logits.dtype == torch.float32
    finally:
        triton_grpc.close()
        triton_http.close()
