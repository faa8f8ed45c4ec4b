"""The cell experiment: equal settings and budget for each cell, the table, the overlaid plot,
resuming a stopped comparison, its errors, and ``charlstm compare`` as a real subprocess."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import assert_png, run_cli, tiny_config

import charlstm
from charlstm import CharLSTMError
from charlstm.checkpoint import read_checkpoint

# Tiny cells, so that three of them train in a few seconds.
pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = {"embed_dim": 16, "hidden_dim": 32, "batch_size": 8, "seq_len": 32}
CLI_SMALL = [
    "--embed-dim", "16", "--hidden-dim", "32", "--batch-size", "8", "--seq-len", "32",
    "--dropout", "0", "--device", "cpu", "--precision", "fp32",
]  # fmt: skip


@pytest.fixture(scope="module")
def comparison(small_corpus: Path, tmp_path_factory) -> charlstm.Comparison:
    out = tmp_path_factory.mktemp("compare") / "cmp"
    config = tiny_config(small_corpus, out, max_steps=20, eval_every=20, **SMALL)
    return charlstm.compare(config, time_budget="90s", progress=False)


def test_each_cell_is_trained_with_the_same_settings_and_budget(comparison):
    out = comparison.out
    assert [row.cell for row in comparison.rows] == ["rnn", "gru", "lstm"]
    settings = []
    for row in comparison.rows:
        assert Path(row.run_dir) == out / row.cell
        saved = read_checkpoint(out / row.cell / "best").config.to_dict()
        assert saved["model"]["cell"] == row.cell
        assert saved["session"]["time_budget"] == "90s"
        saved["model"].pop("cell"), saved["session"].pop("out")
        settings.append(saved)
    assert settings[0] == settings[1] == settings[2]


def test_the_rows_hold_what_each_run_reached(comparison):
    for row in comparison.rows:
        best = read_checkpoint(Path(row.run_dir) / "best")
        model = charlstm.load(row.run_dir, device="cpu")
        assert row.parameters == model.net.num_parameters()
        assert row.steps == 20 and row.characters == 20 * 8 * 32
        assert row.loss == pytest.approx(best.info["val"]["loss"])
        assert row.bpc == pytest.approx(row.loss / math.log(2))
        assert row.perplexity == pytest.approx(math.exp(row.loss))
        assert 0 < row.seconds < 90
    # Same width, so 1, 3 and 4 recurrent weight blocks: rnn < gru < lstm.
    rnn, gru, lstm = (row.parameters for row in comparison.rows)
    assert rnn < gru < lstm


def test_the_table_json_and_overlaid_plot_are_written(comparison):
    out = comparison.out
    table = comparison.table()
    assert (out / "compare.md").read_text(encoding="utf-8") == table + "\n"
    lines = table.splitlines()
    assert lines[0].startswith("| cell | parameters | steps | characters trained |")
    assert len(lines) == 2 + 3
    for line, row in zip(lines[2:], comparison.rows, strict=True):
        assert line.startswith(f"| {row.cell} | {row.parameters:,} | 20 | 5,120 | {row.loss:.4f} |")
    saved = json.loads((out / "compare.json").read_text(encoding="utf-8"))
    assert [r["cell"] for r in saved["rows"]] == ["rnn", "gru", "lstm"]
    assert comparison.plot == out / "compare.png"
    assert_png(comparison.plot)


def test_a_stopped_comparison_resumes_where_it_stopped(comparison, tmp_path):
    # As if it had been stopped while training its last cell: lstm/ never got a checkpoint.
    out = tmp_path / "cmp"
    shutil.copytree(comparison.out, out)
    shutil.rmtree(out / "lstm")
    config = read_checkpoint(out / "rnn" / "best").config
    config = config.with_overrides({"cell": "lstm", "out": str(out), "resume": "auto"})
    again = charlstm.compare(config, time_budget="90s", progress=False)
    for old, new in zip(comparison.rows, again.rows, strict=True):
        assert (new.cell, new.steps) == (old.cell, old.steps)
        # Finished cells are read back; lstm is trained again, to the same (seeded) result.
        assert new.loss == pytest.approx(old.loss, rel=1e-6)
    assert (out / "lstm" / "best").is_dir()


def test_mistakes_are_refused_before_anything_trains(comparison, tmp_path):
    config = read_checkpoint(comparison.out / "rnn" / "best").config
    cases = [
        ({"cells": ()}, "--cells needs at least one of lstm, gru, rnn"),
        ({"cells": ("lstm", "lstm")}, "--cells names a cell twice: lstm lstm"),
        ({"cells": ("transformer",)}, "--cells: unknown cell 'transformer'"),
    ]
    for kwargs, message in cases:
        with pytest.raises(CharLSTMError, match=re.escape(message)):
            charlstm.compare(config.with_overrides({"out": str(tmp_path)}), **kwargs)
    with pytest.raises(CharLSTMError, match=r"/rnn already exists; use --resume auto"):
        charlstm.compare(config.with_overrides({"out": str(comparison.out), "resume": None}))
    resume_one = config.with_overrides({"out": str(tmp_path), "resume": str(comparison.out)})
    with pytest.raises(CharLSTMError, match="a comparison resumes all its cells at once"):
        charlstm.compare(resume_one)
    assert not list(tmp_path.iterdir()), "a refused comparison wrote something"


@pytest.mark.slow
def test_compare_command(small_corpus, isolated_data_dir, tmp_path):
    base = ["compare", "--data", small_corpus, *CLI_SMALL, "--eval-every", "1000"]
    commands = [
        # No --time-budget: compare's own 10 minutes per cell, here cut short by --max-steps.
        [*base, "--out", "steps", "--cells", "rnn", "lstm", "--max-steps", "8"],
        # No --max-steps: the budget alone stops each cell.
        [*base, "--out", "budget", "--cells", "gru", "--time-budget", "10s"],
        [*base, "--out", "twice", "--cells", "gru", "gru"],
    ]
    with ThreadPoolExecutor(max_workers=3) as pool:
        steps, budget, bad = pool.map(
            lambda a: run_cli(a, isolated_data_dir, tmp_path, threads=1), commands
        )

    assert steps.returncode == 0, steps.stderr
    assert "Traceback" not in steps.stderr
    rows = [line for line in steps.stdout.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0] for r in rows] == ["| cell", "| ---", "| rnn", "| lstm"]
    for cell in ("rnn", "lstm"):
        saved = read_checkpoint(tmp_path / "steps" / cell / "best")
        assert saved.config.session.time_budget == "10m" and saved.info["step"] == 8
    assert "wrote " in steps.stderr and (tmp_path / "steps" / "compare.png").is_file()

    assert budget.returncode == 0, budget.stderr
    saved = read_checkpoint(tmp_path / "budget" / "gru" / "best")
    assert saved.config.session.time_budget == "10s" and saved.config.session.max_steps is None
    assert saved.info["step"] > 0 and saved.info["elapsed"] < 20  # 10 s, and slack for a busy CPU

    assert bad.returncode == 2
    assert bad.stderr == "error: --cells names a cell twice: gru gru\n"
    assert not (tmp_path / "twice").exists()


def test_a_cell_that_could_not_train_shows_why_instead_of_a_loss(comparison):
    trained = comparison.rows[0]
    short = dataclasses.replace(trained, cell="gru", loss=None, bpc=None, perplexity=None,
                                note="only 3 steps")  # fmt: skip
    table = charlstm.Comparison(comparison.out, [trained, short]).table()
    last = table.splitlines()[-1]
    assert last.startswith("| gru |") and "no result: only 3 steps" in last
    assert f"{trained.loss:.4f}" in table.splitlines()[-2]
    assert not short.is_result and trained.is_result


def test_a_budget_no_cell_can_train_in_is_refused_and_nothing_is_tabled(small_corpus, tmp_path):
    config = tiny_config(small_corpus, tmp_path / "cmp", max_steps=None, **SMALL)
    with pytest.raises(CharLSTMError, match="no cell trained long enough to compare"):
        charlstm.compare(config, cells=("rnn", "lstm"), time_budget="1s", progress=False)
    assert not (tmp_path / "cmp" / "compare.md").exists()
    assert not (tmp_path / "cmp" / "rnn").exists()  # refused before its directory was made
