"""Export parity: ONNX Runtime's logits and state against PyTorch's, for the same model.

    python benchmarks/export_parity.py [--checkpoint RUN_OR_CKPT] [--batch 8] [--time 256]

Without a checkpoint, every cell (lstm, gru, rnn), layer count (1, 2, 3) and head input (all,
last) at the default width (128-d embedding, 256 hidden units, 65 symbols), untrained, seed 0.
Each model is exported with ``charlstm.export`` and run by ONNX Runtime on the CPU over random
ids from a random carried state; prints the largest absolute difference from PyTorch's float32
forward pass in the logits and in the next state, and the largest logit for scale.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from common import machine, print_table
from sampling_speed import untrained_model

import charlstm
from charlstm.config import CELLS, HEAD_INPUTS, RunConfig
from charlstm.lm import CharLM
from charlstm.model import CharRNN


def differences(model: CharLM, batch: int, time: int, directory: Path) -> list[float]:
    """Largest |ONNX Runtime - PyTorch| over the logits and over the next state, and the
    largest |logit|."""
    path = charlstm.export(model, directory / "model.onnx")
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.vocab.size, (batch, time), generator=generator)
    state = tuple(torch.randn(s.shape, generator=generator) for s in model.net.initial_state(batch))
    with torch.inference_mode():
        logits, next_state = model.net(ids, state)
    names = [i.name for i in session.get_inputs()]
    got = session.run(
        None, dict(zip(names, [ids.numpy(), *(s.numpy() for s in state)], strict=True))
    )
    state_gap = max(
        float(np.abs(o - s.numpy()).max()) for o, s in zip(got[1:], next_state, strict=True)
    )
    return [float(np.abs(got[0] - logits.numpy()).max()), state_gap, float(logits.abs().max())]


def models() -> list[tuple[str, CharLM]]:
    """Every cell, layer count and head input at the default width, untrained."""
    base = untrained_model()
    found = []
    for cell, layers, head in itertools.product(CELLS, (1, 2, 3), HEAD_INPUTS):
        config = dataclasses.replace(base.net.config, cell=cell, n_layers=layers, head_input=head)
        torch.manual_seed(0)
        net = CharRNN(config, base.vocab.size).eval()
        found.append((f"{cell} {layers}x{config.hidden_dim}, head {head}",
                      CharLM(net, base.vocab, RunConfig(model=config))))  # fmt: skip
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a trained model instead of the untrained ones")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--time", type=int, default=256)
    args = parser.parse_args()
    chosen = (
        [(args.checkpoint, charlstm.load(args.checkpoint, device="cpu"))]
        if args.checkpoint
        else models()
    )
    print(machine())
    print(f"batch {args.batch}, time {args.time}, float32, onnxruntime {ort.__version__}")
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for name, model in chosen:
            rows.append([name, *differences(model, args.batch, args.time, Path(directory))])
    print_table(["model", "max |logit diff|", "max |state diff|", "max |logit|"], rows)


if __name__ == "__main__":
    main()
