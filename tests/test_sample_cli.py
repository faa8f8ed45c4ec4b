"""``charlstm sample`` for scripts and people, as real processes: the prompt echoed or not,
JSON Lines that draw the same samples again, prompt files, the interactive loop, exit codes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CLI_TIMEOUT, cli_env, refused, run_cli, train_tiny, write_text

import charlstm
from charlstm.cli import build_parser

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A model trained for two steps on a text of a dozen lowercase words."""
    tmp = tmp_path_factory.mktemp("sample-cli")
    return train_tiny(write_text(tmp / "words.txt"), tmp / "run")


@pytest.fixture(scope="module")
def model(run):
    return charlstm.load(str(run), device="cpu")


def sample(run: Path, data_dir: Path, cwd: Path, *flags, **kw) -> subprocess.CompletedProcess:
    """``charlstm sample RUN FLAGS`` on the CPU, checked to succeed without a word on stderr."""
    result = run_cli(["sample", run, "--device", "cpu", *flags], data_dir, cwd, **kw)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result


def strict_json(line: str) -> dict:
    """A JSON object, refusing NaN and Infinity (not JSON, though Python writes them)."""
    return json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in {line}"))


# ---- the prompt before its continuation -----------------------------------------------------


def test_the_prompt_is_printed_before_its_continuation(run, model, isolated_data_dir, tmp_path):
    result = sample(run, isolated_data_dir, tmp_path, "--prompt", "the ", "--length", 40,
                    "--seed", 3)  # fmt: skip
    assert result.stdout == "the " + model.generate("the ", 40, seed=3) + "\n"


@pytest.mark.slow
def test_no_echo_prints_the_continuation_alone_and_the_default_newline_never_shows(
    run, model, isolated_data_dir, tmp_path
):
    flags = ["--length", 30, "--seed", 5]
    alone = sample(run, isolated_data_dir, tmp_path, "--prompt", "the ", "--no-echo", *flags)
    assert alone.stdout == model.generate("the ", 30, seed=5) + "\n"
    several = sample(run, isolated_data_dir, tmp_path, "--prompt", "fox", "--num-samples", 2,
                     *flags)  # fmt: skip
    texts = model.generate_batch(2, "fox", 30, seed=5)
    headed = [f"=== sample {i} ===\nfox{text}\n" for i, text in enumerate(texts, 1)]
    assert several.stdout == "".join(headed)
    default = sample(run, isolated_data_dir, tmp_path, *flags)
    assert default.stdout == model.generate(length=30, seed=5) + "\n"


# ---- JSON Lines -------------------------------------------------------------------------------


def test_json_lines_report_the_seed_that_draws_each_sample_again(
    run, model, isolated_data_dir, tmp_path
):
    result = sample(run, isolated_data_dir, tmp_path, "--json", "--prompt", "the ",
                    "--num-samples", 3, "--length", 25, "--top-k", 5)  # fmt: skip
    records = [strict_json(line) for line in result.stdout.splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2]
    seed = records[0]["seed"]  # none was given: one was drawn, the same for the whole call
    assert all(r["seed"] == seed for r in records) and 0 <= seed < 2**63
    texts = model.generate_batch(3, "the ", 25, top_k=5, seed=seed)
    assert [r["text"] for r in records] == texts
    assert records[1] == {
        "prompt": "the ",
        "text": texts[1],
        "settings": {"length": 25, "temperature": 0.8, "top_k": 5, "top_p": 1.0,
                     "unknown": "error"},
        "seed": seed,
        "index": 1,
        "model": model.summary(),
    }  # fmt: skip
    assert records[0]["model"]["name"] == run.name
    assert records[0]["model"]["val_bpc"] == pytest.approx(model.info["val"]["bpc"])


@pytest.mark.slow
def test_json_lines_with_the_reported_seed_are_the_same_lines(run, isolated_data_dir, tmp_path):
    flags = ["--json", "--prompt", "fox", "--num-samples", 2, "--length", 20]
    first = sample(run, isolated_data_dir, tmp_path, *flags)
    seed = strict_json(first.stdout.splitlines()[0])["seed"]
    again = sample(run, isolated_data_dir, tmp_path, *flags, "--seed", seed)
    assert again.stdout == first.stdout


# ---- --prompt-file ----------------------------------------------------------------------------


def test_the_prompt_file_is_the_prompt_exactly(run, model, isolated_data_dir, tmp_path):
    prompt = "the lazy dog\nsat on the "
    (tmp_path / "prompt.txt").write_text(prompt, encoding="utf-8")
    result = sample(run, isolated_data_dir, tmp_path, "--prompt-file", "prompt.txt",
                    "--length", 30, "--seed", 2)  # fmt: skip
    assert result.stdout == prompt + model.generate(prompt, 30, seed=2) + "\n"


@pytest.mark.slow
def test_a_prompt_from_standard_input(run, model, isolated_data_dir, tmp_path):
    result = sample(run, isolated_data_dir, tmp_path, "--prompt-file", "-", "--json",
                    "--length", 30, "--seed", 2, input="over the ")  # fmt: skip
    assert strict_json(result.stdout)["text"] == model.generate("over the ", 30, seed=2)


def test_a_prompt_file_that_cannot_be_read_is_one_line_naming_it(run, isolated_data_dir, tmp_path):
    (tmp_path / "latin1.txt").write_bytes("the café ".encode("latin-1"))
    (tmp_path / "ok.txt").write_text("the ", encoding="utf-8")
    cases = {
        "latin1.txt": "error: --prompt-file latin1.txt: invalid UTF-8 at byte 7",
        "missing.txt": "error: --prompt-file missing.txt: no such file",
        ".": "error: --prompt-file . is a directory: give a text file",
    }
    for name, line in cases.items():
        result = run_cli(["sample", run, "--json", "--prompt-file", name], isolated_data_dir,
                         tmp_path)  # fmt: skip
        assert refused(result) == line
        assert result.stdout == ""
    both = run_cli(["sample", run, "--prompt-file", "ok.txt", "--prompt", "the "],
                   isolated_data_dir, tmp_path)  # fmt: skip
    refused(both, "give --prompt or --prompt-file, not both")


# ---- --interactive ----------------------------------------------------------------------------

# Two prompts around two settings, then lines that cannot be used (each one error line) and an
# empty line (the default prompt); piped, so no "> " prompts.
SESSION = (
    b"the \n:length 12\n:temperature 0\nfox\n:tempo 1\n:top-p 2\n:length x\n"
    b"the caf\xe9\nDOG\n\n:help\n"
)


def test_interactive_samples_each_line_with_the_settings_its_commands_set(
    run, model, isolated_data_dir, tmp_path
):
    result = subprocess.run(
        [sys.executable, "-m", "charlstm", "sample", str(run), "--interactive", "--length",
         "20", "--seed", "4", "--device", "cpu"],
        input=SESSION, capture_output=True, env=cli_env(isolated_data_dir), cwd=tmp_path,
        timeout=CLI_TIMEOUT,
    )  # fmt: skip
    out, err = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, err
    assert out == (
        "the " + model.generate("the ", 20, seed=4) + "\n"
        + "fox" + model.generate("fox", 12, temperature=0) + "\n"
        + model.generate(length=12, temperature=0) + "\n"
    )  # fmt: skip
    settings = "length 12, temperature {}, top-k 0, top-p 1.0, num-samples 1, seed 4, unknown error"
    lines = err.splitlines()
    assert lines[:2] == [f"settings: {settings.format(0.8)}", f"settings: {settings.format(0.0)}"]
    assert lines[2:6] == [
        "error: unknown command :tempo; :help lists the commands",
        "error: :top-p must be in (0, 1], got 2.0",
        "error: :length takes int, not 'x'",
        "error: line 8 is not UTF-8 text (byte 0xe9 at 7): type it again",
    ]
    assert lines[6].startswith("error: prompt contains characters not in the model's vocabulary")
    assert lines[6].endswith("(use :unknown skip or :unknown replace to go on)")
    assert lines[7].startswith("Each line is a prompt") and ":seed VALUE" in lines[7]
    assert lines[8] == f"settings: {settings.format(0.0)}"
    assert len(lines) == 9 and "Traceback" not in err


@pytest.mark.slow
def test_interactive_json_lines_and_prompts_given_twice(run, model, isolated_data_dir, tmp_path):
    flags = ["--interactive", "--json", "--length", 10, "--seed", 1, "--device", "cpu"]
    result = run_cli(["sample", run, *flags], isolated_data_dir, tmp_path, input="the \nfox\n")
    assert result.returncode == 0, result.stderr
    records = [strict_json(line) for line in result.stdout.splitlines()]
    assert [(r["prompt"], r["text"]) for r in records] == [
        (p, model.generate(p, 10, seed=1)) for p in ("the ", "fox")
    ]
    given = run_cli(["sample", run, "--interactive", "--prompt", "x"], isolated_data_dir,
                    tmp_path)  # fmt: skip
    refused(given, "--interactive reads its prompts from standard input")


# ---- exit codes -------------------------------------------------------------------------------


def test_help_states_the_echo_and_the_exit_statuses():
    parser = build_parser()
    top = " ".join(parser.format_help().split())
    for status in ("0 done", "2 a usage mistake", "1 the machine could not run it",
                   "130 stopped by Ctrl-C and 143 by SIGTERM"):  # fmt: skip
        assert status in top
    sample_help = parser._subparsers._group_actions[0].choices["sample"].format_help()
    sample_help = " ".join(sample_help.split())
    assert "A prompt you give is printed before its continuation" in sample_help
    assert "--no-echo print the continuation alone" in sample_help
    assert "exit status:" in sample_help


def test_a_usage_mistake_exits_2(run, isolated_data_dir, tmp_path):
    refused(run_cli(["sample", run, "--jsn"], isolated_data_dir, tmp_path),
            "unrecognized arguments: --jsn")  # fmt: skip


# Runs `charlstm sample` (its arguments after the checkpoint's path) in an address space with
# little room to spare beyond the loaded model: the batch runs out of memory for real.
LITTLE_MEMORY = """
import resource, sys
from charlstm.cli import main
from charlstm.lm import CharLM

# Torch, the model and the buffers of numpy's BLAS (set up by its first product) fit; the
# batch of samples is what cannot.
CharLM.load(sys.argv[1], device="cpu").generate(length=2)
with open("/proc/self/statm") as f:
    used = int(f.read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (used + (64 << 20), resource.RLIM_INFINITY))
raise SystemExit(main(["sample", *sys.argv[1:]]))
"""


@pytest.mark.slow
def test_running_out_of_memory_exits_1(run, isolated_data_dir, tmp_path):
    if not Path("/proc/self/statm").exists():
        pytest.skip("needs /proc (Linux)")
    result = run_cli([run, "--num-samples", 20_000, "--length", 2_000, "--device", "cpu"],
                     isolated_data_dir, tmp_path, python=LITTLE_MEMORY, threads=1)  # fmt: skip
    refused(result, "out of memory in charlstm sample: use a smaller --num-samples", code=1)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "code", "word"),
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
)
def test_a_signal_stops_sampling_with_its_exit_status(
    run, isolated_data_dir, tmp_path, signum, code, word
):
    process = subprocess.Popen(
        [sys.executable, "-m", "charlstm", "sample", str(run), "--length", str(10**8), "--device",
         "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(isolated_data_dir),
        cwd=tmp_path,
    )  # fmt: skip
    try:
        assert len(process.stdout.read(100)) == 100  # sampling has begun
        process.send_signal(signum)
        _, err = process.communicate(timeout=CLI_TIMEOUT)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == code
    assert err.decode() == f"{word}\n"
