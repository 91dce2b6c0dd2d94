"""`kdserve-student report`: loading metrics files, the summary table, the curves PNG, the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from student_worker.report import load_run, main, plot_curves, summary_table

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_metrics(run_dir: Path, records: list[dict[str, Any]]) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def train(step: int, epoch: int, loss: float, images_per_s: float) -> dict[str, Any]:
    return {
        "kind": "train",
        "step": step,
        "epoch": epoch,
        "loss": loss,
        "ce": loss,
        "lr": 0.1,
        "images_per_s": images_per_s,
        "teacher_ms": 3.0,
    }


@pytest.fixture
def kd_run(tmp_path: Path) -> Path:
    """A KD run without a teacher accuracy in its last eval, and a NaN KL in its first."""
    return write_metrics(
        tmp_path / "kd",
        [
            train(1, 1, 2.0, 100.0),
            train(2, 1, 1.5, 200.0),
            {"kind": "eval", "step": 2, "epoch": 1, "student_accuracy": 0.5, "kl": float("nan")},
            train(3, 2, 1.2, 300.0),
            train(4, 2, 1.0, 500.0),
            {
                "kind": "eval",
                "step": 4,
                "epoch": 2,
                "student_accuracy": 0.875,
                "agreement": 0.9,
                "kl": 0.1234,
                "ece": 0.05,
                "nll": 0.4,
            },
        ],
    )


@pytest.fixture
def deit_run(tmp_path: Path) -> Path:
    """A DeiT run that also logs each head and train-set fidelity."""
    return write_metrics(
        tmp_path / "deit",
        [
            {"kind": "config", "note": "records of other kinds are ignored"},
            train(1, 1, 3.0, 50.0),
            {
                "kind": "eval",
                "step": 1,
                "epoch": 1,
                "student_accuracy": 0.25,
                "teacher_accuracy": 0.9,
                "agreement": 0.3,
                "kl": 1.5,
                "ece": 0.2,
                "nll": 2.0,
                "train_agreement": 0.4,
                "train_kl": 1.25,
                "class_head_accuracy": 0.2,
                "distillation_head_accuracy": 0.3,
            },
        ],
    )


def rows(table: str) -> dict[str, list[str]]:
    """The table's data rows by run name (header and rule skipped)."""
    lines = table.splitlines()
    return {line.split()[0]: line.split()[1:] for line in lines[2:]}


def test_load_run_splits_records_by_kind(kd_run: Path, deit_run: Path) -> None:
    run = load_run(kd_run)
    assert run.name == "kd"
    assert [r["step"] for r in run.train_records] == [1, 2, 3, 4]
    assert [r["epoch"] for r in run.eval_records] == [1, 2]
    assert len(load_run(deit_run).train_records) == 1


def test_table_reads_last_eval_and_last_epoch_throughput(kd_run: Path) -> None:
    table = summary_table([load_run(kd_run)])
    header = table.splitlines()[0]
    assert header.split("  ")[0].strip() == "run"
    assert "head acc" not in header and "train KL" not in header
    assert rows(table)["kd"] == ["87.50", "-", "90.00", "0.1234", "0.0500", "0.4000", "500.0", "4"]


def test_table_adds_deit_and_train_columns_when_any_run_has_them(
    kd_run: Path, deit_run: Path
) -> None:
    table = summary_table([load_run(kd_run), load_run(deit_run)])
    header = table.splitlines()[0]
    for title in ("train agreement (%)", "train KL", "class head acc (%)", "distill head acc (%)"):
        assert title in header
    by_run = rows(table)
    assert by_run["kd"][6:10] == ["-", "-", "-", "-"]
    assert by_run["deit"] == [
        "25.00", "90.00", "30.00", "1.5000", "0.2000", "2.0000",
        "40.00", "1.2500", "20.00", "30.00", "50.0", "1",
    ]  # fmt: skip
    widths = {len(line) for line in table.splitlines()[:2]}
    assert len(widths) == 1


def test_table_for_a_run_without_records(tmp_path: Path) -> None:
    empty = write_metrics(tmp_path / "empty", [])
    assert set(rows(summary_table([load_run(empty)]))["empty"]) == {"-"}


def test_plot_curves_writes_a_png(kd_run: Path, deit_run: Path, tmp_path: Path) -> None:
    out = plot_curves([load_run(kd_run), load_run(deit_run)], tmp_path / "plots" / "curves.png")
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 10_000


def test_missing_metrics_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere[/\\]metrics\.jsonl"):
        load_run(tmp_path / "nowhere")


def test_corrupt_line_names_file_and_line(kd_run: Path) -> None:
    with open(kd_run / "metrics.jsonl", "a") as handle:
        handle.write('{"kind": "train", "step": 5,\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 7"):
        load_run(kd_run)


def test_non_object_line_is_rejected(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("\n[1, 2]\n")
    with pytest.raises(ValueError, match="line 2: expected a JSON object"):
        load_run(run_dir)


def test_main_prints_table_and_writes_default_png(
    kd_run: Path, deit_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(kd_run), str(deit_run)]) == 0
    printed = capsys.readouterr().out
    assert "87.50" in printed and "deit" in printed
    assert f"wrote {kd_run / 'curves.png'}" in printed
    assert (kd_run / "curves.png").read_bytes().startswith(PNG_SIGNATURE)


def test_main_honours_out(kd_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "elsewhere.png"
    assert main([str(kd_run), "--out", str(out)]) == 0
    assert out.read_bytes().startswith(PNG_SIGNATURE)
    assert not (kd_run / "curves.png").exists()


def test_main_fails_with_2_on_bad_metrics(
    kd_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(kd_run), str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err and not (kd_run / "curves.png").exists()
    (kd_run / "metrics.jsonl").write_text("not json\n")
    assert main([str(kd_run)]) == 2
    assert "line 1" in capsys.readouterr().err


def test_table_prints_nan_as_logged_not_as_missing(tmp_path: Path) -> None:
    run_dir = tmp_path / "diverged"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(
        '{"kind": "eval", "step": 3, "epoch": 1, "student_accuracy": 0.1, "kl": NaN}\n'
    )
    assert rows(summary_table([load_run(run_dir)]))["diverged"][:4] == ["10.00", "-", "-", "nan"]
