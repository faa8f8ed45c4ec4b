"""One writer per run directory, readers that never repair, and starts that fail cleanly."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, run_cli, tiny_config

import charlstm
from charlstm.checkpoint import (
    CONFIG_FILE,
    FILES_KEY,
    RESUME_JSON_FILE,
    RESUME_TENSORS_FILE,
    read_checkpoint,
    read_resume_state,
    write_checkpoint,
)
from charlstm.config import RunConfig
from charlstm.data import Vocab
from charlstm.errors import CharLSTMError
from charlstm.model import CharRNN
from charlstm.runlock import LOCK_FILE, run_lock

pytestmark = pytest.mark.usefixtures("one_thread")

HOLD = """
import sys, time
from pathlib import Path
from charlstm.runlock import run_lock
with run_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(60)
"""


def hold_lock(run_dir: Path) -> subprocess.Popen:
    """Another process holding ``run_dir``'s lock, as a training run does."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_writer_is_refused_naming_the_holder_and_kill_9_frees_the_lock(tmp_path):
    run_dir = tmp_path / "run"
    holder = hold_lock(run_dir)
    try:
        with (
            pytest.raises(
                CharLSTMError, match=rf"in use by another training run \(pid {holder.pid}\)"
            ),
            run_lock(run_dir),
        ):
            pass
    finally:
        holder.kill()  # SIGKILL: the kernel releases the lock with the process
        holder.wait()
    with run_lock(run_dir):
        assert (run_dir / LOCK_FILE).read_text().strip() == str(os.getpid())


@pytest.mark.slow
@pytest.mark.parametrize("resume", [["--resume", "auto", "--out"], ["--resume"]])
def test_train_on_a_run_directory_in_use_is_one_line_and_touches_nothing(
    trained_run, shakespeare_200k, isolated_data_dir, tmp_path, resume
):
    run_dir = tmp_path / "run"
    subprocess.run(["cp", "-r", trained_run, run_dir], check=True)
    before = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    holder = hold_lock(run_dir)
    try:
        done = run_cli(["train", "--data", shakespeare_200k, "--max-steps", "80", *resume, run_dir],
                       isolated_data_dir, tmp_path)  # fmt: skip
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"in use by another training run (pid {holder.pid})" in lines[0]
    after = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert {k: v for k, v in after.items() if k.name != LOCK_FILE} == {
        k: v for k, v in before.items() if k.name != LOCK_FILE
    }


def test_a_run_that_fails_to_start_leaves_no_directory_behind(shakespeare_200k, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    out = tmp_path / "run"
    with pytest.raises(CharLSTMError):
        charlstm.train(tiny_config(shakespeare_200k, out, val_data=[str(empty)]), progress=False)
    assert not out.exists()
    # ...so the same command, corrected, just runs (no "already exists", no "not a run").
    result = charlstm.train(tiny_config(shakespeare_200k, out, max_steps=4), progress=False)
    assert result.steps == 4


def test_an_out_that_is_a_symbolic_link_is_refused_before_anything_is_deleted(
    trained_run, shakespeare_200k, tmp_path
):
    target = tmp_path / "target"
    subprocess.run(["cp", "-r", trained_run, target], check=True)
    link = tmp_path / "link"
    link.symlink_to(target)
    for settings in ({"overwrite": True}, {"resume": "auto"}):
        with pytest.raises(CharLSTMError, match=rf"{link} is a symbolic link; give .*{target}"):
            charlstm.train(tiny_config(shakespeare_200k, link, **settings), progress=False)
    assert (target / "best" / CONFIG_FILE).is_file() and (target / "last" / CONFIG_FILE).is_file()


# ---- readers and the writer at once ------------------------------------------------------


def small_checkpoint(directory: Path, seed: int) -> dict[str, torch.Tensor]:
    config = RunConfig().with_overrides({"embed_dim": 4, "hidden_dim": 8, "n_layers": 1})
    vocab = Vocab("text", tuple(ord(c) for c in "abcdef"))
    torch.manual_seed(seed)
    weights = CharRNN(config.model, vocab.size).state_dict()
    write_checkpoint(directory, config=config, vocab=vocab, weights=weights, info={"step": seed})
    return weights


@pytest.mark.slow
def test_readers_during_replacements_read_whole_checkpoints_and_never_break_the_writer(tmp_path):
    run = tmp_path / "run"
    versions = {seed: small_checkpoint(run / "best", seed) for seed in range(2)}
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        seed = 0
        try:
            while not stop.is_set():
                seed = 1 - seed
                small_checkpoint(run / "best", seed)
        except BaseException as e:  # reported by the test, not lost in the thread
            errors.append(e)

    thread = threading.Thread(target=writer)
    thread.start()
    reads, deadline = 0, time.monotonic() + 3.0
    try:
        while time.monotonic() < deadline and not errors:
            checkpoint = read_checkpoint(run)
            seed = checkpoint.info["step"]  # config.json and weights come from one checkpoint
            assert all(torch.equal(checkpoint.weights[k], v) for k, v in versions[seed].items())
            reads += 1
    finally:
        stop.set()
        thread.join()
    assert not errors, errors[0]
    assert reads > 20
    assert sorted(p.name for p in run.iterdir()) == ["best"]


def test_saving_over_a_symlinked_checkpoint_leaves_no_stray_link(tmp_path):
    run = tmp_path / "run"
    small_checkpoint(tmp_path / "elsewhere", seed=0)
    run.mkdir()
    (run / "last").symlink_to(tmp_path / "elsewhere")
    for seed in (1, 2):
        small_checkpoint(run / "last", seed)
        assert read_checkpoint(run / "last").info["step"] == seed
    assert sorted(p.name for p in run.iterdir()) == ["last"]


def test_checkpoints_are_created_with_the_umasks_mode_not_0700(tmp_path):
    small_checkpoint(tmp_path / "ck", seed=0)
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "ck").stat().st_mode & 0o777 == 0o777 & ~mask


# ---- damaged resume state ----------------------------------------------------------------


def replace_recorded(path: Path, data: bytes) -> None:
    """Write a checkpoint file and record it in config.json, as a writer with a bug would."""
    path.write_bytes(data)
    config = path.parent / CONFIG_FILE
    document = json.loads(config.read_text(encoding="utf-8"))
    document[FILES_KEY][path.name] = {
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    config.write_text(json.dumps(document), encoding="utf-8")


@pytest.fixture
def resumable(shakespeare_200k, tmp_path) -> Path:
    out = tmp_path / "run"
    charlstm.train(tiny_config(shakespeare_200k, out, max_steps=6, eval_every=3), progress=False)
    return out


@pytest.mark.parametrize(
    "change",
    [
        {"step": "six"},
        {"step": -1},
        {"elapsed": None},
        {"batcher": {"epoch": -3, "index": 0}},
        {"batcher": []},
        {"log_window": [1.0]},
        {"param_groups": "x"},
        {"best_val": "low"},
        {"eval_slice": -5},
    ],
)  # fmt: skip
def test_damaged_resume_json_is_one_error_naming_the_field(resumable, shakespeare_200k, change):
    path = resumable / "last" / RESUME_JSON_FILE
    state = json.loads(path.read_text(encoding="utf-8"))
    replace_recorded(path, json.dumps({**state, **change}).encode())
    config = tiny_config(shakespeare_200k, resumable, max_steps=9, resume=str(resumable))
    with pytest.raises(CharLSTMError, match=rf"resume state does not fit .*{next(iter(change))}"):
        charlstm.train(config, progress=False)


def test_a_missing_resume_field_is_one_error(resumable, shakespeare_200k):
    path = resumable / "last" / RESUME_JSON_FILE
    state = json.loads(path.read_text(encoding="utf-8"))
    del state["batcher"]
    replace_recorded(path, json.dumps(state).encode())
    config = tiny_config(shakespeare_200k, resumable, max_steps=9, resume=str(resumable))
    with pytest.raises(CharLSTMError, match=r"resume state does not fit .*lacks batcher"):
        charlstm.train(config, progress=False)


def test_resume_tensors_of_another_model_are_one_error(resumable, shakespeare_200k, tmp_path):
    other = tmp_path / "other"
    charlstm.train(tiny_config(shakespeare_200k, other, max_steps=3, hidden_dim=48), progress=False)
    replace_recorded(
        resumable / "last" / RESUME_TENSORS_FILE,
        (other / "last" / RESUME_TENSORS_FILE).read_bytes(),
    )
    config = tiny_config(shakespeare_200k, resumable, max_steps=9, resume=str(resumable))
    with pytest.raises(CharLSTMError, match=r"resume state does not fit this run"):
        charlstm.train(config, progress=False)


def test_damaged_lines_in_the_metrics_log_are_dropped_on_resume(resumable, shakespeare_200k):
    with open(resumable / "metrics.jsonl", "a", encoding="utf-8") as log:
        log.write('5\n[]\n{"step": "x"}\n{"step": -2, "kind": "train"}\n{"kind"\n')
    config = tiny_config(shakespeare_200k, resumable, max_steps=9, resume=str(resumable))
    charlstm.train(config, progress=False)
    records = read_metrics(resumable)
    assert all(isinstance(r, dict) and r["step"] >= 0 for r in records)
    assert records[-1]["step"] == 9


def test_a_changed_byte_in_a_checkpoint_file_is_an_error_never_a_different_model(resumable):
    for name in (RESUME_JSON_FILE, RESUME_TENSORS_FILE, "model.safetensors"):
        path = resumable / "last" / name
        data = bytearray(path.read_bytes())
        data[-3] ^= 0x01
        path.write_bytes(bytes(data))
        with pytest.raises(CharLSTMError, match=rf"{name} differs from the checksum"):
            charlstm.load(str(resumable / "last"), device="cpu")
            read_resume_state(resumable / "last")
        data[-3] ^= 0x01
        path.write_bytes(bytes(data))


def limit_file_size(limit: int):
    """For a subprocess: writes past ``limit`` bytes fail (EFBIG), as on a full disk."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write, do not kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.slow
def test_a_failed_metrics_write_is_one_line_and_the_run_resumes(shakespeare_200k, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "charlstm", "train", "--data", str(shakespeare_200k),
               "--out", str(out), "--embed-dim", "8", "--hidden-dim", "16", "--n-layers", "1",
               "--batch-size", "4", "--seq-len", "16", "--eval-every", "100", "--log-every", "1",
               "--max-steps", "600", "--sample-length", "0", "--device", "cpu"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          preexec_fn=limit_file_size(40_000))  # fmt: skip
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "cannot write" in lines[-1] and "metrics.jsonl" in lines[-1]
    assert "the last checkpoint is intact" in lines[-1]
    assert not list(out.glob("*.tmp"))
    resumed = subprocess.run([*command, "--resume", str(out)], capture_output=True, text=True,
                             timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    steps = [r["step"] for r in read_metrics(out)]
    assert steps[-1] == 600 and steps == sorted(steps)
