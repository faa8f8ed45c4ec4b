"""Fine-tuning (``--init-from``): a new run that starts from a trained model's weights, shape and
vocabulary, on other text.

The source is the session's tiny LSTM trained on Shakespeare (conftest's ``trained_run``); the
new text is Python's standard library source, which holds characters the plays never use.
"""

from __future__ import annotations

import json
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    CLI_TIMEOUT,
    cli_env,
    read_metrics,
    refused,
    run_cli,
    text_prefix,
    tiny_config,
    without_timing,
)

import charlstm
from charlstm import CharLSTMError
from charlstm.checkpoint import read_checkpoint
from charlstm.finetune import adopt_model
from charlstm.presets import PRESETS, apply_preset
from charlstm.suite import build_suite_corpus

pytestmark = pytest.mark.usefixtures("one_thread")
# Flags of a quick fine-tuning command: no shape flags, the shape is the source's.
FAST_FINE_TUNE = [
    "--max-steps", "2", "--batch-size", "4", "--seq-len", "16", "--eval-every", "2",
    "--device", "cpu", "--precision", "fp32", "--sample-length", "0",
]  # fmt: skip


@pytest.fixture(scope="module")
def python_text(tmp_path_factory) -> Path:
    """60,000 characters of Python's standard library: digits, brackets and symbols that
    Shakespeare's plays never use."""
    source = build_suite_corpus("python", tmp_path_factory.mktemp("suite"))
    return text_prefix(source, tmp_path_factory, 60_000)


def fine_tune(source: Path, data: Path, out: Path, **settings) -> charlstm.RunConfig:
    """tiny_config's run (the shape of trained_run) started from ``source``."""
    return tiny_config(data, out, init_from=str(source), **settings)


def train_quietly(config: charlstm.RunConfig) -> charlstm.TrainResult:
    return charlstm.train(config, progress=False, quiet=True)


def error_of(config: charlstm.RunConfig) -> str:
    with pytest.raises(CharLSTMError) as info:
        train_quietly(config)
    return str(info.value)


# ---- it learns ------------------------------------------------------------------------------


@pytest.mark.slow
def test_fine_tuning_reaches_a_lower_loss_than_the_same_steps_from_scratch(
    trained_run, python_text, tmp_path
):
    steps = {"max_steps": 60, "eval_every": 60}
    tuned = train_quietly(
        fine_tune(trained_run, python_text, tmp_path / "tuned", extend_vocab=True, **steps)
    )
    scratch = train_quietly(tiny_config(python_text, tmp_path / "scratch", **steps))
    # The same validation characters: the last tenth of the same text.
    assert tuned.best_val.characters == scratch.best_val.characters
    assert tuned.best_val.loss < scratch.best_val.loss - 0.1, (tuned.best_val, scratch.best_val)


# ---- the vocabulary -------------------------------------------------------------------------


@pytest.mark.slow
def test_characters_the_model_never_saw_are_one_line_offering_both_ways(
    trained_run, python_text, isolated_data_dir, tmp_path
):
    out = tmp_path / "run"
    result = run_cli(
        ["train", "--init-from", trained_run, "--data", python_text, "--out", out,
         *FAST_FINE_TUNE],
        isolated_data_dir, tmp_path, threads=1,
    )  # fmt: skip
    line = refused(result, f"{python_text} holds ", "characters that the model never saw")
    assert "('\"', '#', " in line  # in code point order, the first twenty of them
    assert ", ...; " in line and " in all): " in line
    assert line.endswith(
        "give --extend-vocab to add them to the model, or --unknown skip to drop them from the text"
    )
    assert not out.exists()


def test_extend_vocab_appends_the_new_characters_and_keeps_the_old_ids(
    trained_run, python_text, tmp_path, capsys
):
    source = charlstm.load(trained_run)
    config = fine_tune(trained_run, python_text, tmp_path / "run", extend_vocab=True,
                       max_steps=2, eval_every=2)  # fmt: skip
    model = charlstm.train(config, progress=False).model
    old = source.vocab.size
    assert model.vocab.codepoints[:old] == source.vocab.codepoints
    added = model.vocab.codepoints[old:]
    text = python_text.read_text(encoding="utf-8")
    assert list(added) == sorted({ord(c) for c in text} - set(source.vocab.codepoints))
    assert "#" in model.vocab.symbols()[old:]
    known = "To be, or not to be"
    assert model.vocab.encode(known).tolist() == source.vocab.encode(known).tolist()
    assert f"{len(added)} characters added to its vocabulary" in capsys.readouterr().err


def test_unknown_skip_drops_the_new_characters_from_the_text(trained_run, python_text, tmp_path):
    source = charlstm.load(trained_run)
    config = fine_tune(trained_run, python_text, tmp_path / "run", unknown="skip",
                       max_steps=2, eval_every=2)  # fmt: skip
    model = train_quietly(config).model
    assert model.vocab == source.vocab
    corpus = model.info["corpus"]
    text = python_text.read_text(encoding="utf-8")
    known = sum(ord(c) in source.vocab.codepoints for c in text)
    assert corpus["train_characters"] + corpus["val_characters"] == known < len(text)
    # eval reads the validation split again, dropping the same characters.
    assert model.evaluate_validation().loss == pytest.approx(model.info["val"]["loss"], rel=1e-6)


def test_a_byte_model_fine_tunes_on_the_bytes_of_the_new_text(small_corpus, tmp_path):
    source = tmp_path / "bytes"
    train_quietly(tiny_config(small_corpus, source, encoding="bytes", max_steps=2, eval_every=2))
    new = tmp_path / "new.txt"
    new.write_text("naïve café — déjà vu\n" * 300, encoding="utf-8")
    model = train_quietly(
        fine_tune(source, new, tmp_path / "run", extend_vocab=True, max_steps=2, eval_every=2)
    ).model
    plays = read_checkpoint(source).vocab
    assert model.vocab.kind == plays.kind == "bytes"
    assert model.config.data.encoding == "bytes"
    assert model.vocab.codepoints[: plays.size] == plays.codepoints
    assert set(model.vocab.codepoints) == set(plays.codepoints) | set(
        "naïve café — déjà vu\n".encode()
    )


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"unknown": "skip"}, "--unknown skip fits a text to the vocabulary of a model"),
        ({"extend_vocab": True}, "--extend-vocab fits a text to the vocabulary of a model"),
    ],
)
def test_vocabulary_settings_without_a_model_to_start_from_are_refused(
    small_corpus, tmp_path, settings, words
):
    config = tiny_config(small_corpus, tmp_path / "run", **settings)
    with pytest.raises(CharLSTMError, match=f"{words} that training starts from: give --init-from"):
        config.validate()


def test_extend_vocab_and_unknown_skip_together_are_refused(trained_run, small_corpus, tmp_path):
    config = fine_tune(trained_run, small_corpus, tmp_path / "run", extend_vocab=True,
                       unknown="skip")  # fmt: skip
    with pytest.raises(CharLSTMError, match=r"--extend-vocab adds .* and --unknown skip removes"):
        config.validate()


# ---- the model's shape ----------------------------------------------------------------------


def test_settings_that_change_the_shape_are_refused_naming_them(
    trained_run, small_corpus, tmp_path
):
    config = fine_tune(trained_run, small_corpus, tmp_path / "run", hidden_dim=128, n_layers=3)
    assert error_of(config) == (
        f"--init-from {trained_run} keeps the shape of its model (lstm 2 x 64, embedding 32, "
        "head reading all layers), and --hidden-dim 128, --n-layers 3 would change it: leave "
        "them out, or train a new model"
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_the_shape_comes_from_the_source_and_dropout_may_change(
    trained_run, python_text, isolated_data_dir, tmp_path
):
    out = tmp_path / "run"
    result = run_cli(
        ["train", "--init-from", trained_run, "--data", python_text, "--out", out,
         "--unknown", "skip", "--dropout", "0.1", *FAST_FINE_TUNE],
        isolated_data_dir, tmp_path, threads=1,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "model: lstm 2x64, embedding 32" in result.stderr
    config = read_checkpoint(out).config
    assert (config.model.hidden_dim, config.model.embed_dim, config.model.dropout) == (64, 32, 0.1)
    shape = run_cli(
        ["train", "--init-from", trained_run, "--data", python_text, "--out", tmp_path / "other",
         "--cell", "gru", *FAST_FINE_TUNE],
        isolated_data_dir, tmp_path, threads=1,
    )  # fmt: skip
    refused(shape, "keeps the shape of its model", "--cell gru would change it")


def test_a_preset_brings_its_learning_settings_and_keeps_the_shape(trained_run, small_corpus):
    one_minute = PRESETS["1m"]
    default = charlstm.ModelConfig()
    fine_tuning = {"data": [str(small_corpus)], "init_from": str(trained_run)}
    for config in (
        charlstm.RunConfig().with_overrides({**fine_tuning, "preset": "1m"}),
        charlstm.RunConfig(train=charlstm.TrainConfig(preset="1m", init_from=str(trained_run))),
        apply_preset(charlstm.RunConfig().with_overrides(fine_tuning), one_minute),
    ):
        assert (config.model.n_layers, config.model.hidden_dim) == (2, default.hidden_dim)
        assert config.model.dropout == one_minute["dropout"]  # a learning setting, not the shape
        assert config.train.seq_len == one_minute["seq_len"]
        assert config.session.eval_every == one_minute["eval_every"]
    # The shape that the model then takes is the source's (trained_run: 2 x 64).
    tuned = adopt_model(config, read_checkpoint(trained_run))
    assert (tuned.model.n_layers, tuned.model.hidden_dim, tuned.model.dropout) == (2, 64, 0.0)
    assert tuned.train.seq_len == one_minute["seq_len"]


# ---- what it starts from --------------------------------------------------------------------


def test_the_checkpoints_record_what_the_run_started_from(trained_run, python_text, tmp_path):
    run = tmp_path / "run"
    train_quietly(fine_tune(trained_run, python_text, run, unknown="skip", max_steps=2,
                            eval_every=2))  # fmt: skip
    source = json.loads((trained_run / "best" / "config.json").read_text(encoding="utf-8"))
    for checkpoint in ("best", "last"):
        tuned = read_checkpoint(run / checkpoint)
        assert tuned.config.train.init_from == str(trained_run)
        assert tuned.info["init_from"] == {
            "path": str((trained_run / "best").absolute()),
            "weights_sha256": source["files"]["model.safetensors"]["sha256"],
            "step": source["step"],
            "corpus": source["corpus"],
            "val": source["val"],
            "vocab_size": len(source["vocab"]["symbols"]),
        }
        assert tuned.info["corpus"]["name"] == python_text.stem  # its own corpus
    assert charlstm.load(run).info["init_from"]["step"] == source["step"]
    # Its own run: a fresh schedule (warm-up from step 1) and its own log.
    assert [r["step"] for r in read_metrics(run, "eval")] == [2]


class _Payload:
    """Unpickling this creates a file: the stand-in for arbitrary code in a pickle."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("missing", "does not exist: give a run directory or a checkpoint directory"),
        ("directory", "is not a charlstm checkpoint or run directory"),
        ("file", "is a file; give the checkpoint directory"),
    ],
)
def test_a_path_that_is_no_checkpoint_is_one_line_naming_it(small_corpus, tmp_path, kind, words):
    path = tmp_path / "source"
    if kind == "directory":
        path.mkdir()
    elif kind == "file":
        path.write_text("{}", encoding="utf-8")
    message = error_of(fine_tune(path, small_corpus, tmp_path / "run"))
    assert message.startswith(f"--init-from: {path} ")
    assert words in message
    assert not (tmp_path / "run").exists()


def test_a_pickle_is_refused_without_running_it(small_corpus, isolated_data_dir, tmp_path):
    canary = tmp_path / "canary"
    model = tmp_path / "ckpt.pt"
    model.write_bytes(pickle.dumps({"model": _Payload(canary)}, protocol=4))
    result = run_cli(
        ["train", "--init-from", model, "--data", small_corpus, "--out", tmp_path / "run",
         *FAST_FINE_TUNE],
        isolated_data_dir, tmp_path, threads=1,
    )  # fmt: skip
    refused(result, f"--init-from: {model} is a pickle", "never unpickles")
    assert not canary.exists()
    assert not (tmp_path / "run").exists()


def test_a_damaged_source_is_one_line(trained_run, small_corpus, tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("config.json", "model.safetensors"):
        (source / name).write_bytes((trained_run / "best" / name).read_bytes())
    weights = source / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    message = error_of(fine_tune(source, small_corpus, tmp_path / "run"))
    assert message.startswith(f"--init-from: {weights} is not a valid safetensors file (")


def test_a_source_inside_the_run_directory_it_would_replace_is_refused(
    trained_run, small_corpus, tmp_path
):
    run = tmp_path / "run"
    train_quietly(tiny_config(small_corpus, run, max_steps=2, eval_every=2))
    config = fine_tune(run, small_corpus, run, overwrite=True)
    assert error_of(config) == (
        f"--init-from {run} lies in {run}, the run directory this run writes: give another --out"
    )
    assert (run / "best" / "model.safetensors").exists()


# ---- resuming -------------------------------------------------------------------------------


def test_resuming_keeps_its_source_and_refuses_another(trained_run, small_corpus, tmp_path):
    run = tmp_path / "run"
    train_quietly(fine_tune(trained_run, small_corpus, run, max_steps=2, eval_every=2))
    # The same configuration with --resume: the shape it was given is the saved one.
    resumed = train_quietly(
        fine_tune(trained_run, small_corpus, run, max_steps=4, eval_every=2, resume=str(run))
    )
    assert resumed.steps == 4
    assert read_checkpoint(run / "last").info["init_from"]["path"].startswith(str(trained_run))
    other = fine_tune(run / "best", small_corpus, run, max_steps=6, resume=str(run))
    assert "cannot resume with different settings: init_from" in error_of(other)
    plain = tmp_path / "plain"
    train_quietly(tiny_config(small_corpus, plain, max_steps=2, eval_every=2))
    added = fine_tune(trained_run, small_corpus, plain, max_steps=4, resume=str(plain))
    assert f"init_from (None -> '{trained_run}')" in error_of(added)


@pytest.mark.slow
def test_a_killed_fine_tuning_run_resumes_exactly_with_the_same_command(
    trained_run, python_text, isolated_data_dir, tmp_path
):
    def command(out: Path) -> list[str]:
        return [
            sys.executable, "-m", "charlstm", "train", "--init-from", str(trained_run),
            "--extend-vocab", "--data", str(python_text), "--out", str(out), "--resume", "auto",
            "--max-steps", "150", "--eval-every", "25", "--log-every", "5", "--dropout", "0.1",
            "--batch-size", "8", "--seq-len", "32", "--device", "cpu", "--precision", "fp32",
            "--sample-length", "0",
        ]  # fmt: skip

    def run(out: Path) -> subprocess.Popen:
        env = {**cli_env(isolated_data_dir), "OMP_NUM_THREADS": "1"}
        return subprocess.Popen(command(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env)  # fmt: skip

    reference, out = tmp_path / "reference", tmp_path / "run"
    whole = run(reference)
    assert whole.wait(CLI_TIMEOUT) == 0, whole.communicate()[1]
    killed = run(out)
    deadline = time.monotonic() + CLI_TIMEOUT
    while not (out / "last" / "config.json").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(random.uniform(0.0, 0.3))  # somewhere after the first checkpoint
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=CLI_TIMEOUT)
    assert killed.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    at = read_checkpoint(out / "last").info["step"]
    again = run(out)  # the very same command
    _, err = again.communicate(timeout=CLI_TIMEOUT)
    assert again.returncode == 0, err
    assert f"resuming {out} at step {at}" in err
    assert without_timing(read_metrics(out)) == without_timing(read_metrics(reference))
    for name in ("best/model.safetensors", "last/model.safetensors", "last/resume.safetensors"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert read_checkpoint(out).info["init_from"] == read_checkpoint(reference).info["init_from"]
