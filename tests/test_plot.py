"""Loss curves: reading metrics.jsonl, the PNG of several runs, curves.png written by training,
and ``charlstm plot`` as a real subprocess."""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_png, run_cli, tiny_config

import charlstm
from charlstm import CharLSTMError
from charlstm import session as session_module
from charlstm.plot import CURVES_FILE, METRICS_FILE, plot_runs, read_curves
from charlstm.runlock import LOCK_FILE

pytestmark = pytest.mark.usefixtures("one_thread")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_metrics(run_dir: Path, records: list[dict], tail: str = "") -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(r) + "\n" for r in records)
    (run_dir / METRICS_FILE).write_text(lines + tail, encoding="utf-8")
    return run_dir


def test_read_curves_converts_training_nats_to_bits_and_skips_a_cut_line(tmp_path):
    run = write_metrics(
        tmp_path / "run",
        [
            {"step": 10, "elapsed": 1.5, "kind": "train", "loss": 2.0, "lr": 0.01},
            {"step": 20, "elapsed": 3.0, "kind": "train", "loss": 1.5, "lr": 0.01},
            {"step": 20, "elapsed": 3.5, "kind": "eval", "loss": 1.6, "bpc": 2.31, "perplexity": 5},
        ],
        tail='{"step": 30, "elapsed": 4.0, "kind": "tr',  # a crash cut this line short
    )
    curves = read_curves(run)
    assert curves.label == "run"
    assert curves.train_step.tolist() == [10, 20]
    assert curves.train_seconds.tolist() == [1.5, 3.0]
    np.testing.assert_allclose(curves.train_bpc, [2.0 / math.log(2), 1.5 / math.log(2)])
    assert curves.val_step.tolist() == [20] and curves.val_bpc.tolist() == [2.31]


def test_bad_run_directories_are_one_line_errors(tmp_path):
    with pytest.raises(CharLSTMError, match=r"is not a run directory \(no such directory\)"):
        read_curves(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CharLSTMError, match=r"is not a run directory \(no metrics.jsonl in it\)"):
        read_curves(tmp_path / "empty")
    write_metrics(tmp_path / "new", [], tail="garbage\n")
    with pytest.raises(CharLSTMError, match="holds no training or validation records yet"):
        read_curves(tmp_path / "new")
    with pytest.raises(CharLSTMError, match="2 labels for 1 run directories"):
        plot_runs([tmp_path / "new"], tmp_path / "x.png", labels=["a", "b"])


def test_training_redraws_curves_png_at_each_evaluation(small_corpus, tmp_path, monkeypatch):
    calls = []
    real = session_module.write_curves

    def counting(run_dir):
        calls.append(len((Path(run_dir) / METRICS_FILE).read_text().splitlines()))
        return real(run_dir)

    monkeypatch.setattr(session_module, "write_curves", counting)
    out = tmp_path / "run"
    config = tiny_config(small_corpus, out, max_steps=20, eval_every=10, log_every=5)
    charlstm.train(config, progress=False)
    assert len(calls) == 2  # at steps 10 and 20
    assert calls[0] < calls[1]  # each time from the log as it then was
    assert_png(out / CURVES_FILE)
    leftovers = [p for p in out.glob(".*") if p.name != LOCK_FILE]
    assert not leftovers, "a temporary picture was left behind"


def test_a_failing_plot_warns_once_and_never_costs_training_or_a_checkpoint(
    small_corpus, tmp_path, monkeypatch, capsys
):
    calls = []

    def broken(run_dir):
        calls.append(run_dir)
        raise RuntimeError("no fonts here")

    monkeypatch.setattr(session_module, "write_curves", broken)
    out = tmp_path / "run"
    config = tiny_config(small_corpus, out, max_steps=10, eval_every=5)
    result = charlstm.train(config, progress=False)
    assert result.steps == 10
    assert (out / "best" / "config.json").is_file() and (out / "last" / "config.json").is_file()
    assert len(calls) == 1, "plotting was tried again after it failed"
    err = capsys.readouterr().err
    assert err.count("warning: cannot draw") == 1 and "no fonts here" in err


def test_plot_runs_overlays_several_runs(trained_run, small_corpus, tmp_path):
    other = tmp_path / "gru"
    config = tiny_config(small_corpus, other, cell="gru", max_steps=20, eval_every=20)
    charlstm.train(config, progress=False)
    out = charlstm.plot_runs(
        [trained_run, other], tmp_path / "both.png", labels=["lstm", "gru"], title="two cells"
    )
    assert out == tmp_path / "both.png"
    assert_png(out)
    # The trained run's own curves.png was drawn by training.
    assert_png(trained_run / CURVES_FILE)


def test_plot_command(trained_run, isolated_data_dir, tmp_path):
    commands = [
        ["plot", trained_run, trained_run, "--out", "two.png", "--labels", "a", "b"],
        ["plot", tmp_path / "nowhere"],
    ]
    with ThreadPoolExecutor(max_workers=2) as pool:
        good, bad = pool.map(
            lambda args: run_cli(args, isolated_data_dir, tmp_path, threads=1), commands
        )
    assert good.returncode == 0, good.stderr
    assert good.stderr.strip() == "wrote two.png"
    assert_png(tmp_path / "two.png")
    assert bad.returncode == 2
    nowhere = tmp_path / "nowhere"
    assert bad.stderr == (
        f"error: {nowhere} is not a run directory (no such directory); give one that charlstm "
        "train wrote\n"
    )
