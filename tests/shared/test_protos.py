"""The committed gRPC stubs are exactly what protoc generates from protos/teacher.proto."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("teacher_pb2.py", "teacher_pb2.pyi", "teacher_pb2_grpc.py")


def test_committed_stubs_match_the_proto(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    (tmp_path / "protos").mkdir()
    shutil.copy(ROOT / "protos" / "teacher.proto", tmp_path / "protos" / "teacher.proto")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-Iteacher_server/shared/_proto=protos",
            "--python_out=.",
            "--pyi_out=.",
            "--grpc_python_out=.",
            "protos/teacher.proto",
        ],
        cwd=tmp_path,
        check=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / "teacher_server" / "shared" / "_proto" / name).read_text()
        committed = (ROOT / "teacher_server" / "shared" / "_proto" / name).read_text()
        assert fresh == committed, f"{name} is stale or edited by hand: run `make protos`"
