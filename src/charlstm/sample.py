"""Sampling the next character: a pure filter over logits, and the generation loop.

After the prompt, generation advances one character per step. Calling the torch module for a
single step costs over a millisecond on a CPU (dispatch and oneDNN set-up dwarf the arithmetic),
so on a CPU the steps run through :class:`NumpyStepper`, the same recurrence written out in numpy
with the weights pre-arranged. Filtering and drawing are numpy too, on at most a few thousand
numbers per step, and shared by every path, so the fast path and the module path draw the same
characters for the same seed.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from charlstm.model import MAX_LOGITS, WEIGHT_NAMES, CharRNN, State


def filter_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Next-symbol probabilities after temperature, top-k and top-p (nucleus) filtering.

    logits: (N, V). Returns (N, V) float64 probabilities that sum to 1 per row. ``top_k`` keeps
    the k likeliest symbols (0 = all); ``top_p`` then keeps the smallest set of the likeliest
    symbols whose probability reaches ``top_p`` (1 = all). The likeliest symbol always survives.
    ``temperature`` must be positive here; 0 (greedy) is handled by :func:`next_ids`.
    """
    weights, cumulative, order = _kept_weights(logits, temperature, top_k, top_p)
    probs = weights / cumulative[:, -1:]
    if order is None:
        return probs
    in_place = np.empty_like(probs)
    in_place[np.arange(len(probs))[:, None], order] = probs
    return in_place


def next_ids(
    logits: np.ndarray,
    temperature: float,
    top_k: int,
    top_p: float,
    rng: np.random.Generator | None,
) -> np.ndarray:
    """Draw one id per row of logits (N, V) from :func:`filter_probs`' distribution;
    temperature 0 takes the likeliest.

    A draw inverts the cumulative distribution at one uniform number per row (over the symbols
    in rank order when filtering, else in id order), so the same generator state and the same
    logits always give the same ids.
    """
    if temperature == 0:
        return np.asarray(logits).argmax(axis=-1)
    _, cumulative, order = _kept_weights(logits, temperature, top_k, top_p)
    rng = rng if rng is not None else np.random.default_rng()
    point = rng.random(len(cumulative))[:, None] * cumulative[:, -1:]
    # Past the kept symbols the total stays flat above the point, so they are never reached.
    chosen = np.minimum((cumulative <= point).sum(axis=-1), cumulative.shape[-1] - 1)
    return chosen if order is None else order[np.arange(len(order)), chosen]


def _kept_weights(
    logits: np.ndarray, temperature: float, top_k: int, top_p: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """What the filter keeps, unnormalised: the weights exp(logit / temperature) with the
    dropped ones zeroed, their running totals, and the rank order (likeliest first, ties by
    id) the two are in, or None when nothing is filtered and they stay in id order."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    weights = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
    vocab = weights.shape[-1]
    if not (0 < top_k < vocab or top_p < 1.0):
        return weights, weights.cumsum(axis=-1), None
    order = np.argsort(-weights, axis=-1, kind="stable")
    weights = weights[np.arange(len(weights))[:, None], order]
    if 0 < top_k < vocab:
        weights[:, top_k:] = 0.0
    cumulative = weights.cumsum(axis=-1)
    if top_p < 1.0:
        # Kept: up to and including the first symbol whose running total reaches top_p.
        weights[cumulative - weights >= top_p * cumulative[:, -1:]] = 0.0
        cumulative = weights.cumsum(axis=-1)
    return weights, cumulative, order


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
    fast: bool = True,
) -> Iterator[np.ndarray]:
    """Yield ``length`` arrays of ``num_samples`` new ids (int64) each, one step at a time.

    The prompt (1-D ids) is read in one forward pass; after that each new character costs one
    recurrent step with the state carried, never a re-run of the sequence. ``fast`` steps a
    CPU model through :class:`NumpyStepper`; ``fast=False`` calls the module every step (the
    reference the fast path is tested against, and the path on GPUs).
    """
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    rng = np.random.default_rng(seed)  # None: fresh entropy from the operating system
    try:
        # Inference mode around the calls into torch only: entered on every resumption of this
        # generator, it would cost a CPU character a tenth of its time.
        with torch.inference_mode():
            logits, state = _read_prompt(net, prompt.to(device=device, dtype=torch.long))
        # Every sample reads the same prompt: read once, its state is copied to each of them.
        logits = logits.expand(num_samples, -1, -1)
        state = tuple(s.expand(-1, num_samples, -1).contiguous() for s in state)
        stepper_class = NumpyStepper if fast and device.type == "cpu" else ModuleStepper
        step = stepper_class(net, state)
        last = _array(logits[:, -1])
        for position in range(length):
            ids = next_ids(last, temperature, top_k, top_p, rng)
            yield ids
            if position + 1 < length:
                last = step(ids)
    finally:
        net.train(was_training)


def _read_prompt(net: CharRNN, prompt: torch.Tensor) -> tuple[torch.Tensor, State]:
    """The logits after the last character of a 1-D prompt (1, 1, V) and the state there. A
    long prompt is read in pieces, the state carried, so its logits never take more than
    MAX_LOGITS numbers."""
    piece = max(1, MAX_LOGITS // net.vocab_size)
    state = None
    for start in range(0, len(prompt), piece):
        logits, state = net(prompt[start : start + piece].unsqueeze(0), state)
    if state is None:
        raise ValueError("the prompt is empty: give at least one id")
    return logits[:, -1:], state


class ModuleStepper:
    """One step by calling the module with the carried state; works on any device."""

    def __init__(self, net: CharRNN, state: State) -> None:
        self.net, self.state = net, state
        self.device = next(net.parameters()).device

    @torch.inference_mode()
    def __call__(self, ids: np.ndarray) -> np.ndarray:
        """(N,) ids in, (N, V) float32 logits of the next character out."""
        x = torch.from_numpy(ids).to(self.device).unsqueeze(1)
        logits, self.state = self.net(x, self.state)
        return _array(logits[:, -1])


class NumpyStepper:
    """A CPU CharRNN advanced one character at a time in numpy, from its weights.

    Every layer's h lies side by side in one buffer, ``hidden`` (N, L * H), so layer l > 0
    reads [its input | its own h] as one contiguous column range and, for an LSTM or vanilla
    RNN, computes its gates in one product with the stacked weights; the head reads its input
    from the same buffer. Layer 0's input is folded into a lookup table (embedding times input
    weights plus biases), the LSTM gates are reordered and scaled so one tanh covers all four,
    and the states are updated in place. At batch 1 the calls, not the arithmetic, are what a
    step costs.
    """

    def __init__(self, net: CharRNN, state: State) -> None:
        config, rnn = net.config, net.rnn
        self.cell, self.size = config.cell, config.hidden_dim
        h, *c = (_array(s) for s in state)  # (n_layers, N, H): h, and c for LSTM
        self.cells = [layer.copy() for layer in c[0]] if c else []
        self.hidden = np.concatenate(list(h), axis=1)  # (N, L * H)
        rows = len(self.hidden)
        self.layers = []
        for layer in range(config.n_layers):
            w_ih, w_hh, b_ih, b_hh = (
                _gate_order(_array(getattr(rnn, f"{name}_l{layer}")), self.cell, self.size)
                for name in WEIGHT_NAMES
            )
            # Layer 0's input product becomes a lookup table: one row per input id.
            w_ih = _array(net.embed.weight) @ w_ih.T + b_ih if layer == 0 else w_ih.T
            b_ih = np.zeros_like(b_ih) if layer == 0 else b_ih
            if self.cell == "gru":  # the reset gate scales the recurrent part alone: keep apart
                weights = (w_ih, b_ih, w_hh.T, b_hh)
            elif layer == 0:
                weights = (w_ih + b_hh, None, w_hh.T, None)
            else:
                weights = (np.concatenate([w_ih, w_hh.T]), b_ih + b_hh, None, None)
            w_in, *rest = weights  # layer 0's w_in is a table indexed by rows, not a product
            w_in = np.ascontiguousarray(w_in) if layer == 0 else _right_operand(w_in, rows)
            self.layers.append((w_in, *(_right_operand(a, rows) for a in rest)))
        head_weight = _array(net.head.weight).T
        self.head_input = self.hidden[:, self.hidden.shape[1] - len(head_weight) :]
        self.head_weight = _right_operand(head_weight, rows)
        self.head_bias = _array(net.head.bias)

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        """(N,) ids in, (N, V) float32 logits of the next character out."""
        size = self.size
        for layer, (w_in, b_in, w_hh, b_hh) in enumerate(self.layers):
            h = self.hidden[:, layer * size : (layer + 1) * size]
            # Above layer 0, [input | h] is the previous layer's h and this one's, side by side.
            joined = self.hidden[:, (layer - 1) * size : (layer + 1) * size] if layer else h
            if self.cell == "gru":
                inputs = w_in[ids] if layer == 0 else joined[:, :size] @ w_in + b_in
                h[...] = _gru(inputs, h @ w_hh + b_hh, h, size)
                continue
            gates = w_in[ids] + h @ w_hh if layer == 0 else joined @ w_in + b_in
            if self.cell == "lstm":
                self._lstm(self.cells[layer], gates, h)
            else:
                np.tanh(gates, out=h)
        return self.head_input @ self.head_weight + self.head_bias

    def _lstm(self, c: np.ndarray, gates: np.ndarray, h: np.ndarray) -> None:
        """Advance the cell state ``c`` and write the new h into ``h``, both in place."""
        size = self.size
        # One tanh for all four gates: the sigmoid ones arrive halved (see _gate_order).
        squashed = np.tanh(gates)
        ifo = squashed[:, : 3 * size]  # input, forget, output
        ifo *= 0.5
        ifo += 0.5
        c *= ifo[:, size : 2 * size]
        c += ifo[:, :size] * squashed[:, 3 * size :]
        np.multiply(ifo[:, 2 * size :], np.tanh(c), out=h)


def _right_operand(matrix: np.ndarray | None, batch: int) -> np.ndarray | None:
    """``matrix`` (in, out) laid out for ``x @ matrix`` at this batch size. A single row makes
    the product a matrix-vector one, which BLAS spreads over threads by output only when the
    weights are stored output-major (2x faster on 2 cores for 512 x 1024); more rows prefer
    the input-major layout."""
    if matrix is None:
        return None
    return np.ascontiguousarray(matrix.T).T if batch == 1 else np.ascontiguousarray(matrix)


def _gate_order(weights: np.ndarray, cell: str, size: int) -> np.ndarray:
    """PyTorch stacks LSTM gates as input, forget, cell, output; put the three sigmoids first,
    halved, so that one tanh serves all four: sigmoid(x) = (1 + tanh(x / 2)) / 2. Halving is
    exact in binary floating point, so the products come out exactly as halved afterwards."""
    if cell != "lstm":
        return weights
    i, f, g, o = (weights[k * size : (k + 1) * size] for k in range(4))
    return np.concatenate([0.5 * i, 0.5 * f, 0.5 * o, g])


def _gru(inputs: np.ndarray, recurrent: np.ndarray, h: np.ndarray, size: int) -> np.ndarray:
    # PyTorch's GRU: reset and update gates, then a candidate whose recurrent part r scales.
    r_z = _sigmoid(inputs[:, : 2 * size] + recurrent[:, : 2 * size])
    n = np.tanh(inputs[:, 2 * size :] + r_z[:, :size] * recurrent[:, 2 * size :])
    return n + r_z[:, size:] * (h - n)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 + 0.5 * np.tanh(0.5 * x)  # the same function, without exp's overflow warnings


def _array(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()
