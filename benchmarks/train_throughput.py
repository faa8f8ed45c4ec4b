"""Training throughput: charlstm against the plain loop, same model, same batch.

    python benchmarks/train_throughput.py [--steps 150] [--rounds 2]

Every loop trains the 2-layer, 256-unit LSTM with 128-d embeddings on Tiny Shakespeare with
batches of 64 x 128 for the same number of steps (so the same number of characters), in this
process: the plain loop; charlstm's defaults (dropout 0.2); charlstm without dropout; and
charlstm's defaults with its AMX kernel turned off (``CHARLSTM_AMX=0``: torch.nn.LSTM in bf16
autocast), which shows what the kernel contributes. The loops take turns ``--rounds`` times and
each reports its fastest round: on a shared machine the slower rounds measure the neighbours.
Prints characters per second, achieved GFLOP/s against this machine's measured matmul peak, and
the validation loss each reached (over the whole held-out 10% as one stream, the same evaluator
for all), with charlstm's figures as ratios to the plain loop's.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from common import corpus_path, encoded_corpus, machine, matmul_peak_gflops, print_table
from plain import PlainTrainer

import charlstm
from charlstm.config import ModelConfig
from charlstm.evaluate import evaluate_ids
from charlstm.model import CharRNN

BATCH, SEQ = 64, 128


def flops_per_trained_char(config: ModelConfig, vocab: int) -> float:
    """Multiply-adds of one character's forward pass, x2 for FLOPs, x3 for forward + backward."""
    forward = 0
    for layer in range(config.n_layers):
        width_in = config.embed_dim if layer == 0 else config.hidden_dim
        forward += (width_in + config.hidden_dim) * 4 * config.hidden_dim
    forward += config.hidden_dim * vocab
    return 2 * 3 * forward


def ours(steps: int, work: Path, dropout: float, kernel: bool) -> tuple[float, CharRNN]:
    """Characters per second of charlstm's training with ``dropout`` (the AMX kernel on or
    off), and the trained network."""
    config = charlstm.RunConfig().with_overrides(
        {"data": [str(corpus_path())], "out": str(work / "ours"), "max_steps": steps,
         "eval_every": 10 * steps, "log_every": 10, "sample_length": 0,
         # The plain loop's model and batch, whatever the defaults are.
         "cell": "lstm", "embed_dim": 128, "hidden_dim": 256, "n_layers": 2,
         "batch_size": BATCH, "seq_len": SEQ, "dropout": dropout}
    )  # fmt: skip
    os.environ["CHARLSTM_AMX"] = "1" if kernel else "0"
    try:
        result = charlstm.train(config, progress=False)
    finally:
        del os.environ["CHARLSTM_AMX"]
    lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    speeds = [r["chars_per_s"] for r in records if r["kind"] == "train"][1:]  # skip warm-up
    return sum(speeds) / len(speeds), result.model.net


def plain(steps: int, train_ids: torch.Tensor, vocab: int) -> tuple[float, PlainTrainer]:
    trainer = PlainTrainer(train_ids, vocab, BATCH, SEQ)
    trainer.step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps - 1):
        trainer.step()
    return (steps - 1) * BATCH * SEQ / (time.perf_counter() - start), trainer


def plain_as_charrnn(trainer: PlainTrainer, vocab: int) -> CharRNN:
    """The plain model's weights in a CharRNN, so both are scored by the same evaluator."""
    net = CharRNN(ModelConfig(dropout=0.0), vocab)
    net.embed.load_state_dict(trainer.model.embed.state_dict())
    net.rnn.load_state_dict(trainer.model.lstm.state_dict())
    net.head.load_state_dict(trainer.model.head.state_dict())
    return net


VARIANTS = {  # name: (dropout, AMX kernel)
    "charlstm defaults (dropout 0.2)": (ModelConfig().dropout, True),
    "charlstm, dropout 0": (0.0, True),
    "charlstm defaults, CHARLSTM_AMX=0 (torch.nn.LSTM)": (ModelConfig().dropout, False),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps for each")
    parser.add_argument("--rounds", type=int, default=2, help="turns each loop takes")
    args = parser.parse_args()
    train_ids, val_ids, vocab = encoded_corpus()
    flops = flops_per_trained_char(ModelConfig(), vocab)
    val = val_ids.numpy()
    speeds: dict[str, list[float]] = {name: [] for name in ["plain", *VARIANTS]}
    losses: dict[str, float] = {}
    peaks = {"fp32": 0.0, "bf16": 0.0}
    for _ in range(args.rounds):
        peaks["fp32"] = max(peaks["fp32"], matmul_peak_gflops(torch.float32))
        peaks["bf16"] = max(peaks["bf16"], matmul_peak_gflops(torch.bfloat16))
        speed, trainer = plain(args.steps, train_ids, vocab)
        speeds["plain"].append(speed)
        losses["plain"] = evaluate_ids(plain_as_charrnn(trainer, vocab), [val]).loss
        for name, (dropout, kernel) in VARIANTS.items():
            with tempfile.TemporaryDirectory() as work:
                speed, net = ours(args.steps, Path(work), dropout, kernel)
            speeds[name].append(speed)
            losses[name] = evaluate_ids(net.cpu(), [val]).loss

    print(machine())
    print(f"matmul peak: {peaks['fp32']:,.0f} GFLOP/s fp32, {peaks['bf16']:,.0f} GFLOP/s bf16; "
          f"{flops / 1e6:.2f} MFLOP per trained character; {args.steps} steps of "
          f"{BATCH} x {SEQ} each; fastest of {args.rounds} rounds")  # fmt: skip
    precision = "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    plain_speed = max(speeds["plain"])
    rows = []
    for name, measured in speeds.items():
        dtype = "fp32" if name == "plain" else precision
        speed = max(measured)
        achieved = speed * flops / 1e9
        label = "plain (fp32, random windows, AdamW 3e-4)" if name == "plain" else name
        rows.append([label, speed, achieved, f"{achieved / peaks[dtype]:.0%} of {dtype}",
                     losses[name], f"{speed / plain_speed:.2f}x"])  # fmt: skip
    headers = ["loop", "chars/s", "GFLOP/s", "of matmul peak", "val loss after", "speed vs plain"]
    print_table(headers, rows)


if __name__ == "__main__":
    main()
