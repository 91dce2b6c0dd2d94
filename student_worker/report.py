"""`kdserve-student report`: a summary table and training curves from runs' `metrics.jsonl`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from student_worker.runlog import Record, RunLog


@dataclass(frozen=True)
class Run:
    """One training run's metrics, split by record kind."""

    name: str
    train_records: list[Record]
    eval_records: list[Record]


@dataclass(frozen=True)
class Column:
    """A numeric table column: its header, the eval key it reads and how to print it."""

    header: str
    key: str
    percent: bool = False
    digits: int = 2


BASE_COLUMNS = (
    Column("student acc (%)", "student_accuracy", percent=True),
    Column("teacher acc (%)", "teacher_accuracy", percent=True),
    Column("agreement (%)", "agreement", percent=True),
    Column("KL", "kl", digits=4),
    Column("ECE", "ece", digits=4),
    Column("NLL", "nll", digits=4),
)
OPTIONAL_COLUMNS = (
    Column("train agreement (%)", "train_agreement", percent=True),
    Column("train KL", "train_kl", digits=4),
    Column("class head acc (%)", "class_head_accuracy", percent=True),
    Column("distill head acc (%)", "distillation_head_accuracy", percent=True),
)
MISSING = "-"


def load_run(run_dir: Path) -> Run:
    """Read a run directory's `metrics.jsonl`; records of other kinds are ignored."""
    records = RunLog(run_dir).records()
    return Run(
        name=run_dir.resolve().name,
        train_records=[r for r in records if r.get("kind") == "train"],
        eval_records=[r for r in records if r.get("kind") == "eval"],
    )


def images_per_second(run: Run) -> float | None:
    """The training throughput of the last epoch that logged any.

    Each train record holds the images/s since its epoch began, so the epoch's last record is
    the epoch's throughput.
    """
    timed = [r for r in run.train_records if "images_per_s" in r]
    if not timed:
        return None
    last_epoch = max(r["epoch"] for r in timed)
    return float([r for r in timed if r["epoch"] == last_epoch][-1]["images_per_s"])


def last_step(run: Run) -> int | None:
    """The last optimiser step the run logged."""
    records = run.train_records or run.eval_records
    return int(records[-1]["step"]) if records else None


def format_value(value: float | None, *, percent: bool = False, digits: int = 2) -> str:
    """A number for the table, `-` where the run did not log it."""
    if value is None:
        return MISSING
    return f"{value * 100 if percent else value:.{digits}f}"


def summary_table(runs: Sequence[Run]) -> str:
    """A fixed-width table, one row per run, from each run's last eval record."""
    return format_table(table_rows(runs))


def table_columns(runs: Sequence[Run]) -> tuple[Column, ...]:
    """The base columns, and each optional one that some run's last evaluation logged."""
    last_evals = [last_eval(run) for run in runs]
    return BASE_COLUMNS + tuple(
        column for column in OPTIONAL_COLUMNS if any(column.key in record for record in last_evals)
    )


def last_eval(run: Run) -> Record:
    """The run's last eval record (empty if it logged none)."""
    return run.eval_records[-1] if run.eval_records else {}


def table_rows(runs: Sequence[Run]) -> list[list[str]]:
    """The table's header and one row of printed cells per run."""
    columns = table_columns(runs)
    rows = [["run", *(column.header for column in columns), "images/s", "steps"]]
    for run in runs:
        record, steps = last_eval(run), last_step(run)
        rows.append(
            [
                run.name,
                *(
                    format_value(record.get(c.key), percent=c.percent, digits=c.digits)
                    for c in columns
                ),
                format_value(images_per_second(run), digits=1),
                MISSING if steps is None else str(steps),
            ]
        )
    return rows


def format_table(rows: Sequence[Sequence[str]]) -> str:
    """Rows of cells (the first one the header) in aligned columns, a rule under the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [format_row(row, widths) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def format_row(cells: Sequence[str], widths: Sequence[int]) -> str:
    """The run name left-aligned, numbers right-aligned, each in its column's width."""
    aligned = [
        cell.ljust(width) if index == 0 else cell.rjust(width)
        for index, (cell, width) in enumerate(zip(cells, widths, strict=True))
    ]
    return "  ".join(aligned).rstrip()


def series(
    records: Sequence[Record], x: str, y: str, scale: float = 1.0
) -> tuple[list[float], list[float]]:
    """The (x, y) points of the records that logged `y`, NaN kept as a gap."""
    points = [(float(r[x]), float(r[y]) * scale) for r in records if r.get(y) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot_curves(runs: Sequence[Run], out: Path) -> Path:
    """Write one PNG of loss, student accuracy, agreement and KL, one line per run."""
    figure = Figure(figsize=(11, 8), layout="constrained")
    loss_axes, accuracy_axes, agreement_axes, kl_axes = figure.subplots(2, 2).flat
    panels = (
        (loss_axes, "train", "step", "loss", 1.0, "training loss"),
        (accuracy_axes, "eval", "step", "student_accuracy", 100.0, "student accuracy (%)"),
        (agreement_axes, "eval", "step", "agreement", 100.0, "agreement (%)"),
        (kl_axes, "eval", "step", "kl", 1.0, "KL(teacher || student)"),
    )
    for axes, kind, x, y, scale, title in panels:
        for index, run in enumerate(runs):
            records = run.train_records if kind == "train" else run.eval_records
            xs, ys = series(records, x, y, scale)
            if xs:
                marker = "" if kind == "train" else "o"
                axes.plot(xs, ys, marker=marker, color=f"C{index % 10}", label=run.name)
        if kind == "train":
            axes.set_yscale("log")  # the losses' scales differ by orders of magnitude
        axes.set_title(title)
        axes.set_xlabel(x)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    return out


def main(argv: list[str]) -> int:
    """Run `kdserve-student report`; `argv` is what follows `report` on the command line."""
    parser = argparse.ArgumentParser(
        prog="kdserve-student report",
        description="Print a summary table of training runs and plot their curves.",
    )
    parser.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    parser.add_argument("--out", type=Path, help="PNG to write (default: FIRST_RUN_DIR/curves.png)")
    args = parser.parse_args(argv)
    try:
        runs = [load_run(run_dir) for run_dir in args.run_dirs]
    except (FileNotFoundError, ValueError) as exc:
        print(f"kdserve-student report: {exc}", file=sys.stderr)
        return 2
    print(summary_table(runs))
    out = plot_curves(runs, args.out or args.run_dirs[0] / "curves.png")
    print(f"wrote {out}")
    return 0
