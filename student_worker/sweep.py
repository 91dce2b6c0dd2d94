"""`kdserve-sweep`: a grid of student runs against one teacher, N at a time, resumable.

Each run is `kdserve-student --config RUN/config.yaml --output-dir RUN --auto-resume` in a
process of its own (`demo.processes`: none outlives the sweep). A run that exits 0 gets a
`done` marker holding its config's digest: a later sweep skips it while its config is the
same, resumes the others from their checkpoints, and writes one table, CSV and plot.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import signal
import sys
import time
from collections import deque
from pathlib import Path
from types import FrameType
from typing import Literal

from tqdm import tqdm

from student_worker import report
from student_worker.checkpoint import LATEST
from student_worker.demo.processes import Children
from student_worker.runlog import METRICS_FILE
from student_worker.sweep_plan import (
    PlannedRun,
    Sweep,
    config_text,
    config_value,
    format_override,
    load_sweep,
)
from teacher_server.shared.settings import AUTH_TOKEN_ENV, ConfigError

RUN_CONFIG = "config.yaml"
RUN_LOG = "student.log"
DONE = "done"
RESULTS = "results.csv"
CURVES = "curves.png"
POLL_S = 0.2
LOG_TAIL_LINES = 5

State = Literal["complete", "resume", "start"]
Outcome = Literal["complete", "failed", "interrupted", "not started"]


def config_digest(run: PlannedRun) -> str:
    return hashlib.sha256(config_text(run).encode()).hexdigest()


def run_state(run: PlannedRun) -> State:
    """`complete` if it finished with the config it has now, `resume` if it holds a
    checkpoint, else `start`."""
    done = run.directory / DONE
    if done.is_file() and done.read_text().strip() == config_digest(run):
        return "complete"
    return "resume" if (run.directory / LATEST).is_file() else "start"


def say(message: str) -> None:
    """A line above the progress bar (or alone, off a terminal)."""
    tqdm.write(message)
    sys.stdout.flush()


class StopSignal:
    """SIGINT and SIGTERM, noted for the loop to stop the runs (each checkpoints) and exit."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __enter__(self) -> StopSignal:
        self._previous = {
            signum: signal.signal(signum, self._note) for signum in (signal.SIGINT, signal.SIGTERM)
        }
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum


def start(children: Children, sweep: Sweep, run: PlannedRun) -> None:
    """Write the run's config and start its student; a run without a checkpoint starts
    over, so the records of an attempt killed before its first checkpoint are dropped."""
    run.directory.mkdir(parents=True, exist_ok=True)
    config = run.directory / RUN_CONFIG
    config.write_text(config_text(run))
    (run.directory / DONE).unlink(missing_ok=True)
    resuming = (run.directory / LATEST).is_file()
    if not resuming:
        (run.directory / METRICS_FILE).unlink(missing_ok=True)
    threads = sweep.threads(run)
    argv = [sys.executable, "-m", "student_worker", "--config", str(config)]
    argv += ["--output-dir", str(run.directory), "--auto-resume", "--threads", str(threads)]
    children.start(run.name, argv, run.directory / RUN_LOG, threads=threads)
    say(f"{'resumed' if resuming else 'started'} {run.name}")


def exited(children: Children) -> list[tuple[str, int]]:
    """The children that have exited, with their exit codes (forgotten, their logs closed)."""
    ended = []
    for name, child in list(children.running.items()):
        code = child.process.poll()
        if code is not None:
            del children.running[name]
            child.log_file.close()
            ended.append((name, code))
    return ended


def finish(run: PlannedRun, code: int) -> Outcome:
    """Mark a run that exited 0 done; report a failed one with the end of its log."""
    if code == 0:
        (run.directory / DONE).write_text(config_digest(run) + "\n")
        say(f"done    {run.name}")
        return "complete"
    log = run.directory / RUN_LOG
    tail = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
    say(f"FAILED  {run.name} (exit code {code}); the end of {log}:")
    say("\n".join(f"    {line}" for line in tail))
    return "failed"


def run_all(sweep: Sweep, stop: StopSignal) -> dict[str, Outcome]:
    """Run every incomplete run, `parallel` at a time, until all end or a signal comes."""
    outcomes: dict[str, Outcome] = {
        run.name: "complete" for run in sweep.runs if run_state(run) == "complete"
    }
    if outcomes:
        say(f"skipped {len(outcomes)} complete run(s)")
    pending = deque(run for run in sweep.runs if run.name not in outcomes)
    by_name = {run.name: run for run in sweep.runs}
    children = Children()
    bar = tqdm(total=len(sweep.runs), initial=len(outcomes), unit="run", disable=None)
    try:
        while True:
            for name, code in exited(children):
                outcomes[name] = finish(by_name[name], code)
                bar.update()
            if stop.signum is not None or not (pending or children.running):
                break
            while pending and len(children.running) < sweep.parallel:
                start(children, sweep, pending.popleft())
            failed = sum(outcome == "failed" for outcome in outcomes.values())
            bar.set_postfix(running=len(children.running), failed=failed, refresh=False)
            time.sleep(POLL_S)
    finally:
        outcomes.update(dict.fromkeys(children.running, "interrupted"))
        children.stop_all()
        bar.close()
    outcomes.update({run.name: "not started" for run in pending})
    return {run.name: outcomes[run.name] for run in sweep.runs}


def load_results(sweep: Sweep) -> list[report.Run]:
    """Each run's records (none for a run that failed before it logged any)."""
    return [
        report.load_run(run.directory)
        if (run.directory / METRICS_FILE).is_file()
        else report.Run(run.name, [], [])
        for run in sweep.runs
    ]


def swept_cells(sweep: Sweep, run: PlannedRun) -> list[str]:
    """The run's value of each swept key (its resolved config's, for a key it leaves alone)."""
    return [
        format_override(
            run.overrides[key] if key in run.overrides else config_value(run.config, key)
        )
        for key in sweep.swept_keys
    ]


def results_table(sweep: Sweep, runs: list[report.Run]) -> str:
    """`kdserve-student report`'s table with a column for each swept key after the name."""
    header, *rows = report.table_rows(runs)
    cells = [[header[0], *sweep.swept_keys, *header[1:]]]
    for planned, row in zip(sweep.runs, rows, strict=True):
        cells.append([row[0], *swept_cells(sweep, planned), *row[1:]])
    return report.format_table(cells)


def write_csv(
    sweep: Sweep, runs: list[report.Run], outcomes: dict[str, Outcome], out: Path
) -> Path:
    """One row per run: its name, outcome, swept values, last evaluation, images/s, steps."""
    columns = report.table_columns(runs)
    with open(out, "w", newline="") as handle:
        writer = csv.writer(handle)
        keys = [column.key for column in columns]
        writer.writerow(["name", "status", *sweep.swept_keys, *keys, "images_per_s", "steps"])
        for planned, run in zip(sweep.runs, runs, strict=True):
            record = report.last_eval(run)
            writer.writerow(
                [
                    planned.name,
                    outcomes[planned.name],
                    *swept_cells(sweep, planned),
                    *(blank(record.get(key)) for key in keys),
                    blank(report.images_per_second(run)),
                    blank(report.last_step(run)),
                ]
            )
    return out


def blank(value: float | None) -> float | str:
    """A CSV cell: the number, or empty where the run did not log it."""
    return "" if value is None else value


def describe(sweep: Sweep) -> str:
    """The plan: each run's state and what it sets."""
    lines = [
        f"{len(sweep.runs)} run(s) of {sweep.source}, {sweep.parallel} at a time, into "
        f"{sweep.output_dir}:"
    ]
    for run in sweep.runs:
        lines.append(f"  {run_state(run):<9} {run.name}  ({sweep.threads(run)} thread(s))")
    return "\n".join(lines)


def teacher_token(sweep: Sweep) -> str | None:
    """The one token the runs send (a sweep has one teacher); ConfigError if they differ."""
    tokens = {
        run.config.teacher.token.get_secret_value()
        for run in sweep.runs
        if run.config.teacher.token is not None
    }
    if len(tokens) > 1:
        raise ConfigError(f"sweep {sweep.source}: the runs set different teacher.token values")
    return next(iter(tokens), None)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdserve-sweep",
        description="Run a grid (or a list) of student configs against one teacher, N at a "
        "time; run it again to skip the complete runs and resume the others.",
    )
    parser.add_argument("sweep_file", type=Path, metavar="SWEEP.yaml")
    parser.add_argument("--parallel", type=int, help="runs at a time (default: the file's)")
    parser.add_argument(
        "--teacher", help="the teacher endpoint of every run, e.g. grpc://host:50051"
    )
    parser.add_argument("--output-dir", type=Path, help="where the runs go (default: the file's)")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the runs and their state; start nothing"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        sweep = load_sweep(
            args.sweep_file,
            parallel=args.parallel,
            teacher=args.teacher,
            output_dir=args.output_dir,
        )
        token = teacher_token(sweep)
    except ConfigError as exc:
        print(f"kdserve-sweep: {exc}", file=sys.stderr)
        return 2
    print(describe(sweep), flush=True)
    if args.dry_run:
        return 0
    if token is not None:
        os.environ[AUTH_TOKEN_ENV] = token  # the runs' configs leave the token out
    with StopSignal() as stop:
        outcomes = run_all(sweep, stop)
    if stop.signum is not None:
        stopped = [name for name, outcome in outcomes.items() if outcome != "complete"]
        print(
            f"kdserve-sweep: stopped by {signal.Signals(stop.signum).name}; "
            f"{len(stopped)} run(s) left to resume with the same command: {', '.join(stopped)}",
            file=sys.stderr,
        )
        return 128 + stop.signum
    runs = load_results(sweep)
    print(results_table(sweep, runs))
    print(f"wrote {write_csv(sweep, runs, outcomes, sweep.output_dir / RESULTS)}")
    print(f"wrote {report.plot_curves(runs, sweep.output_dir / CURVES)}")
    failed = [run for run in sweep.runs if outcomes[run.name] == "failed"]
    for run in failed:
        print(f"kdserve-sweep: {run.name} failed; see {run.directory / RUN_LOG}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
