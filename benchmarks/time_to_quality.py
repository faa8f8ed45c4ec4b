"""Time to quality on Tiny Shakespeare: the best validation loss reached within a wall-clock
budget that includes start-up and evaluation, charlstm's preset against the plain loop.

    python benchmarks/time_to_quality.py [--budgets 1m 5m 20m] [--no-plain]

charlstm runs as the real command (``charlstm train --preset BUDGET``) in a subprocess, timed
from before the process starts; the plain loop trains in this process until its budget, less
the time its evaluation needs, runs out. Both are scored two ways on the last 10% of the text:
as one stream with the state carried (charlstm's metric) and with the state reset every 128
characters (how windowed trainers such as the plain loop are scored).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import corpus_path, encoded_corpus, machine, print_table
from plain import PlainTrainer
from train_throughput import plain_as_charrnn

import charlstm
from charlstm.config import parse_duration
from charlstm.evaluate import evaluate_ids
from charlstm.model import CharRNN

WINDOW = 128


@torch.no_grad()
def windowed_loss(net: CharRNN, ids: np.ndarray, window: int = WINDOW) -> float:
    """Mean loss over non-overlapping windows, each read from a zero state."""
    net.eval()
    usable = (len(ids) - 1) // window * window
    x = torch.from_numpy(ids[:usable].astype(np.int64)).view(-1, window)
    y = torch.from_numpy(ids[1 : usable + 1].astype(np.int64)).view(-1, window)
    total = 0.0
    for rows in range(0, len(x), 256):
        logits, _ = net(x[rows : rows + 256])
        total += float(F.cross_entropy(logits.flatten(0, 1), y[rows : rows + 256].flatten(),
                                       reduction="sum"))  # fmt: skip
    return total / usable


def run_ours(budget: str, work: Path) -> tuple[float, float, float, int]:
    """(seconds, stream loss, windowed loss, characters trained) of `charlstm train --preset`."""
    data_dir = work / "data"
    data_dir.mkdir()
    shutil.copy(corpus_path(), data_dir / "tinyshakespeare.txt")
    out = work / f"ours-{budget}"
    command = [sys.executable, "-m", "charlstm", "train", "--preset", budget,
               "--data", "tinyshakespeare", "--out", str(out), "--sample-length", "0"]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, check=True, env=dict(os.environ, CHARLSTM_DATA_DIR=str(data_dir)))
    seconds = time.perf_counter() - start
    model = charlstm.load(str(out / "best"), device="cpu")
    info = model.info
    _, val_ids, _ = encoded_corpus()
    steps = charlstm.load(str(out / "last"), device="cpu").info["step"]  # the whole run's
    chars = steps * model.config.train.batch_size * model.config.train.seq_len
    return seconds, info["val"]["loss"], windowed_loss(model.net, val_ids.numpy()), chars


def run_plain(budget_seconds: float) -> tuple[float, float, float, int]:
    """The plain loop trained until its budget (less its evaluation time) is used up."""
    start = time.perf_counter()
    train_ids, val_ids, vocab = encoded_corpus()
    trainer = PlainTrainer(train_ids, vocab)
    val = val_ids.numpy()
    probe = time.perf_counter()
    windowed_loss(plain_as_charrnn(trainer, vocab), val)
    evaluate_ids(plain_as_charrnn(trainer, vocab), [val])
    eval_seconds = time.perf_counter() - probe
    steps = trainer.train_for(budget_seconds - (time.perf_counter() - start) - eval_seconds)
    net = plain_as_charrnn(trainer, vocab)
    stream = evaluate_ids(net, [val]).loss
    windowed = windowed_loss(net, val)
    return time.perf_counter() - start, stream, windowed, steps * trainer.batch * trainer.seq


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", nargs="+", default=["1m"], help="presets to run")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain loop")
    args = parser.parse_args()
    rows = []
    for budget in args.budgets:
        with tempfile.TemporaryDirectory() as work:
            seconds, stream, windowed, chars = run_ours(budget, Path(work))
        rows.append([f"charlstm --preset {budget}", budget, seconds, chars, stream, windowed])
        if not args.no_plain:
            seconds, stream, windowed, chars = run_plain(parse_duration(budget))
            rows.append(["plain loop", budget, seconds, chars, stream, windowed])
    print(machine())
    print_table(
        ["run", "budget", "wall s (all in)", "chars trained", "val loss, stream",
         f"val loss, reset every {WINDOW}"],
        rows,
    )  # fmt: skip


if __name__ == "__main__":
    main()
