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
    generator: torch.Generator | None = None,
) -> tuple[list[torch.Tensor], State]:
    """``rnn(x, state)`` computed by the kernel, time-major: x (T, B, E) -> every layer's
    output, each (T, B, H) in bf16, and the final (h, c), each (n_layers, B, H) in fp32.
    Differentiable in x, state and weights. With ``embedding`` (V, E), x holds ids (T, B) and
    the input is their embedding. Each layer's output has dropout with ``rate``, its mask
    fresh at every step and hashed from one seed per layer drawn from ``generator``; the next
    layer reads it so."""
    _check_inputs(rnn, x, state, embedding)
    amx = backend() == "amx"
    steps, batch = x.shape[0], x.shape[1]
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
        w_ih, w_hh, b_ih, b_hh = [getattr(rnn, name) for name in names]
        seed = _seed(rate, generator)
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
        if steps == 0 or batch == 0:
            # Nothing to run (the kernel wants a step and a row): an empty output, and the
            # state as given. The seed above is drawn all the same, so that the generator
            # moves on as it would for any length.
            layer_input = h0.new_empty(steps, padded, rnn.hidden_size, dtype=torch.bfloat16)
            h, c = h0, c0
        else:
            layer_input, h, c = _Layer.apply(*inputs, h0, c0, rate, seed, amx)
        outputs.append(layer_input[:, :batch])
        finals_h.append(h)
        finals_c.append(c)
    return outputs, (torch.stack(finals_h)[:, :batch], torch.stack(finals_c)[:, :batch])


_WEIGHTS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


class _Layer(torch.autograd.Function):
    """One LSTM layer over a whole sequence: x (T, B, E), h0 and c0 (B, H) -> out (T, B, H)
    after dropout with ``rate`` (masks hashed from ``seed``), and h_T, c_T; the products on
    AMX tiles if ``amx``, else AVX-512 BF16. B must be a multiple of 16; E is padded to a
    multiple of 32 here. For a layer whose input is a lookup, x, w_ih and the biases are None:
    ``ids`` (T, B) are the inputs and ``table`` (V, 4H) holds W_ih x + b_ih + b_hh for each."""

    @staticmethod
    def forward(ctx, x, ids, w_ih, w_hh, b_ih, b_hh, table, h0, c0, rate, seed, amx):
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
        saved_size = (steps * batch * hidden * _fused_lstm.SAVED_BYTES_PER_UNIT,)
        saved = torch.empty(saved_size, dtype=torch.uint8)
        out = torch.empty(steps, batch, hidden, dtype=torch.bfloat16)
        h_last = torch.empty(batch, hidden)
        c_last = torch.empty(batch, hidden)
        gates, rows, state = 4 * hidden, (steps, batch), (batch, hidden)
        buffers = _buffers(
            ("xh", joined, torch.bfloat16, (*rows, padded + hidden)),
            ("packed weights", forward_weights, torch.bfloat16, (gates * (padded + hidden),)),
            ("bias", table, torch.float32, (gates,) if ids is None else (table.shape[0], gates)),
            ("ids", ids, torch.int32, rows),
            ("c0", c0, torch.float32, state),
            ("saved", saved, torch.uint8, saved_size),
            ("out", out, torch.bfloat16, (*rows, hidden)),
            ("h_last", h_last, torch.float32, state),
            ("c_last", c_last, torch.float32, state),
        )
        _fused_lstm.forward(steps, batch, padded, hidden, *buffers, 1 - rate, seed, amx)
        ctx.save_for_backward(joined, saved, c0, backward_weights, ids)
        ctx.sizes = steps, batch, width, padded, hidden
        ctx.dropout = 1 - rate, seed
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
        gates, state = 4 * hidden, (batch, hidden)
        bias_shape = (gates,) if ctx.vocab is None else (ctx.vocab, gates)
        d_bias = torch.zeros(bias_shape)
        before = _buffers(
            ("d_out", d_out, torch.bfloat16, (steps, batch, hidden)),
            ("packed weights", backward_weights, torch.bfloat16, (gates * (padded + hidden),)),
            ("saved", saved, torch.uint8, (rows * hidden * _fused_lstm.SAVED_BYTES_PER_UNIT,)),
            ("c0", c0, torch.float32, state),
            ("d_gates", d_gates, torch.bfloat16, (gates, rows + 32)),
        )
        after = _buffers(
            ("d_x", d_x, torch.bfloat16, (steps, batch, padded)),
            ("d_h", d_h, torch.float32, state),
            ("d_c", d_c, torch.float32, state),
            ("d_bias", d_bias, torch.float32, bias_shape),
            ("ids", ids, torch.int32, (steps, batch)),
        )
        _fused_lstm.backward(
            steps, batch, padded, hidden, *before, d_gates.stride(0), *after, *ctx.dropout,
            ctx.amx,
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


_NONE = (None,) * 3  # no gradient for the rate, the seed and amx


def _pack(w_ih: torch.Tensor, w_hh: torch.Tensor, padded: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's weights [W_ih | 0 | W_hh] (W_ih's columns padded to ``padded``) in bf16, in
    the kernel's packed layouts: transposed for the forward, as is for the backward."""
    gates, width = w_ih.shape
    hidden = w_hh.shape[1]
    w_ih = w_ih.detach().float().contiguous()
    w_hh = w_hh.detach().float().contiguous()
    forward = torch.empty(gates * (padded + hidden), dtype=torch.bfloat16)
    backward = torch.empty_like(forward)
    weights = _buffers(
        ("W_ih", w_ih, torch.float32, (4 * hidden, width)),
        ("W_hh", w_hh, torch.float32, (4 * hidden, hidden)),
    )
    size = (4 * hidden * (padded + hidden),)
    packed = _buffers(
        ("packed weights", forward, torch.bfloat16, size),
        ("packed weights", backward, torch.bfloat16, size),
    )
    _fused_lstm.pack(*weights, width, padded, hidden, *packed)
    return forward, backward


def _seed(rate: float, generator: torch.Generator | None) -> int:
    """A mask's seed, drawn from ``generator``; none is drawn for a rate of 0, so that one kind
    of dropout left off does not change the other's masks."""
    return int(torch.randint(2**62, (), generator=generator)) if rate > 0 else 0


def _check_inputs(
    rnn: nn.LSTM, x: torch.Tensor, state: State | None, embedding: torch.Tensor | None
) -> None:
    """What :func:`lstm_forward` is given, checked as torch.nn.LSTM would: the kernel reads
    every shape off these, and a state for another batch would be padded or cut silently."""
    if embedding is None:
        if x.dim() != 3 or x.shape[2] != rnn.input_size:
            raise ValueError(f"x must be (T, B, {rnn.input_size}), not {tuple(x.shape)}")
    else:
        if x.dim() != 2:
            raise ValueError(f"ids must be (T, B), not {tuple(x.shape)}")
        if x.dtype not in (torch.int32, torch.int64):  # torch's embedding takes these alone
            raise TypeError(f"ids must be int32 or int64, not {x.dtype}")
        if embedding.dim() != 2 or embedding.shape[1] != rnn.input_size:
            raise ValueError(
                f"the embedding must be (V, {rnn.input_size}), not {tuple(embedding.shape)}"
            )
    if state is not None:
        expected = (rnn.num_layers, x.shape[1], rnn.hidden_size)
        for part in state:
            if tuple(part.shape) != expected:
                raise ValueError(f"each state part must be {expected}, not {tuple(part.shape)}")


def _check_ids(ids: torch.Tensor, vocab: int) -> None:
    """The kernel reads and writes row ``id`` of a (V, 4H) table: an id outside the vocabulary
    must fail here, as in torch's embedding (the kernel's own check sees ids only as int32)."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise IndexError(f"an input id lies outside the vocabulary of {vocab} symbols")


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


def _buffers(*specs: tuple[str, torch.Tensor | None, torch.dtype, tuple[int, ...]]) -> list[int]:
    """Each (name, tensor, dtype, shape) as the kernel takes a buffer: its address and its size
    in bytes, (0, 0) for None. The kernel reads and writes these as raw memory of that layout,
    so any other dtype, shape, device or a non-contiguous tensor is an error raised here (not
    an assert, which ``python -O`` strips)."""
    parts = []
    for name, t, dtype, shape in specs:
        if t is None:
            parts += [0, 0]
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"LSTM kernel: {name} must be a tensor, not {type(t).__name__}")
        if t.dtype != dtype:
            raise TypeError(f"LSTM kernel: {name} must be {dtype}, not {t.dtype}")
        if t.device.type != "cpu":
            raise ValueError(f"LSTM kernel: {name} must be on the CPU, not {t.device}")
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"LSTM kernel: {name} must be {tuple(shape)}, not {tuple(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"LSTM kernel: {name} must be contiguous")
        parts += [t.data_ptr(), t.numel() * t.element_size()]
    return parts
