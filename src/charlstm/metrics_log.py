"""``metrics.jsonl``: the log a run appends one JSON record per line to.

Records are ``{"step", "elapsed", "kind", ...}`` with ``kind`` one of ``train`` (the mean loss
since the previous one, the learning rate, the speed), ``eval`` (a validation score) and
``final`` (the best model scored again on more of the validation text). Each line is one
unbuffered write, so a crash leaves whole lines only; a resumed run first drops the lines
written after its checkpoint (:meth:`MetricsLog.truncate`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, BinaryIO

from charlstm.errors import CharLSTMError

METRICS_FILE = "metrics.jsonl"
_FULL_DISK_HINT = "the last checkpoint is intact; free some space and resume"


class MetricsLog:
    """Appends records to ``RUN_DIR/metrics.jsonl``; does nothing when ``enabled`` is false
    (processes other than rank 0 under torchrun)."""

    def __init__(self, run_dir: Path, *, enabled: bool = True) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled
        self._file: BinaryIO | None = None

    def __enter__(self) -> MetricsLog:
        if self.enabled:
            try:
                # Unbuffered: each line is one write, and a full disk cannot fail again at close.
                self._file = open(self.path, "ab", buffering=0)
            except OSError as e:
                raise CharLSTMError(f"cannot write {self.path}: {e}") from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def write(self, step: int, elapsed: float, kind: str, **values: Any) -> None:
        """Append one record."""
        if self._file is None:
            return
        record = {"step": step, "elapsed": round(elapsed, 3), "kind": kind, **values}
        try:
            self._file.write((json.dumps(record) + "\n").encode())
        except OSError as e:
            raise CharLSTMError(
                f"cannot write {self.path}: {e.strerror or e} ({_FULL_DISK_HINT})"
            ) from None

    def truncate(self, step: int) -> None:
        """Drop the records after ``step`` (a resumed run's checkpoint), so the log has no
        repeats; lines that are not a record (cut short by a crash, or damaged) go too."""
        if not self.enabled or not self.path.exists():
            return
        if not self.path.is_file():  # a device such as /dev/zero would be read without end
            raise CharLSTMError(f"{self.path} is not a regular file; move it away and resume")
        kept = []
        with open(self.path, encoding="utf-8", errors="replace") as lines:
            for line in lines:
                record = _record(line)
                if record is not None and record["step"] <= step:
                    kept.append(line.rstrip("\n") + "\n")
        tmp = self.path.with_suffix(".tmp")
        try:
            tmp.write_text("".join(kept), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise CharLSTMError(
                f"cannot write {self.path}: {e.strerror or e} ({_FULL_DISK_HINT})"
            ) from None


def _record(line: str) -> dict[str, Any] | None:
    """The record on ``line``, or None if it is not one."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(record, dict) or not is_count(record.get("step")):
        return None
    return record


def is_count(value: Any) -> bool:
    """Whether ``value`` is a non-negative int (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
