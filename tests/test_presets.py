"""Presets: their settings, applied in Python as on the command line, and how one is picked
for a machine's speed and a corpus's size."""

from __future__ import annotations

import dataclasses

import pytest

from charlstm.budget import PERIODIC_EVAL_SHARE
from charlstm.config import RunConfig, TrainConfig, parse_duration
from charlstm.errors import CharLSTMError
from charlstm.presets import (
    MANY_EPOCHS_DROPOUT,
    MIN_STEPS_PER_PASS,
    PRESET_MACHINE_SPEED,
    PRESETS,
    SEVERAL_EPOCHS,
    SEVERAL_EPOCHS_EVALUATIONS,
    apply_preset,
    choose_preset,
    picks_preset,
    preset_for,
)


def error_of(call) -> str:
    with pytest.raises(CharLSTMError) as caught:
        call()
    return str(caught.value)


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_applies_its_settings_and_flags_win(name):
    config = RunConfig().with_overrides({"preset": name})
    flat = {key: value for part in (config.model, config.data, config.train, config.session)
            for key, value in dataclasses.asdict(part).items()}  # fmt: skip
    assert flat["preset"] == name
    assert {key: flat[key] for key in PRESETS[name]} == PRESETS[name]
    assert config.session.budget_seconds() == parse_duration(name)
    mine = RunConfig().with_overrides({"preset": name, "time-budget": "7s", "seed": 5})
    assert (mine.session.time_budget, mine.train.seed) == ("7s", 5)


def test_the_defaults_are_the_5m_preset():
    assert RunConfig().with_overrides({"preset": "5m"}).with_overrides({"preset": None}) == (
        RunConfig().with_overrides({"time_budget": "5m"})
    )


def test_unknown_preset_is_refused():
    config = RunConfig().with_overrides({"preset": "2h"})
    assert error_of(config.validate) == "--preset must be one of 1m, 5m, 20m, auto, not '2h'"


@pytest.mark.parametrize(
    ("budget", "speed_ratio", "expected"),
    [
        ("1m", 1.0, "1m"), ("5m", 1.0, "5m"), ("20m", 1.0, "20m"),  # the presets' own machine
        ("5m", 1 / 8, "1m"),  # 5 minutes 8x slower train what 38 s train there
        ("20m", 1 / 8, "5m"),  # 150 s there: nearer 5m than 1m on a log scale
        ("20m", 1 / 30, "1m"),
        ("1m", 12.0, "20m"),  # 12 minutes' worth there
        ("2h", 1.0, "20m"),  # beyond the longest preset, the longest
        ("10s", 1.0, "1m"),
    ],
)  # fmt: skip
def test_preset_for_picks_the_preset_tuned_for_the_same_training(budget, speed_ratio, expected):
    speed = PRESET_MACHINE_SPEED * speed_ratio
    assert preset_for(parse_duration(budget), speed) == expected


@pytest.mark.parametrize(
    ("budget", "train_chars", "preset", "dropout", "words"),
    [
        ("5m", 1_000_000, "5m", None, "best/ keeps the best weights"),  # 24 passes
        ("5m", 100_000_000, "5m", None, "its own regularisation"),  # a quarter of a pass
        ("5m", 200_000, "5m", MANY_EPOCHS_DROPOUT, "small text read many times"),  # 120
        ("1m", 100_000, "1m", MANY_EPOCHS_DROPOUT, "small text read many times"),  # 48
        ("1m", 1_000_000, "1m", None, "its own regularisation"),  # 4.8 passes: as tuned
        ("1m", 500_000, "1m", None, "best/ keeps the best weights"),  # 9.6 passes
        ("1m", 100_000_000, "1m", None, "its own regularisation"),  # no dropout to drop
        ("20m", 3_000_000, "20m", MANY_EPOCHS_DROPOUT, "small text read many times"),  # 32
        ("20m", 50_000_000, "20m", None, "its own regularisation"),  # 1.9 passes
    ],
)  # fmt: skip
def test_choose_preset_fits_regularisation_to_how_often_the_budget_reads_the_text(
    budget, train_chars, preset, dropout, words
):
    seconds = parse_duration(budget)
    choice = choose_preset(seconds, PRESET_MACHINE_SPEED, train_chars)
    assert choice.name == preset and choice.settings["preset"] == preset
    own = PRESETS[preset].get("dropout")  # the preset's own, unless fitted
    assert choice.settings.get("dropout") == (own if dropout is None else dropout)
    unfitted = ("eval_every", "dropout")  # the settings choose_preset may fit
    kept = {k: v for k, v in PRESETS[preset].items() if k not in (*unfitted, "time_budget")}
    assert {k: choice.settings[k] for k in kept} == kept
    assert "time_budget" not in choice.settings  # the run's own budget chose the preset
    assert words in choice.reason
    epochs = seconds * PRESET_MACHINE_SPEED / train_chars
    assert f"about {epochs:.3g} times" in choice.reason
    config = RunConfig().with_overrides(choice.settings).validate()
    steps = seconds * PRESET_MACHINE_SPEED / (config.train.batch_size * config.train.seq_len)
    as_preset = RunConfig().with_overrides({"preset": preset}).session.eval_every
    # Ten evaluations in the run, so best/ keeps the best; fewer where their saves would take
    # more than their share of the budget (three in a minute).
    evaluations = min(SEVERAL_EPOCHS_EVALUATIONS, int(seconds * PERIODIC_EVAL_SHARE))
    if epochs > SEVERAL_EPOCHS:
        often = round(steps / evaluations)
        assert config.session.eval_every == min(often, as_preset)
        if often < as_preset:
            assert f"an evaluation every {often} steps" in choice.reason
    else:
        assert config.session.eval_every == as_preset


def test_choose_preset_fits_evaluations_to_the_runs_batch_and_keeps_its_own_eval_every():
    # 20 times over 1,000 characters in 5 minutes: evaluations keep the best weights.
    seconds, speed, train_chars = 300.0, 1000.0 / 15, 1_000
    small = RunConfig().with_overrides({"batch_size": 2, "seq_len": 50})
    choice = choose_preset(seconds, speed, train_chars, small)
    steps = seconds * speed / (2 * 50)  # 200 steps of this run's batches, not the default's
    assert choice.settings["eval_every"] == round(steps / SEVERAL_EPOCHS_EVALUATIONS) == 20
    assert "an evaluation every 20 steps" in choice.reason
    # An eval_every the run was given is its own: nothing is fitted over it.
    given = small.with_overrides({"eval_every": 7})
    choice = choose_preset(seconds, speed, train_chars, given)
    assert choice.settings.get("eval_every") == PRESETS[choice.name].get("eval_every")
    assert "evaluation every" not in choice.reason
    assert apply_preset(given, choice.settings).session.eval_every == 7
    # A budget too short for two evaluations with their saves in their share keeps the closing
    # one alone, however often it reads the text.
    short = 1 / PERIODIC_EVAL_SHARE * 1.9
    choice = choose_preset(short, speed * seconds / short, train_chars, small)
    assert choice.settings.get("eval_every") == PRESETS[choice.name].get("eval_every")
    assert "evaluation every" not in choice.reason


@pytest.mark.parametrize(
    ("train_chars", "given", "batch"),
    [(2_205, {}, (4, 64)),  # four streams of eight windows each
     (300, {}, (1, 37)),  # one stream, and shorter windows
     (2_205, {"batch_size": 16}, (16, 64)),  # the run's own batch is kept
     (4_000_000, {}, (64, 64))],  # a large text: the preset's own
)  # fmt: skip
def test_choose_preset_gives_a_small_text_fewer_streams(train_chars, given, batch):
    config = RunConfig().with_overrides(given)
    choice = choose_preset(60.0, PRESET_MACHINE_SPEED / 10, train_chars, config)
    train = apply_preset(config, choice.settings).validate().train
    assert choice.name == "1m" and (train.batch_size, train.seq_len) == batch
    fitted = batch != (64, 64) and "batch_size" not in given
    assert (f"batches of {batch[0]} x {batch[1]}" in choice.reason) == fitted
    if fitted:  # a pass over the text is at least eight steps
        assert train.batch_size * train.seq_len * MIN_STEPS_PER_PASS <= train_chars


def test_choose_preset_counts_steps_at_the_speed_of_the_settings_picked():
    # Ten evaluations in 5 minutes of a small text read many times, in steps of 2 x 50.
    config = RunConfig().with_overrides({"batch_size": 2, "seq_len": 50})
    slower = choose_preset(300.0, 1000.0, 1_000, config, picked_speed=100.0)
    assert slower.settings["eval_every"] == round(300 * 100.0 / 100 / 10) == 30


def test_preset_for_refuses_a_speed_or_budget_that_is_not_positive():
    for budget, speed in ((300.0, 0.0), (0.0, 1000.0), (300.0, -5.0)):
        with pytest.raises(ValueError, match="must be positive"):
            preset_for(budget, speed)


@pytest.mark.parametrize(
    ("overrides", "picks"),
    [
        ({}, True),
        ({"time-budget": "20m", "data": ["a.txt"], "eval_every": 50, "cell": "gru"}, True),
        ({"batch_size": 32, "optimizer": "adamw", "out": "runs/x"}, True),
        ({"preset": "5m"}, False),
        ({"max-steps": 100}, False),
        ({"max_epochs": 2}, False),
        ({"hidden-dim": 512}, False),
        ({"n_layers": 3}, False),
        ({"dropout": 0.1}, False),
        ({"lr": 0.01, "time_budget": "1m"}, False),
    ],
)
def test_picks_preset_only_when_the_run_leaves_the_learning_settings_open(overrides, picks):
    assert picks_preset(overrides) is picks


def test_a_preset_named_in_python_brings_its_settings():
    config = RunConfig(train=TrainConfig(preset="20m"))
    assert config.model.hidden_dim == PRESETS["20m"]["hidden_dim"]
    assert (config.train.lr, config.model.dropout) == (
        PRESETS["20m"]["lr"],
        PRESETS["20m"]["dropout"],
    )
    assert config.session.time_budget == "20m"
    assert config == RunConfig().with_overrides({"preset": "20m"})


def test_settings_given_in_python_win_over_the_preset():
    config = RunConfig(train=TrainConfig(preset="20m", lr=1e-3))
    assert config.train.lr == 1e-3 and config.model.hidden_dim == PRESETS["20m"]["hidden_dim"]


def test_a_flag_given_at_its_default_value_still_wins_over_the_preset():
    config = RunConfig().with_overrides({"preset": "20m", "dropout": 0.2})
    assert config.model.dropout == 0.2
    assert RunConfig.from_dict(config.to_dict()) == config  # a checkpoint's config reads back as is


def test_apply_preset_fills_only_what_was_left_at_its_default():
    config = RunConfig().with_overrides({"hidden_dim": 100})
    applied = apply_preset(config, {"hidden_dim": 384, "n_layers": 1, "seq_len": 64})
    assert (applied.model.hidden_dim, applied.model.n_layers, applied.train.seq_len) == (100, 1, 64)
    assert config.model.n_layers == 2  # the original is unchanged
