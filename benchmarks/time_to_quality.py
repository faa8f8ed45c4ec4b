"""Time to quality on Tiny Shakespeare: the best validation loss reached within a wall-clock
budget that includes start-up and evaluation, charlstm's preset against the plain loop.

    python benchmarks/time_to_quality.py [--budgets 1m 5m 20m] [--no-plain] [--dynamic]

charlstm runs as the real command (``charlstm train --preset BUDGET``) in a subprocess, timed
from before the process starts; the plain loop trains in this process until its budget, less
the time its evaluation needs, runs out. Both are scored two ways on the last 10% of the text:
as one stream with the state carried (charlstm's metric) and with the state reset every 128
characters (how windowed trainers such as the plain loop are scored).

With ``--dynamic`` each run also scores the stream by dynamic evaluation (``charlstm eval
--dynamic``: the model keeps learning from the validation text it has scored), inside the
same budget: training stops early by the time that evaluation is measured to need.
"""

from __future__ import annotations

import argparse
import json
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
from charlstm.config import DynamicEvalConfig, RunConfig, parse_duration
from charlstm.evaluation import dynamic_evaluate_ids, evaluate_ids
from charlstm.model import CharRNN

WINDOW = 128
EVAL_STARTUP = 5.0  # seconds for `charlstm eval` to start and read the corpus (measured ~2 s)


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


def dynamic_eval_seconds(net: CharRNN, val: np.ndarray) -> float:
    """What dynamic evaluation of ``val`` costs ``net``: a tenth of it timed, times 10, plus
    a tenth for safety (the cost depends on the network's shape, not on its weights)."""
    start = time.perf_counter()
    dynamic_evaluate_ids(net, [val[: len(val) // 10]], DynamicEvalConfig())
    return (time.perf_counter() - start) * 11


def run_ours(budget: str, work: Path, dynamic: bool) -> list[object]:
    """[seconds, characters trained, stream loss, windowed loss, dynamic loss or "-"] of
    ``charlstm train --preset`` (then ``charlstm eval --dynamic``, with ``dynamic``)."""
    data_dir = work / "data"
    data_dir.mkdir()
    shutil.copy(corpus_path(), data_dir / "tinyshakespeare.txt")
    env = dict(os.environ, CHARLSTM_DATA_DIR=str(data_dir))
    out = work / f"ours-{budget}"
    _, val_ids, vocab = encoded_corpus()
    train_seconds = parse_duration(budget)
    if dynamic:
        shape = RunConfig().with_overrides({"preset": budget}).model
        net = CharRNN(shape, vocab)
        train_seconds -= dynamic_eval_seconds(net, val_ids.numpy()) + EVAL_STARTUP
    command = [sys.executable, "-m", "charlstm", "train", "--preset", budget,
               "--time-budget", f"{train_seconds:.1f}s", "--data", "tinyshakespeare",
               "--out", str(out), "--sample-length", "0"]  # fmt: skip
    evaluate = [sys.executable, "-m", "charlstm", "eval", str(out), "--dynamic", "--json"]
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env)
    if dynamic:  # without --data: the run's own validation split
        scored = subprocess.run(evaluate, check=True, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    model = charlstm.load(str(out / "best"), device="cpu")
    steps = charlstm.load(str(out / "last"), device="cpu").info["step"]  # the whole run's
    chars = steps * model.config.train.batch_size * model.config.train.seq_len
    adapted = json.loads(scored.stdout)["loss"] if dynamic else "-"
    windowed = windowed_loss(model.net, val_ids.numpy())
    return [seconds, chars, model.info["val"]["loss"], windowed, adapted]


def run_plain(budget_seconds: float, dynamic: bool) -> list[object]:
    """The plain loop trained until its budget (less its evaluation time) is used up."""
    start = time.perf_counter()
    train_ids, val_ids, vocab = encoded_corpus()
    trainer = PlainTrainer(train_ids, vocab)
    val = val_ids.numpy()
    probe = time.perf_counter()
    windowed_loss(plain_as_charrnn(trainer, vocab), val)
    evaluate_ids(plain_as_charrnn(trainer, vocab), [val])
    eval_seconds = time.perf_counter() - probe
    if dynamic:
        eval_seconds += dynamic_eval_seconds(plain_as_charrnn(trainer, vocab), val)
    steps = trainer.train_for(budget_seconds - (time.perf_counter() - start) - eval_seconds)
    net = plain_as_charrnn(trainer, vocab)
    stream = evaluate_ids(net, [val]).loss
    windowed = windowed_loss(net, val)
    adapted = dynamic_evaluate_ids(net, [val], DynamicEvalConfig()).loss if dynamic else "-"
    seconds = time.perf_counter() - start
    return [seconds, steps * trainer.batch * trainer.seq, stream, windowed, adapted]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", nargs="+", default=["1m"], help="presets to run")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain loop")
    parser.add_argument(
        "--dynamic", action="store_true", help="also score by dynamic evaluation, in budget"
    )
    args = parser.parse_args()
    rows = []
    for budget in args.budgets:
        with tempfile.TemporaryDirectory() as work:
            ours = run_ours(budget, Path(work), args.dynamic)
        rows.append([f"charlstm --preset {budget}", budget, *ours])
        if not args.no_plain:
            rows.append(["plain loop", budget, *run_plain(parse_duration(budget), args.dynamic)])
    print(machine())
    print_table(
        ["run", "budget", "wall s (all in)", "chars trained", "val loss, stream",
         f"val loss, reset every {WINDOW}", "val loss, stream, dynamic eval"],
        rows,
    )  # fmt: skip


if __name__ == "__main__":
    main()
