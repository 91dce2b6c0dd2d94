"""`kdserve-demo`: the whole system in miniature on the embedded digits data, on a CPU.

1. train the teacher (or an ensemble of two) on every label once; weights cached as
   safetensors under RUN_DIR/teacher;
2. start `kdserve-teacher` on loopback with it;
3. run one `kdserve-student` per loss at the same time against that one endpoint (KD, DKD,
   DIST, DeiT, and a CE-only baseline for each architecture), with consistent views and
   mixup; with `--teaching`, one KD student per teaching mode instead, without labels;
4. print their table (each row's gain over its own arch's baseline) and the server's
   batching, write RUN_DIR/curves.png, stop everything.

`kdserve-demo teacher --run-dir DIR` does step 1 alone and leaves DIR/teacher/teacher.yaml,
the teacher server's config (the compose file's init service runs it).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import torch
from tqdm import tqdm

from student_worker import report
from student_worker.config import available_cores
from student_worker.demo import recipes
from student_worker.demo.processes import ChildFailed, Children
from student_worker.demo.recipes import Member, StudentRun
from student_worker.runlog import RunLog

SERVER = "teacher server"
READY_TIMEOUT_S = 120.0


class Interrupted(Exception):
    """SIGTERM (or Ctrl-C) asked the demo to stop."""


def executable(name: str) -> str:
    """A console script of this installation (next to this Python), else from PATH."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is not installed next to {sys.executable} nor on PATH")
    return found


# ---- step 1: the teacher ----------------------------------------------------------------


def ensure_teacher(
    children: Children, teacher_dir: Path, members: tuple[Member, ...], epochs: int, seed: int
) -> Path:
    """Train the members (in parallel, the cores shared) unless this recipe's weights exist.

    Returns the teacher server's config, whose weights paths are relative to it; with several
    members, `member-NAME.yaml` beside it serves each member alone.
    """
    threads = max(1, available_cores() // len(members))
    runs = {
        m.name: recipes.teacher_run_config(m, epochs=epochs, seed=seed, threads=threads)
        for m in members
    }
    recipe = {name: {k: v for k, v in run.items() if k != "threads"} for name, run in runs.items()}
    recipe_path = teacher_dir / "recipe.json"
    weights = {m.name: teacher_dir / f"{m.name}.safetensors" for m in members}
    cached = recipe_path.is_file() and json.loads(recipe_path.read_text()) == recipe
    if cached and all(path.is_file() for path in weights.values()):
        print(f"teacher: cached weights in {teacher_dir} (delete it to train again)")
    else:
        recipe_path.unlink(missing_ok=True)  # the weights match it again only once all are done
        shutil.rmtree(teacher_dir / "runs", ignore_errors=True)
        print(
            f"teacher: training {', '.join(m.arch for m in members)} on every digits label, "
            f"{epochs} epochs, {threads} thread(s) each ...",
            flush=True,
        )
        started = time.monotonic()
        for member in members:
            config = recipes.write_yaml(
                teacher_dir / "configs" / f"{member.name}.yaml", runs[member.name]
            )
            children.start(
                f"teacher {member.name}",
                [
                    executable("kdserve-student"),
                    "--config",
                    str(config),
                    "--output-dir",
                    str(teacher_dir / "runs" / member.name),
                ],
                teacher_dir / "logs" / f"{member.name}.log",
                threads=threads,
            )
        children.wait_all()
        for member in members:
            children.start(
                f"export {member.name}",
                [
                    executable("kdserve-student"),
                    "export",
                    str(teacher_dir / "runs" / member.name),
                    "--out",
                    str(weights[member.name]),
                ],
                teacher_dir / "logs" / f"export-{member.name}.log",
            )
        children.wait_all()
        recipe_path.write_text(json.dumps(recipe, indent=2))
        print(f"teacher: trained in {time.monotonic() - started:.0f}s; weights in {teacher_dir}")
    for member in members:
        accuracy = last_eval(teacher_dir / "runs" / member.name).get("student_accuracy")
        if accuracy is not None:
            print(f"teacher: {member.name} reaches {accuracy:.2%} on the held-out digits")
    if len(members) > 1:  # one server per member too (docker/compose.ensemble.yml)
        for member in members:
            recipes.write_yaml(
                teacher_dir / f"member-{member.name}.yaml", recipes.server_config((member,))
            )
    return recipes.write_yaml(teacher_dir / "teacher.yaml", recipes.server_config(members))


def last_eval(run_dir: Path) -> dict[str, Any]:
    log = RunLog(run_dir)
    evaluations = log.records("eval") if log.exists() else []
    return evaluations[-1] if evaluations else {}


# ---- step 2: the server -----------------------------------------------------------------


def start_server(children: Children, teacher_config: Path, run_dir: Path) -> dict[str, Any]:
    """Start kdserve-teacher on free loopback ports; its endpoints once every model is ready."""
    port_file = run_dir / "ports.json"
    port_file.unlink(missing_ok=True)
    children.start(
        SERVER,
        [
            executable("kdserve-teacher"),
            "--config",
            str(teacher_config),
            "--port-file",
            str(port_file),
        ],
        run_dir / "logs" / "teacher-server.log",
    )
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        children.check()
        if SERVER not in children.running:
            raise ChildFailed("the teacher server exited before it was ready")
        if port_file.is_file():
            ports: dict[str, Any] = json.loads(port_file.read_text())
            try:
                if httpx.get(f"{ports['http_url']}/readyz", timeout=2).status_code == 200:
                    return ports
            except httpx.TransportError:
                pass
        time.sleep(0.2)
    raise ChildFailed(f"the teacher server was not ready within {READY_TIMEOUT_S:.0f}s")


# ---- step 3: the students ---------------------------------------------------------------


def start_students(
    children: Children,
    run_dir: Path,
    runs: Sequence[StudentRun],
    teacher_url: str,
    teacher_model: str,
    args: argparse.Namespace,
) -> dict[str, Path]:
    students_dir = run_dir / "students"
    shutil.rmtree(students_dir, ignore_errors=True)
    out = {}
    for run in runs:
        config = recipes.student_run_config(
            run,
            teacher_url=teacher_url,
            teacher_model=teacher_model,
            steps=args.steps,
            eval_every=args.eval_every or max(1, args.steps // 6),
            labeled_fraction=1.0 if args.full_labels or args.teaching else args.labeled_fraction,
            seed=args.seed,
        )
        path = recipes.write_yaml(students_dir / f"{run.name}.yaml", config)
        out[run.name] = students_dir / run.name
        children.start(
            run.name,
            [
                executable("kdserve-student"),
                "--config",
                str(path),
                "--output-dir",
                str(out[run.name]),
            ],
            run_dir / "logs" / f"student-{run.name}.log",
        )
    return out


def train_steps(run_dir: Path) -> int:
    log = RunLog(run_dir)
    return len(log.records("train")) if log.exists() else 0


def follow(children: Children, students: dict[str, Path], steps: int) -> None:
    """Progress bars (plain lines off a terminal) until every student has finished."""
    interactive = sys.stdout.isatty()
    bars = (
        {
            loss: tqdm(total=steps, desc=f"{loss:>17}", position=index, unit="step", leave=True)
            for index, loss in enumerate(students)
        }
        if interactive
        else {}
    )
    last_line = time.monotonic()
    try:
        while any(name in children.running for name in students):
            children.check()
            done = {loss: train_steps(path) for loss, path in students.items()}
            for loss, bar in bars.items():
                bar.update(done[loss] - bar.n)
            if not interactive and time.monotonic() - last_line > 15:
                print(
                    "steps: " + ", ".join(f"{k} {v}/{steps}" for k, v in done.items()), flush=True
                )
                last_line = time.monotonic()
            time.sleep(0.5)
        children.check()
    finally:
        for bar in bars.values():
            bar.close()


# ---- step 4: the table ------------------------------------------------------------------


def server_stats(ports: dict[str, Any], members: tuple[Member, ...]) -> str:
    """The batching the shared teacher did: requests, images and forward passes per member."""
    stats = httpx.get(f"{ports['http_url']}/v1/stats", timeout=10).json()["models"]
    lines = []
    for member in members:
        model = stats[member.name]
        requests = sum(model["requests"].values())
        lines.append(
            f"teacher server, {member.name}: {requests} requests ({model['images']} images) in "
            f"{model['executions']} forward passes: mean batch {model['mean_batch_size']:.1f} "
            f"images, largest {model['max_batch_size']} (a training request holds "
            f"{recipes.BATCH_SIZE}, an evaluation request up to 256)"
        )
    return "\n".join(lines)


def title(args: argparse.Namespace, members: tuple[Member, ...], runs: Sequence[StudentRun]) -> str:
    """The regime, seed and lengths of the run: the table's heading."""
    teacher = " + ".join(m.arch for m in members)
    epochs = args.steps * recipes.BATCH_SIZE / recipes.DIGITS_TRAIN_IMAGES
    names = ", ".join(run.name for run in runs)
    if args.teaching:
        low, high = (round(100 * share) for share in recipes.TEACHING_CROP_SCALE)
        return (
            f"kdserve demo, teaching modes (FunMatch): digits at {recipes.IMAGE_SIZE} px, KD "
            f"students ({recipes.STUDENT_ARCH}, T 4) without labels, crops of {low}-{high}% of "
            f"each image, taught by the served teacher ({teacher}, {args.teacher_epochs} epochs "
            f"on every label, seed {args.seed}) on all {recipes.DIGITS_TRAIN_IMAGES} training "
            f"images; {args.steps} steps of {recipes.BATCH_SIZE} per student ({names}), "
            f"{epochs:.1f} epochs; {available_cores()} CPU cores, {platform.machine()}, "
            f"torch {torch.__version__}"
        )
    labels = "every label" if args.full_labels else f"labels on {args.labeled_fraction:.0%}"
    return (
        f"kdserve demo: digits at {recipes.IMAGE_SIZE} px, students with {labels} of the "
        f"{recipes.DIGITS_TRAIN_IMAGES} training images (seed {args.seed}), the teacher "
        f"({teacher}, {args.teacher_epochs} epochs on every label) teaching on all of them; "
        f"{args.steps} steps of {recipes.BATCH_SIZE} per student ({names}; ce-vit is CE on "
        f"the ViT, {recipes.VIT_ARCH}), "
        f"{epochs:.1f} epochs of the training images; {available_cores()} CPU cores, "
        f"{platform.machine()}, torch {torch.__version__}"
    )


# ---- the command ------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kdserve-demo",
        description="Train a digits teacher, serve it, and distill it into one student per loss "
        "at once. `kdserve-demo teacher` only trains (and caches) the teacher.",
    )
    p.add_argument("--run-dir", type=Path, default=Path("runs/demo"))
    p.add_argument("--steps", type=int, default=240, help="training steps per student")
    p.add_argument("--eval-every", type=int, help="steps between evaluations (default steps/6)")
    p.add_argument("--teacher-epochs", type=int, default=10)
    p.add_argument("--ensemble", action="store_true", help="teach with an ensemble of two")
    p.add_argument("--losses", default=",".join(recipes.LOSSES), help="comma-separated")
    p.add_argument("--labeled-fraction", type=float, default=0.1)
    p.add_argument("--full-labels", action="store_true", help="students keep every label")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--teaching",
        action="store_true",
        help="instead of one student per loss, one KD student per teaching mode (consistent, "
        "function_matching, fixed, independent), without labels",
    )
    return p


def results_table(runs: Sequence[report.Run], baselines: dict[str, str]) -> str:
    """The report's table, plus each row's accuracy gain over its own arch's CE baseline."""
    rows = report.table_rows(runs)
    if not baselines:
        return report.format_table(rows)
    accuracy = {run.name: report.last_eval(run).get("student_accuracy") for run in runs}
    rows[0].append("vs CE, same arch (pts)")
    for row, run in zip(rows[1:], runs, strict=True):
        baseline = accuracy.get(baselines.get(run.name, ""))
        mine = accuracy[run.name]
        gain = None if baseline is None or mine is None else (mine - baseline) * 100
        row.append(report.MISSING if gain is None else f"{gain:+.2f}")
    return report.format_table(rows)


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    only_teacher = arguments[:1] == ["teacher"]
    args = parser().parse_args(arguments[1:] if only_teacher else arguments)
    losses = [loss.strip() for loss in args.losses.split(",") if loss.strip()]
    unknown = sorted(set(losses) - set(recipes.LOSSES))
    if unknown or not losses:
        print(
            f"kdserve-demo: unknown loss(es) {unknown}; known: {list(recipes.LOSSES)}",
            file=sys.stderr,
        )
        return 2
    if args.steps < 1 or args.teacher_epochs < 1 or not 0.0 < args.labeled_fraction <= 1.0:
        print(
            "kdserve-demo: --steps and --teacher-epochs must be >= 1, --labeled-fraction in (0, 1]",
            file=sys.stderr,
        )
        return 2
    members = recipes.ENSEMBLE if args.ensemble else recipes.SINGLE
    run_dir: Path = args.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    children = Children()
    try:
        teacher_config = ensure_teacher(
            children, run_dir / "teacher", members, args.teacher_epochs, args.seed
        )
        if only_teacher:
            print(f"teacher: server config {teacher_config}")
            return 0
        runs = recipes.teaching_runs() if args.teaching else recipes.loss_runs(losses)
        print(title(args, members, runs), flush=True)
        ports = start_server(children, teacher_config, run_dir)
        print(f"teacher server: ready at {ports['grpc_url']} and {ports['http_url']}", flush=True)
        students = start_students(
            children, run_dir, runs, ports["grpc_url"], recipes.served_name(members), args
        )
        print(f"students: {', '.join(students)} started; logs in {run_dir / 'logs'}", flush=True)
        follow(children, students, args.steps)
        stats = server_stats(ports, members)
        children.stop(SERVER)
        results = [report.load_run(path) for path in students.values()]
        print()
        print(title(args, members, runs))
        print(results_table(results, recipes.baseline_of(runs)))
        print()
        print(stats)
        print(f"curves: {report.plot_curves(results, run_dir / 'curves.png')}")
        return 0
    except (KeyboardInterrupt, Interrupted):
        print(
            f"\nkdserve-demo: interrupted; stopping. Students checkpoint as they stop "
            f"({run_dir / 'students'}); the teacher's weights are kept once trained.",
            file=sys.stderr,
        )
        return 130
    except (ChildFailed, FileNotFoundError) as exc:
        print(f"kdserve-demo: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        children.stop_all(keep_last=SERVER)
