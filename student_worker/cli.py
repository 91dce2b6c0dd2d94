"""`kdserve-student`: train a student against a remote teacher; `export` its weights."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import get_args

from student_worker import __version__, losses, report
from student_worker.checkpoint import LATEST, CheckpointError, load_checkpoint
from student_worker.config import TeachingMode, load_run_config
from student_worker.teacher import TeacherUnreachable
from student_worker.trainer import Trainer, TrainingError
from teacher_server.shared.settings import ConfigError

EXIT_TEACHER_UNREACHABLE = 69
"""sysexits' EX_UNAVAILABLE: no teacher answered within teacher.startup_wait_s. Unlike 2 (a
config, data or teacher mismatch), running the same command later may succeed."""


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdserve-student",
        description="Train a student with a remote teacher. Also: `kdserve-student export "
        "RUN_DIR --out student.safetensors` writes its weights for the teacher server; "
        "`kdserve-student report RUN_DIR...` prints the runs' table and plots their curves.",
    )
    parser.add_argument("--config", type=Path, help="student YAML file (defaults otherwise)")
    parser.add_argument(
        "--teacher", action="append", help="teacher endpoint(s), e.g. grpc://host:50051"
    )
    parser.add_argument("--teacher-model", help="the served model or ensemble to learn from")
    parser.add_argument(
        "--teacher-wait",
        type=float,
        metavar="SECONDS",
        help="at start-up, wait this long for an unreachable or loading teacher, then exit "
        f"{EXIT_TEACHER_UNREACHABLE} (teacher.startup_wait_s, default 60)",
    )
    parser.add_argument(
        "--allow-insecure-token",
        action="store_const",
        const=True,
        help="send the token over http:// or grpc:// to a non-loopback teacher (a private "
        "network you trust; otherwise use https:// or grpcs://)",
    )
    parser.add_argument("--loss", help=f"one of {', '.join(losses.names())}")
    parser.add_argument(
        "--teaching",
        choices=get_args(TeachingMode),
        help="what the teacher sees: the student's crop (consistent, the default), that mixed "
        "on every batch (function_matching), one fixed view per image asked once (fixed), or "
        "a crop of its own (independent)",
    )
    parser.add_argument("--arch", help="student arch, e.g. kdserve:resnet8x4")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--amp", choices=["auto", "off", "float16", "bfloat16"])
    parser.add_argument(
        "--eval-every", type=int, help="steps between evaluations (default: each epoch)"
    )
    parser.add_argument("--output-dir", type=Path)
    parser.add_argument("--resume", action="store_true", help="continue the run in --output-dir")
    parser.add_argument(
        "--auto-resume",
        action="store_true",
        help="continue the run in --output-dir if it holds one, else start it (for restarts)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument("--version", action="version", version=f"kdserve-student {__version__}")
    return parser


def export(run_dir: Path, out: Path, *, ema: bool = False) -> None:
    """Write a run's student weights (or their moving average) as safetensors, the form the
    teacher server loads."""
    import safetensors.torch

    state = load_checkpoint(run_dir)
    if ema and not state.get("ema"):
        raise CheckpointError(f"{run_dir} was trained without ema (set ema.decay to keep one)")
    weights = state["ema"] if ema else state["model"]
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in weights.items()}
    safetensors.torch.save_file(tensors, str(out))


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    if arguments[:1] == ["report"]:
        return report.main(arguments[1:])
    if arguments[:1] == ["export"]:
        parser = argparse.ArgumentParser(prog="kdserve-student export")
        parser.add_argument("run_dir", type=Path)
        parser.add_argument("--out", type=Path, required=True)
        parser.add_argument(
            "--ema", action="store_true", help="the moving average of the weights (ema.decay)"
        )
        args = parser.parse_args(arguments[1:])
        try:
            export(args.run_dir, args.out, ema=args.ema)
        except CheckpointError as exc:
            print(f"kdserve-student: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {args.out}")
        return 0
    args = train_parser().parse_args(arguments)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    overrides = {
        "teacher.endpoints": args.teacher,
        "teacher.model": args.teacher_model,
        "teacher.startup_wait_s": args.teacher_wait,
        "teacher.allow_insecure_token": args.allow_insecure_token,
        "loss.name": args.loss,
        "teaching.mode": args.teaching,
        "student.arch": args.arch,
        "epochs": args.epochs,
        "max_steps": args.max_steps,
        "batch_size": args.batch_size,
        "optimizer.lr": args.lr,
        "seed": args.seed,
        "threads": args.threads,
        "device": args.device,
        "amp": args.amp,
        "eval_every": args.eval_every,
        "output_dir": str(args.output_dir) if args.output_dir else None,
    }
    try:
        config = load_run_config(args.config, overrides)
        resume = args.resume or (args.auto_resume and (config.output_dir / LATEST).is_file())
        trainer = Trainer(config, resume=resume)
        metrics = trainer.fit()
    except TeacherUnreachable as exc:
        print(f"kdserve-student: {exc}", file=sys.stderr)
        return EXIT_TEACHER_UNREACHABLE
    except (ConfigError, TrainingError, CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"kdserve-student: {exc}", file=sys.stderr)
        return 2
    if trainer.stopped_early:
        print(
            f"kdserve-student: stopped by SIGTERM at step {trainer.step} of "
            f"{trainer.total_steps}; checkpoint written, --auto-resume continues it",
            file=sys.stderr,
        )
        return 128 + signal.SIGTERM
    print(" ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return 0
