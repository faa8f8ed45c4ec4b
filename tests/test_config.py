"""The typed configuration: dict round trips, overrides, TOML files, validation and durations."""

from __future__ import annotations

import dataclasses
import json

import pytest

from charlstm.config import (
    MAX_CONFIG_BYTES,
    SECTION_OF,
    DataConfig,
    DynamicEvalConfig,
    ModelConfig,
    RunConfig,
    SampleConfig,
    SessionConfig,
    TrainConfig,
    load_config_file,
    parse_duration,
)
from charlstm.errors import CharLSTMError

ALL_KEBAB_NAMES = sorted(name.replace("_", "-") for name in SECTION_OF)
VALID_NAMES = ", ".join(ALL_KEBAB_NAMES)


def write_toml(tmp_path, text: str):
    path = tmp_path / "run.toml"
    path.write_text(text, encoding="utf-8")
    return path


def error_of(action) -> str:
    with pytest.raises(CharLSTMError) as excinfo:
        action()
    return str(excinfo.value)


# --- RunConfig as a dict ------------------------------------------------------------------------


def test_to_dict_from_dict_round_trip_through_json():
    """Every non-default value survives to_dict -> JSON -> from_dict."""
    config = RunConfig(
        model=ModelConfig(cell="gru", embed_dim=16, hidden_dim=48, n_layers=3, dropout=0.5),
        data=DataConfig(data=["a.txt", "b/"], val_data=["v.txt"], val_fraction=0.25),
        train=TrainConfig(batch_size=7, seq_len=33, batching="random", lr=0.5, seed=9),
        session=SessionConfig(max_steps=12, max_epochs=1.5, time_budget="2m", out="runs/x",
                              resume="auto", overwrite=True),
    )  # fmt: skip
    restored = RunConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    assert restored.to_dict()["session"]["max_epochs"] == 1.5
    assert restored.data.val_data == ["v.txt"]


def test_to_dict_is_nested_by_section():
    """to_dict has one table per section holding exactly that section's fields."""
    values = RunConfig().to_dict()
    assert set(values) == {"model", "data", "train", "session"}
    assert values["model"]["hidden_dim"] == 256
    assert values["data"]["data"] == ["shakespeare"]
    assert values["session"]["max_steps"] is None


def test_from_dict_missing_sections_take_defaults():
    """A partial dict fills everything it does not name with the defaults."""
    config = RunConfig.from_dict({"model": {"hidden_dim": 8}})
    assert config.model.hidden_dim == 8
    assert config.model.embed_dim == 128
    assert config.train == TrainConfig()


def test_from_dict_rejects_unknown_field():
    assert (
        error_of(lambda: RunConfig.from_dict({"model": {"hidden_dim": 8, "width": 3}}))
        == "unknown setting(s) 'width' in ModelConfig"
    )


def test_from_dict_rejects_section_that_is_not_a_table():
    assert (
        error_of(lambda: RunConfig.from_dict({"train": 5}))
        == "config section 'train' must be a table"
    )


def test_from_dict_rejects_unknown_section():
    """A misspelt section must not silently fall back to the defaults."""
    with pytest.raises(CharLSTMError, match="modle"):
        RunConfig.from_dict({"modle": {"hidden_dim": 8}})


def test_default_lists_are_not_shared():
    """Mutable defaults are per instance."""
    first, second = DataConfig(), DataConfig()
    first.data.append("extra")
    assert second.data == ["shakespeare"]
    assert DataConfig().data == ["shakespeare"]


# --- with_overrides -----------------------------------------------------------------------------


def test_with_overrides_accepts_kebab_and_snake_names():
    """Kebab and snake spellings reach whichever section owns the field."""
    base = RunConfig()
    config = base.with_overrides(
        {"hidden-dim": 32, "n_layers": 1, "val-fraction": 0.2, "batch_size": 4, "max-steps": 9}
    )
    assert config.model.hidden_dim == 32
    assert config.model.n_layers == 1
    assert config.data.val_fraction == 0.2
    assert config.train.batch_size == 4
    assert config.session.max_steps == 9
    assert base == RunConfig(), "the original is left untouched"


def test_with_overrides_coerces_int_to_float():
    config = RunConfig().with_overrides({"lr": 1, "dropout": 0})
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)
    assert config.model.dropout == 0.0 and isinstance(config.model.dropout, float)


def test_with_overrides_rejects_unknown_name_listing_valid_ones():
    message = error_of(lambda: RunConfig().with_overrides({"hiden-dim": 3}))
    assert message == f"unknown setting 'hiden-dim'; valid settings: {VALID_NAMES}"
    assert "hidden-dim" in message and "batch-size" in message and "val-fraction" in message


@pytest.mark.parametrize(
    ("key", "value", "shown"),
    [
        ("hidden_dim", "x", "hidden-dim = 'x'"),
        ("hidden_dim", 2.5, "hidden-dim = 2.5"),
        ("hidden_dim", True, "hidden-dim = True"),
        ("lr", "fast", "lr = 'fast'"),
        ("lr", False, "lr = False"),
        ("overwrite", 1, "overwrite = 1"),
        ("data", [1, 2], "data = [1, 2]"),
        ("data", "a.txt", "data = 'a.txt'"),
        ("max_steps", 1.0, "max-steps = 1.0"),
    ],
)
def test_with_overrides_rejects_wrong_types(key, value, shown):
    """Values of the wrong type are refused, naming the setting and the value."""
    assert (
        error_of(lambda: RunConfig().with_overrides({key: value}))
        == f"setting {shown} has the wrong type"
    )


def test_optional_fields_accept_none():
    config = RunConfig().with_overrides({"max_steps": 5}).with_overrides({"max-steps": None})
    assert config.session.max_steps is None


# --- config files -------------------------------------------------------------------------------


def test_load_config_file_flat_keys(tmp_path):
    """Top-level keys, kebab or snake, become flat snake_case overrides."""
    path = write_toml(
        tmp_path,
        'hidden-dim = 64\nn_layers = 1\ndata = "corpus.txt"\nval-data = ["v1.txt", "v2.txt"]\n'
        'lr = 0.003\ncell = "gru"\nmax-steps = 10\n',
    )
    assert load_config_file(path) == {
        "hidden_dim": 64,
        "n_layers": 1,
        "data": ["corpus.txt"],
        "val_data": ["v1.txt", "v2.txt"],
        "lr": 0.003,
        "cell": "gru",
        "max_steps": 10,
    }


def test_load_config_file_section_tables(tmp_path):
    """[model], [data] and [train] tables are flattened and applied to their sections."""
    path = write_toml(
        tmp_path,
        "[model]\nhidden-dim = 64\ndropout = 0\n\n"
        '[data]\ndata = ["a.txt", "b.txt"]\nval_fraction = 0.05\nencoding = "latin-1"\n\n'
        '[train]\nbatch-size = 8\nseq_len = 16\nbatching = "random"\ntime-budget = "90s"\n',
    )
    overrides = load_config_file(path)
    config = RunConfig().with_overrides(overrides).validate()
    assert config.model.hidden_dim == 64
    assert config.model.dropout == 0.0
    assert config.data.data == ["a.txt", "b.txt"]
    assert config.data.val_fraction == 0.05
    assert config.data.encoding == "latin-1"
    assert config.train.batch_size == 8
    assert config.train.seq_len == 16
    assert config.train.batching == "random"
    assert config.session.budget_seconds() == 90.0


def test_load_config_file_accepts_str_path(tmp_path):
    path = write_toml(tmp_path, "seed = 3\n")
    assert load_config_file(str(path)) == {"seed": 3}


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("hiden-dim = 3\n", "hiden_dim"),
        ("[model]\nwidth = 3\n", "width"),
        ("[scheduler]\nlr = 0.1\n", "scheduler"),
    ],
)
def test_load_config_file_rejects_unknown_keys(tmp_path, text, key):
    path = write_toml(tmp_path, text)
    assert (
        error_of(lambda: load_config_file(path))
        == f"{path}: unknown setting {key!r}; valid settings: {VALID_NAMES}"
    )


def test_load_config_file_wrong_type_is_refused_when_applied(tmp_path):
    """hidden-dim = "x" reads fine but cannot become a RunConfig."""
    path = write_toml(tmp_path, '[model]\nhidden-dim = "x"\n')
    overrides = load_config_file(path)
    assert overrides == {"hidden_dim": "x"}
    assert (
        error_of(lambda: RunConfig().with_overrides(overrides))
        == "setting hidden-dim = 'x' has the wrong type"
    )


def test_load_config_file_invalid_toml(tmp_path):
    path = write_toml(tmp_path, "hidden-dim = = 3\n")
    message = error_of(lambda: load_config_file(path))
    assert message.startswith(f"config file {path} is not valid TOML: ")
    assert "line 1" in message


def test_load_config_file_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    assert error_of(lambda: load_config_file(path)) == f"config file {path} does not exist"


def test_load_config_file_directory_is_a_clear_error(tmp_path):
    """A directory (or unreadable file) is a CharLSTMError, not a raw OSError."""
    with pytest.raises(CharLSTMError, match=str(tmp_path)):
        load_config_file(tmp_path)


def test_load_config_file_that_is_not_utf8_names_the_file_and_the_byte(tmp_path):
    """A file saved in Latin-1 (say) gets one line with the offset, not a UnicodeDecodeError."""
    path = tmp_path / "run.toml"
    path.write_bytes(b"hidden-dim = 64\n# caf\xe9\n")
    assert error_of(lambda: load_config_file(path)) == (
        f"config file {path} is not UTF-8 text: byte 0xe9 at offset 21 does not decode; "
        "save it as UTF-8"
    )


def test_load_config_file_skips_a_byte_order_mark(tmp_path):
    """Editors on Windows start UTF-8 files with a BOM; it is no part of the settings, and an
    offset past it still counts it."""
    path = tmp_path / "run.toml"
    path.write_bytes(b"\xef\xbb\xbfhidden-dim = 64\n")
    assert load_config_file(path) == {"hidden_dim": 64}
    path.write_bytes(b"\xef\xbb\xbfa\xff")
    assert "byte 0xff at offset 4" in error_of(lambda: load_config_file(path))


@pytest.mark.parametrize(
    ("text", "first", "second"),
    [
        ("[model]\nhidden_dim = 32\nhidden-dim = 64\n", "model.hidden_dim", "model.hidden-dim"),
        ("hidden-dim = 32\n[model]\nhidden_dim = 64\n", "hidden-dim", "model.hidden_dim"),
        ("lr = 0.1\n[train]\nlr = 0.2\n", "lr", "train.lr"),
    ],
)
def test_load_config_file_refuses_a_setting_given_twice(tmp_path, text, first, second):
    """Two spellings of one setting: refused naming both, rather than the last silently winning."""
    path = write_toml(tmp_path, text)
    name = first.rsplit(".", 1)[-1].replace("_", "-")
    assert error_of(lambda: load_config_file(path)) == (
        f"config file {path} sets {name} twice, as {first!r} and {second!r}: keep one"
    )


def test_load_config_file_refuses_a_file_far_too_large_to_be_settings(tmp_path):
    """/dev/zero or a corpus given by mistake is read no further than a settings file can be."""
    path = tmp_path / "big.toml"
    path.write_bytes(b"#" * (MAX_CONFIG_BYTES + 1))
    assert "is over 1024 KB: not a settings file" in error_of(lambda: load_config_file(path))


def test_resume_with_overwrite_is_refused_and_each_alone_is_fine():
    for resume in ("runs/a", "auto"):
        config = RunConfig().with_overrides({"resume": resume, "overwrite": True})
        assert "--overwrite replaces one: give one of them" in error_of(config.validate)
        assert RunConfig().with_overrides({"resume": resume}).validate().session.resume == resume
    assert RunConfig().with_overrides({"overwrite": True}).validate().session.overwrite is True


def test_seed_bounds_are_accepted_and_one_past_them_is_refused():
    for seed in (0, 2**63 - 1):
        assert RunConfig().with_overrides({"seed": seed}).validate().train.seed == seed
    SampleConfig(seed=2**63 - 1).validate()
    for seed in (-1, 2**63):
        message = f"--seed must be in [0, 2**63) (a 64-bit seed), got {seed}"
        assert error_of(RunConfig().with_overrides({"seed": seed}).validate) == message
        assert error_of(SampleConfig(seed=seed).validate) == message


@pytest.mark.parametrize(
    "settings",
    [{}, {"cell": "gru", "n_layers": 3, "head_input": "last"}, {"cell": "rnn", "embed_dim": 7}],
)
def test_parameter_count_is_the_networks(settings):
    """The arithmetic that refuses absurd sizes before building agrees with the network."""
    from charlstm.model import CharRNN

    config = ModelConfig(**settings)
    assert config.parameter_count(50) == CharRNN(config, 50).num_parameters()


def test_time_budget_as_toml_number(tmp_path):
    """The help text offers `90` as a budget; written as a TOML number it should work too."""
    path = write_toml(tmp_path, "time-budget = 90\n")
    config = RunConfig().with_overrides(load_config_file(path))
    assert config.session.budget_seconds() == 90.0


# --- validation ---------------------------------------------------------------------------------


def test_defaults_are_valid():
    config = RunConfig()
    assert config.validate() is config
    SampleConfig().validate()


RUN_CONFIG_ERRORS = [
    ({"cell": "transformer"}, "--cell must be one of lstm, gru, rnn, not 'transformer'"),
    ({"embed_dim": 0}, "--embed-dim must be at least 1"),
    ({"hidden_dim": -4}, "--hidden-dim must be at least 1"),
    ({"n_layers": -1}, "--n-layers must be at least 1"),
    ({"dropout": 1.0}, "--dropout must be in [0, 1)"),
    ({"dropout": -0.1}, "--dropout must be in [0, 1)"),
    ({"dropout": float("nan")}, "--dropout must be a finite number, got nan"),
    ({"data": []}, "--data needs at least one file, directory or corpus name"),
    ({"val_fraction": 0.0}, "--val-fraction must be in (0, 1)"),
    ({"val_fraction": 1.0}, "--val-fraction must be in (0, 1)"),
    ({"batch_size": 0}, "--batch-size must be at least 1"),
    ({"batch_size": -2}, "--batch-size must be at least 1"),
    ({"seq_len": 0}, "--seq-len must be at least 1"),
    ({"eval_every": 0}, "--eval-every must be at least 1"),
    ({"log_every": 0}, "--log-every must be at least 1"),
    ({"max_bad_steps": 0}, "--max-bad-steps must be at least 1"),
    ({"lr": 0.0}, "--lr must be greater than 0"),
    ({"lr": -1e-3}, "--lr must be greater than 0"),
    ({"beta1": 1.0}, "--beta1 must be in [0, 1)"),
    ({"beta2": -0.5}, "--beta2 must be in [0, 1)"),
    ({"weight_decay": -0.1}, "--weight-decay must not be negative"),
    ({"warmup_steps": -1}, "--warmup-steps must not be negative"),
    ({"min_lr_ratio": 1.5}, "--min-lr-ratio must be in [0, 1]"),
    ({"grad_clip": -1.0}, "--grad-clip must not be negative (0 turns it off)"),
    ({"ema": 1.0}, "--ema must be in [0, 1) (0 turns it off)"),
    ({"muon_lr": 0.0}, "--muon-lr must be greater than 0"),
    ({"ema": -0.5}, "--ema must be in [0, 1) (0 turns it off)"),
    ({"max_steps": 0}, "--max-steps must be at least 1"),
    ({"max_epochs": 0.0}, "--max-epochs must be above 0"),
    ({"sample_length": -1}, "--sample-length must not be negative"),
    ({"seed": -1}, "--seed must be in [0, 2**63) (a 64-bit seed), got -1"),
    ({"seed": 2**70}, f"--seed must be in [0, 2**63) (a 64-bit seed), got {2**70}"),
    ({"lr": float("inf")}, "--lr must be a finite number, got inf"),
    ({"lr": float("nan")}, "--lr must be a finite number, got nan"),
    ({"muon_lr": float("inf")}, "--muon-lr must be a finite number, got inf"),
    ({"weight_decay": float("inf")}, "--weight-decay must be a finite number, got inf"),
    ({"grad_clip": float("nan")}, "--grad-clip must be a finite number, got nan"),
    ({"beta2": float("nan")}, "--beta2 must be a finite number, got nan"),
    ({"ema": float("nan")}, "--ema must be a finite number, got nan"),
    ({"min_lr_ratio": float("nan")}, "--min-lr-ratio must be a finite number, got nan"),
    ({"max_epochs": float("inf")}, "--max-epochs must be a finite number, got inf"),
    ({"val_fraction": float("nan")}, "--val-fraction must be a finite number, got nan"),
    (
        {"resume": "runs/a", "overwrite": True},
        "--resume runs/a continues a run and --overwrite replaces one: give one of them, not both",
    ),
    (
        {"time_budget": "soon"},
        "--time-budget 'soon' is not a positive duration such as 90, 90s, 5m or 1h",
    ),
]


@pytest.mark.parametrize(("overrides", "message"), RUN_CONFIG_ERRORS)
def test_run_config_validate_errors(overrides, message):
    """Each rule raises CharLSTMError with its exact message."""
    config = RunConfig().with_overrides(overrides)
    assert error_of(config.validate) == message


@pytest.mark.parametrize(
    ("overrides", "flag"),
    [
        (overrides, "--" + next(iter(overrides)).replace("_", "-"))
        for overrides, _ in RUN_CONFIG_ERRORS
    ],
)
def test_run_config_validate_messages_name_the_flag(overrides, flag):
    assert flag in error_of(RunConfig().with_overrides(overrides).validate)


@pytest.mark.parametrize(
    ("field", "flag"),
    [
        ("batching", "--batching"),
        ("schedule", "--schedule"),
        ("precision", "--precision"),
        ("device", "--device"),
        ("head_input", "--head-input"),
    ],
)
def test_choices_are_validated(field, flag):
    """A misspelt choice in a config file must not silently pick another mode."""
    config = RunConfig().with_overrides({field: "bogus"})
    assert flag in error_of(config.validate)


# Each setting: the last value its range accepts, and the nearest one it refuses.
RUN_CONFIG_ENDS = {
    "dropout": (0.0, -1e-9), "n_layers": (1, 0), "batch_size": (1, 0), "seq_len": (1, 0),
    "beta1": (0.0, -1e-9), "weight_decay": (0.0, -1e-9), "warmup_steps": (0, -1),
    "min_lr_ratio": (1.0, 1.0 + 1e-9), "grad_clip": (0.0, -1e-9), "max_steps": (1, 0),
    "sample_length": (0, -1), "val_fraction": (0.999, 1.0),
}  # fmt: skip


def test_validate_boundaries_are_accepted():
    """The inclusive ends of each range pass, and kept as given; a step past each is refused."""
    ends = {key: last for key, (last, _) in RUN_CONFIG_ENDS.items()}
    config = RunConfig().with_overrides(ends).validate()
    flat = {key: value for part in (config.model, config.data, config.train, config.session)
            for key, value in dataclasses.asdict(part).items()}  # fmt: skip
    assert {key: flat[key] for key in ends} == ends
    for key, (_, past) in RUN_CONFIG_ENDS.items():
        flag = "--" + key.replace("_", "-")
        assert error_of(RunConfig().with_overrides({key: past}).validate).startswith(f"{flag} must")
    # With a validation file, --val-fraction is not used, so any value passes.
    config = RunConfig().with_overrides({"val_fraction": 5.0, "val_data": ["v.txt"]}).validate()
    assert (config.data.val_fraction, config.data.val_data) == (5.0, ["v.txt"])


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"length": -1}, "--length must be at least 1, got -1"),
        ({"length": 0}, "--length must be at least 1, got 0"),
        ({"temperature": -0.5}, "--temperature must be 0 (greedy) or positive, got -0.5"),
        ({"temperature": float("inf")}, "--temperature must be a finite number, got inf"),
        ({"temperature": float("nan")}, "--temperature must be a finite number, got nan"),
        ({"top_p": float("nan")}, "--top-p must be a finite number, got nan"),
        ({"seed": -1}, "--seed must be in [0, 2**63) (a 64-bit seed), got -1"),
        ({"seed": 2**63}, f"--seed must be in [0, 2**63) (a 64-bit seed), got {2**63}"),
        ({"top_k": -1}, "--top-k must be 0 (off) or positive, got -1"),
        ({"top_p": 0.0}, "--top-p must be in (0, 1], got 0.0"),
        ({"top_p": 1.01}, "--top-p must be in (0, 1], got 1.01"),
        ({"num_samples": 0}, "--num-samples must be at least 1, got 0"),
        ({"unknown": "ignore"}, "--unknown must be one of error, skip, replace, not 'ignore'"),
    ],
)
def test_sample_config_validate_errors(settings, message):
    assert error_of(SampleConfig(**settings).validate) == message


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"dynamic_lr": -1e-4}, "--dynamic-lr must be 0 or positive, got -0.0001"),
        ({"dynamic_lr": float("nan")}, "--dynamic-lr must be a finite number, got nan"),
        ({"dynamic_lr": float("inf")}, "--dynamic-lr must be a finite number, got inf"),
        (
            {"dynamic_lr": 1e300},
            "--dynamic-lr must be at most 1, got 1e+300: a step moves every weight by about "
            "this much (0.0003 is typical)",
        ),
        ({"dynamic_decay": float("nan")}, "--dynamic-decay must be a finite number, got nan"),
        (
            {"dynamic_segment": 10**8},
            "--dynamic-segment must be at most 10,000, got 100,000,000: each update "
            "backpropagates through the whole segment",
        ),
        ({"dynamic_decay": -0.1}, "--dynamic-decay must be in [0, 1], got -0.1"),
        ({"dynamic_decay": 1.5}, "--dynamic-decay must be in [0, 1], got 1.5"),
        ({"dynamic_segment": 0}, "--dynamic-segment must be at least 1, got 0"),
    ],
)
def test_dynamic_eval_config_validate_errors(settings, message):
    assert error_of(DynamicEvalConfig(**settings).validate) == message


def test_dynamic_eval_config_boundaries_are_accepted():
    """The ends of each range pass; a step past each is refused."""
    DynamicEvalConfig().validate()
    DynamicEvalConfig(dynamic_lr=0.0, dynamic_decay=0.0, dynamic_segment=1).validate()
    DynamicEvalConfig(dynamic_decay=1.0).validate()
    DynamicEvalConfig(dynamic_lr=1.0, dynamic_segment=10_000).validate()
    for past, words in [
        ({"dynamic_lr": -1e-9}, "--dynamic-lr must be 0 or positive"),
        ({"dynamic_lr": 1.0 + 1e-9}, "--dynamic-lr must be at most 1"),
        ({"dynamic_decay": -1e-9}, "--dynamic-decay must be in [0, 1]"),
        ({"dynamic_decay": 1.0 + 1e-9}, "--dynamic-decay must be in [0, 1]"),
        ({"dynamic_segment": 0}, "--dynamic-segment must be at least 1"),
        ({"dynamic_segment": 10_001}, "--dynamic-segment must be at most 10,000"),
    ]:
        assert error_of(DynamicEvalConfig(**past).validate).startswith(words)


def test_sample_config_boundaries_are_accepted():
    """The ends of each range pass; a step past each is refused."""
    SampleConfig(length=1, temperature=0.0, top_k=0, top_p=1.0, num_samples=1).validate()
    SampleConfig(top_p=1e-9, top_k=1, unknown="replace").validate()
    for past, words in [
        ({"length": 0}, "--length must be at least 1"),
        ({"temperature": -1e-9}, "--temperature must be 0 (greedy) or positive"),
        ({"top_k": -1}, "--top-k must be 0 (off) or positive"),
        ({"top_p": 0.0}, "--top-p must be in (0, 1]"),
        ({"top_p": 1.0 + 1e-9}, "--top-p must be in (0, 1]"),
        ({"num_samples": 0}, "--num-samples must be at least 1"),
    ]:
        assert error_of(SampleConfig(**past).validate).startswith(words)


# --- durations and the time budget --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90.0),
        (90, 90.0),
        ("90s", 90.0),
        ("5m", 300.0),
        ("1.5h", 5400.0),
        (" 2 m ", 120.0),
        ("0.5s", 0.5),
    ],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["0", "0m", "-5m", "abc", "5x", "", "5 minutes", "1e3", "m"])
def test_parse_duration_rejects(text):
    assert (
        error_of(lambda: parse_duration(text))
        == f"--time-budget {text!r} is not a positive duration such as 90, 90s, 5m or 1h"
    )


@pytest.mark.parametrize(
    ("settings", "budget"),
    [
        ({}, 300.0),
        ({"max_steps": 100}, None),
        ({"max_epochs": 2.0}, None),
        ({"max_steps": 100, "time_budget": "1m"}, 60.0),
        ({"time_budget": "1.5h"}, 5400.0),
    ],
)
def test_budget_seconds(settings, budget):
    """Five minutes when nothing says when to stop; otherwise only an explicit budget."""
    assert SessionConfig(**settings).budget_seconds() == budget


# --- flag names ---------------------------------------------------------------------------------


def test_flag_names_are_unique_across_sections():
    """SECTION_OF has every field of every section, each mapped to the section that owns it."""
    expected = {
        f.name: section.name
        for section in dataclasses.fields(RunConfig)
        for f in dataclasses.fields(section.default_factory)
    }
    total = sum(
        len(dataclasses.fields(cls))
        for cls in (ModelConfig, DataConfig, TrainConfig, SessionConfig)
    )
    assert len(SECTION_OF) == total
    assert expected == SECTION_OF
    assert SECTION_OF["hidden_dim"] == "model"
    assert SECTION_OF["val_fraction"] == "data"
    assert SECTION_OF["time_budget"] == "session"
    assert SECTION_OF["lr"] == "train"


def test_every_field_has_help():
    for cls in (ModelConfig, DataConfig, TrainConfig, SampleConfig, DynamicEvalConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
