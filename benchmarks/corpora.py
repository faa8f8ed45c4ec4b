"""The default command on the corpus suite: does every automatic decision hold off the benchmark?

    python benchmarks/corpora.py [--budgets 90s 5m 20m] [--corpora shakespeare python russian small]
                                 [--no-plain] [--side-by-side]

For each corpus of :mod:`charlstm.suite` (built on this machine) and each budget, runs the
default command a user types, ``charlstm train --data FILE --time-budget BUDGET``, in a
subprocess, and reads its log: steps, training speed, the set-up before the first step (reading
the corpus and the speed probes; the imports before ``train()`` are not counted), the share of
the run spent evaluating, the best validation loss in bits per character and how many validation
characters it was scored on. Beside it: the corpus's unigram entropy (what a model that only
counts characters reaches) and the plain hand-written loop (``plain.py``) trained for the same
wall time on the same split. With ``--side-by-side`` the two run at once, each pinned to one
core with one thread (half the wall time of a long budget, on a machine of two cores or more).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from common import in_fresh_process, machine, print_table
from plain import PlainTrainer
from train_throughput import plain_as_charrnn

import charlstm
from charlstm.config import parse_duration
from charlstm.data import load_corpus
from charlstm.evaluation import evaluate_ids
from charlstm.suite import SUITE, build_suite_corpus

SAMPLE_CHARS = 240


def run_ours(path: Path, budget: str, out: Path, core: int | None) -> tuple[list[object], str]:
    """The default command on ``path`` (on one ``core`` with one thread if given); returns its
    table cells and the start of its sample."""
    command = [sys.executable, "-m", "charlstm", "train", "--data", str(path), "--time-budget",
               budget, "--out", str(out), "--sample-length", str(SAMPLE_CHARS)]  # fmt: skip
    env = dict(os.environ)
    if core is not None:
        command = ["taskset", "--cpu-list", str(core), *command]
        env["OMP_NUM_THREADS"] = "1"
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - began
    if done.returncode != 0:
        return [f"failed: {done.stderr.strip().splitlines()[-1]}"] + ["-"] * 7, ""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    start = float(re.search(r"^set-up: ([\d.]+)s", done.stderr, re.M)[1])  # type: ignore[index]
    speeds = [r["chars_per_s"] for r in records if r["kind"] == "train"]
    evaluating = sum(r.get("seconds", 0.0) for r in records if r["kind"] in ("eval", "final"))
    best = charlstm.load(str(out / "best"), device="cpu").info["val"]
    steps = charlstm.load(str(out / "last"), device="cpu").info["step"]
    preset = next((line.split(":")[0] for line in done.stderr.splitlines()
                   if line.startswith("preset ")), "-")  # fmt: skip
    sample = done.stdout.strip().replace("\n", " | ")[:SAMPLE_CHARS]
    cells = [preset, steps, float(np.median(speeds)) if speeds else 0.0, start,
             evaluating / wall, wall, best["bpc"], best["characters"]]  # fmt: skip
    return cells, sample


def run_plain(path: Path, seconds: float, core: int | None) -> float:
    """Best bpc of the plain loop trained for ``seconds`` (its evaluation included) on the
    same training and validation split charlstm uses, on one ``core`` with one thread if given."""
    began = time.perf_counter()
    if core is not None:
        os.sched_setaffinity(0, {core})
        torch.set_num_threads(1)
    corpus = load_corpus(charlstm.RunConfig().with_overrides({"data": [str(path)]}).data)
    train = torch.from_numpy(np.asarray(corpus.train, dtype=np.int64))
    trainer = PlainTrainer(train, corpus.vocab.size)
    probe = time.perf_counter()
    evaluate_ids(plain_as_charrnn(trainer, corpus.vocab.size), [corpus.val])
    evaluation = time.perf_counter() - probe
    trainer.train_for(seconds - (time.perf_counter() - began) - evaluation)
    net = plain_as_charrnn(trainer, corpus.vocab.size)
    return evaluate_ids(net, [corpus.val]).bpc


def run_both(
    path: Path, budget: str, out: Path, no_plain: bool, side_by_side: bool
) -> tuple[list[object], str, object]:
    """charlstm's cells and sample, and the plain loop's bpc: one after the other on every core,
    or at once on a core each."""
    cores = (0, 1) if side_by_side else (None, None)
    with ThreadPoolExecutor(2) as pool:
        ours = pool.submit(run_ours, path, budget, out, cores[0])
        if not side_by_side:
            ours.result()
        plain = None
        if not no_plain:
            plain = pool.submit(in_fresh_process, run_plain, path, parse_duration(budget), cores[1])
        cells, sample = ours.result()
        return cells, sample, "-" if plain is None else plain.result()


def unigram_bits(path: Path) -> float:
    """Entropy of the corpus's character frequencies, bits per character."""
    counts = np.unique(np.frombuffer(path.read_text(encoding="utf-8").encode("utf-32-le"),
                                     dtype=np.uint32), return_counts=True)[1]  # fmt: skip
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", nargs="+", default=["90s", "5m"])
    parser.add_argument("--corpora", nargs="+", default=list(SUITE), choices=SUITE)
    parser.add_argument("--no-plain", action="store_true", help="skip the plain loop")
    parser.add_argument(
        "--side-by-side",
        action="store_true",
        help="run charlstm and the plain loop at once, one core and one thread each",
    )
    args = parser.parse_args()
    rows, samples = [], []
    with tempfile.TemporaryDirectory() as work:
        for name in args.corpora:
            path = build_suite_corpus(name, Path(work) / "suite")
            text = path.read_text(encoding="utf-8")
            size = f"{len(text) / 1e6:.2f} M chars, {len(set(text))} symbols"
            for budget in args.budgets:
                out = Path(work) / f"{name}-{budget}"
                ours, sample, plain = run_both(path, budget, out, args.no_plain, args.side_by_side)
                rows.append([name, size, budget, *ours, plain, unigram_bits(path)])
                samples.append(f"{name}, {budget}: {sample}")
                print(rows[-1], file=sys.stderr)
    print(machine())
    print_table(
        ["corpus", "size", "budget", "preset", "steps", "chars/s", "set-up s",
         "share evaluating", "wall s", "best val bpc", "val chars scored", "plain loop bpc",
         "unigram bpc"],
        rows,
    )  # fmt: skip
    print()
    for line in samples:
        print(f"- {line}")


if __name__ == "__main__":
    main()
