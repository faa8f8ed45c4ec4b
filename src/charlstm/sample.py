"""Sampling the next character: a pure filter over logits, and the generation loop.

After the prompt, generation advances one character per step. Calling the torch module for a
single step costs over a millisecond on a CPU (dispatch and oneDNN set-up dwarf the arithmetic),
so on a CPU the steps run through :class:`NumpyStepper`, the same recurrence written out in numpy
with the weights pre-arranged. Filtering and drawing are numpy too, on at most a few thousand
numbers per step, and shared by every path, so the fast path and the module path draw the same
characters for the same seed.

A sample's characters never depend on what else is generated beside it, which is what lets
:mod:`charlstm.engine` serve many requests in one batch and still give each the characters that
``charlstm sample`` gives alone. Three things make it so:

- **Its own generator.** Sample ``i`` of seed ``s`` draws from :func:`sample_rng` ``(s, i)``,
  one uniform number per sampled character, whatever the other rows draw.
- **Products row by row.** BLAS picks its kernels and its split of the work by the shape of a
  product, so row ``i`` of a matrix product ``X @ W`` can come out with other bits when ``X``
  has another number of rows. So :class:`NumpyStepper` multiplies through ``row_products.c``,
  where every element is one chain of fused multiply-adds in a fixed order whatever the rows
  beside it (rows are grouped only to share the loads of the weights), or, where that kernel
  is not built, by one BLAS matrix-vector product per row, the same call at batch 1 as at 64.
  Everything else in a step is elementwise or per row.
- **Per-row filtering.** :func:`draw_ids` takes each row's settings and generator and computes
  each row exactly as :func:`next_ids` does for that row alone.

:class:`ModuleStepper` (the path on accelerators) calls the module on blocks of
``MODULE_BLOCK_ROWS`` rows, every call of the same shape, so that nothing there depends on
the number of rows either; that a row's result is also the same at every place in a block is
likely but tested only on a CPU.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from charlstm.config import SEED_LIMIT
from charlstm.model import MAX_LOGITS, WEIGHT_NAMES, CharRNN, State

try:  # optional: built where a C compiler was at install (see row_products.c)
    from charlstm import _row_products
except ImportError:
    _row_products = None
# The vector paths of row_products.c this CPU runs, fastest first; none: BLAS, row by row.
_KERNEL_PATHS: tuple[str, ...] = _row_products.paths() if _row_products is not None else ()

# Rows per module call in ModuleStepper: on an accelerator a call costs its launches, not its
# rows, and on a CPU that path is the reference the fast one is tested against.
MODULE_BLOCK_ROWS = 256


def sample_rng(seed: int | None, index: int) -> np.random.Generator:
    """The generator of sample ``index`` of a call with ``seed``: child ``index`` of the seed's
    :class:`numpy.random.SeedSequence`, as ``SeedSequence(seed).spawn(n)[index]`` gives it, so
    samples are independent streams and sample ``i`` is the same in a batch of any size. None
    draws fresh entropy from the operating system."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))


def fresh_seed() -> int:
    """A seed drawn from the operating system's entropy, in the range every seed takes, for a
    call that was given none and must still say which one reproduces it."""
    return secrets.randbelow(SEED_LIMIT)


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
    rng: np.random.Generator | Sequence[np.random.Generator] | None,
) -> np.ndarray:
    """Draw one id per row of logits (N, V) from :func:`filter_probs`' distribution;
    temperature 0 takes the likeliest.

    A draw inverts the cumulative distribution at one uniform number per row (over the symbols
    in rank order when filtering, else in id order), so the same generator state and the same
    logits always give the same ids. ``rng`` is one generator for every row (N numbers in one
    call; None: a fresh one), or N generators, one number from each.
    """
    if temperature == 0:
        return np.asarray(logits).argmax(axis=-1)
    if rng is None or isinstance(rng, np.random.Generator):
        uniforms = (rng or np.random.default_rng()).random(len(logits))
    else:
        uniforms = np.array([generator.random() for generator in rng])
    return _inverse_cdf(logits, temperature, top_k, top_p, uniforms)


def draw_ids(
    logits: np.ndarray,
    temperature: np.ndarray,
    top_k: np.ndarray,
    top_p: np.ndarray,
    rngs: Sequence[np.random.Generator],
) -> np.ndarray:
    """One id per row of logits (N, V), each row with its own settings (arrays of N) and its
    own generator: row i's id is what :func:`next_ids` draws for that row alone with its
    settings and ``rngs[i]``. A greedy row (temperature 0) draws no number; every other row
    draws one from its generator.
    """
    if _same(temperature) and _same(top_k) and _same(top_p):  # one filter for all, cheaper
        return next_ids(logits, temperature[0], top_k[0], top_p[0], rngs)
    ids = np.asarray(logits).argmax(axis=-1)
    sampled = np.flatnonzero(temperature != 0)
    if len(sampled) == 0:
        return ids
    uniforms = np.array([rngs[i].random() for i in sampled])
    k, p = top_k[sampled, None], top_p[sampled, None]
    filtered = (((k > 0) & (k < logits.shape[-1])) | (p < 1.0))[:, 0]
    # Filtering draws over the symbols in rank order, not filtering in id order: each row goes
    # with the rows that take its path, and every step below is a row's own.
    for group in (~filtered, filtered):
        rows = sampled[group]
        if len(rows):
            t = temperature[rows, None]
            ids[rows] = _inverse_cdf(logits[rows], t, k[group], p[group], uniforms[group])
    return ids


# A filter setting: one for every row, or a column (N, 1) of one per row.
Setting = float | np.ndarray


def _inverse_cdf(
    logits: np.ndarray, temperature: Setting, top_k: Setting, top_p: Setting, uniforms: np.ndarray
) -> np.ndarray:
    """The id each row's uniform number falls on in its filtered cumulative distribution."""
    _, cumulative, order = _kept_weights(logits, temperature, top_k, top_p)
    point = uniforms[:, None] * cumulative[:, -1:]
    # Past the kept symbols the total stays flat above the point, so they are never reached.
    chosen = np.minimum((cumulative <= point).sum(axis=-1), cumulative.shape[-1] - 1)
    return chosen if order is None else order[np.arange(len(order)), chosen]


def _kept_weights(
    logits: np.ndarray, temperature: Setting, top_k: Setting, top_p: Setting
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """What the filter keeps, unnormalised: the weights exp(logit / temperature) with the
    dropped ones zeroed, their running totals, and the rank order (likeliest first, ties by
    id) the two are in, or None when nothing is filtered and they stay in id order.

    With settings per row, the rows must agree on whether they filter at all (:func:`draw_ids`
    groups them so); a row that does not use top-k or top-p then skips that step exactly as it
    does alone. Every operation is a row's own, so a row's result is the same in any company.
    """
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    weights = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
    vocab = weights.shape[-1]
    cut_k = (top_k > 0) & (top_k < vocab)
    cut_p = top_p < 1.0
    if not (_some(cut_k) or _some(cut_p)):
        return weights, weights.cumsum(axis=-1), None
    order = np.argsort(-weights, axis=-1, kind="stable")
    weights = weights[np.arange(len(weights))[:, None], order]
    if isinstance(top_k, np.ndarray):  # a row without top-k keeps all its ranks
        weights[np.arange(vocab) >= np.where(cut_k, top_k, vocab)] = 0.0
    elif cut_k:
        weights[:, top_k:] = 0.0
    cumulative = weights.cumsum(axis=-1)
    if _some(cut_p):
        # Kept: up to and including the first symbol whose running total reaches top_p.
        weights[(cumulative - weights >= top_p * cumulative[:, -1:]) & cut_p] = 0.0
        cumulative = weights.cumsum(axis=-1)
    return weights, cumulative, order


def _same(values: np.ndarray) -> bool:
    return bool((values == values[0]).all())


def _some(flags: bool | np.ndarray) -> bool:
    """Whether any row's flag is set (a plain bool stands for every row)."""
    return bool(flags.any()) if isinstance(flags, np.ndarray) else bool(flags)


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
    recurrent step with the state carried, never a re-run of the sequence. Sample i draws from
    :func:`sample_rng` ``(seed, i)``, so it is the same in a batch of any size. ``fast`` steps a
    CPU model through :class:`NumpyStepper`; ``fast=False`` calls the module every step (the
    reference the fast path is tested against, and the path on GPUs).
    """
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    rngs = [sample_rng(seed, i) for i in range(num_samples)]
    try:
        # Inference mode around the calls into torch only: entered on every resumption of this
        # generator, it would cost a CPU character a tenth of its time.
        with torch.inference_mode():
            logits, state = read_prompt(net, prompt.to(device=device, dtype=torch.long))
        step = make_stepper(net, num_samples, fast)
        # Every sample reads the same prompt: read once, its state is copied to each of them.
        step.load(slice(0, num_samples), state)
        last = np.repeat(_array(logits[:, -1]), num_samples, axis=0)
        for position in range(length):
            ids = next_ids(last, temperature, top_k, top_p, rngs)
            yield ids
            if position + 1 < length:
                last = step(ids)
    finally:
        net.train(was_training)


def read_prompt(net: CharRNN, prompt: torch.Tensor) -> tuple[torch.Tensor, State]:
    """The logits after the last character of a 1-D prompt (1, 1, V) and the state there
    (batch 1, whatever else is being generated). A long prompt is read in pieces, the state
    carried, so its logits never take more than MAX_LOGITS numbers. Call it in inference mode."""
    piece = max(1, MAX_LOGITS // net.vocab_size)
    state = None
    for start in range(0, len(prompt), piece):
        logits, state = net(prompt[start : start + piece].unsqueeze(0), state)
    if state is None:
        raise ValueError("the prompt is empty: give at least one id")
    return logits[:, -1:], state


def make_stepper(net: CharRNN, rows: int, fast: bool = True) -> NumpyStepper | ModuleStepper:
    """A stepper for ``rows`` sequences of ``net`` (in eval mode): :class:`NumpyStepper` for a
    CPU model when ``fast``, else :class:`ModuleStepper`."""
    device = next(net.parameters()).device
    return NumpyStepper(net, rows) if fast and device.type == "cpu" else ModuleStepper(net, rows)


class ModuleStepper:
    """Steps by calling the module once per block of ``MODULE_BLOCK_ROWS`` rows, the state of
    every row carried in one tensor per part; works on any device.

    Like :class:`NumpyStepper`: rows 0..n-1 are stepped by a call with n ids, their state is
    set by :meth:`load` and moved by :meth:`move`.
    """

    @torch.inference_mode()
    def __init__(self, net: CharRNN, rows: int) -> None:
        self.net = net
        padded = -(-rows // MODULE_BLOCK_ROWS) * MODULE_BLOCK_ROWS
        self.state = net.initial_state(padded)  # each part (L, rows, H)
        # Rows past the last sequence of a block read id 0: any valid id will do.
        self.ids = torch.zeros(padded, dtype=torch.long, device=self.state[0].device)

    @torch.inference_mode()
    def load(self, rows: slice, state: State) -> None:
        """Set ``rows`` to one sequence's state (each part (L, 1, H), as read_prompt gives)."""
        for part, value in zip(self.state, state, strict=True):
            part[:, rows] = value

    @torch.inference_mode()
    def move(self, source: int, target: int) -> None:
        """Copy row ``source``'s state to row ``target``."""
        for part in self.state:
            part[:, target] = part[:, source]

    @torch.inference_mode()
    def __call__(self, ids: np.ndarray) -> np.ndarray:
        """(n,) ids of rows 0..n-1 in, (n, V) float32 logits of their next character out."""
        rows, block = len(ids), MODULE_BLOCK_ROWS
        self.ids[:rows] = torch.from_numpy(ids)
        logits = []
        for start in range(0, rows, block):
            part = slice(start, start + block)
            x = self.ids[part].unsqueeze(1)
            out, new = self.net(x, tuple(s[:, part] for s in self.state))
            for s, n in zip(self.state, new, strict=True):
                s[:, part] = n
            logits.append(out[:, -1])
        return _array(torch.cat(logits))[:rows]


class NumpyStepper:
    """A CPU CharRNN advanced one character at a time in numpy, from its weights.

    No row's products depend on the other rows (see the module docstring). Every layer's h
    lies side by side in one buffer, ``hidden`` (N, L * H), so layer l > 0 reads [its input |
    its own h] as one contiguous column range and, for an LSTM or vanilla RNN, computes its
    gates in one product with the stacked weights; the head reads its input from the same
    buffer. Layer 0's input is folded into a lookup table (embedding times input weights plus
    biases), the LSTM gates are reordered and scaled so one tanh covers all four, and the
    states are updated in place. At
    batch 1 the calls, not the arithmetic, are what a step costs.
    """

    def __init__(self, net: CharRNN, rows: int) -> None:
        config = net.config
        self.cell, self.size = config.cell, config.hidden_dim
        self.hidden = np.zeros((rows, config.n_layers * self.size), dtype=np.float32)
        lstm_layers = config.n_layers if self.cell == "lstm" else 0
        self.cells = np.zeros((lstm_layers, rows, self.size), dtype=np.float32)
        self.layers = [self._layer(net, layer) for layer in range(config.n_layers)]
        head_weight = _array(net.head.weight).T
        self.head = _product(self.hidden[:, self.hidden.shape[1] - len(head_weight) :], head_weight)
        self.head_bias = _array(net.head.bias)

    def _layer(self, net: CharRNN, layer: int) -> _Layer:
        size = self.size
        w_ih, w_hh, b_ih, b_hh = (
            _gate_order(_array(getattr(net.rnn, f"{name}_l{layer}")), self.cell, size)
            for name in WEIGHT_NAMES
        )
        h = self.hidden[:, layer * size : (layer + 1) * size]
        if layer == 0:  # the input product becomes a lookup table: one row per input id
            table = _matmul(_array(net.embed.weight), w_ih.T) + b_ih
            if self.cell == "gru":  # the reset gate scales the recurrent part alone: keep apart
                return _Layer(table=table, recurrent=_product(h, w_hh.T), recurrent_bias=b_hh)
            return _Layer(table=table + b_hh, recurrent=_product(h, w_hh.T))
        if self.cell == "gru":
            below = self.hidden[:, (layer - 1) * size : layer * size]
            return _Layer(
                inputs=_product(below, w_ih.T),
                input_bias=b_ih,
                recurrent=_product(h, w_hh.T),
                recurrent_bias=b_hh,
            )
        # [input | h] lie side by side in the buffer: one product with the weights stacked.
        joined = self.hidden[:, (layer - 1) * size : (layer + 1) * size]
        stacked = np.concatenate([w_ih.T, w_hh.T])
        return _Layer(inputs=_product(joined, stacked), input_bias=b_ih + b_hh)

    def load(self, rows: slice, state: State) -> None:
        """Set ``rows`` to one sequence's state (each part (L, 1, H), as read_prompt gives)."""
        h, *c = (_array(s) for s in state)
        self.hidden[rows] = np.concatenate(list(h), axis=1)
        if c:
            self.cells[:, rows] = c[0]

    def move(self, source: int, target: int) -> None:
        """Copy row ``source``'s state to row ``target``."""
        self.hidden[target] = self.hidden[source]
        self.cells[:, target] = self.cells[:, source]

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        """(n,) ids of rows 0..n-1 in, (n, V) float32 logits of their next character out."""
        rows, size = len(ids), self.size
        for layer, step in enumerate(self.layers):
            h = self.hidden[:rows, layer * size : (layer + 1) * size]
            if step.table is not None:
                inputs = step.table[ids]
            else:
                inputs = step.inputs(rows) + step.input_bias
            if self.cell == "gru":
                h[...] = _gru(inputs, step.recurrent(rows) + step.recurrent_bias, h, size)
                continue
            gates = inputs + step.recurrent(rows) if step.recurrent else inputs
            if self.cell == "lstm":
                self._lstm(self.cells[layer, :rows], gates, h)
            else:
                np.tanh(gates, out=h)
        return self.head(rows) + self.head_bias

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


def _product(x: np.ndarray, weight: np.ndarray) -> _RowProducts | _MatrixVectorProducts:
    """``x @ weight`` for the first rows of ``x`` (N, K), a view read afresh on every call, in
    which no row's result depends on the other rows: the kernel of ``row_products.c`` where
    this CPU runs it, else one BLAS matrix-vector product per row."""
    if _KERNEL_PATHS:
        return _RowProducts(x, weight)
    return _MatrixVectorProducts(x, weight)


def _matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b``, through the kernel where it runs: numpy's BLAS threads spin for a while
    after a call and would take the core the kernel's second thread needs."""
    if _KERNEL_PATHS:
        return _RowProducts(a, b)(len(a)).copy()
    return a @ b


class _RowProducts:
    """The products through ``row_products.c``, whose rows share each load of the weights.

    The weights are packed once into 64-column panels (zero columns pad the last); the result
    lands in a buffer kept for it, which the next call overwrites. ``path`` picks the kernel's
    vector path (default: the fastest) and ``split`` whether a second thread takes half the
    panels (default: when torch may use more than one thread); neither changes a bit.
    """

    def __init__(
        self, x: np.ndarray, weight: np.ndarray, path: str = "", split: bool | None = None
    ) -> None:
        if x.dtype != np.float32 or x.strides[1] != x.itemsize:
            raise ValueError("row products read float32 rows with contiguous columns")
        depth, self.columns = weight.shape
        panel = _row_products.PANEL
        padded = -(-self.columns // panel) * panel
        wide = np.zeros((depth, padded), dtype=np.float32)
        wide[:, : self.columns] = weight
        self.packed = np.ascontiguousarray(wide.reshape(depth, -1, panel).transpose(1, 0, 2))
        self.x = x  # kept alive: the kernel reads it by address
        self.out = np.empty((len(x), padded), dtype=np.float32)
        stride = x.strides[0] // x.itemsize
        extent = ((len(x) - 1) * stride + depth) * x.itemsize
        self.arguments = (
            (x.ctypes.data, stride, extent),
            (depth, self.packed.ctypes.data, self.packed.nbytes, padded),
            (self.out.ctypes.data, padded, self.out.nbytes),
            torch.get_num_threads() > 1 if split is None else split,  # with a second thread?
            path or _KERNEL_PATHS[0],
        )

    def __call__(self, rows: int) -> np.ndarray:
        """The products of rows 0..rows-1, (rows, N)."""
        x, weights, out, *options = self.arguments
        _row_products.products(*x, rows, *weights, *out, *options)
        return self.out[:rows, : self.columns]


class _MatrixVectorProducts:
    """The products as a stack of (1, K) matrices: ``matmul`` calls BLAS's matrix-vector
    product once per row with the same arguments whatever the number of rows. The weights are
    stored output-major, the layout in which BLAS splits a matrix-vector product across cores
    by output."""

    def __init__(self, x: np.ndarray, weight: np.ndarray) -> None:
        self.x = x[:, None, :]
        self.weight = np.asfortranarray(weight)
        self.out = np.empty((len(x), 1, weight.shape[1]), dtype=np.float32)

    def __call__(self, rows: int) -> np.ndarray:
        """The products of rows 0..rows-1, (rows, N)."""
        return np.matmul(self.x[:rows], self.weight, out=self.out[:rows])[:, 0]


@dataclass
class _Layer:
    """One layer's step: its input term from a lookup table (layer 0) or a product of the layer
    below, its recurrent product if apart, and the biases to add to each."""

    table: np.ndarray | None = None
    inputs: _RowProducts | _MatrixVectorProducts | None = None
    input_bias: np.ndarray | None = None
    recurrent: _RowProducts | _MatrixVectorProducts | None = None
    recurrent_bias: np.ndarray | None = None


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
    r_z = _sigmoid(inputs[..., : 2 * size] + recurrent[..., : 2 * size])
    n = np.tanh(inputs[..., 2 * size :] + r_z[..., :size] * recurrent[..., 2 * size :])
    return n + r_z[..., size:] * (h - n)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 + 0.5 * np.tanh(0.5 * x)  # the same function, without exp's overflow warnings


def _array(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()
