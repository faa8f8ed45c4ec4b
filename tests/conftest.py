"""Shared fixtures: the benchmark corpus from ../shared, an isolated data cache, a tiny run."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import charlstm

SHARED_CORPUS = (
    Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"
)


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    """Tiny Shakespeare as shipped in ../shared (never committed to this repository)."""
    if not SHARED_CORPUS.exists():
        pytest.skip(f"benchmark corpus not found at {SHARED_CORPUS}")
    return SHARED_CORPUS


@pytest.fixture(scope="session")
def shakespeare_200k(shakespeare_path: Path, tmp_path_factory) -> Path:
    """The first 200,000 characters of Tiny Shakespeare, as a file."""
    return text_prefix(shakespeare_path, tmp_path_factory, 200_000)


def text_prefix(source: Path, tmp_path_factory, characters: int) -> Path:
    """The first ``characters`` characters of ``source``, as a new file."""
    path = tmp_path_factory.mktemp("corpus") / f"{source.stem}-{characters}.txt"
    path.write_text(source.read_text(encoding="utf-8")[:characters], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def small_corpus(shakespeare_200k: Path, tmp_path_factory) -> Path:
    """30,000 characters of Tiny Shakespeare: evaluations (and so tests) stay quick."""
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


@pytest.fixture(scope="session")
def session_data_dir(tmp_path_factory) -> Path:
    """A corpus cache for the whole session, seeded with Tiny Shakespeare when available."""
    directory = tmp_path_factory.mktemp("charlstm-data")
    if SHARED_CORPUS.exists():
        shutil.copy(SHARED_CORPUS, directory / "tinyshakespeare.txt")
    return directory


@pytest.fixture(autouse=True)
def isolated_data_dir(session_data_dir: Path, monkeypatch) -> Path:
    """No test reads or writes the user's real cache."""
    monkeypatch.setenv("CHARLSTM_DATA_DIR", str(session_data_dir))
    return session_data_dir


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
    charlstm.train(tiny_config(shakespeare_200k, out), progress=False)
    return out
