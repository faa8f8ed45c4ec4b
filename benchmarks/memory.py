"""Peak memory of training and evaluation on a 500 MB corpus.

    python benchmarks/memory.py [--megabytes 500]

Builds a corpus of the given size by repeating Tiny Shakespeare into a temporary directory,
then runs the real command, ``charlstm train`` (a few steps, one evaluation over the whole
held-out 10%) and ``charlstm eval`` over that held-out part, each in its own process, and
reports each one's peak resident memory. The encoded corpus is memory-mapped at one byte per
character, so memory should not grow with the corpus. The model is kept small so that scoring
50 MB of validation text takes a minute, not an hour: memory is about the data path.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from common import corpus_path, machine, print_table

SMALL_MODEL = ["--embed-dim", "16", "--hidden-dim", "32", "--n-layers", "1"]


def build_corpus(path: Path, megabytes: int) -> int:
    piece = corpus_path().read_bytes()
    target = megabytes * 1_000_000
    with open(path, "wb") as f:
        written = 0
        while written < target:
            chunk = piece[: target - written]
            f.write(chunk)
            written += len(chunk)
    return written


def peak_of(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of a child process."""
    start = time.perf_counter()
    pid = os.spawnve(os.P_NOWAIT, sys.executable, [sys.executable, *command], env)
    _, status, usage = os.wait4(pid, 0)  # this child's own resource usage
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed with status {status}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work_dir:
        work = Path(work_dir)
        corpus = work / "big.txt"
        size = build_corpus(corpus, args.megabytes)
        held_out = work / "held_out.txt"
        with open(corpus, "rb") as f:
            f.seek(size - size // 10)
            held_out.write_bytes(f.read())
        env = dict(os.environ, CHARLSTM_DATA_DIR=str(work / "cache"))
        train = ["-m", "charlstm", "train", "--data", str(corpus), "--out", str(work / "run"),
                 "--max-steps", "20", "--eval-every", "20", "--sample-length", "0",
                 *SMALL_MODEL]  # fmt: skip
        evaluate = ["-m", "charlstm", "eval", str(work / "run"), "--data", str(held_out)]
        train_seconds, train_peak = peak_of(train, env)
        eval_seconds, eval_peak = peak_of(evaluate, env)
    print(machine())
    print_table(
        ["job", "corpus", "seconds", "peak RSS (MB)"],
        [
            ["charlstm train (encode + mmap, 20 steps, 1 full evaluation)",
             f"{size / 1e6:.0f} MB", train_seconds, train_peak],
            ["charlstm eval of the held-out 10%", f"{size / 1e7:.0f} MB", eval_seconds,
             eval_peak],
        ],
    )  # fmt: skip


if __name__ == "__main__":
    main()
