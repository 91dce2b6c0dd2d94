"""`kdserve-teacher --config teacher.yaml [flags]`: flags override the file, the file defaults."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from teacher_server import __version__
from teacher_server.server.config import load_config, parse_devices
from teacher_server.server.serve import serve
from teacher_server.shared.settings import ConfigError


def _int_or_auto(value: str) -> int | str:
    return value if value == "auto" else int(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdserve-teacher",
        description="Serve a teacher model or ensemble to remote students over HTTP and gRPC.",
    )
    parser.add_argument("--config", type=Path, required=True, help="teacher YAML file")
    parser.add_argument("--host", help="address to bind (default 127.0.0.1; 0.0.0.0 in containers)")
    parser.add_argument("--http-port", type=int, help="HTTP port (0: any free port)")
    parser.add_argument("--grpc-port", type=int, help="gRPC port (0: any free port)")
    parser.add_argument(
        "--device", help="cpu, cuda, cuda:N, or a comma-separated list (one replica set per device)"
    )
    parser.add_argument("--replicas-per-device", type=int)
    parser.add_argument("--threads-per-replica", type=_int_or_auto, help="int or auto")
    parser.add_argument("--max-batch-size", type=int, help="images per forward pass")
    parser.add_argument("--max-delay-ms", type=float)
    parser.add_argument("--max-queue-images", type=int)
    parser.add_argument("--max-request-bytes", type=int)
    parser.add_argument("--request-timeout-s", type=float)
    parser.add_argument(
        "--port-file", type=Path, help="write the bound ports here as JSON once listening"
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument("--version", action="version", version=f"kdserve-teacher {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    device = parse_devices(args.device) if args.device else None
    overrides = {
        "host": args.host,
        "http_port": args.http_port,
        "grpc_port": args.grpc_port,
        "device": device,
        "replicas_per_device": args.replicas_per_device,
        "threads_per_replica": args.threads_per_replica,
        "max_batch_size": args.max_batch_size,
        "max_delay_ms": args.max_delay_ms,
        "max_queue_images": args.max_queue_images,
        "max_request_bytes": args.max_request_bytes,
        "request_timeout_s": args.request_timeout_s,
    }
    try:
        config = load_config(args.config, server_overrides=overrides)
    except ConfigError as exc:
        print(f"kdserve-teacher: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(serve(config, port_file=args.port_file))
    except OSError as exc:
        print(f"kdserve-teacher: cannot listen: {exc}", file=sys.stderr)
        return 1
