"""Training throughput: charlstm against the plain loop, same model, same batch.

    python benchmarks/train_throughput.py [--steps 150] [--rounds 2]

Every loop trains the 2-layer, 256-unit LSTM with 128-d embeddings on Tiny Shakespeare with
batches of 64 x 128 for the same number of steps (so the same number of characters), in this
process: the plain loop; charlstm's defaults (dropout 0.2); charlstm without dropout;
on a CPU where the fused LSTM kernel runs, charlstm's defaults with it turned off
(``CHARLSTM_FUSED=0``: torch.nn.LSTM in bf16 autocast), which shows what the kernel
contributes; and on a CPU with AMX, the kernel on its other back end (``CHARLSTM_FUSED=avx512``).
Without native bf16 the matmul peak is measured in fp32 only. The loops take turns
``--rounds`` times and each reports its fastest round: on a shared machine the slower rounds
measure the neighbours.
The plain loop runs in a fresh interpreter each time, so that nothing charlstm sets for its
own process reaches it: above all the allocator setting that keeps freed memory in the
process (``charlstm.device.keep_freed_memory``), which a second plain row adds on purpose.
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
from common import (
    corpus_path,
    encoded_corpus,
    in_fresh_process,
    machine,
    matmul_peak_gflops,
    print_table,
)
from plain import PlainTrainer

import charlstm
from charlstm.config import ModelConfig
from charlstm.device import keep_freed_memory
from charlstm.evaluation import evaluate_ids
from charlstm.fused_lstm import _fused_lstm, available
from charlstm.model import CharRNN

BATCH, SEQ = 64, 128


def flops_per_trained_char(config: ModelConfig, vocab: int) -> float:
    """Multiply-adds of one character's forward pass, x2 for FLOPs, x3 for forward + backward."""
    forward = 0
    for layer in range(config.n_layers):
        width_in = config.embed_dim if layer == 0 else config.hidden_dim
        forward += (width_in + config.hidden_dim) * 4 * config.hidden_dim
    forward += config.hidden_dim * (config.n_layers if config.head_input == "all" else 1) * vocab
    return 2 * 3 * forward


def ours(steps: int, work: Path, dropout: float, kernel: str) -> tuple[float, CharRNN]:
    """Characters per second of charlstm's training with ``dropout`` and ``CHARLSTM_FUSED``
    set to ``kernel``, and the trained network."""
    config = charlstm.RunConfig().with_overrides(
        {"data": [str(corpus_path())], "out": str(work / "ours"), "max_steps": steps,
         "eval_every": 10 * steps, "log_every": 10, "sample_length": 0,
         # The plain loop's model and batch, whatever the defaults are.
         "cell": "lstm", "embed_dim": 128, "hidden_dim": 256, "n_layers": 2,
         "batch_size": BATCH, "seq_len": SEQ, "dropout": dropout}
    )  # fmt: skip
    os.environ["CHARLSTM_FUSED"] = kernel
    try:
        result = charlstm.train(config, progress=False)
    finally:
        del os.environ["CHARLSTM_FUSED"]
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


def _plain_job(steps: int, tuned_allocator: bool) -> tuple[float, float]:
    """(chars/s, validation loss) of the plain loop, with charlstm's allocator setting if
    ``tuned_allocator``; run through in_fresh_process."""
    if tuned_allocator:
        keep_freed_memory()
    train_ids, val_ids, vocab = encoded_corpus()
    speed, trainer = plain(steps, train_ids, vocab)
    return speed, evaluate_ids(plain_as_charrnn(trainer, vocab), [val_ids.numpy()]).loss


def plain_as_charrnn(trainer: PlainTrainer, vocab: int) -> CharRNN:
    """The plain model's weights in a CharRNN, so both are scored by the same evaluator."""
    net = CharRNN(ModelConfig(dropout=0.0, head_input="last"), vocab)
    net.embed.load_state_dict(trainer.model.embed.state_dict())
    net.rnn.load_state_dict(trainer.model.lstm.state_dict())
    net.head.load_state_dict(trainer.model.head.state_dict())
    return net


PLAIN = {  # name: with charlstm's allocator setting; the first is the baseline
    "plain (fp32, random windows, AdamW 3e-4)": False,
    "plain, keeping freed memory as charlstm does": True,
}
VARIANTS = {  # name: (dropout, CHARLSTM_FUSED)
    "charlstm defaults (dropout 0.2)": (ModelConfig().dropout, "1"),
    "charlstm, dropout 0": (0.0, "1"),
}
if available():  # elsewhere the defaults already run torch.nn.LSTM: this row would repeat them
    VARIANTS["charlstm defaults, CHARLSTM_FUSED=0 (torch.nn.LSTM)"] = (ModelConfig().dropout, "0")
if _fused_lstm is not None and "amx" in _fused_lstm.backends():
    VARIANTS["charlstm defaults, CHARLSTM_FUSED=avx512"] = (ModelConfig().dropout, "avx512")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps for each")
    parser.add_argument("--rounds", type=int, default=2, help="turns each loop takes")
    args = parser.parse_args()
    if args.steps < 20:  # charlstm's speed is read from its log windows of 10, the first skipped
        parser.error("--steps must be at least 20")
    _, val_ids, vocab = encoded_corpus()
    flops = flops_per_trained_char(ModelConfig(), vocab)
    plain_flops = flops_per_trained_char(ModelConfig(head_input="last"), vocab)
    val = val_ids.numpy()
    speeds: dict[str, list[float]] = {name: [] for name in [*PLAIN, *VARIANTS]}
    losses: dict[str, float] = {}
    # bf16 only where the CPU computes it natively: elsewhere it is emulated, and unused.
    native_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    precision = "bf16" if native_bf16 else "fp32"
    dtypes = (
        {"fp32": torch.float32, "bf16": torch.bfloat16} if native_bf16 else {"fp32": torch.float32}
    )
    peaks = dict.fromkeys(dtypes, 0.0)
    for _ in range(args.rounds):
        for name, dtype in dtypes.items():
            peaks[name] = max(peaks[name], matmul_peak_gflops(dtype))
        for name, tuned_allocator in PLAIN.items():
            speed, losses[name] = in_fresh_process(_plain_job, args.steps, tuned_allocator)
            speeds[name].append(speed)
        for name, (dropout, kernel) in VARIANTS.items():
            with tempfile.TemporaryDirectory() as work:
                speed, net = ours(args.steps, Path(work), dropout, kernel)
            speeds[name].append(speed)
            losses[name] = evaluate_ids(net.cpu(), [val]).loss

    print(machine())
    bf16_peak = f"{peaks['bf16']:,.0f} GFLOP/s bf16" if native_bf16 else "no native bf16"
    print(f"matmul peak: {peaks['fp32']:,.0f} GFLOP/s fp32, {bf16_peak}; "
          f"{flops / 1e6:.2f} MFLOP per trained character ({plain_flops / 1e6:.2f} in the plain "
          f"model, whose head reads one layer); {args.steps} steps of "
          f"{BATCH} x {SEQ} each; fastest of {args.rounds} rounds")  # fmt: skip
    plain_speed = max(speeds[next(iter(PLAIN))])
    rows = []
    for name, measured in speeds.items():
        dtype = "fp32" if name in PLAIN else precision
        speed = max(measured)
        achieved = speed * (plain_flops if name in PLAIN else flops) / 1e9
        rows.append([name, speed, achieved, f"{achieved / peaks[dtype]:.0%} of {dtype}",
                     losses[name], f"{speed / plain_speed:.2f}x"])  # fmt: skip
    headers = ["loop", "chars/s", "GFLOP/s", "of matmul peak", "val loss after", "speed vs plain"]
    print_table(headers, rows)


if __name__ == "__main__":
    main()
