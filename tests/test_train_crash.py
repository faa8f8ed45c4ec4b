"""Never lose a run: real ``charlstm train`` processes killed with SIGKILL (between steps and in
the middle of a checkpoint write) or starved of disk space, then resumed with the same command.

A resumed run must end with the same metrics and the same weights, byte for byte, as a run that
was never interrupted.
"""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import read_metrics, without_timing

from charlstm.runlock import LOCK_FILE

pytestmark = pytest.mark.slow  # training processes killed and resumed, 150 steps each
TIMEOUT = 180
STEPS = 150
# A small, fast model, a checkpoint every 25 steps, dropout on (so the RNG state matters).
TRAIN = [
    "--max-steps", str(STEPS), "--eval-every", "25", "--log-every", "5", "--embed-dim", "16",
    "--hidden-dim", "32", "--n-layers", "2", "--dropout", "0.1", "--batch-size", "8",
    "--seq-len", "32", "--device", "cpu", "--precision", "fp32", "--sample-length", "0",
]  # fmt: skip

# Runs the CLI in a process that SIGKILLs itself at a chosen point of its n-th `last/` write:
# "mid-write" after the new weights are on disk in the temporary directory, "between-renames"
# after the old checkpoint was moved aside and before the new one took its place.
KILL_DURING_WRITE = """
import os, signal, sys
import charlstm.checkpoint as checkpoint
from charlstm.cli import main

where, nth = sys.argv[1], int(sys.argv[2])
seen = [0]
real_write_file, real_replace = checkpoint._write_file, os.replace

def maybe_die():
    seen[0] += 1
    if seen[0] == nth:
        os.kill(os.getpid(), signal.SIGKILL)

def write_file(path, data):
    real_write_file(path, data)
    if where == "mid-write" and path.name == "model.safetensors" and ".last.tmp-" in str(path):
        maybe_die()

def replace(src, dst):
    real_replace(src, dst)
    if where == "between-renames" and str(dst).endswith(".last.old"):
        maybe_die()

checkpoint._write_file, os.replace = write_file, replace
sys.exit(main(sys.argv[3:]))
"""


def command(corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(corpus), "--out", str(out), *TRAIN, *extra]


def start(args: list[str], *, script: list[str] | None = None, **popen) -> subprocess.Popen:
    prefix = [sys.executable, "-c", KILL_DURING_WRITE, *script] if script else [
        sys.executable, "-m", "charlstm",
    ]  # fmt: skip
    return subprocess.Popen(
        [*prefix, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen
    )


def finish(process: subprocess.Popen) -> tuple[int, str]:
    _, err = process.communicate(timeout=TIMEOUT)
    return process.returncode, err


def run_ok(args: list[str]) -> str:
    code, err = finish(start(args))
    assert code == 0, err
    assert "Traceback" not in err
    return err


def metrics_without_timing(run_dir: Path) -> list[dict]:
    return without_timing(read_metrics(run_dir))


def assert_same_run(resumed: Path, reference: Path) -> None:
    assert metrics_without_timing(resumed) == metrics_without_timing(reference)
    for name in ("best/model.safetensors", "last/model.safetensors", "last/resume.safetensors"):
        assert (resumed / name).read_bytes() == (reference / name).read_bytes(), name
    leftovers = [p for p in resumed.glob(".*") if p.name != LOCK_FILE]
    assert not leftovers, "temporary or set-aside checkpoints were left behind"


def checkpoint_bytes(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.glob("*/*")}


def last_step(run_dir: Path) -> int | None:
    try:
        return json.loads((run_dir / "last" / "config.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return None


@pytest.fixture(scope="module")
def reference(shakespeare_200k: Path, tmp_path_factory) -> Path:
    """An uninterrupted run of the command every test below interrupts."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run_ok(command(shakespeare_200k, out))
    return out


def test_sigkill_at_an_arbitrary_moment_then_resume_auto_matches_an_uninterrupted_run(
    shakespeare_200k, tmp_path, reference
):
    out = tmp_path / "run"
    process = start(command(shakespeare_200k, out, "--resume", "auto"))
    deadline = time.monotonic() + TIMEOUT
    while last_step(out) is None and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(random.uniform(0.0, 0.5))  # somewhere after the first checkpoint
    process.send_signal(signal.SIGKILL)
    code, _ = finish(process)
    assert code == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = last_step(out)
    assert killed_at is not None and killed_at < STEPS

    err = run_ok(command(shakespeare_200k, out, "--resume", "auto"))  # the very same command
    assert f"resuming {out} at step {killed_at}" in err
    assert_same_run(out, reference)


@pytest.mark.parametrize("where", ["mid-write", "between-renames"])
def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(
    shakespeare_200k, tmp_path, reference, where
):
    out = tmp_path / "run"
    # Die while last/ of step 75 is written (the 3rd write, but only the 2nd that sets an old
    # checkpoint aside): last/ from step 50 must survive it.
    nth = "3" if where == "mid-write" else "2"
    code, err = finish(start(command(shakespeare_200k, out), script=[where, nth]))
    assert code == -signal.SIGKILL, err
    leftovers = {p.name.split("-")[0] for p in out.glob(".*") if p.name != LOCK_FILE}
    if where == "mid-write":
        assert leftovers == {".last.tmp"}
        assert last_step(out) == 50
    else:  # the old checkpoint is set aside, the complete new one not yet in place
        assert leftovers == {".last.tmp", ".last.old"}
        assert not (out / "last").exists()

    err = run_ok(command(shakespeare_200k, out, "--resume", str(out)))
    assert f"resuming {out} at step 50" in err
    assert_same_run(out, reference)


def test_a_full_disk_stops_with_one_line_and_keeps_the_last_checkpoint(
    shakespeare_200k, tmp_path, reference
):
    out = tmp_path / "run"
    # A run that died after its checkpoint at step 25 (its 2nd write of last/ never finished).
    code, err = finish(start(command(shakespeare_200k, out), script=["mid-write", "2"]))
    assert code == -signal.SIGKILL, err
    before = checkpoint_bytes(out)

    def small_file_limit() -> None:
        # Any file over 64 KiB now fails to write (EFBIG), as on a full disk; the weights are
        # larger, the metrics log is not.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    resume = command(shakespeare_200k, out, "--resume", str(out))
    starved = start(resume, preexec_fn=small_file_limit)
    code, err = finish(starved)
    assert code == 2
    assert "Traceback" not in err
    # best/ is written first when the loss improved, so that is the write that fails.
    assert err.strip().splitlines()[-1] == (
        f"error: cannot write checkpoint {out / 'best'}: File too large "
        "(the previous checkpoint, if any, is intact)"
    )
    assert checkpoint_bytes(out) == before
    assert not list(out.glob(".best.tmp-*")), "the failed write left its temporary directory"

    # With space again, the same resume finishes the run as if nothing had happened.
    run_ok(resume)
    assert_same_run(out, reference)


def test_an_unusable_run_directory_is_one_line(shakespeare_200k, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code, err = finish(start(command(shakespeare_200k, blocker / "run")))
    assert code == 2
    assert err.strip().splitlines() == [
        f"error: cannot create run directory {blocker / 'run'}: Not a directory"
    ]
    assert os.path.isfile(blocker)
