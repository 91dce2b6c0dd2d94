"""A run's log, `metrics.jsonl`: one JSON object per line, a training step or an evaluation.

The one writer (`append`), reader (`records`) and truncation (`forget_after`) of the file, so
the trainer, `kdserve-student report` and the demo read and write it alike. Every record has
`kind` ("train" or "eval") and `step`; a line still being written is not read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"

Record = dict[str, Any]


class RunLog:
    """The metrics file of one run directory."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / METRICS_FILE

    def exists(self) -> bool:
        return self.path.is_file()

    def append(self, record: Record) -> None:
        """Add one record as one line (one write, so a reader sees it whole or not at all)."""
        line = json.dumps(record) + "\n"
        with open(self.path, "a") as handle:
            handle.write(line)

    def records(self, kind: str | None = None) -> list[Record]:
        """Every complete record in order (of one `kind` if given); the file must exist.

        Raises ValueError naming the file and the line of a line that is not a JSON object.
        """
        if not self.path.is_file():
            raise FileNotFoundError(f"no metrics file: {self.path}")
        return self._parse(self.path.read_bytes(), kind)

    def forget_after(self, step: int) -> None:
        """Drop the records of steps after `step` (a killed run's, trained again on resume),
        and a line a killed run left half-written, so the next record starts a line of its own."""
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        records = self._parse(data)
        kept = [record for record in records if record["step"] <= step]
        torn = bool(data) and not data.endswith(b"\n")
        if len(kept) < len(records) or torn:
            tmp = self.path.with_name(f".{METRICS_FILE}.tmp")
            tmp.write_text("".join(json.dumps(record) + "\n" for record in kept))
            tmp.replace(self.path)

    def _parse(self, data: bytes, kind: str | None = None) -> list[Record]:
        lines = data.split(b"\n")[:-1]  # the part after the last newline is still being written
        records = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{self.path}, line {number}: not valid JSON ({exc})") from exc
            if not isinstance(record, dict):
                raise ValueError(
                    f"{self.path}, line {number}: expected a JSON object, got {record!r}"
                )
            if kind is None or record.get("kind") == kind:
                records.append(record)
        return records
