"""Bad input through the real ``charlstm`` command: one ``error:`` line that says what is wrong
and what to do, never a traceback, nothing left behind, and memory that stays bounded.

Settings are refused before torch loads (half a second a command); the cases that need a model
share one trained for two steps on a small generated text.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CLI_TIMEOUT, FAST_TRAIN, refused, run_cli, train_tiny, write_text

from charlstm import cli

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory) -> Path:
    return write_text(tmp_path_factory.mktemp("text") / "corpus.txt")


@pytest.fixture(scope="module")
def tiny_run(tiny_text, tmp_path_factory) -> Path:
    return train_tiny(tiny_text, tmp_path_factory.mktemp("runs") / "tiny")


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_text(tmp_path / "corpus.txt")


# ---- settings: refused before any run directory exists --------------------------------------


@pytest.mark.parametrize("seed", ["-1", str(2**70)])
def test_a_seed_out_of_range_is_refused(corpus, isolated_data_dir, tmp_path, seed):
    out = tmp_path / "run"
    result = run_cli(["train", "--data", corpus, "--out", out, *FAST_TRAIN, "--seed", seed],
                     isolated_data_dir, tmp_path)  # fmt: skip
    refused(result, "--seed", "[0, 2**63)", seed)
    assert not out.exists()


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--lr", "inf"), ("--lr", "nan"), ("--muon-lr", "inf"), ("--weight-decay", "inf"),
     ("--grad-clip", "nan"), ("--dropout", "nan"), ("--max-epochs", "inf"),
     ("--val-fraction", "nan")],
)  # fmt: skip
def test_a_setting_that_is_not_a_finite_number_is_refused(
    corpus, isolated_data_dir, tmp_path, flag, value
):
    out = tmp_path / "run"
    result = run_cli(["train", "--data", corpus, "--out", out, *FAST_TRAIN, flag, value],
                     isolated_data_dir, tmp_path)  # fmt: skip
    refused(result, flag, "finite number", value)
    assert not out.exists()


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [
        ("--dynamic-lr", "1e300", ["at most 1", "1e+300", "0.0003 is typical"]),
        ("--dynamic-lr", "nan", ["finite number"]),
        ("--dynamic-segment", "100000000", ["at most 10,000", "100,000,000"]),
    ],
)
def test_dynamic_evaluation_settings_out_of_range_are_refused(
    isolated_data_dir, tmp_path, flag, value, words
):
    """Answered before any model loads (the checkpoint need not even exist)."""
    result = run_cli(["eval", tmp_path / "run", "--dynamic", flag, value],
                     isolated_data_dir, tmp_path)  # fmt: skip
    refused(result, flag, *words)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"hidden-dim = 16\n# caf\xe9\n", ["is not UTF-8 text", "0xe9", "offset 21"]),
        (b"[model]\nhidden_dim = 16\nhidden-dim = 32\n",
         ["sets hidden-dim twice", "'model.hidden_dim'", "'model.hidden-dim'"]),
    ],
    ids=["latin-1", "duplicate"],
)  # fmt: skip
def test_a_config_file_that_is_not_utf8_or_sets_a_setting_twice_is_refused(
    corpus, isolated_data_dir, tmp_path, content, words
):
    config, out = tmp_path / "run.toml", tmp_path / "run"
    config.write_bytes(content)
    result = run_cli(["train", "--config", config, "--data", corpus, "--out", out, *FAST_TRAIN],
                     isolated_data_dir, tmp_path)  # fmt: skip
    refused(result, str(config), *words)
    assert not out.exists()


def test_resume_with_overwrite_is_refused_and_the_run_is_left_alone(isolated_data_dir, tmp_path):
    run = tmp_path / "run"
    (run / "last").mkdir(parents=True)
    (run / "last" / "config.json").write_text("{}", encoding="utf-8")
    before = sorted(p.name for p in run.rglob("*"))
    result = run_cli(["train", "--resume", run, "--overwrite"], isolated_data_dir, tmp_path)
    refused(result, f"--resume {run} continues a run", "--overwrite replaces one")
    assert sorted(p.name for p in run.rglob("*")) == before


# ---- inspect reads what it needs, from regular files only -----------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("source", ["/dev/zero", "fifo"])
def test_inspect_refuses_a_device_or_a_fifo_at_once(isolated_data_dir, tmp_path, source):
    """/dev/zero would be read without end and a FIFO would wait for a writer for ever."""
    if source == "fifo":
        if not hasattr(os, "mkfifo"):
            pytest.skip("no FIFOs here")
        os.mkfifo(tmp_path / "fifo")
    elif not Path(source).exists():
        pytest.skip(f"no {source} here")
    began = time.monotonic()
    result = run_cli(["inspect", tmp_path / "run", "--text", source, "--max-chars", "200"],
                     isolated_data_dir, tmp_path)  # fmt: skip
    refused(result, source, "not a regular file", "save the text to a file")
    assert time.monotonic() - began < 60
    assert not (tmp_path / "inspect.html").exists()


# ---- the encoded-corpus cache ----------------------------------------------------------------

# The cache is written for corpora over 64 MB: this script lowers the threshold, makes the
# disk look full (and memory scarce, when asked) and runs the command as `charlstm` would.
CACHE_SCRIPT = """
import errno, os, sys
import charlstm.data
from charlstm.cli import main
charlstm.data._MMAP_THRESHOLD_BYTES = 100
def full(fd, offset, length):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
os.posix_fallocate = full
if os.environ.get("SCARCE_MEMORY"):
    charlstm.data.available_memory = lambda: int(os.environ["SCARCE_MEMORY"])
sys.argv[0] = "charlstm"
raise SystemExit(main())
"""


@pytest.mark.slow
@pytest.mark.parametrize("memory", ["enough", "scarce"])
def test_a_full_disk_for_the_encoded_cache_is_one_line_or_none(tmp_path, monkeypatch, memory):
    """ENOSPC on the cache file (no bus error, no .npy.tmp left): the corpus is held in memory
    with a warning, or when it cannot be, the run is refused in one line before it starts."""
    if not hasattr(os, "posix_fallocate"):
        pytest.skip("no posix_fallocate here")
    corpus = write_text(tmp_path / "corpus.txt", lines=20_000)  # 1.2 MB
    if memory == "scarce":  # room for the model (70 KB) but not for the encoded text
        monkeypatch.setenv("SCARCE_MEMORY", str(1 << 20))
    cache, out = tmp_path / "cache", tmp_path / "run"
    result = run_cli(["train", "--data", corpus, "--out", out, *FAST_TRAIN], cache, tmp_path,
                     python=CACHE_SCRIPT)  # fmt: skip
    assert "Traceback" not in result.stderr
    if memory == "scarce":
        refused(result, "cannot write the encoded corpus", "No space left on device",
                "would not fit in memory", "CHARLSTM_DATA_DIR")  # fmt: skip
        assert not out.exists()
    else:
        assert result.returncode == 0, result.stderr
        assert "encoding it in memory instead" in result.stderr
    assert not [p for p in cache.rglob("*") if ".tmp" in p.name]


# ---- memory ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_model_too_large_for_memory_is_refused_at_once(corpus, isolated_data_dir, tmp_path):
    """Counted before anything is built: a billion hidden units would take minutes to fail."""
    out = tmp_path / "run"
    began = time.monotonic()
    result = run_cli(["train", "--data", corpus, "--out", out, "--hidden-dim", "1000000000",
                      "--max-steps", "1", "--device", "cpu"],
                     isolated_data_dir, tmp_path)  # fmt: skip
    refused(result, "1,000,000,000", "GB of memory", "use a smaller --hidden-dim")
    assert time.monotonic() - began < 60
    assert not out.exists()


@pytest.mark.slow
def test_too_many_samples_for_memory_are_refused(tiny_run, isolated_data_dir, tmp_path):
    result = run_cli(["sample", tiny_run, "--num-samples", 10**12, "--length", "2"],
                     isolated_data_dir, tmp_path)  # fmt: skip
    refused(result, "1,000,000,000,000 samples", "GB of memory", "--num-samples")


# Runs `charlstm sample` and then prints the process's peak resident memory in MB.
PEAK_SCRIPT = """
import resource, sys
from charlstm.cli import main
code = main(sys.argv[1:])
print(f"peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}", file=sys.stderr)
raise SystemExit(code)
"""


@pytest.mark.slow
def test_many_samples_of_a_long_prompt_read_the_prompt_once(
    tiny_run, tiny_text, isolated_data_dir, tmp_path
):
    """1,000 samples after a 100 KB prompt: the prompt is read once, in pieces, and its state
    copied to every sample (read 1,000 times over, its logits alone took 12 GB)."""
    if sys.platform == "win32":
        pytest.skip("no resource module")
    prompt = tiny_text.read_text(encoding="utf-8")
    prompt = (prompt * (100_000 // len(prompt) + 1))[:100_000]
    args = ["sample", tiny_run, "--num-samples", 1000, "--length", 3, "--prompt", prompt]
    result = run_cli([*args, "--no-echo"], isolated_data_dir, tmp_path, python=PEAK_SCRIPT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("=== sample ") == 1000
    peak = int(result.stderr.split("peak ")[-1])
    assert peak < 1500, f"{peak} MB"


@pytest.mark.parametrize(
    "error",
    [
        MemoryError(),
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
            "memory: you tried to allocate 2048000000000 bytes. Error code 12"
        ),
        "torch.OutOfMemoryError",
    ],
    ids=["MemoryError", "cpu-allocator", "cuda"],
)
def test_running_out_of_memory_is_one_line_naming_the_command_and_what_to_shrink(
    monkeypatch, capsys, error
):
    if error == "torch.OutOfMemoryError":
        import torch

        error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    def run_out(args):
        raise error

    monkeypatch.setattr(cli, "_sample", run_out)
    assert cli.main(["sample", "run"]) == 1
    captured = capsys.readouterr()
    assert captured.err == (
        "error: out of memory in charlstm sample: use a smaller --num-samples or a shorter "
        "--prompt\n"
    )


def test_other_runtime_errors_are_not_taken_for_memory(monkeypatch):
    def fail(args):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(cli, "_sample", fail)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        cli.main(["sample", "run"])


# ---- a second Ctrl-C as the process ends ------------------------------------------------------

# The command ends, then a Ctrl-C arrives while Python runs its atexit handlers (as when a user
# presses it again while a stopped run's process shuts down).
LATE_INTERRUPT = """
import atexit, os, signal, sys, time
from charlstm.cli import main

def interrupted_at_exit():
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)

atexit.register(interrupted_at_exit)
sys.argv = ["charlstm", "sample", "run", "--top-p", "2"]
raise SystemExit(main())
"""


def test_a_second_ctrl_c_during_shutdown_exits_quietly_with_130(tmp_path):
    if not hasattr(os, "kill") or sys.platform == "win32":
        pytest.skip("POSIX signals")
    result = subprocess.run([sys.executable, "-c", LATE_INTERRUPT], capture_output=True,
                            text=True, timeout=CLI_TIMEOUT, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 130
    assert result.stderr == "error: --top-p must be in (0, 1], got 2.0\n"
