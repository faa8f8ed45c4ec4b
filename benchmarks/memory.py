"""Large corpora end to end: time to the first step and peak memory of the default command.

    python benchmarks/memory.py [--megabytes 100 1000] [--budget 3m]

Builds each corpus from the Python source files on this machine (the standard library and
every installed package, thousands of distinct symbols), repeated until it is large enough,
then runs the command a user types, ``charlstm train --data big.txt --time-budget BUDGET``, in
a child process: once on a fresh cache (scanning, encoding and memory-mapping the corpus) and
once more on the same files (the cached scan and encoding reused). For each it reports the
seconds from starting the process to the first training step, the steps trained, the share of
the run spent evaluating, the validation characters the closing evaluation scored, and the
child's peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from common import machine, print_table

from charlstm.config import parse_duration


def source_files() -> list[Path]:
    """Every ``*.py`` file of the standard library and the installed packages, sorted."""
    roots = {Path(sysconfig.get_paths()[key]) for key in ("stdlib", "purelib", "platlib")}
    return sorted({p for root in roots if root.is_dir() for p in root.rglob("*.py")})


def build_corpus(path: Path, megabytes: int) -> int:
    """Python source repeated until about ``megabytes`` million bytes: returns the size
    written."""
    target, written = megabytes * 1_000_000, 0
    files = source_files()
    with open(path, "wb") as out:
        while written < target - 4:
            for source in files:
                text = source.read_text(encoding="utf-8", errors="replace")  # a few are not UTF-8
                # Cut on a character boundary, so the corpus is valid UTF-8 to its last byte.
                piece = text.encode()[: target - written].decode(errors="ignore").encode()
                out.write(piece)
                written += len(piece)
                if written >= target:
                    break
    return written


def run(command: list[str], env: dict[str, str], log: Path) -> tuple[float, float, float]:
    """(seconds to the first step, wall seconds, peak RSS in MB) of ``command`` in a child whose
    standard error goes to ``log``: the first step comes right after its ``set-up:`` line."""
    start = time.perf_counter()
    with open(log, "w") as err:
        child = subprocess.Popen([sys.executable, *command], env=env, stderr=err)
    first_step = float("nan")
    while True:
        done, status, usage = os.wait4(child.pid, os.WNOHANG)  # this child's own usage
        if done:
            break
        if first_step != first_step and "\nset-up: " in log.read_text():
            first_step = time.perf_counter() - start
        time.sleep(0.05)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed: {log.read_text()[-2000:]}")
    return first_step, time.perf_counter() - start, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--budget", default="3m")
    args = parser.parse_args()
    rows = []
    for megabytes in args.megabytes:
        with tempfile.TemporaryDirectory() as work_dir:
            work = Path(work_dir)
            corpus = work / "big.txt"
            size = build_corpus(corpus, megabytes)
            env = dict(os.environ, CHARLSTM_DATA_DIR=str(work / "cache"))
            for attempt in ("fresh cache", "cached"):
                out = work / "run"
                command = ["-m", "charlstm", "train", "--data", str(corpus), "--out", str(out),
                           "--overwrite", "--time-budget", args.budget,
                           "--sample-length", "0"]  # fmt: skip
                first, wall, peak = run(command, env, work / "stderr.txt")
                records = [json.loads(line) for line in (out / "metrics.jsonl").open()]
                evaluating = sum(r.get("seconds", 0.0) for r in records)
                steps = max(r["step"] for r in records)
                scored = [r["characters"] for r in records if r["kind"] in ("eval", "final")]
                rows.append([f"{size / 1e6:,.0f} MB", attempt, first, steps, evaluating / wall,
                             scored[-1], wall, peak])  # fmt: skip
                print(rows[-1], file=sys.stderr)
    print(machine())
    print(f"charlstm train --data big.txt --time-budget {args.budget} "
          f"({parse_duration(args.budget):.0f} s)")  # fmt: skip
    print_table(
        ["corpus", "run", "s to first step", "steps", "share evaluating",
         "val chars scored at the end", "wall s", "peak RSS (MB)"],
        rows,
    )  # fmt: skip


if __name__ == "__main__":
    main()
