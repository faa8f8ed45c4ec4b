"""MetricsLog: whole JSON lines, unbuffered, and a resume drops what came after its step."""

from __future__ import annotations

import json

import pytest

from charlstm.errors import CharLSTMError
from charlstm.metrics_log import METRICS_FILE, MetricsLog


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]


def test_each_record_is_one_line_in_order(tmp_path):
    with MetricsLog(tmp_path) as log:
        log.write(10, 1.23456, "train", loss=2.5)
        log.write(20, 2.0, "eval", loss=2.25, bpc=3.2)
        assert len(records(tmp_path)) == 2  # on disk before the log is closed
    assert records(tmp_path) == [
        {"step": 10, "elapsed": 1.235, "kind": "train", "loss": 2.5},
        {"step": 20, "elapsed": 2.0, "kind": "eval", "loss": 2.25, "bpc": 3.2},
    ]


def test_a_disabled_log_writes_nothing(tmp_path):
    with MetricsLog(tmp_path, enabled=False) as log:
        log.write(1, 0.0, "train", loss=1.0)
    assert not (tmp_path / METRICS_FILE).exists()


def test_truncate_keeps_records_up_to_the_step_and_drops_damaged_lines(tmp_path):
    lines = [
        json.dumps({"step": 5, "elapsed": 1.0, "kind": "train"}),
        '{"step": 7, "elap',  # cut short by a crash
        json.dumps({"step": 10, "elapsed": 2.0, "kind": "eval"}),
        json.dumps([1, 2]),
        json.dumps({"step": -3}),
        json.dumps({"step": 15, "elapsed": 3.0, "kind": "train"}),
    ]
    (tmp_path / METRICS_FILE).write_text("\n".join(lines) + "\n")
    MetricsLog(tmp_path).truncate(10)
    assert [r["step"] for r in records(tmp_path)] == [5, 10]
    assert not list(tmp_path.glob("*.tmp"))


def test_a_log_that_is_not_a_regular_file_is_refused(tmp_path):
    (tmp_path / METRICS_FILE).mkdir()
    with pytest.raises(CharLSTMError, match="not a regular file"):
        MetricsLog(tmp_path).truncate(3)
