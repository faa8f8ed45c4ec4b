"""The ``charlstm`` command, run as a real subprocess: train, sample, eval, and its errors.

Each subprocess that trains or loads a model pays 1.5-3 s to import torch, so independent
commands are started side by side (``run_many``) where a test needs several.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import CLI_TIMEOUT, FAST_TRAIN, cli_env, run_cli

import charlstm


def run_many(
    commands: Sequence[Sequence[object]], data_dir: Path, cwd: Path
) -> list[subprocess.CompletedProcess]:
    """Independent commands run concurrently, results in order, each on one thread: side by
    side, more would fight over the cores."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return list(pool.map(lambda args: run_cli(args, data_dir, cwd, threads=1), commands))


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result


# ---- version, train -------------------------------------------------------------------------


def test_version(isolated_data_dir, tmp_path):
    script = Path(sys.executable).with_name("charlstm")  # the installed console script
    if not script.exists():
        pytest.skip("console script not installed next to the interpreter")
    result = subprocess.run(
        [str(script), "--version"], capture_output=True, text=True, timeout=CLI_TIMEOUT
    )
    assert result.returncode == 0
    assert result.stdout == f"charlstm {charlstm.__version__}\n"


@pytest.mark.parametrize(
    ("args", "input"),
    [(["sample", "{run}", "--length", "40", "--seed", "3", "--prompt-file", "-"], "To be\n"),
     (["sample", "{run}", "--top-p", "2"], None),
     (["eval", "{run}", "--data", "-"], "héllo"),
     (["eval", "{run}", "--data", "-", "--unknown", "skip"], "héllo wörld\r\n" * 20),
     (["plot", "{run}", "--out", "{tmp}/curves.png"], None)],
    ids=["sample-from-stdin", "refused", "unknown-characters", "eval-from-stdin", "plot"],
)  # fmt: skip
def test_run_cli_gives_what_a_fresh_interpreter_gives(
    args, input, trained_run, isolated_data_dir, tmp_path
):
    # run_cli forks commands from a server that imported torch already (cli_forkserver.py):
    # what they print, in which encoding and newlines, and their exit status are a fresh
    # `python -m charlstm`'s.
    args = [arg.format(run=trained_run, tmp=tmp_path) for arg in args]
    forked = run_cli(args, isolated_data_dir, tmp_path, input=input)
    fresh = subprocess.run(
        [sys.executable, "-m", "charlstm", *args], input=input,
        stdin=subprocess.DEVNULL if input is None else None, capture_output=True, text=True,
        encoding="utf-8", env=cli_env(isolated_data_dir), cwd=tmp_path, timeout=CLI_TIMEOUT,
    )  # fmt: skip

    def output(result: subprocess.CompletedProcess) -> tuple[int, str, str]:
        speeds = re.sub(r"[\d.]+char/s", "<speed>", result.stderr)  # eval's progress
        return result.returncode, result.stdout, speeds

    assert output(forked) == output(fresh)


# Each argv, then whether torch had loaded when it returned, one line per command on stderr.
WITHOUT_TORCH = """
import sys
from charlstm.cli import main

for argv in sys.argv[1:]:
    try:
        code = main(argv.split())
    except SystemExit as e:
        code = e.code
    print(f"{argv}: exit {code}, torch loaded: {'torch' in sys.modules}", file=sys.stderr)
"""


def test_help_usage_mistakes_and_rejected_settings_answer_before_torch_loads(tmp_path):
    commands = ["--help", "train --help", "train --bogus", "train --lr 0", "sample x --top-p 2"]
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, *commands],
        capture_output=True, text=True, timeout=CLI_TIMEOUT, cwd=tmp_path,
    )  # fmt: skip
    lines = [line for line in result.stderr.splitlines() if not line.startswith("error:")]
    codes = [0, 0, 2, 2, 2]
    assert lines == [
        f"{c}: exit {code}, torch loaded: False" for c, code in zip(commands, codes, strict=True)
    ]
    # The next command that needs a model does load it (the same process, to show the test
    # sees torch when it is there).
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, f"sample {tmp_path}"],
        capture_output=True, text=True, timeout=CLI_TIMEOUT, cwd=tmp_path,
    )  # fmt: skip
    assert result.stderr.splitlines()[-1] == f"sample {tmp_path}: exit 2, torch loaded: True"


@pytest.mark.slow
def test_train_reports_progress_and_prints_a_sample(shakespeare_200k, isolated_data_dir, tmp_path):
    out = tmp_path / "run"
    result = ok(
        run_cli(
            ["train", "--data", shakespeare_200k, "--out", out, "--max-steps", "30",
             "--eval-every", "15", "--embed-dim", "32", "--hidden-dim", "64", "--batch-size",
             "16", "--seq-len", "64", "--dropout", "0", "--device", "cpu", "--precision", "fp32",
             "--sample-length", "40"],
            isolated_data_dir,
            tmp_path,
        )
    )  # fmt: skip
    parameters = charlstm.load(str(out), device="cpu").net.num_parameters()
    assert f"{parameters:,} parameters" in result.stderr
    for step in (15, 30):
        assert re.search(
            rf"^step {step}: validation loss \d+\.\d{{4}} nats/char", result.stderr, re.M
        )
    assert f"sample from {out / 'best'}:" in result.stderr
    # stdout is the sample alone: 40 characters and a newline.
    assert len(result.stdout) == 41 and result.stdout.endswith("\n")
    assert {"best", "last", "metrics.jsonl"} <= {p.name for p in out.iterdir()}
    # stderr is not a terminal: status lines, not a bar's carriage-return frames; the last one
    # after the closing evaluation, with the best validation loss in bits per character.
    assert "\r" not in result.stderr
    assert re.search(r"^step 30/30 \| 100% \| train \d\.\d{3} bpc \| [\d,]+ chars/s \| "
                     r"val \d\.\d{3} bpc \| \d+s in all$", result.stderr, re.M)  # fmt: skip


@pytest.mark.slow
def test_train_quiet_prints_only_the_closing_line_and_the_sample(
    small_corpus, isolated_data_dir, tmp_path
):
    out = tmp_path / "run"
    args = ["train", "--data", small_corpus, "--out", out, *FAST_TRAIN, "--sample-length", "20"]
    result = ok(run_cli([*args, "--quiet"], isolated_data_dir, tmp_path))
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("done: 2 steps in "), result.stderr
    assert len(result.stdout) == 21


@pytest.mark.slow
def test_train_without_a_preset_picks_the_one_for_its_budget_at_this_speed(
    shakespeare_200k, isolated_data_dir, tmp_path
):
    # Twelve seconds are worth under 2 minutes on the presets' machine unless this one is 10
    # times faster: the 1m preset, with the budget, evaluation and precision flags given kept (and
    # batches small enough that the two runs side by side train more than the fewest steps a
    # budget must, on a loaded machine too).
    common = ["train", "--data", shakespeare_200k, "--device", "cpu", "--precision", "fp32",
              "--sample-length", "0", "--batch-size", "2"]  # fmt: skip
    picked, chosen = run_many(
        [[*common, "--time-budget", "12s", "--out", tmp_path / "picked", "--eval-every", "7"],
         [*common, "--time-budget", "5s", "--out", tmp_path / "chosen", "--hidden-dim", "48",
          "--embed-dim", "16"]],
        isolated_data_dir,
        tmp_path,
    )  # fmt: skip
    line = re.search(
        r"^preset (\S+): this machine trains the 5m settings at ([\d,]+) chars/s "
        r"\((\d+\.\d\d)x the machine the presets were tuned on\), so the budget reads the "
        r"[\d,]+ training characters about [\d.e+]+ times; ",
        ok(picked).stderr,
        re.M,
    )
    assert line and line[1] == "1m" and int(line[2].replace(",", "")) > 0
    saved = json.loads((tmp_path / "picked" / "last" / "config.json").read_text("utf-8"))
    model, train_ = saved["config"]["model"], saved["config"]["train"]
    session = saved["config"]["session"]
    assert (model["n_layers"], model["hidden_dim"], model["dropout"]) == (1, 384, 0.0)
    assert (train_["preset"], train_["seq_len"], session["time_budget"]) == ("1m", 64, "12s")
    assert (session["eval_every"], train_["precision"]) == (7, "fp32")
    assert "model: lstm 1x384" in picked.stderr
    # A run that sets its own learning settings keeps the defaults around them, unmeasured.
    assert not re.search(r"^preset ", ok(chosen).stderr, re.M)
    saved = json.loads((tmp_path / "chosen" / "last" / "config.json").read_text("utf-8"))
    assert saved["config"]["train"]["preset"] is None
    assert (saved["config"]["model"]["n_layers"], saved["config"]["model"]["hidden_dim"]) == (2, 48)


@pytest.mark.slow
def test_the_default_command_keeps_its_5_minute_budget_whatever_preset_it_picks(
    shakespeare_200k, isolated_data_dir, tmp_path
):
    command = [sys.executable, "-m", "charlstm", "train", "--data", str(shakespeare_200k),
               "--out", str(tmp_path / "run")]  # fmt: skip
    with subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                          env=cli_env(isolated_data_dir), cwd=tmp_path) as process:  # fmt: skip
        banner = [process.stderr.readline()]
        while banner[-1] and not banner[-1].startswith(("training on", "error")):
            banner.append(process.stderr.readline())  # "" once the process has ended
        process.kill()
    assert any(line.startswith("preset ") for line in banner), banner
    assert banner[-1].endswith("stopping at 5m00s\n"), banner


@pytest.mark.slow
def test_train_on_a_text_without_newlines_still_prints_its_sample(
    shakespeare_200k, isolated_data_dir, tmp_path
):
    # The end-of-training sample starts from "\n"; a one-line text has no such character.
    corpus = tmp_path / "one-line.txt"
    text = shakespeare_200k.read_text(encoding="utf-8")[:20_000].replace("\n", " ")
    corpus.write_text(text, encoding="utf-8")
    result = ok(
        run_cli(
            ["train", "--data", corpus, "--out", tmp_path / "run", *FAST_TRAIN,
             "--sample-length", "20"],
            isolated_data_dir,
            tmp_path,
        )
    )  # fmt: skip
    assert len(result.stdout) == 21 and result.stdout.endswith("\n")
    assert "\n" not in result.stdout[:-1]  # only characters the model knows


@pytest.mark.slow
def test_config_file_sets_values_flags_override_and_resume_keeps_them(
    shakespeare_200k, isolated_data_dir, tmp_path
):
    config = tmp_path / "run.toml"
    config.write_text(
        "sample-length = 0\n"
        '[model]\nhidden-dim = 48\nembed_dim = 16\nhead-input = "last"\ndropout = 0.25\n'
        "[train]\nmax_steps = 1000\nbatch_size = 8\nseq_len = 32\nlr = 0.005\n"
        'device = "cpu"\nprecision = "fp32"\n',
        encoding="utf-8",
    )
    out = tmp_path / "run"
    first = ok(
        run_cli(
            ["train", "--config", config, "--data", shakespeare_200k, "--out", out,
             "--max-steps", "6", "--lr", "0.002"],
            isolated_data_dir,
            tmp_path,
        )
    )  # fmt: skip
    assert first.stdout == ""  # sample-length 0 from the file
    saved = json.loads((out / "last" / "config.json").read_text(encoding="utf-8"))
    assert saved["step"] == 6  # --max-steps 6 beat the file's 1000
    assert saved["config"]["model"]["hidden_dim"] == 48
    assert saved["config"]["model"]["embed_dim"] == 16
    assert saved["config"]["model"]["head_input"] == "last"
    assert saved["config"]["model"]["dropout"] == 0.25
    assert (saved["config"]["train"]["batch_size"], saved["config"]["train"]["seq_len"]) == (8, 32)
    assert saved["config"]["train"]["lr"] == 0.002  # the flag beat the file's 0.005

    # --resume keeps the run's saved settings; only the flags given now change.
    second = ok(
        run_cli(["train", "--resume", out, "--max-steps", "9"], isolated_data_dir, tmp_path)
    )
    assert f"resuming {out} at step 6" in second.stderr
    saved = json.loads((out / "last" / "config.json").read_text(encoding="utf-8"))
    assert saved["step"] == 9
    assert saved["config"]["model"]["hidden_dim"] == 48
    assert saved["config"]["model"]["head_input"] == "last"
    assert saved["config"]["model"]["dropout"] == 0.25


# ---- sample ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_sample_prints_exactly_length_characters_reproducibly(
    trained_run, isolated_data_dir, tmp_path
):
    sample = ["sample", trained_run, "--prompt", "ROMEO:", "--length", "50", "--device", "cpu"]
    first, again, other = run_many(
        [[*sample, "--seed", "3"], [*sample, "--seed", "3"], [*sample, "--seed", "4"]],
        isolated_data_dir,
        tmp_path,
    )
    for result in (first, again, other):
        ok(result)
        # The prompt, then the 50 characters that continue it and a newline.
        assert len(result.stdout) == 57 and result.stdout.startswith("ROMEO:")
        assert result.stdout.endswith("\n")
    assert first.stdout == again.stdout
    assert first.stdout != other.stdout


@pytest.mark.slow
def test_num_samples_prints_that_many_samples(trained_run, isolated_data_dir, tmp_path):
    result = ok(
        run_cli(
            ["sample", trained_run, "--num-samples", "3", "--length", "30", "--seed", "1",
             "--device", "cpu"],
            isolated_data_dir,
            tmp_path,
        )
    )  # fmt: skip
    text, samples = result.stdout, []
    for index in (1, 2, 3):
        header = f"=== sample {index} ===\n"
        assert text.startswith(header), result.stdout
        samples.append(text[len(header) : len(header) + 30])
        assert text[len(header) + 30] == "\n"
        text = text[len(header) + 31 :]
    assert text == ""
    assert len(set(samples)) == 3  # independent draws, not one sample three times


@pytest.mark.slow
def test_temperature_zero_is_deterministic_without_a_seed(trained_run, isolated_data_dir, tmp_path):
    greedy = ["sample", trained_run, "--temperature", "0", "--length", "60", "--device", "cpu"]
    first, second = run_many([greedy, greedy], isolated_data_dir, tmp_path)
    assert ok(first).stdout == ok(second).stdout
    assert len(first.stdout) == 61


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--num-samples", "3"]], ids=["stream", "batch"])
def test_sample_into_a_closed_pipe_exits_quietly(trained_run, isolated_data_dir, tmp_path, extra):
    # `charlstm sample ... | head -c 10` where head has already gone: the reader end is closed
    # before the command writes anything, so every write meets a broken pipe.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "charlstm", "sample", str(trained_run), "--length", "200",
             "--device", "cpu", *extra],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(isolated_data_dir),
            cwd=tmp_path,
            timeout=CLI_TIMEOUT,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert result.stderr == ""  # no traceback, no "Exception ignored ... BrokenPipeError"
    assert result.returncode == 0


@pytest.mark.slow
def test_sample_stops_quietly_when_the_reader_leaves_early(
    trained_run, isolated_data_dir, tmp_path
):
    # Like `| head -c 10`: read a little, then close. 100,000 characters cannot fit in a pipe
    # buffer, so the command must notice the closed pipe and stop long before finishing.
    process = subprocess.Popen(
        [sys.executable, "-m", "charlstm", "sample", str(trained_run), "--length", "100000",
         "--device", "cpu"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(isolated_data_dir),
        cwd=tmp_path,
    )  # fmt: skip
    try:
        head = process.stdout.read(10)
        process.stdout.close()
        stderr = process.stderr.read().decode("utf-8")
        returncode = process.wait(timeout=CLI_TIMEOUT)
    finally:
        process.kill()
        process.wait()
    assert len(head) == 10
    assert stderr == ""
    assert returncode == 0


# ---- eval -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_eval_prints_loss_bits_and_perplexity(trained_run, isolated_data_dir, tmp_path):
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 20
    data = tmp_path / "eval.txt"
    data.write_text(text, encoding="utf-8")
    command = ["eval", trained_run, "--data", data, "--device", "cpu"]
    human, as_json = run_many([command, [*command, "--json"]], isolated_data_dir, tmp_path)

    values = json.loads(ok(as_json).stdout)
    expected = charlstm.load(str(trained_run), device="cpu").evaluate(text)
    assert values["characters"] == len(text) - 1
    assert values["loss"] == pytest.approx(expected.loss, abs=1e-6)
    assert values["bpc"] == pytest.approx(values["loss"] / math.log(2), rel=1e-12)
    assert values["perplexity"] == pytest.approx(math.exp(values["loss"]), rel=1e-12)

    match = re.fullmatch(
        r"loss (\S+) nats/char  (\S+) bits/char  perplexity (\S+)  over ([\d,]+) characters "
        rf"of {re.escape(str(data))}\n",
        ok(human).stdout,
    )
    assert match, human.stdout
    loss, bits, perplexity = (float(match.group(i)) for i in (1, 2, 3))
    assert loss == pytest.approx(values["loss"], abs=5e-5)
    assert bits == pytest.approx(values["bpc"], abs=5e-5)
    assert perplexity == pytest.approx(values["perplexity"], abs=5e-4)
    assert int(match.group(4).replace(",", "")) == len(text) - 1
    # The progress bar on stderr ends at every character scored.
    assert f"scoring: {len(text) - 1}char [" in human.stderr


@pytest.mark.slow
def test_eval_without_data_scores_the_validation_split_and_dynamic_adapts(
    trained_run, isolated_data_dir, tmp_path
):
    plain, dynamic, human = run_many(
        [["eval", trained_run, "--json"], ["eval", trained_run, "--json", "--dynamic"],
         ["eval", trained_run, "--dynamic", "--dynamic-lr", "1e-3", "--dynamic-segment", "32"]],
        isolated_data_dir, tmp_path,
    )  # fmt: skip
    model = charlstm.load(str(trained_run), device="cpu")
    recorded = model.info["val"]
    static_values, dynamic_values = json.loads(ok(plain).stdout), json.loads(ok(dynamic).stdout)
    assert static_values["dynamic"] is False and dynamic_values["dynamic"] is True
    assert static_values["characters"] == dynamic_values["characters"] == recorded["characters"]
    assert static_values["loss"] == pytest.approx(recorded["loss"], abs=1e-6)
    # The model keeps learning from the validation text as it reads it.
    assert dynamic_values["loss"] < static_values["loss"] - 0.05
    assert dynamic_values["loss"] == pytest.approx(model.evaluate_validation(True).loss, abs=1e-4)
    # The flags reach the evaluation: these settings give another loss.
    tuned = charlstm.DynamicEvalConfig(dynamic_lr=1e-3, dynamic_segment=32)
    expected = model.evaluate_validation(tuned).loss
    match = re.fullmatch(
        r"dynamic evaluation: loss (\S+) nats/char  .* over ([\d,]+) characters of the "
        r"validation split\n",
        ok(human).stdout,
    )
    assert match, human.stdout
    assert float(match.group(1)) == pytest.approx(expected, abs=2e-4)
    assert abs(expected - dynamic_values["loss"]) > 1e-3
    assert int(match.group(2).replace(",", "")) == recorded["characters"]
    scored = recorded["characters"]
    assert f"scoring: {scored}char [" in plain.stderr and f"scoring: {scored}char [" in human.stderr


# ---- errors ---------------------------------------------------------------------------------


def train_with(*flags: str) -> list[str]:
    """A command of ERROR_CASES: train on the shared corpus with ``flags``."""
    return ["train", "--data", "{corpus}", "--out", "{out}", *flags]


# (name, arguments, message pattern); {placeholders} are paths made by the fixture below, and
# "train" commands get FAST_TRAIN first so that a missing check cannot start a long run.
ERROR_CASES = [
    ("invalid-utf8", ["train", "--data", "{bad}", "--out", "{out}"],
     r"{bad}: not valid UTF-8 at byte 1,400 \(0xff\); the text before it holds UTF-8 "
     r"characters, so the file mixes encodings or is damaged there"),
    ("empty-corpus", ["train", "--data", "{empty}", "--out", "{out}"],
     r"the training text is empty \({empty}\)"),
    ("missing-data", ["train", "--data", "{tmp}/nope.txt", "--out", "{out}"],
     r"{tmp}/nope\.txt: no such file or directory"),
    ("unseen-prompt", ["sample", "{run}", "--prompt", "héllo"],
     r"prompt contains characters not in the model's vocabulary: 'é'"),
    ("temperature", ["sample", "{run}", "--temperature", "-1"],
     r"--temperature must be 0 \(greedy\) or positive, got -1"),
    ("top-p-0", ["sample", "{run}", "--top-p", "0"], r"--top-p must be in \(0, 1\], got 0"),
    ("top-p-1.5", ["sample", "{run}", "--top-p", "1.5"], r"--top-p must be in \(0, 1\], got 1\.5"),
    ("top-k", ["sample", "{run}", "--top-k", "-1"], r"--top-k must be 0 \(off\) or positive"),
    ("length", ["sample", "{run}", "--length", "-1"], r"--length must be at least 1, got -1"),
    ("length-0", ["sample", "{run}", "--length", "0"], r"--length must be at least 1, got 0"),
    ("num-samples", ["sample", "{run}", "--num-samples", "0"],
     r"--num-samples must be at least 1, got 0"),
    ("hidden-dim", train_with("--hidden-dim", "-3"), r"--hidden-dim must be at least 1"),
    ("embed-dim", train_with("--embed-dim", "0"), r"--embed-dim must be at least 1"),
    ("n-layers", train_with("--n-layers", "0"), r"--n-layers must be at least 1"),
    ("seq-len", train_with("--seq-len", "-5"), r"--seq-len must be at least 1"),
    ("dropout-negative", train_with("--dropout", "-0.1"), r"--dropout must be in \[0, 1\)"),
    ("lr-negative", train_with("--lr=-0.001"), r"--lr must be greater than 0"),
    ("one-character", ["train", "--data", "{monotone}", "--out", "{out}"],
     r"has only one distinct character, 'a': there is nothing to predict"),
    ("shorter-than-a-batch", ["train", "--data", "{short}", "--out", "{out}", "--batch-size",
                              "8", "--seq-len", "32"],
     r"the training text has [\d,]+ characters but one batch of 8 x 32 needs at least 257: "
     r"use more text or a smaller --batch-size or --seq-len"),
    ("binary-in-directory", ["train", "--data", "{mixed}", "--out", "{out}"],
     r"{mixed}/b\.bin: not valid UTF-8 at byte 0 \(0x89\); it does not look like text in a "
     r"common encoding \(a binary file\?\)"),
    ("truncated-checkpoint", ["sample", "{truncated}"],
     r"{truncated}/best/model\.safetensors is not a valid safetensors file"),
    ("pickled-checkpoint", ["sample", "{pickled}"],
     r"{pickled}/best/model\.safetensors is a pickle \(torch\.save\) file, not safetensors; "
     r"charlstm never unpickles files"),
    ("foreign-checkpoint", ["eval", "{foreign}", "--data", "{corpus}"],
     r"{foreign}/best/config\.json is not a charlstm checkpoint configuration"),
    ("dropout", train_with("--dropout", "1.0"), r"--dropout must be in \[0, 1\)"),
    ("batch-size", train_with("--batch-size", "0"), r"--batch-size must be at least 1"),
    ("lr", train_with("--lr", "0"), r"--lr must be greater than 0"),
    ("existing-run", ["train", "--data", "{corpus}", "--out", "{existing}"],
     r"run directory {existing} already exists; use --resume {existing} to continue it or "
     r"--overwrite to replace it"),
    ("resume-not-a-run", ["train", "--data", "{corpus}", "--resume", "{notrun}"],
     r"--resume {notrun}: not a run directory with a last/ checkpoint"),
    ("sample-not-a-checkpoint", ["sample", "{notrun}"],
     r"{notrun} is not a charlstm checkpoint or run directory"),
    ("sample-missing-path", ["sample", "{tmp}/nowhere"], r"{tmp}/nowhere does not exist"),
    ("unknown-flag", ["train", "--bogus"], r"unrecognized arguments: --bogus"),
    ("time-budget", train_with("--time-budget", "5x"),
     r"--time-budget '5x' is not a positive duration"),
    ("missing-config", ["train", "--config", "{tmp}/none.toml"],
     r"config file {tmp}/none\.toml does not exist"),
    ("dynamic-flag-alone", ["eval", "{run}", "--data", "{corpus}", "--dynamic-lr", "1e-3"],
     r"--dynamic-lr set dynamic evaluation; add --dynamic to use it$"),
    ("dynamic-decay", ["eval", "{run}", "--dynamic", "--dynamic-decay", "2"],
     r"--dynamic-decay must be in \[0, 1\], got 2\.0$"),
    ("dynamic-segment", ["eval", "{run}", "--dynamic", "--dynamic-segment", "0"],
     r"--dynamic-segment must be at least 1, got 0$"),
    ("eval-encoding-alone", ["eval", "{run}", "--encoding", "latin-1"],
     r"--encoding applies to --data files; give the files too$"),
    ("eval-training-text-gone", ["eval", "{moved}"],
     r"{tmp}/gone\.txt: no such file or directory \(built-in corpora: [^)]*\); without "
     r"--data, eval reads the validation split from the files the model was trained on: give "
     r"--data FILE to score other text$"),
]  # fmt: skip


@pytest.fixture(scope="module")
def error_results(request, trained_run, shakespeare_200k, session_data_dir, tmp_path_factory):
    """The commands of ERROR_CASES that this session tests, run concurrently once:
    {name: (result, paths)}."""
    tested = {
        item.callspec.params["name"]
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_error_exits_2_with_one_error_line"
    }
    cases = [case for case in ERROR_CASES if case[0] in tested | {"existing-run"}]
    tmp = tmp_path_factory.mktemp("cli-errors")
    bad = tmp / "bad.txt"
    # 1,200 characters but 1,400 bytes before the bad byte: the offset must count bytes.
    bad.write_bytes(("héllo wörld\n" * 100).encode("utf-8") + b"\xff" + b"more text\n")
    (tmp / "empty.txt").write_bytes(b"")
    (tmp / "notrun").mkdir()
    (tmp / "monotone.txt").write_text("a" * 5000)
    (tmp / "short.txt").write_text("To be, or not to be.\n" * 11)
    (tmp / "mixed").mkdir()
    (tmp / "mixed" / "a.txt").write_text("plain text\n" * 100)
    (tmp / "mixed" / "b.bin").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    damaged = {name: shutil.copytree(trained_run, tmp / name) for name in
               ("truncated", "pickled", "foreign", "moved")}  # fmt: skip
    weights = damaged["truncated"] / "best" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (damaged["pickled"] / "best" / "model.safetensors").write_bytes(b"\x80\x04K\x01.")
    (damaged["foreign"] / "best" / "config.json").write_text('{"architectures": ["GPT2"]}')
    moved = json.loads((damaged["moved"] / "best" / "config.json").read_text())
    moved["config"]["data"]["data"] = [str(tmp / "gone.txt")]
    (damaged["moved"] / "best" / "config.json").write_text(json.dumps(moved))
    paths = {
        "tmp": tmp,
        "bad": bad,
        "empty": tmp / "empty.txt",
        "out": tmp / "out",
        "run": trained_run,
        "corpus": shakespeare_200k,
        "existing": shutil.copytree(trained_run, tmp / "existing"),
        "notrun": tmp / "notrun",
        "monotone": tmp / "monotone.txt",
        "short": tmp / "short.txt",
        "mixed": tmp / "mixed",
        **damaged,
    }
    commands = []
    for name, args, _ in cases:
        # Each its own run directory: two runs on one directory at once refuse each other.
        command = [arg.format(**{**paths, "out": paths["out"] / name}) for arg in args]
        if command[0] == "train":
            command[1:1] = FAST_TRAIN
        commands.append(command)
    results = run_many(commands, session_data_dir, tmp)
    return {name: (result, paths) for (name, _, _), result in zip(cases, results, strict=True)}


@pytest.mark.parametrize(
    ("name", "pattern"),
    [pytest.param(name, pattern, id=name) for name, _, pattern in ERROR_CASES],
)
def test_error_exits_2_with_one_error_line(error_results, name, pattern):
    result, paths = error_results[name]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    escaped = {key: re.escape(str(path)) for key, path in paths.items()}
    assert re.search(pattern.format(**escaped), lines[0]), lines[0]
    assert result.stdout == ""


def test_error_leaves_an_existing_run_untouched(error_results, trained_run):
    _, paths = error_results["existing-run"]
    existing = paths["existing"]
    for name in ("best/model.safetensors", "last/model.safetensors", "metrics.jsonl"):
        assert (existing / name).read_bytes() == (trained_run / name).read_bytes()
    assert not paths["out"].exists()  # no failed command created its run directory


@pytest.mark.slow
def test_debug_shows_the_traceback(trained_run, isolated_data_dir, tmp_path):
    result = run_cli(
        ["sample", trained_run, "--prompt", "é", "--debug", "--device", "cpu"],
        isolated_data_dir,
        tmp_path,
    )
    assert result.returncode == 1  # an uncaught exception
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.splitlines()[-1].startswith(
        "charlstm.errors.CharLSTMError: prompt contains characters not in the model's vocabulary"
    )
