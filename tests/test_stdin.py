"""``--data -``: training and evaluating on standard input, as real ``charlstm`` processes.

Standard input can be read once, so training keeps a copy of it (in the data cache, named by
the corpus's fingerprint, which the checkpoint records): evaluating the validation split and
resuming later need no standard input, and piping the same text again resumes too.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
from conftest import FAST_TRAIN, run_cli

pytestmark = pytest.mark.slow  # every test runs two or three commands in subprocesses
LINES = "".join(f"{i}: the quick brown fox jumps over the lazy dog — ünïcödé\n" for i in range(300))


def ok(result) -> str:
    """The command's stderr, after checking that it succeeded."""
    assert result.returncode == 0, result.stderr
    return result.stderr


@pytest.fixture(scope="module")
def stdin_run(tmp_path_factory):
    """A run trained for 2 steps on text piped into ``charlstm train --data -``."""
    tmp = tmp_path_factory.mktemp("stdin")
    data_dir = tmp / "data"
    result = run_cli(
        ["train", "--data", "-", "--out", tmp / "run", *FAST_TRAIN], data_dir, tmp, input=LINES
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
    validation = run_cli(["eval", run, "--json", "--device", "cpu"], data_dir, tmp)
    ok(validation)
    assert json.loads(validation.stdout)["loss"] == pytest.approx(recorded["loss"], abs=1e-6)
    # Other text, piped in, scores as the same text in a file does.
    text = LINES[:3000]
    (tmp / "other.txt").write_text(text, encoding="utf-8")
    piped = run_cli(
        ["eval", run, "--data", "-", "--json", "--device", "cpu"], data_dir, tmp, input=text
    )
    ok(piped)
    from_file = run_cli(
        ["eval", run, "--data", tmp / "other.txt", "--json", "--device", "cpu"], data_dir, tmp
    )
    ok(from_file)
    assert json.loads(piped.stdout) == json.loads(from_file.stdout)


def test_resuming_with_the_same_text_piped_again(stdin_run, tmp_path):
    tmp, data_dir, _ = stdin_run
    run = shutil.copytree(tmp / "run", tmp_path / "run")
    args = ["train", "--resume", run, "--data", "-", "--max-steps", "4"]
    resumed = run_cli(args, data_dir, tmp, input=LINES)
    assert f"resuming {run} at step 2" in ok(resumed)
    other = run_cli(args, data_dir, tmp, input=LINES.replace("fox", "cat"))
    assert other.returncode == 2
    assert other.stderr.splitlines()[-1] == (
        f"error: the training text differs from the one {run} was trained on; resume with the "
        "same --data, or start a new run"
    )


def test_resuming_without_standard_input_and_the_default_run_name(stdin_run, tmp_path):
    tmp, data_dir, _ = stdin_run
    run = shutil.copytree(tmp / "run", tmp_path / "run")
    resumed = run_cli(["train", "--resume", run, "--max-steps", "4"], data_dir, tmp)
    assert f"resuming {run} at step 2" in ok(resumed)
    args = ["train", "--data", "-", *FAST_TRAIN]
    ok(run_cli(args, data_dir, tmp_path, input=LINES))
    (name,) = [p.name for p in (tmp_path / "runs").iterdir()]
    assert re.fullmatch(r"stdin-\d{8}-\d{6}", name)
