"""The committed gRPC stubs are exactly what `make protos` generates from protos/*.proto."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GENERATED = (
    "teacher_pb2.py",
    "teacher_pb2.pyi",
    "teacher_pb2_grpc.py",
    "grpc_predict_v2_pb2.py",
    "grpc_predict_v2_pb2.pyi",
)


def test_committed_stubs_match_the_protos(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    subprocess.run([sys.executable, "protos/generate.py", str(tmp_path)], cwd=ROOT, check=True)
    for name in GENERATED:
        fresh = (tmp_path / "teacher_server" / "shared" / "_proto" / name).read_text()
        committed = (ROOT / "teacher_server" / "shared" / "_proto" / name).read_text()
        assert fresh == committed, f"{name} is stale or edited by hand: run `make protos`"


def test_the_v2_messages_live_in_their_own_pool() -> None:
    """tritonclient's `inference.*` messages and ours load in one process, wire-compatible."""
    from tritonclient.grpc import service_pb2 as triton

    from teacher_server.shared._proto import grpc_predict_v2_pb2 as v2

    ours = v2.ModelInferRequest(model_name="small", raw_input_contents=[b"\x01"])
    ours.parameters["temperature"].double_param = 4.0
    theirs = triton.ModelInferRequest.FromString(ours.SerializeToString())
    assert theirs.model_name == "small" and theirs.raw_input_contents == [b"\x01"]
    assert theirs.parameters["temperature"].double_param == 4.0
    assert v2.ModelInferRequest.DESCRIPTOR.file.pool is v2.POOL
