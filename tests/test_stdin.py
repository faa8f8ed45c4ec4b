"""``--data -``: training and evaluating on standard input, as real ``charlstm`` processes.

Standard input can be read once, so training keeps a copy of it (in the data cache, named by
the corpus's fingerprint, which the checkpoint records): evaluating the validation split and
resuming later need no standard input, and piping the same text again resumes too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

TIMEOUT = 180  # seconds; each command imports torch and trains or scores for a few
TRAIN = [
    "--embed-dim", "16", "--hidden-dim", "32", "--n-layers", "1", "--batch-size", "8",
    "--seq-len", "32", "--eval-every", "5", "--device", "cpu", "--precision", "fp32",
    "--sample-length", "0", "--ema", "0",
]  # fmt: skip
LINES = "".join(f"{i}: the quick brown fox jumps over the lazy dog — ünïcödé\n" for i in range(300))


def charlstm(
    args: Sequence[object], data_dir: Path, cwd: Path, stdin: bytes | None = None
) -> subprocess.CompletedProcess:
    """Run the command with ``stdin`` piped in (None: /dev/null, nothing to read)."""
    env = dict(os.environ, CHARLSTM_DATA_DIR=str(data_dir), PYTHONIOENCODING="utf-8")
    return subprocess.run(
        [sys.executable, "-m", "charlstm", *map(str, args)],
        input=stdin,
        stdin=subprocess.DEVNULL if stdin is None else None,
        capture_output=True,
        env=env,
        cwd=cwd,
        timeout=TIMEOUT,
    )


def ok(result: subprocess.CompletedProcess) -> str:
    """The command's stderr, after checking that it succeeded."""
    err = result.stderr.decode("utf-8")
    assert result.returncode == 0, err
    return err


@pytest.fixture(scope="module")
def stdin_run(tmp_path_factory):
    """A run trained for 5 steps on text piped into ``charlstm train --data -``."""
    tmp = tmp_path_factory.mktemp("stdin")
    data_dir = tmp / "data"
    result = charlstm(
        ["train", "--data", "-", "--out", tmp / "run", "--max-steps", "5", *TRAIN],
        data_dir,
        tmp,
        stdin=LINES.encode("utf-8"),
    )
    return tmp, data_dir, ok(result)


def test_training_reads_standard_input_and_says_where_it_keeps_it(stdin_run):
    tmp, data_dir, err = stdin_run
    saved = json.loads((tmp / "run" / "best" / "config.json").read_text(encoding="utf-8"))
    assert saved["config"]["data"]["data"] == ["-"]
    copy = data_dir / "stdin" / f"{saved['corpus']['fingerprint'][:32]}.txt"
    assert copy.read_text(encoding="utf-8") == LINES
    assert f"standard input ({len(LINES.encode()):,} bytes) is kept in {copy}" in err
    assert "corpus stdin:" in err


def test_eval_reads_the_kept_copy_or_standard_input(stdin_run):
    tmp, data_dir, _ = stdin_run
    run = tmp / "run"
    recorded = json.loads((run / "best" / "config.json").read_text(encoding="utf-8"))["val"]
    # The validation split, without standard input.
    validation = charlstm(["eval", run, "--json", "--device", "cpu"], data_dir, tmp)
    ok(validation)
    assert json.loads(validation.stdout)["loss"] == pytest.approx(recorded["loss"], abs=1e-6)
    # Other text, piped in, scores as the same text in a file does.
    text = LINES[:3000]
    (tmp / "other.txt").write_text(text, encoding="utf-8")
    piped = charlstm(
        ["eval", run, "--data", "-", "--json", "--device", "cpu"], data_dir, tmp, text.encode()
    )
    ok(piped)
    from_file = charlstm(
        ["eval", run, "--data", tmp / "other.txt", "--json", "--device", "cpu"], data_dir, tmp
    )
    ok(from_file)
    assert json.loads(piped.stdout) == json.loads(from_file.stdout)


def test_resuming_with_the_same_text_piped_again(stdin_run, tmp_path):
    tmp, data_dir, _ = stdin_run
    run = shutil.copytree(tmp / "run", tmp_path / "run")
    args = ["train", "--resume", run, "--data", "-", "--max-steps", "8"]
    resumed = charlstm(args, data_dir, tmp, stdin=LINES.encode())
    assert f"resuming {run} at step 5" in ok(resumed)
    other = charlstm(args, data_dir, tmp, stdin=LINES.replace("fox", "cat").encode())
    assert other.returncode == 2
    assert other.stderr.decode().splitlines()[-1] == (
        f"error: the training text differs from the one {run} was trained on; resume with the "
        "same --data, or start a new run"
    )


def test_resuming_without_standard_input_and_the_default_run_name(stdin_run, tmp_path):
    tmp, data_dir, _ = stdin_run
    run = shutil.copytree(tmp / "run", tmp_path / "run")
    resumed = charlstm(["train", "--resume", run, "--max-steps", "8"], data_dir, tmp)
    assert f"resuming {run} at step 5" in ok(resumed)
    args = ["train", "--data", "-", "--max-steps", "2", *TRAIN]
    ok(charlstm(args, data_dir, tmp_path, stdin=LINES.encode()))
    (name,) = [p.name for p in (tmp_path / "runs").iterdir()]
    assert re.fullmatch(r"stdin-\d{8}-\d{6}", name)
