"""Sampling speed: charlstm's generator against the plain sampler, same model, same settings.

    python benchmarks/sampling_speed.py [--length 2000] [--checkpoint RUN_OR_CKPT]

Without a checkpoint the model is an untrained default-shaped one (2 x 256 LSTM, 128-d
embedding, Tiny Shakespeare's 65 symbols): speed does not depend on what the weights learnt.
The plain sampler runs the classic stack, whose head reads the last layer alone (all that
torch.nn.LSTM returns); charlstm is timed on exactly that model and on the model itself, whose
head (by default) reads every layer. The plain sampler is timed in fresh interpreters, its
fastest kept. Prints characters per second at batch 1 and charlstm's aggregate rate at batch
64, temperature 0.8 and top-p 0.9 throughout.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from common import in_fresh_process, machine, print_table
from plain import PlainCharLSTM, plain_sample

import charlstm
from charlstm.config import ModelConfig, RunConfig
from charlstm.data import Vocab
from charlstm.lm import CharLM
from charlstm.model import CharRNN

TEMPERATURE, TOP_P = 0.8, 0.9
# Timed inside this script's process, the plain sampler ran at about 500 or about 820 chars/s
# from one run to the next on the Zen 1 VM, whatever the code; in fresh interpreters it runs
# alike each time. The baseline is its fastest in this many of them.
PLAIN_PROCESSES = 3


def untrained_model(vocab_size: int = 65) -> CharLM:
    torch.manual_seed(0)
    net = CharRNN(ModelConfig(), vocab_size).eval()
    vocab = Vocab("text", (10, *range(32, 32 + vocab_size - 1)))  # newline and printable ASCII
    return CharLM(net, vocab, RunConfig())


def classic_twin(model: CharLM) -> CharLM:
    """The model with a head that reads the last layer alone: its head's columns for that
    layer (the model itself if its head reads nothing else)."""
    config = model.net.config
    if config.head_input == "last":
        return model
    net = CharRNN(dataclasses.replace(config, head_input="last"), model.net.vocab_size)
    weights = model.net.state_dict()
    weights["head.weight"] = weights["head.weight"][:, -config.hidden_dim :]
    net.load_state_dict(weights)
    return CharLM(net.eval(), model.vocab, model.config)


def plain_twin(model: CharLM) -> PlainCharLSTM:
    """The plain module carrying exactly the same weights as ``model`` (a classic stack)."""
    net = model.net
    plain = PlainCharLSTM(net.vocab_size, net.config.embed_dim, net.config.hidden_dim)
    plain.embed.load_state_dict(net.embed.state_dict())
    plain.lstm.load_state_dict(net.rnn.state_dict())
    plain.head.load_state_dict(net.head.state_dict())
    return plain.eval()


def rate(function, characters: int, repeats: int = 3) -> float:
    """Characters per second of the fastest of ``repeats`` runs (as timeit does: on a shared
    machine the slower runs measure the neighbours, not the code)."""
    function(min(characters, 50))  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function(characters)
        best = min(best, time.perf_counter() - start)
    return characters / best


def plain_rate_of(checkpoint: str | None, length: int) -> float:
    """The plain sampler's characters per second on the benchmark's model (see main)."""
    model = charlstm.load(checkpoint, device="cpu") if checkpoint else untrained_model()
    plain = plain_twin(classic_twin(model))
    return rate(lambda n: plain_sample(plain, 0, n, TEMPERATURE, TOP_P), length)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=2000, help="characters per measurement")
    parser.add_argument("--checkpoint", help="sample from this trained model instead")
    args = parser.parse_args()
    model = charlstm.load(args.checkpoint, device="cpu") if args.checkpoint else untrained_model()
    classic = classic_twin(model)
    settings = {"temperature": TEMPERATURE, "top_p": TOP_P, "seed": 0}

    plain_rate = max(
        in_fresh_process(plain_rate_of, args.checkpoint, args.length)
        for _ in range(PLAIN_PROCESSES)
    )
    classic_rate = rate(lambda n: classic.generate("\n", n, **settings), args.length)
    ours_rate = rate(lambda n: model.generate("\n", n, **settings), args.length)
    batch_rate = 64 * rate(
        lambda n: model.generate_batch(64, "\n", n, **settings), args.length // 4
    )

    head = "every" if model.net.config.head_input == "all" else "the last"
    print(machine())
    print_table(
        ["sampler", "batch", "chars/s", "vs plain"],
        [
            ["plain (module per step, sort for top-p, multinomial; fastest of "
             f"{PLAIN_PROCESSES} processes)", 1, plain_rate, "1.00x"],
            ["charlstm `generate`, the same model", 1, classic_rate,
             f"{classic_rate / plain_rate:.1f}x"],
            [f"charlstm `generate`, head reading {head} layer", 1, ours_rate,
             f"{ours_rate / plain_rate:.1f}x"],
            ["charlstm `generate_batch` (aggregate)", 64, batch_rate,
             f"{batch_rate / plain_rate:.1f}x"],
        ],
    )  # fmt: skip


if __name__ == "__main__":
    main()
