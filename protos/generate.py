"""Generate the Python stubs of protos/*.proto into teacher_server/shared/_proto (`make protos`).

`python protos/generate.py [ROOT]` writes under ROOT (default: the repository), which must
hold a copy of protos/. The Open Inference Protocol's module gets its own descriptor pool:
tritonclient registers the same `inference.*` names in protobuf's default pool, and both may
be imported in one process.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

OUT = Path("teacher_server/shared/_proto")
DEFAULT_POOL = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
OWN_POOL = "POOL = _descriptor_pool.DescriptorPool()\nDESCRIPTOR = POOL.AddSerializedFile("


def protoc(root: Path, proto: str, *grpc: str) -> None:
    command = [sys.executable, "-m", "grpc_tools.protoc", f"-I{OUT}=protos"]
    command += ["--python_out=.", "--pyi_out=.", *grpc, f"protos/{proto}"]
    subprocess.run(command, cwd=root, check=True)


def generate(root: Path) -> None:
    protoc(root, "teacher.proto", "--grpc_python_out=.")
    protoc(root, "grpc_predict_v2.proto")
    module = root / OUT / "grpc_predict_v2_pb2.py"
    text = module.read_text()
    if text.count(DEFAULT_POOL) != 1:
        raise SystemExit(f"{module}: protoc's output changed; cannot give it its own pool")
    module.write_text(text.replace(DEFAULT_POOL, OWN_POOL))


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1])
