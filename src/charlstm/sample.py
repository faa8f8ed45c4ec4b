"""Sampling the next character: a pure filter over logits, and the generation loop."""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch

from charlstm.model import CharRNN


def filter_probs(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float
) -> torch.Tensor:
    """Next-symbol probabilities after temperature, top-k and top-p (nucleus) filtering.

    logits: (N, V). Returns (N, V) probabilities that sum to 1 per row. ``top_k`` keeps the k
    likeliest symbols (0 = all); ``top_p`` then keeps the smallest set of the likeliest symbols
    whose probability reaches ``top_p`` (1 = all). The likeliest symbol always survives.
    ``temperature`` must be positive here; 0 (greedy) is handled by :func:`next_ids`.
    """
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if 0 < top_k < probs.shape[-1]:
        kept = torch.zeros_like(probs, dtype=torch.bool)
        kept.scatter_(-1, probs.topk(top_k, dim=-1).indices, True)
        probs = probs.masked_fill(~kept, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the likelier symbols
        keep_sorted = before < top_p  # true up to and including the symbol that reaches top_p
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        probs = probs.masked_fill(~keep, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def next_ids(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Draw one id per row of logits (N, V); temperature 0 takes the likeliest."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate_ids(
    net: CharRNN,
    prompt: torch.Tensor,
    length: int,
    *,
    num_samples: int = 1,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> Iterator[torch.Tensor]:
    """Yield ``length`` tensors of ``num_samples`` new ids each, one step at a time.

    The prompt (1-D ids) is read in one forward pass; after that each new character costs one
    recurrent step with the state carried, never a re-run of the sequence.
    """
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little"))
    try:
        inputs = prompt.to(device=device, dtype=torch.long).unsqueeze(0).expand(num_samples, -1)
        logits, state = net(inputs)
        last = logits[:, -1]
        for position in range(length):
            ids = next_ids(last, temperature, top_k, top_p, generator)
            yield ids
            if position + 1 < length:
                logits, state = net(ids.unsqueeze(1), state)
                last = logits[:, -1]
    finally:
        net.train(was_training)
