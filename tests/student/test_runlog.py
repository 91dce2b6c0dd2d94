"""The run log: one writer, one reader, truncation on resume, and a line being written skipped."""

from __future__ import annotations

from pathlib import Path

import pytest

from student_worker.runlog import RunLog


def test_records_come_back_in_order_and_by_kind(tmp_path: Path) -> None:
    log = RunLog(tmp_path)
    assert not log.exists()
    records = [
        {"kind": "train", "step": 1, "loss": 2.0},
        {"kind": "eval", "step": 1, "kl": float("nan")},
        {"kind": "train", "step": 2, "loss": 1.0},
    ]
    for record in records:
        log.append(record)
    assert log.exists() and (tmp_path / "metrics.jsonl").is_file()
    back = log.records()
    assert [r["step"] for r in back] == [1, 1, 2] and back[0] == records[0]
    assert [r["loss"] for r in log.records("train")] == [2.0, 1.0]
    assert len(log.records("eval")) == 1


def test_forget_after_drops_later_steps_only(tmp_path: Path) -> None:
    log = RunLog(tmp_path)
    for step in range(1, 7):
        log.append({"kind": "train", "step": step})
    log.append({"kind": "eval", "step": 6})
    log.forget_after(4)
    assert [r["step"] for r in log.records()] == [1, 2, 3, 4]
    log.forget_after(10)
    assert len(log.records()) == 4
    RunLog(tmp_path / "empty").forget_after(3)  # nothing logged yet: nothing to do


def test_a_line_still_being_written_is_not_read(tmp_path: Path) -> None:
    log = RunLog(tmp_path)
    log.append({"kind": "train", "step": 1})
    with open(log.path, "a") as handle:
        handle.write('{"kind": "train", "st')
    assert [r["step"] for r in log.records()] == [1]


def test_bad_lines_name_the_file_and_the_line(tmp_path: Path) -> None:
    log = RunLog(tmp_path)
    log.path.write_text('{"kind": "train", "step": 1}\n{"kind":\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 2: not valid JSON"):
        log.records()
    log.path.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="line 1: expected a JSON object"):
        log.records()
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        RunLog(tmp_path / "nowhere").records()


def test_a_half_written_line_is_dropped_on_resume(tmp_path: Path) -> None:
    log = RunLog(tmp_path)
    log.append({"kind": "train", "step": 1})
    with open(log.path, "a") as handle:
        handle.write('{"kind": "train", "st')
    log.forget_after(1)
    log.append({"kind": "train", "step": 2})
    assert [r["step"] for r in log.records()] == [1, 2]
