"""A 200 MB corpus: Ctrl-C while it is scanned or encoded stops the load at once, and leaves
no partial cache file behind; a finished load is cached, and the next one starts at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a 200 MB corpus, loaded and interrupted in subprocesses
SIZE = 200 << 20
LOAD = (
    "import sys\n"
    "from charlstm.config import DataConfig\n"
    "from charlstm.data import load_corpus\n"
    "corpus = load_corpus(DataConfig(data=[sys.argv[1]]))\n"
    "print(len(corpus.train) + len(corpus.val))\n"
)


def write_corpus(path: Path, size: int) -> int:
    """About ``size`` bytes of text, a thousand lines over and over; returns its length in
    characters."""
    lines = "".join(f"line {i}: the quick brown fox jumps over the lazy dog — ü {i * i}\n"
                    for i in range(1000))  # fmt: skip
    block = lines.encode("utf-8")
    with open(path, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
    return size // len(block) * len(lines)


def start_load(path: Path, cache: Path) -> tuple[subprocess.Popen, list[bytes]]:
    """A fresh process loading ``path``, and the list its stderr is gathered into."""
    env = dict(os.environ, CHARLSTM_DATA_DIR=str(cache))
    process = subprocess.Popen(
        [sys.executable, "-c", LOAD, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    gathered: list[bytes] = []

    def gather() -> None:  # a progress bar rewrites its line: read bytes, not lines
        while chunk := os.read(process.stderr.fileno(), 4096):
            gathered.append(chunk)

    threading.Thread(target=gather, daemon=True).start()
    return process, gathered


def wait_for(gathered: list[bytes], text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text.encode() not in b"".join(gathered):
        assert time.monotonic() < deadline, f"{text!r} never shown: {b''.join(gathered)!r}"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("big") / "big.txt"
    characters = write_corpus(path, SIZE)
    yield path, characters
    path.unlink()  # 200 MB: not left behind in pytest's kept temporary directories


@pytest.mark.parametrize("phase", ["scanning the corpus", "encoding the corpus"])
def test_ctrl_c_while_loading_stops_at_once_and_leaves_no_partial_cache(
    big_corpus, tmp_path, phase
):
    cache = tmp_path / "cache"
    process, gathered = start_load(big_corpus[0], cache)
    try:
        wait_for(gathered, phase)  # the progress bar of this phase is up: it has begun
        time.sleep(0.3)
        process.send_signal(signal.SIGINT)
        sent = time.monotonic()
        process.wait(timeout=30)
        stopped = time.monotonic() - sent
    finally:
        process.kill()
    assert process.returncode != 0
    assert b"KeyboardInterrupt" in b"".join(gathered)
    assert stopped < 1.0, f"{stopped:.2f} s to stop"
    files = sorted(p.name for p in cache.rglob("*") if p.is_file()) if cache.exists() else []
    # No partial file: only the scan, if it finished (the encoding starts after it).
    assert [name.split(".", 1)[1] for name in files] == (
        ["scan.json"] if "encoding" in phase else []
    )


def test_a_large_corpus_loads_once_then_from_its_cache(big_corpus, tmp_path):
    path, characters = big_corpus
    cache = tmp_path / "cache"
    timings = []
    for _ in range(2):
        began = time.monotonic()
        process, gathered = start_load(path, cache)
        out, _ = process.communicate(timeout=300)
        timings.append(time.monotonic() - began)
        assert process.returncode == 0, b"".join(gathered)
        assert int(out) == characters
    err = b"".join(gathered).decode()
    assert "scanning" not in err and "encoding" not in err  # nothing read the second time
    assert timings[1] < 1.5  # the process's start-up and imports, and no reading
    names = sorted(p.name.split(".", 1)[1] for p in (cache / "encoded").iterdir())
    assert names == ["npy", "scan.json"]
