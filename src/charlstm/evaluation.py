"""Loss per character over a whole text, in bounded memory, with the state carried.

The text is scored as one stream. To use a batch's parallelism, it is cut into segments that
run side by side; each segment first reads the ``prime`` characters before it (unscored) so
its state is warm, which makes the result match a single sequential pass to within noise.

Dynamic evaluation (:func:`dynamic_evaluate_ids`) scores the stream in one sequential pass
instead, and after each segment takes a gradient step on the text it has just scored, so the
model adapts to the names, words and style of the text as it goes. Every character is still
predicted before the model learns from it.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from charlstm.budget import EVAL_PRIME, EVAL_SEGMENTS
from charlstm.config import DynamicEvalConfig
from charlstm.errors import CharLSTMError
from charlstm.model import MAX_LOGITS, CharRNN, State, detach_state

_BLOCK = 1 << 20  # characters scored per block when streaming a long text
_MAX_EXP = math.log(1.7e308)  # math.exp overflows beyond this
# Dynamic evaluation divides each gradient by its running RMS (RMSprop): the average forgets
# with this factor (a memory of about 100 updates), and _RMS_FLOOR keeps the steps of
# parameters with tiny gradients (rare characters' embeddings) finite.
_RMS_BETA = 0.99
_RMS_FLOOR = 1e-4


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


# Called with the number of characters just scored, or asked whether to give up.
Progress = Callable[[int], object]
ShouldStop = Callable[[], bool]


class EvaluationStopped(Exception):
    """Scoring gave up part-way because ``should_stop`` said so (a signal, usually)."""


@torch.no_grad()
def evaluate_ids(
    net: CharRNN,
    blocks: Iterable[np.ndarray],
    *,
    segments: int = EVAL_SEGMENTS,
    prime: int = EVAL_PRIME,
    chunk: int = 256,
    progress: Progress | None = None,
) -> EvalResult:
    """Score every symbol of the concatenated ``blocks`` after the first one.

    ``progress``, if given, is called with each number of characters scored. Raises
    CharLSTMError when there is nothing to score (fewer than two symbols).
    """
    total, count = score_ids(
        net, blocks, segments=segments, prime=prime, chunk=chunk, progress=progress
    )
    return eval_result(total, count)


@torch.no_grad()
def score_ids(
    net: CharRNN,
    blocks: Iterable[np.ndarray],
    *,
    part: tuple[int, int] = (0, 1),
    segments: int = EVAL_SEGMENTS,
    prime: int = EVAL_PRIME,
    chunk: int = 256,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
) -> tuple[float, int]:
    """Summed loss (nats) and number of the symbols :func:`evaluate_ids` scores.

    ``part=(k, n)`` scores only the k-th of n contiguous shares of the segments, so n
    processes can split one evaluation and add their sums: together they score exactly what
    one process scores, segment for segment. ``should_stop`` is asked between forward calls;
    when it answers True, :class:`EvaluationStopped` is raised.
    """
    was_training = net.training
    net.eval()
    total, count = 0.0, 0
    context = np.empty(0, dtype=np.int64)
    hooks = _Hooks(progress, should_stop)
    try:
        for block in _rechunk(blocks):
            nats, scored = _score(net, context, block, segments, prime, chunk, part, hooks)
            total, count = total + nats, count + scored
            context = np.concatenate([context, block])[-(prime + 1) :]
    finally:
        net.train(was_training)
    return total, count


@torch.no_grad()
def measure_score_speed(net: CharRNN, rows: int = EVAL_SEGMENTS, length: int = 256) -> float:
    """Characters per second at which ``net`` scores text (forward pass and loss) in
    :func:`score_ids`' layout: one call of ``rows`` x ``length`` random symbols, timed after
    one to warm up. The network is left as it was."""
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(net.vocab_size, (rows, length + 1), generator=generator).to(device)
    x, y, weight = ids[:, :-1], ids[:, 1:], torch.ones(rows, length)
    hooks = _Hooks(None, None)
    try:
        _score_rows(net, x, y, weight, length, hooks)  # pays for first allocations and set-up
        began = time.perf_counter()
        _score_rows(net, x, y, weight, length, hooks)  # float() of the sum waits for a GPU
        elapsed = time.perf_counter() - began
    finally:
        net.train(was_training)
    return rows * length / max(elapsed, 1e-9)


def eval_result(total: float, count: int) -> EvalResult:
    """The mean loss of ``count`` scored symbols summing to ``total`` nats."""
    if count == 0:
        raise CharLSTMError("the text to evaluate needs at least 2 characters")
    return EvalResult(total / count, count)


@dataclass(frozen=True)
class _Hooks:
    progress: Progress | None
    should_stop: ShouldStop | None


def _score(
    net: CharRNN,
    context: np.ndarray,
    ids: np.ndarray,
    segments: int,
    prime: int,
    chunk: int,
    part: tuple[int, int],
    hooks: _Hooks,
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
    x, y = (torch.from_numpy(t).to(device) for t in (inputs, targets))
    total = _score_rows(net, x, y, torch.from_numpy(weight), chunk, hooks)
    return total, int(weight.sum())


def _score_rows(
    net: CharRNN,
    x: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    chunk: int,
    hooks: _Hooks,
) -> float:
    """Weighted sum of the losses of targets ``y`` after inputs ``x``, rows read in parallel."""
    rows, width = x.shape
    chunk = max(1, min(chunk, MAX_LOGITS // (rows * net.vocab_size)))
    weight = weight.to(x.device)
    state, total = None, torch.zeros((), dtype=torch.float64, device=x.device)
    for t in range(0, width, chunk):
        if hooks.should_stop is not None and hooks.should_stop():
            raise EvaluationStopped
        logits, state = net(x[:, t : t + chunk], state)
        losses = F.cross_entropy(
            logits.float().flatten(0, 1), y[:, t : t + chunk].flatten(), reduction="none"
        )
        scored = weight[:, t : t + chunk].flatten()
        total += (losses * scored).sum(dtype=torch.float64)
        if hooks.progress is not None:
            hooks.progress(int(scored.sum()))
    return float(total)


def dynamic_evaluate_ids(
    net: CharRNN,
    blocks: Iterable[np.ndarray],
    settings: DynamicEvalConfig,
    progress: Progress | None = None,
) -> EvalResult:
    """Score every symbol of the concatenated ``blocks`` after the first, adapting as it goes.

    One stream, read in order with the state carried: each segment of
    ``settings.dynamic_segment`` symbols is scored, then the model takes a step on that
    segment's loss. The step is the gradient divided by its running RMS, times
    ``dynamic_lr``, and every parameter is pulled back toward its trained value by
    ``dynamic_decay`` (scaled by its RMS relative to its tensor's mean), so that what was
    learnt long ago fades. A copy of ``net`` adapts; ``net`` itself is left as it was.
    ``progress``, if given, is called with each number of characters scored.
    """
    settings.validate()
    learner = _Learner(copy.deepcopy(net).eval(), settings)
    segment = settings.dynamic_segment
    total, count = 0.0, 0
    pending = np.empty(0, dtype=np.int64)
    for block in _rechunk(blocks):
        pending = np.concatenate([pending, block.astype(np.int64)])
        while len(pending) > segment:  # a segment needs its inputs and the next target
            total += learner.score_and_learn(pending[: segment + 1])
            count += segment
            pending = pending[segment:]
            if progress is not None:
                progress(segment)
    if len(pending) > 1:
        total += learner.score_and_learn(pending)
        count += len(pending) - 1
        if progress is not None:
            progress(len(pending) - 1)
    return eval_result(total, count)


class _Learner:
    """A network that scores one segment at a time and then learns from it."""

    def __init__(self, net: CharRNN, settings: DynamicEvalConfig) -> None:
        self.net = net
        self.settings = settings
        self.params = [p for p in net.parameters() if p.requires_grad]
        self.trained = [p.detach().clone() for p in self.params]
        self.mean_square = [torch.zeros_like(p) for p in self.params]
        self.updates = 0
        self.state: State | None = None
        self.device = next(net.parameters()).device

    def score_and_learn(self, ids: np.ndarray) -> float:
        """Summed loss of ids[1:] given ids[:-1] and the carried state, then one update."""
        x = torch.from_numpy(ids[:-1]).to(self.device).unsqueeze(0)
        y = torch.from_numpy(ids[1:]).to(self.device)
        logits, state = self.net(x, self.state)
        self.state = detach_state(state)
        loss = F.cross_entropy(logits[0].float(), y, reduction="sum")
        (loss / len(y)).backward()
        self._update()
        return float(loss.detach())

    @torch.no_grad()
    def _update(self) -> None:
        self.updates += 1
        debias = 1 - _RMS_BETA**self.updates  # the running average starts at zero
        lr, decay = self.settings.dynamic_lr, self.settings.dynamic_decay
        moments = zip(self.params, self.trained, self.mean_square, strict=True)
        for p, trained, mean_square in moments:
            grad, p.grad = p.grad, None
            mean_square.mul_(_RMS_BETA).addcmul_(grad, grad, value=1 - _RMS_BETA)
            rms = mean_square.div(debias).sqrt_()
            p.addcdiv_(grad, rms + _RMS_FLOOR, value=-lr)
            if decay > 0:
                # Parameters that move a lot are pulled back harder (at most all the way).
                pull = rms.mul_(decay / rms.mean().clamp_min(1e-30)).clamp_(max=1.0)
                p.add_((trained - p).mul_(pull))


def _rechunk(blocks: Iterable[np.ndarray]) -> Iterable[np.ndarray]:
    """Regroup arbitrary blocks into _BLOCK-sized pieces, the last one shorter (bounded memory,
    good batching). A large block, such as a memory-mapped validation split, is sliced: only
    each piece is ever copied, never the whole block."""
    pending: list[np.ndarray] = []
    held = 0
    for block in blocks:
        start = 0
        while held + len(block) - start >= _BLOCK:
            end = start + _BLOCK - held
            yield np.concatenate([*pending, block[start:end]])
            pending, held, start = [], 0, end
        if start < len(block):
            pending.append(block[start:])
            held += len(block) - start
    if held:
        yield np.concatenate(pending)
