"""The layout holds: the inference path imports no transport library, a student no server."""

from __future__ import annotations

import json
import subprocess
import sys

TRANSPORT_LIBRARIES = ("grpc", "fastapi", "starlette", "uvicorn", "httpx")


def modules_after_import(*names: str) -> list[str]:
    """Every module a fresh interpreter holds after importing `names`."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {list(names)!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    return list(json.loads(result.stdout))


def test_the_inference_path_imports_no_transport_library() -> None:
    """One interpreter for all of them: if together they load none, each alone loads none."""
    inference_path = [
        "teacher_server.server.engine",
        "teacher_server.server.batcher",
        "teacher_server.server.registry",
        "teacher_server.server.outputs",
        "teacher_server.server.lifecycle",
        "teacher_server.shared.errors",
        "teacher_server.shared.wire",
    ]
    loaded = modules_after_import(*inference_path)
    transports = [m for m in loaded if m.split(".")[0] in TRANSPORT_LIBRARIES]
    assert set(inference_path) <= set(loaded) and not transports, transports
    assert "teacher_server.server.http_api" not in loaded


def test_a_student_imports_the_shared_part_and_the_client_only() -> None:
    student = [
        "student_worker.trainer",
        "student_worker.cli",
        "student_worker.report",
        "student_worker.demo.cli",
    ]
    loaded = modules_after_import(*student)
    assert "teacher_server.client" in loaded and "teacher_server.shared.wire" in loaded
    server = [m for m in loaded if m.startswith("teacher_server.server")]
    assert not server, server
