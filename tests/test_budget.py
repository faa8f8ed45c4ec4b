"""The time budget: what evaluation scores, the reserve kept for the end, and refused budgets."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import read_metrics, tiny_config

import charlstm
from charlstm.budget import (
    FINAL_EVAL_SHARE,
    MIN_SLICE,
    MIN_STEPS,
    SCORE_MARGIN,
    BudgetTooSmall,
    check_budget,
    plan_budget,
    score_seconds,
)
from charlstm.suite import build_suite_corpus

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def help_topics(tmp_path_factory) -> Path:
    """180,000 characters of Python's help topics: English prose every Python install has."""
    return build_suite_corpus("small", tmp_path_factory.mktemp("suite"))


def test_the_closing_evaluation_scores_the_whole_split_when_it_fits_its_share():
    plan = plan_budget(budget=60, score_speed=1e6, val_chars=100_000)
    assert plan.final_chars == 100_000 and plan.final_is_whole


def test_the_closing_evaluation_scores_the_largest_prefix_that_fits_its_share():
    plan = plan_budget(budget=60, score_speed=100_000, val_chars=10_000_000)
    assert not plan.final_is_whole
    # The prefix and its priming take the closing evaluation's share of the budget.
    assert plan.score_seconds(plan.final_chars) == pytest.approx(FINAL_EVAL_SHARE * 60, rel=1e-3)


def test_a_periodic_slice_shrinks_with_the_evaluations_to_come_but_not_below_the_minimum():
    plan = plan_budget(budget=600, score_speed=200_000, val_chars=10_000_000)
    few = plan.slice_chars(seconds_left=500, steps_per_second=2, eval_every=1000)
    many = plan.slice_chars(seconds_left=500, steps_per_second=20, eval_every=100)
    assert MIN_SLICE < many < few < plan.final_chars
    assert plan.slice_chars(seconds_left=500, steps_per_second=1e6, eval_every=1) == MIN_SLICE
    small = plan_budget(budget=600, score_speed=200_000, val_chars=5_000)
    assert small.slice_chars(seconds_left=500, steps_per_second=2, eval_every=1000) == 5_000


def test_a_budget_that_trains_fewer_than_the_minimum_steps_is_refused_with_one_that_would_not():
    plan = plan_budget(budget=20, score_speed=1e6, val_chars=50_000)
    speed, per_step, elapsed, save = 4_096.0, 8_192, 3.0, 1.0  # two seconds a step
    with pytest.raises(BudgetTooSmall) as refused:
        check_budget(plan, speed, per_step, elapsed, save)
    message = str(refused.value)
    assert "time budget of 20s trains about 8 steps" in message
    smallest = message.split("give --time-budget ")[1].split(" ")[0]
    assert smallest == "1m50s"  # 3 s + 1 s + 50 steps of 2 s + scoring, rounded up to 10 s
    roomy = plan_budget(budget=120, score_speed=1e6, val_chars=50_000)
    check_budget(roomy, speed, per_step, elapsed, save)  # 50 steps fit: no error


def test_scoring_cost_counts_each_segments_priming():
    assert score_seconds(1_000_000, 1e6) == pytest.approx(SCORE_MARGIN * (1 + 64 * 256 / 1e6))
    assert score_seconds(1_000, 1e6) == pytest.approx(SCORE_MARGIN * (1_000 + 256) / 1e6)


@pytest.mark.slow
def test_periodic_evaluations_score_one_fixed_prefix_and_the_best_model_is_scored_on_more(
    help_topics, tmp_path, capsys
):
    """A budgeted run whose validation text is long: every periodic evaluation scores the same
    slice, and the closing one scores the best model on as much as its share allows."""
    val = tmp_path / "val.txt"
    text = help_topics.read_text(encoding="utf-8")
    val.write_text(text * 12, encoding="utf-8")  # 2.2 M characters, all known symbols
    config = tiny_config(help_topics, tmp_path / "run", max_steps=None, time_budget="8s",
                         eval_every=40, val_data=[str(val)])  # fmt: skip
    result = charlstm.train(config, progress=False)
    records = read_metrics(tmp_path / "run")
    evals = [r for r in records if r["kind"] == "eval"]
    finals = [r for r in records if r["kind"] == "final"]
    assert len(evals) >= 2 and len({r["characters"] for r in evals}) == 1  # the same slice
    slice_chars = evals[0]["characters"]
    assert MIN_SLICE - 1 <= slice_chars < len(text) * 12 - 1
    assert len(finals) == 1 and finals[0]["characters"] > slice_chars
    best = charlstm.load(str(tmp_path / "run" / "best"), device="cpu").info
    assert best["val"]["characters"] == finals[0]["characters"] == result.best_val.characters
    assert best["val_slice"]["characters"] == slice_chars
    assert best["step"] == finals[0]["model_step"]
    closing = capsys.readouterr().err
    # The line names the prefix the best model was scored on, as the log records it.
    scored, total = finals[0]["characters"] + 1, len(text) * 12
    words = f"all {total:,}" if scored >= total else f"the first {scored:,} of {total:,}"
    assert f"over {words} validation characters" in closing
    assert result.elapsed < 8 + 1.5  # the budget held, its evaluations included
    assert not result.warnings


@pytest.mark.slow
def test_a_run_the_budget_stops_after_a_handful_of_steps_is_warned_about(help_topics, tmp_path):
    out = tmp_path / "run"
    charlstm.train(tiny_config(help_topics, out, max_steps=10, eval_every=5), progress=False)
    resumed = tiny_config(help_topics, out, resume=str(out), time_budget="0.01s",
                          max_steps=None, eval_every=5)  # fmt: skip
    result = charlstm.train(resumed, progress=False)  # already past its budget: stops at once
    assert result.steps == 10
    assert result.warnings and result.warnings[0].startswith(
        f"only 10 steps fitted in the 0s budget (fewer than {MIN_STEPS})"
    )


@pytest.mark.slow
def test_a_tiny_budget_is_refused_before_the_run_directory_is_touched(help_topics, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "charlstm", "train", "--data", str(help_topics),
               "--time-budget", "3s", "--out", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: a time budget of 3s trains about ")
    assert "give --time-budget " in last and "Traceback" not in done.stderr
    assert not out.exists()


@pytest.mark.slow
def test_the_default_command_trains_on_more_than_256_distinct_characters(tmp_path):
    """The speed probe draws text of the corpus's own vocabulary size (it once overflowed
    uint8 above 256 symbols)."""
    symbols = [chr(c) for c in range(0x400, 0x400 + 299)] + [" "]  # Cyrillic and beyond
    draw = random.Random(0)
    lines = ["".join(draw.choices(symbols, k=60)) for _ in range(3000)]
    data = tmp_path / "wide.txt"
    data.write_text("\n".join(lines), encoding="utf-8")
    out = tmp_path / "run"
    command = [sys.executable, "-m", "charlstm", "train", "--data", str(data), "--time-budget",
               "12s", "--hidden-dim", "64", "--embed-dim", "16", "--batch-size", "16",
               "--out", str(out), "--sample-length", "20"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert "vocabulary of 301" in done.stderr  # 300 symbols and the newline
    assert charlstm.load(str(out), device="cpu").vocab.size == 301
