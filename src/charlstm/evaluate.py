"""Loss per character over a whole text, in bounded memory, with the state carried.

The text is scored as one stream. To use a batch's parallelism, it is cut into segments that
run side by side; each segment first reads the ``prime`` characters before it (unscored) so
its state is warm, which makes the result match a single sequential pass to within noise.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from charlstm.errors import CharLSTMError
from charlstm.model import CharRNN

_BLOCK = 1 << 20  # characters scored per block when streaming a long text
_MAX_EXP = math.log(1.7e308)  # math.exp overflows beyond this


@dataclass(frozen=True)
class EvalResult:
    """Mean next-character cross-entropy over ``characters`` scored positions."""

    loss: float  # nats per character
    characters: int

    @property
    def bpc(self) -> float:
        """Bits per character."""
        return self.loss / math.log(2)

    @property
    def perplexity(self) -> float:
        """exp(loss): the effective number of equally likely next characters (inf past ~709)."""
        return math.exp(self.loss) if self.loss < _MAX_EXP else math.inf

    def as_dict(self) -> dict[str, float]:
        """Loss, bpc, perplexity and count, for logs and JSON output."""
        return {
            "loss": self.loss,
            "bpc": self.bpc,
            "perplexity": self.perplexity,
            "characters": self.characters,
        }


@torch.no_grad()
def evaluate_ids(
    net: CharRNN,
    blocks: Iterable[np.ndarray],
    *,
    segments: int = 64,
    prime: int = 256,
    chunk: int = 256,
) -> EvalResult:
    """Score every symbol of the concatenated ``blocks`` after the first one.

    Raises CharLSTMError when there is nothing to score (fewer than two symbols).
    """
    total, count = score_ids(net, blocks, segments=segments, prime=prime, chunk=chunk)
    return eval_result(total, count)


@torch.no_grad()
def score_ids(
    net: CharRNN,
    blocks: Iterable[np.ndarray],
    *,
    part: tuple[int, int] = (0, 1),
    segments: int = 64,
    prime: int = 256,
    chunk: int = 256,
) -> tuple[float, int]:
    """Summed loss (nats) and number of the symbols :func:`evaluate_ids` scores.

    ``part=(k, n)`` scores only the k-th of n contiguous shares of the segments, so n
    processes can split one evaluation and add their sums: together they score exactly what
    one process scores, segment for segment.
    """
    was_training = net.training
    net.eval()
    total, count = 0.0, 0
    context = np.empty(0, dtype=np.int64)
    try:
        for block in _rechunk(blocks):
            nats, scored = _score(net, context, block, segments, prime, chunk, part)
            total, count = total + nats, count + scored
            context = np.concatenate([context, block])[-(prime + 1) :]
    finally:
        net.train(was_training)
    return total, count


def eval_result(total: float, count: int) -> EvalResult:
    """The mean loss of ``count`` scored symbols summing to ``total`` nats."""
    if count == 0:
        raise CharLSTMError("the text to evaluate needs at least 2 characters")
    return EvalResult(total / count, count)


def _score(
    net: CharRNN,
    context: np.ndarray,
    ids: np.ndarray,
    segments: int,
    prime: int,
    chunk: int,
    part: tuple[int, int] = (0, 1),
) -> tuple[float, int]:
    """Sum of losses of every position of ``ids`` given ``context`` and the ids before it."""
    full = np.concatenate([context, ids]).astype(np.int64)
    first = max(len(context), 1)  # the very first symbol of a text has nothing to predict it
    if first >= len(full):
        return 0.0, 0
    n_segments = max(1, min(segments, (len(full) - first) // (4 * max(prime, 1))))
    bounds = np.linspace(first, len(full), n_segments + 1).astype(np.int64)
    rows = [(max(0, a - 1 - prime), a, b) for a, b in itertools.pairwise(bounds)]
    share, shares = part  # this process's contiguous share of the segments
    rows = rows[len(rows) * share // shares : len(rows) * (share + 1) // shares]
    if not rows:
        return 0.0, 0
    width = max(b - 1 - start for start, _, b in rows)
    inputs = np.zeros((len(rows), width), dtype=np.int64)
    targets = np.zeros_like(inputs)
    weight = np.zeros(inputs.shape, dtype=np.float32)
    for r, (start, a, b) in enumerate(rows):
        n = b - 1 - start
        inputs[r, :n] = full[start : b - 1]
        targets[r, :n] = full[start + 1 : b]
        weight[r, a - 1 - start : n] = 1.0  # only targets at positions >= a are scored here
    device = next(net.parameters()).device
    x, y, w = (torch.from_numpy(t).to(device) for t in (inputs, targets, weight))
    state, total = None, torch.zeros((), dtype=torch.float64, device=device)
    for t in range(0, width, chunk):
        logits, state = net(x[:, t : t + chunk], state)
        losses = F.cross_entropy(
            logits.float().flatten(0, 1), y[:, t : t + chunk].flatten(), reduction="none"
        )
        total += (losses * w[:, t : t + chunk].flatten()).sum(dtype=torch.float64)
    return float(total), int(weight.sum())


def _rechunk(blocks: Iterable[np.ndarray]) -> Iterable[np.ndarray]:
    """Regroup arbitrary blocks into ~_BLOCK-sized pieces (bounded memory, good batching)."""
    pending: list[np.ndarray] = []
    size = 0
    for block in blocks:
        pending.append(np.asarray(block))
        size += len(block)
        while size >= _BLOCK:
            joined = np.concatenate(pending)
            yield joined[:_BLOCK]
            pending, size = [joined[_BLOCK:]], size - _BLOCK
    if size:
        yield np.concatenate(pending)
