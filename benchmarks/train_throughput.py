"""Training throughput: charlstm's defaults against the plain loop, same model, same batch.

    python benchmarks/train_throughput.py [--steps 150]

Both train the 2-layer, 256-unit LSTM with 128-d embeddings on Tiny Shakespeare with batches of
64 x 128 for the same number of steps (so the same number of characters), one after the other
in this process. Prints characters per second, achieved GFLOP/s against this machine's measured
matmul peak, and the validation loss each reached (over the whole held-out 10% as one stream,
the same evaluator for both), with charlstm's figures as ratios to the plain loop's.
"""

from __future__ import annotations

import argparse
import json
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


def ours(steps: int, work: Path, dropout: float) -> tuple[float, float, CharRNN]:
    """(chars/s, seconds) of charlstm's default training with ``dropout``, and the network."""
    config = charlstm.RunConfig().with_overrides(
        {"data": [str(corpus_path())], "out": str(work / "ours"), "max_steps": steps,
         "eval_every": 10 * steps, "log_every": 10, "sample_length": 0,
         # The plain loop's model and batch, whatever the defaults are.
         "cell": "lstm", "embed_dim": 128, "hidden_dim": 256, "n_layers": 2,
         "batch_size": BATCH, "seq_len": SEQ, "dropout": dropout}
    )  # fmt: skip
    start = time.perf_counter()
    result = charlstm.train(config, progress=False)
    seconds = time.perf_counter() - start
    lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    speeds = [r["chars_per_s"] for r in records if r["kind"] == "train"][1:]  # skip warm-up
    return sum(speeds) / len(speeds), seconds, result.model.net


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps for each")
    args = parser.parse_args()
    train_ids, val_ids, vocab = encoded_corpus()
    peak32 = matmul_peak_gflops(torch.float32)
    peak16 = matmul_peak_gflops(torch.bfloat16)
    flops = flops_per_trained_char(ModelConfig(), vocab)

    val = val_ids.numpy()
    runs = {}  # dropout -> (chars/s, validation loss after the same steps)
    for dropout in (ModelConfig().dropout, 0.0):
        with tempfile.TemporaryDirectory() as work:
            speed, _, net = ours(args.steps, Path(work), dropout)
        runs[dropout] = speed, evaluate_ids(net.cpu(), [val]).loss
    plain_speed, trainer = plain(args.steps, train_ids, vocab)
    plain_val = evaluate_ids(plain_as_charrnn(trainer, vocab), [val]).loss

    print(machine())
    print(f"matmul peak: {peak32:,.0f} GFLOP/s fp32, {peak16:,.0f} GFLOP/s bf16; "
          f"{flops / 1e6:.2f} MFLOP per trained character; {args.steps} steps of "
          f"{BATCH} x {SEQ} each")  # fmt: skip
    precision = "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    gflops = {"fp32": peak32, "bf16": peak16}

    def row(name: str, speed: float, dtype: str, val_loss: float) -> list[object]:
        achieved = speed * flops / 1e9
        ratio = f"{achieved / gflops[dtype]:.0%} of {dtype}"
        return [name, speed, achieved, ratio, val_loss, f"{speed / plain_speed:.2f}x"]

    rows = [row("plain (fp32, random windows, AdamW 3e-4)", plain_speed, "fp32", plain_val)]
    for dropout, (speed, val_loss) in runs.items():
        how = "one batch shard per core" if dropout == 0 else "no shards: dropout"
        name = f"charlstm, dropout {dropout:g} ({precision}, stateful, {how})"
        rows.append(row(name, speed, precision, val_loss))
    headers = ["loop", "chars/s", "GFLOP/s", "of matmul peak", "val loss after", "speed vs plain"]
    print_table(headers, rows)


if __name__ == "__main__":
    main()
