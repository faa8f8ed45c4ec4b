"""Training with torch.distributed: real torchrun jobs of two CPU processes (gloo) on a tiny model.

Two processes with half the batch each must train the model one process trains with the whole
batch (up to float rounding); they must read disjoint streams that together cover the text, hold
identical parameters, stop together when one of them dies, and write checkpoints that resume on
another number of processes.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import read_metrics, text_prefix, tiny_config, without_timing
from safetensors import safe_open
from safetensors.torch import load_file

import charlstm
from charlstm import distributed
from charlstm.batching import IGNORE, StatefulBatcher, make_batcher
from charlstm.data import load_corpus

pytestmark = [
    pytest.mark.slow,  # torchrun: a few processes that each import torch, for every test
    pytest.mark.skipif(
        not torch.distributed.is_available() or sys.platform != "linux",
        reason="needs torch.distributed with gloo, on Linux",
    ),
    # In-process runs on one thread too, like each torchrun process.
    pytest.mark.usefixtures("one_thread"),
]

TIMEOUT = 120
# One model, one batch of 16 streams, constant learning rate after warm-up (so runs of different
# lengths share their first steps), a log line at every step and a checkpoint every 20.
SETTINGS = {
    "embed_dim": 32, "hidden_dim": 64, "n_layers": 2, "dropout": 0.0, "batch_size": 16,
    "seq_len": 64, "lr": 3e-3, "warmup_steps": 10, "schedule": "constant", "eval_every": 20,
    "log_every": 1, "precision": "fp32", "device": "cpu", "sample_length": 0,
}  # fmt: skip
# With 36,000 training characters, 16 streams of 2,249 or 2,250 pairs take 36 steps of 64: the
# last step of each epoch has one stream shorter than the others, in the second process's share.
STEPS_PER_EPOCH = 36
# Float rounding only: the per-process gradients are added in another order than in one process.
TOLERANCE = 1e-5

# Run under torchrun instead of `-m charlstm`: the same CLI, plus a look inside each process.
# CHARLSTM_TEST_DUMP=DIR: each process saves its parameters and best validation loss after
# training, and the targets of its share of every batch. CHARLSTM_TEST_KILL_AT=N: the process of
# rank 1 SIGKILLs itself when it is about to train step N + 1. CHARLSTM_TEST_NAN_AT=N: from step
# N + 1 on, the loss of rank 1's share is NaN (and its gradients stay finite).
PROBE = """
import os, signal, sys
import numpy as np
from safetensors.torch import save_file
from charlstm import batching
from charlstm.cli import main

from charlstm.session import TrainingSession
from charlstm.trainer import Trainer

rank = os.environ["RANK"]
dump, kill_at = os.environ.get("CHARLSTM_TEST_DUMP"), os.environ.get("CHARLSTM_TEST_KILL_AT")
nan_at = os.environ.get("CHARLSTM_TEST_NAN_AT")
real_run, real_step, real_rows = TrainingSession.run, Trainer.step, batching.Batch.rows
real_ddp_loss = Trainer._ddp_shard_loss
targets = []

def rows(self, which):
    share = real_rows(self, which)
    targets.append(share.targets.copy())
    return share

def run(self):
    result = real_run(self)
    if dump:
        weights = {k: v.detach().clone() for k, v in self.trainer.net.state_dict().items()}
        save_file(weights, f"{dump}/rank{rank}.safetensors", {"best_val": repr(self.best_val)})
        np.save(f"{dump}/targets{rank}.npy", np.stack([t for t in targets if t.shape[1] == 64]))
    return result

def step(self, lr):
    if rank == "1" and kill_at is not None and self.step_count == int(kill_at):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_step(self, lr)

def ddp_loss(self, *args, **kwargs):
    loss, grads, state = real_ddp_loss(self, *args, **kwargs)
    if rank == "1" and nan_at is not None and self.step_count >= int(nan_at):
        loss = loss * float("nan")
    return loss, grads, state

batching.Batch.rows, TrainingSession.run = rows, run
Trainer.step, Trainer._ddp_shard_loss = step, ddp_loss
sys.exit(main(sys.argv[1:]))
"""


def flags(**settings) -> list[str]:
    args = []
    for key, value in settings.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def train_args(corpus: Path, out: Path, **settings) -> list[str]:
    return ["train", "--data", str(corpus), "--out", str(out), *flags(**{**SETTINGS, **settings})]


def torchrun(
    args: list[str], *, probe: Path | None = None, env: dict | None = None, launcher=None
) -> subprocess.Popen:
    """A torchrun job of two local processes (or the launcher given) running ``charlstm``."""
    launcher = launcher or ["--standalone", "--nproc-per-node", "2"]
    program = [str(probe)] if probe else ["-m", "charlstm"]
    command = [sys.executable, "-m", "torch.distributed.run", *launcher, *program, *args]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment
    )


def finish(process: subprocess.Popen) -> tuple[int, str]:
    _, err = process.communicate(timeout=TIMEOUT)
    return process.returncode, err


def run_ok(args: list[str], **options) -> str:
    code, err = finish(torchrun(args, **options))
    assert code == 0, err
    assert "Traceback" not in err
    return err


def by_step(run_dir: Path, kind: str) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir, kind)}


def assert_same_trajectory(run: Path, reference: Path, steps: range) -> None:
    """Training and validation losses of ``steps`` agree to float rounding."""
    for kind in ("train", "eval"):
        ours, theirs = by_step(run, kind), by_step(reference, kind)
        shared = [s for s in steps if s in theirs]
        assert shared and all(s in ours for s in shared), (kind, sorted(ours))
        for step in shared:
            assert ours[step]["loss"] == pytest.approx(theirs[step]["loss"], abs=TOLERANCE), step
            if kind == "eval":
                assert ours[step]["characters"] == theirs[step]["characters"]


def step_of(checkpoint: Path) -> int:
    return json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))["step"]


@pytest.fixture(scope="module")
def corpus(shakespeare_200k: Path, tmp_path_factory) -> Path:
    """40,000 characters: 36,000 to train on, 4,000 to validate on (three evaluation segments)."""
    return text_prefix(shakespeare_200k, tmp_path_factory, 40_000)


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("probe") / "probe.py"
    path.write_text(PROBE, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def one_process(corpus: Path, tmp_path_factory) -> tuple[Path, Path]:
    """The reference: one process, the whole batch, 80 steps; and a copy of it at step 40."""
    out = tmp_path_factory.mktemp("one") / "run"
    charlstm.train(tiny_config(corpus, out, **SETTINGS, max_steps=40), progress=False)
    at_40 = out.parent / "at-40"
    shutil.copytree(out, at_40)
    config = tiny_config(corpus, out, **SETTINGS, max_steps=80, resume=str(out))
    charlstm.train(config, progress=False)
    return out, at_40


@pytest.fixture(scope="module")
def two_processes(corpus: Path, probe: Path, tmp_path_factory) -> Path:
    """Two processes of half the batch each, 60 steps, each dumping what it holds at the end."""
    out = tmp_path_factory.mktemp("two") / "run"
    dump = out.parent / "dump"
    dump.mkdir()
    err = run_ok(
        train_args(corpus, out, max_steps=60), probe=probe, env={"CHARLSTM_TEST_DUMP": str(dump)}
    )
    # Rank 0 alone talks: one announcement, one line per evaluation.
    assert err.count("run directory:") == 1
    assert err.count("step 20: validation loss") == 1
    assert "distributed: 2 processes (cpu), 8 streams each" in err
    return out


def test_every_process_holds_the_same_parameters(two_processes):
    dump = two_processes.parent / "dump"
    ranks = [load_file(dump / f"rank{r}.safetensors") for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    # ...which is what rank 0 saved to train on (model.safetensors holds their average), and a
    # model that learnt something.
    saved = load_file(two_processes / "last" / "resume.safetensors")
    weights = {name[len("train.") :]: v for name, v in saved.items() if name.startswith("train.")}
    assert weights.keys() == ranks[0].keys()
    assert all(torch.equal(weights[name], ranks[0][name]) for name in weights)
    assert by_step(two_processes, "train")[60]["loss"] < by_step(two_processes, "train")[1]["loss"]
    # The validation loss is all-reduced: both processes hold the same number, to the bit.
    best = []
    for r in (0, 1):
        with safe_open(dump / f"rank{r}.safetensors", "pt") as f:
            best.append(f.metadata()["best_val"])
    assert best[0] == best[1] != "None"


def test_two_processes_of_half_the_batch_follow_one_process_of_the_whole(
    two_processes, one_process, corpus
):
    reference, _ = one_process
    # Steps 1-60 span an epoch's end, where the two shares hold different numbers of targets.
    assert_same_trajectory(two_processes, reference, range(1, 61))
    assert by_step(two_processes, "train")[60]["epoch"] > 1
    # The split evaluation adds up to exactly what one process measures with those weights.
    logged = by_step(two_processes, "eval")[60]
    text = corpus.read_text(encoding="utf-8")[36_000:]
    alone = charlstm.load(str(two_processes / "last"), device="cpu").evaluate(text)
    assert logged["characters"] == alone.characters == 3_999
    assert logged["loss"] == pytest.approx(alone.loss, abs=1e-6)


def test_the_processes_read_disjoint_streams_that_cover_every_character(two_processes, corpus):
    dump = two_processes.parent / "dump"
    shares = [np.load(dump / f"targets{r}.npy")[: STEPS_PER_EPOCH - 1] for r in (0, 1)]
    config = tiny_config(corpus, two_processes, **SETTINGS)
    ids = load_corpus(config.data).train
    # Where each target of the first epoch comes from: the batcher over positions, not ids.
    positions = StatefulBatcher(np.arange(len(ids)), 16, 64, config.train.seed)
    seen = []
    for step in range(STEPS_PER_EPOCH):
        where = positions.next_batch().targets
        for rank in (0, 1):
            mine = where[8 * rank : 8 * (rank + 1)]
            if step < STEPS_PER_EPOCH - 1:  # full-width steps were recorded
                expected = np.where(mine == IGNORE, IGNORE, ids[np.maximum(mine, 0)])
                assert np.array_equal(shares[rank][step], expected), (step, rank)
            seen.append((rank, mine[mine != IGNORE]))
    by_rank = [np.concatenate([p for r, p in seen if r == rank]) for rank in (0, 1)]
    assert not set(by_rank[0].tolist()) & set(by_rank[1].tolist())  # disjoint
    everything = np.sort(np.concatenate(by_rank))
    assert np.array_equal(everything, np.arange(1, len(ids)))  # every character, once


@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_every_global_batch_is_split_into_equal_contiguous_shares(size):
    ids = np.arange(1_000)
    for mode in ("stateful", "random"):
        whole = make_batcher(mode, ids, 8, 7, seed=3)
        for _ in range(20):
            batch = whole.next_batch()
            shares = [batch.rows(distributed.World(r, size).rows(8)) for r in range(size)]
            assert all(len(s.inputs) == 8 // size for s in shares)
            assert np.array_equal(np.concatenate([s.targets for s in shares]), batch.targets)
            assert np.array_equal(np.concatenate([s.inputs for s in shares]), batch.inputs)


def test_a_batch_that_does_not_split_evenly_is_one_error_line_and_every_process_fails(
    corpus, tmp_path
):
    out = tmp_path / "run"
    code, err = finish(torchrun(train_args(corpus, out, batch_size=15, max_steps=5)))
    assert code != 0
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: --batch-size 15 is the global batch and must split evenly over the 2 processes "
        "of this job: use a multiple of 2 (14 or 16)"
    ]
    assert "exitcode  : 2" in err  # torchrun's summary: the processes failed with status 2
    assert not out.exists()


def test_killing_one_process_stops_the_job_and_resume_auto_finishes_it(corpus, probe, tmp_path):
    # Dropout on: each process draws its own masks, and the resumed run must restore them all.
    args = ["--max-steps", "60", "--dropout", "0.1", "--resume", "auto"]
    reference, out = tmp_path / "reference", tmp_path / "run"
    run_ok(train_args(corpus, reference) + args)

    killed = torchrun(
        train_args(corpus, out) + args, probe=probe, env={"CHARLSTM_TEST_KILL_AT": "30"}
    )
    code, err = finish(killed)
    assert code != 0, err
    assert "Signal 9 (SIGKILL) received" in err  # torchrun names the process that died...
    assert "error: lost contact with another process of this job" in err  # ...rank 0 stops
    assert step_of(out / "last") == 20

    err = run_ok(train_args(corpus, out) + args)  # the very same command
    assert f"resuming {out} at step 20" in err
    assert without_timing(read_metrics(out)) == without_timing(read_metrics(reference))
    for name in ("best/model.safetensors", "last/model.safetensors", "last/resume.safetensors"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name


def test_a_non_finite_loss_in_one_process_stops_every_process_at_the_same_step(
    corpus, probe, tmp_path
):
    out = tmp_path / "run"
    args = train_args(corpus, out, max_steps=40)
    code, err = finish(torchrun(args, probe=probe, env={"CHARLSTM_TEST_NAN_AT": "10"}))
    assert code != 0
    # Both processes skipped steps 11-15 together (rank 0's own loss was fine) and then stopped
    # with the same error, which rank 0 alone printed; nobody was left waiting for the other.
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: the loss was not finite (nan) for 5 steps in a row at step 11; try a lower "
        "--lr (now 0.003)"
    ]
    assert "exitcode  : 2" in err and "lost contact" not in err
    assert max(by_step(out, "train")) == 10


def test_a_two_process_checkpoint_resumes_in_one_process(
    two_processes, one_process, corpus, tmp_path, capsys
):
    reference, _ = one_process
    run = tmp_path / "run"
    shutil.copytree(two_processes, run)
    config = tiny_config(corpus, run, **SETTINGS, max_steps=80, resume=str(run))
    result = charlstm.train(config, progress=False)
    assert f"resuming {run} at step 60" in capsys.readouterr().err
    assert result.steps == 80
    # The carried state of all 16 streams was saved: one process continues every one of them.
    assert_same_trajectory(run, reference, range(61, 81))


def test_a_one_process_checkpoint_resumes_on_two_machines(one_process, corpus, tmp_path):
    reference, at_40 = one_process
    run = tmp_path / "run"
    shutil.copytree(at_40, run)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Two torchrun agents of one process each meet at a c10d rendezvous: the multi-node recipe.
    launcher = [
        "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "test",
    ]  # fmt: skip
    args = [*train_args(corpus, run, max_steps=60), "--resume", str(run)]
    nodes = [torchrun(args, launcher=launcher, env={"GLOO_SOCKET_IFNAME": "lo"}) for _ in "ab"]
    outputs = [finish(node) for node in nodes]
    for code, err in outputs:
        assert code == 0, err
    said = "".join(err for _, err in outputs)
    assert said.count(f"resuming {run} at step 40") == 1  # rank 0 only
    assert step_of(run / "last") == 60
    assert_same_trajectory(run, reference, range(41, 61))


def test_a_plain_run_never_touches_torch_distributed(corpus, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a single-process run initialised torch.distributed")

    monkeypatch.setattr(torch.distributed, "init_process_group", refuse)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.world() is distributed.SINGLE
    result = charlstm.train(tiny_config(corpus, tmp_path / "a", max_steps=3), progress=False)
    assert result.steps == 3 and result.model is not None
    # torchrun with one process is a plain run too.
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.world() is distributed.SINGLE
    assert charlstm.train(tiny_config(corpus, tmp_path / "b", max_steps=3), progress=False).steps
    assert not torch.distributed.is_initialized()
