"""The default command on the corpus suite: does every automatic decision hold off the benchmark?

    python benchmarks/corpora.py [--budgets 90s 5m 20m] [--corpora shakespeare python russian small]
                                 [--no-plain]

For each corpus of :mod:`charlstm.suite` (built on this machine) and each budget, runs the
default command a user types, ``charlstm train --data FILE --time-budget BUDGET``, in a
subprocess, and reads its log: steps, training speed, the set-up before the first step (reading
the corpus and the speed probes; the imports before ``train()`` are not counted), the share of
the run spent evaluating, the best validation loss in bits per character and how many validation
characters it was scored on. Beside it: the corpus's unigram entropy (what a model that only
counts characters reaches) and the plain hand-written loop (``plain.py``) trained for the same
wall time on the same split.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import in_fresh_process, machine, print_table
from plain import PlainTrainer
from train_throughput import plain_as_charrnn

import charlstm
from charlstm.config import parse_duration
from charlstm.data import load_corpus
from charlstm.evaluate import evaluate_ids
from charlstm.suite import SUITE, build_suite_corpus

SAMPLE_CHARS = 240


def run_ours(path: Path, budget: str, out: Path) -> tuple[list[object], str]:
    """The default command on ``path``; returns its table cells and the start of its sample."""
    command = [sys.executable, "-m", "charlstm", "train", "--data", str(path), "--time-budget",
               budget, "--out", str(out), "--sample-length", str(SAMPLE_CHARS)]  # fmt: skip
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
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


def run_plain(path: Path, seconds: float) -> float:
    """Best bpc of the plain loop trained for ``seconds`` (its evaluation included) on the
    same training and validation split charlstm uses."""
    began = time.perf_counter()
    corpus = load_corpus(charlstm.RunConfig().with_overrides({"data": [str(path)]}).data)
    train = torch.from_numpy(np.asarray(corpus.train, dtype=np.int64))
    trainer = PlainTrainer(train, corpus.vocab.size)
    probe = time.perf_counter()
    evaluate_ids(plain_as_charrnn(trainer, corpus.vocab.size), [corpus.val])
    evaluation = time.perf_counter() - probe
    trainer.train_for(seconds - (time.perf_counter() - began) - evaluation)
    net = plain_as_charrnn(trainer, corpus.vocab.size)
    return evaluate_ids(net, [corpus.val]).bpc


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
    args = parser.parse_args()
    rows, samples = [], []
    with tempfile.TemporaryDirectory() as work:
        for name in args.corpora:
            path = build_suite_corpus(name, Path(work) / "suite")
            text = path.read_text(encoding="utf-8")
            size = f"{len(text) / 1e6:.2f} M chars, {len(set(text))} symbols"
            for budget in args.budgets:
                ours, sample = run_ours(path, budget, Path(work) / f"{name}-{budget}")
                plain = "-"
                if not args.no_plain:
                    plain = in_fresh_process(run_plain, path, parse_duration(budget))
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
