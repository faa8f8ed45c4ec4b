"""The LSTM recurrence in one C call per layer: each layer's whole time loop, fused.

A character LSTM's time goes to T small sequential steps, and PyTorch's CPU LSTM (oneDNN) pays
a fixed cost per step that dwarfs the arithmetic at these sizes. ``_fused_lstm``
(fused_lstm.c) runs the loop itself: each step's product [x_t | h_t-1] x [W_ih | W_hh]^T in
bf16 with fp32 sums, the gates in AVX-512 in fp32, the cell state in fp32. The products run on
Intel's AMX tiles where the CPU has them (Xeon since Sapphire Rapids), else on AVX-512 BF16
dot products (AMD Zen 4 and later, Intel Cooper Lake). The weight gradients, which are not
sequential, are one large PyTorch product per layer.

It runs where PyTorch would compute the LSTM in bf16 anyway: on such a CPU under bf16
autocast, i.e. training with ``--precision auto`` or ``bf16``. Everything else uses
torch.nn.LSTM. The environment variable ``CHARLSTM_FUSED`` chooses: ``0`` turns the kernel
off, ``avx512`` or ``amx`` asks for that back end (off if the CPU lacks it), and unset or
``1`` takes the fastest the CPU has.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    from charlstm import _fused_lstm
except ImportError:  # built without a C compiler, or on a platform the kernel does not cover
    _fused_lstm = None

_ROWS, _COLUMNS = 16, 32  # the kernel wants batches in multiples of 16, widths of 32

State = tuple[torch.Tensor, torch.Tensor]


def backend() -> str | None:
    """The back end the kernel runs its products on here, ``"amx"`` or ``"avx512"``; None if
    the kernel was not built, this CPU and operating system cannot run it, or the environment
    turns it off (``CHARLSTM_FUSED=0``, or a back end this CPU lacks)."""
    usable = _fused_lstm.backends() if _fused_lstm is not None else ()
    wanted = os.environ.get("CHARLSTM_FUSED", "1")
    if wanted == "1":
        return usable[0] if usable else None
    return wanted if wanted in usable else None


def available() -> bool:
    """True if the kernel runs here (see :func:`backend`)."""
    return backend() is not None


def applies(rnn: nn.Module, x: torch.Tensor) -> bool:
    """Whether :func:`lstm_forward` can stand in for ``rnn(x)`` here: a plain LSTM whose hidden
    width is a multiple of 32, on a CPU tensor, under bf16 autocast, with the kernel usable."""
    return (
        isinstance(rnn, nn.LSTM)
        and x.device.type == "cpu"
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
        and rnn.hidden_size % _COLUMNS == 0
        and rnn.bias
        and rnn.batch_first
        and not rnn.bidirectional
        and rnn.proj_size == 0
        and available()
    )


def lstm_forward(
    rnn: nn.LSTM,
    x: torch.Tensor,
    state: State | None,
    *,
    embedding: torch.Tensor | None = None,
    rate: float = 0.0,
    recurrent_rate: float = 0.0,
    locked: bool = False,
    generator: torch.Generator | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> tuple[list[torch.Tensor], State]:
    """``rnn(x, state)`` computed by the kernel, time-major: x (T, B, E) -> every layer's
    output, each (T, B, H) in bf16, and the final (h, c), each (n_layers, B, H) in fp32.
    Differentiable in x, state and weights. With ``embedding`` (V, E), x holds ids (T, B) and
    the input is their embedding. Each layer's output has dropout with ``rate``, its mask
    hashed from one seed per layer drawn from ``generator`` (fresh at every step, or one for
    all steps if ``locked``); the next layer reads it so. ``recurrent_rate`` drops out the
    cell update g inside each layer (c = f c' + i g m) with a mask hashed the same way.
    ``weights`` replaces some of rnn's parameters by name (W_hh with DropConnect, say)."""
    weights = weights or {}
    amx = backend() == "amx"
    batch = x.shape[1]
    padded = -(-batch // _ROWS) * _ROWS
    if state is None:
        zeros = torch.zeros(rnn.num_layers, padded, rnn.hidden_size, device=x.device)
        state = (zeros, zeros)
    else:
        state = tuple(_pad_rows(s.float(), padded, dim=1) for s in state)
    layer_input = _pad_rows(x, padded, dim=1)
    outputs, finals_h, finals_c = [], [], []
    for layer in range(rnn.num_layers):
        names = [f"{name}_l{layer}" for name in _WEIGHTS]
        w_ih, w_hh, b_ih, b_hh = [weights.get(name, getattr(rnn, name)) for name in names]
        seed, recurrent_seed = _seed(rate, generator), _seed(recurrent_rate, generator)
        h0, c0 = state[0][layer], state[1][layer]
        if layer == 0 and embedding is not None:
            # W_ih times a character's embedding is a row of one small (V, 4H) table, so the
            # kernel looks it up instead of multiplying: a third less work in the first layer.
            with torch.autocast("cpu", enabled=False):  # (biases added one by one: see below)
                table = F.linear(embedding.float(), w_ih.float()) + b_ih.float() + b_hh.float()
            _check_ids(layer_input, table.shape[0])  # before int32 could wrap one around
            ids = layer_input.to(torch.int32).contiguous()
            inputs = None, ids, None, w_hh, None, None, table
        else:
            inputs = layer_input, None, w_ih, w_hh, b_ih, b_hh, None
        layer_input, h, c = _Layer.apply(
            *inputs, h0, c0, rate, seed, recurrent_rate, recurrent_seed, locked, amx
        )
        outputs.append(layer_input[:, :batch])
        finals_h.append(h)
        finals_c.append(c)
    return outputs, (torch.stack(finals_h)[:, :batch], torch.stack(finals_c)[:, :batch])


_WEIGHTS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


class _Layer(torch.autograd.Function):
    """One LSTM layer over a whole sequence: x (T, B, E), h0 and c0 (B, H) -> out (T, B, H)
    after dropout with ``rate`` (masks hashed from ``seed``, one for all steps if ``locked``),
    with the cell update dropped out at ``recurrent_rate`` (from ``recurrent_seed``), and
    h_T, c_T; the products on AMX tiles if ``amx``, else AVX-512 BF16. B must be a
    multiple of 16; E is padded to a multiple of 32 here. For a layer whose input is a lookup,
    x, w_ih and the biases are None: ``ids`` (T, B) are the inputs and ``table`` (V, 4H) holds
    W_ih x + b_ih + b_hh for each."""

    @staticmethod
    def forward(
        ctx, x, ids, w_ih, w_hh, b_ih, b_hh, table, h0, c0,
        rate, seed, recurrent_rate, recurrent_seed, locked, amx,
    ):  # fmt: skip
        hidden = w_hh.shape[1]
        if ids is None:
            steps, batch, width = x.shape
            table = b_ih + b_hh
        else:
            (steps, batch), width = ids.shape, 0
            x, w_ih = torch.empty(steps, batch, 0), w_hh.new_empty(4 * hidden, 0)
        padded = -(-width // _COLUMNS) * _COLUMNS
        # Row t of joined holds [x_t | h_t-1]: the kernel writes each new h into the next row.
        joined = torch.empty(steps, batch, padded + hidden, dtype=torch.bfloat16)
        joined[:, :, :width] = x
        joined[:, :, width:padded] = 0
        joined[0, :, padded:] = h0
        forward_weights, backward_weights = _pack(w_ih, w_hh, padded)
        table = table.detach().float().contiguous()
        c0 = c0.float().contiguous()
        saved = torch.empty(
            steps * batch * hidden * _fused_lstm.SAVED_BYTES_PER_UNIT, dtype=torch.uint8
        )
        out = torch.empty(steps, batch, hidden, dtype=torch.bfloat16)
        h_last = torch.empty(batch, hidden)
        c_last = torch.empty(batch, hidden)
        _fused_lstm.forward(
            steps, batch, padded, hidden, *_pointers(joined, forward_weights, table),
            _id_pointer(ids), *_pointers(c0, saved, out, h_last, c_last), 1 - rate, seed,
            1 - recurrent_rate, recurrent_seed, locked, amx,
        )  # fmt: skip
        ctx.save_for_backward(joined, saved, c0, backward_weights, ids)
        ctx.sizes = steps, batch, width, padded, hidden
        ctx.dropout = 1 - rate, seed, 1 - recurrent_rate, recurrent_seed, locked
        ctx.amx = amx
        ctx.input_dtype = x.dtype
        ctx.vocab = None if ids is None else table.shape[0]
        return out, h_last, c_last

    @staticmethod
    def backward(ctx, d_out, d_h_last, d_c_last):
        joined, saved, c0, backward_weights, ids = ctx.saved_tensors
        steps, batch, width, padded, hidden = ctx.sizes
        rows = steps * batch
        d_out = _dense(d_out, (steps, batch, hidden), torch.bfloat16)
        d_h = _dense(d_h_last, (batch, hidden), torch.float32).clone()  # in: d h_T; out: d h_0
        d_c = _dense(d_c_last, (batch, hidden), torch.float32).clone()
        # The gates' gradient, transposed: (4H, rows), each row padded by 64 bytes so that the
        # kernel's 16-row column writes fall in different cache sets.
        d_gates = torch.empty(4 * hidden, rows + 32, dtype=torch.bfloat16)
        d_x = torch.empty(steps, batch, padded, dtype=torch.bfloat16)
        # A lookup layer's kernel adds each row's gates' gradient to its id's row of the table.
        d_bias = (
            torch.zeros(4 * hidden) if ctx.vocab is None else torch.zeros(ctx.vocab, 4 * hidden)
        )
        buffers = (d_out, backward_weights, saved, c0, d_gates)
        _fused_lstm.backward(
            steps, batch, padded, hidden, *_pointers(*buffers), d_gates.stride(0),
            *_pointers(d_x, d_h, d_c, d_bias), _id_pointer(ids), *ctx.dropout, ctx.amx,
        )  # fmt: skip
        # The weight gradient sums every step's outer product: one large matrix product.
        d_stacked = (d_gates[:, :rows] @ joined.view(rows, padded + hidden)).float()
        d_w_hh = d_stacked[:, padded:]
        if ctx.vocab is None:
            d_x = d_x[:, :, :width].to(ctx.input_dtype)
            # Each bias gets its own tensor: a shared one would be clipped (in place) twice.
            d_biases = d_bias, d_bias.clone()
            return d_x, None, d_stacked[:, :width], d_w_hh, *d_biases, None, d_h, d_c, *_NONE
        return None, None, None, d_w_hh, None, None, d_bias, d_h, d_c, *_NONE


_NONE = (None,) * 6  # no gradient for the two rates and seeds, locked and amx


def _pack(w_ih: torch.Tensor, w_hh: torch.Tensor, padded: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's weights [W_ih | 0 | W_hh] (W_ih's columns padded to ``padded``) in bf16, in
    the kernel's packed layouts: transposed for the forward, as is for the backward."""
    gates, width = w_ih.shape
    w_ih = w_ih.detach().float().contiguous()
    w_hh = w_hh.detach().float().contiguous()
    forward = torch.empty(gates * (padded + w_hh.shape[1]), dtype=torch.bfloat16)
    backward = torch.empty_like(forward)
    _fused_lstm.pack(
        w_ih.data_ptr(), w_hh.data_ptr(), width, padded, w_hh.shape[1],
        forward.data_ptr(), backward.data_ptr(),
    )  # fmt: skip
    return forward, backward


def _seed(rate: float, generator: torch.Generator | None) -> int:
    """A mask's seed, drawn from ``generator``; none is drawn for a rate of 0, so that one kind
    of dropout left off does not change the other's masks."""
    return int(torch.randint(2**62, (), generator=generator)) if rate > 0 else 0


def _check_ids(ids: torch.Tensor, vocab: int) -> None:
    """The kernel reads and writes row ``id`` of a (V, 4H) table unchecked: an id outside the
    vocabulary must fail here, as in torch's embedding, not touch memory past the table."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise IndexError(f"an input id lies outside the vocabulary of {vocab} symbols")


def _id_pointer(ids: torch.Tensor | None) -> int:
    """The address of a lookup layer's ids, or 0 (NULL) for a layer whose input is x."""
    return 0 if ids is None else _pointers(ids)[0]


def _dense(grad: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An incoming gradient as a contiguous tensor of ``dtype``; None (unused output) as zeros."""
    if grad is None:
        return torch.zeros(shape, dtype=dtype)
    return grad.to(dtype).contiguous()


def _pad_rows(t: torch.Tensor, rows: int, dim: int) -> torch.Tensor:
    extra = rows - t.shape[dim]
    if extra == 0:
        return t
    pad = [0, 0] * (t.dim() - dim - 1) + [0, extra]
    return F.pad(t, pad)


def _pointers(*tensors: torch.Tensor) -> list[int]:
    for t in tensors:
        assert t.is_contiguous() and t.device.type == "cpu"
    return [t.data_ptr() for t in tensors]
