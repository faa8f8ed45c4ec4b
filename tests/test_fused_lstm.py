"""The fused LSTM kernel against torch.nn.LSTM: outputs, states, gradients, dropout, training.

The kernel computes its products in bf16 (as bf16 autocast does), so it is held to bf16
tolerances against an fp32 reference. Each test runs once for every back end this CPU has
(AMX, AVX-512 BF16), and is skipped where it has neither; the tests of the wrapper's own
checks and the fallback tests at the end run everywhere.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import read_metrics, tiny_config

import charlstm
from charlstm import fused_lstm
from charlstm.config import ModelConfig
from charlstm.model import CharRNN

pytestmark = pytest.mark.usefixtures("one_thread")

BACKENDS = fused_lstm._fused_lstm.backends() if fused_lstm._fused_lstm is not None else ()


@pytest.fixture(
    params=BACKENDS or [pytest.param(None, marks=pytest.mark.skip("no AMX/AVX-512 BF16"))]
)
def backend(request, monkeypatch):
    """Each back end this CPU can run, chosen through the environment as a user would."""
    monkeypatch.setenv("CHARLSTM_FUSED", request.param)
    assert fused_lstm.backend() == request.param
    return request.param


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.detach().float() - expected.detach()).norm() / expected.detach().norm())


def make_lstm(embed: int, hidden: int, layers: int, seed: int = 0) -> torch.nn.LSTM:
    torch.manual_seed(seed)
    return torch.nn.LSTM(embed, hidden, layers, batch_first=True)


def kernel_layers(lstm, x, state=None, **dropout):
    """The kernel on batch-first x: every layer's output (batch-first) and the final state."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs, (h, c) = fused_lstm.lstm_forward(lstm, x.transpose(0, 1), state, **dropout)
    return [out.transpose(0, 1) for out in outputs], (h, c)


def kernel(lstm, x, state=None, **dropout):
    """The kernel on batch-first x, as torch.nn.LSTM would be called: the last layer's output."""
    outputs, final = kernel_layers(lstm, x, state, **dropout)
    return outputs[-1], final


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize(
    ("batch", "embed", "hidden", "layers"),
    [(32, 128, 256, 2), (5, 20, 64, 1), (17, 96, 32, 3), (48, 64, 128, 2)],
)
def test_forward_matches_torch_lstm(batch, embed, hidden, layers):
    lstm = make_lstm(embed, hidden, layers)
    x = torch.randn(batch, 40, embed)
    state = (torch.randn(layers, batch, hidden) * 0.5, torch.randn(layers, batch, hidden))
    expected, (h, c) = lstm(x, state)
    got, (got_h, got_c) = kernel(lstm, x, state)
    assert got.shape == expected.shape and got.dtype == torch.bfloat16
    assert got_h.shape == h.shape and got_h.dtype == torch.float32
    # bf16 products: about three significant digits, the same as autocast's own LSTM.
    assert relative_error(got, expected) < 1e-2
    assert relative_error(got_h, h) < 1e-2
    assert relative_error(got_c, c) < 1e-2
    assert (got.float() - expected).abs().max() < 0.03


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize(
    ("batch", "embed", "hidden", "layers"), [(32, 128, 256, 2), (7, 40, 64, 2)]
)
def test_gradients_match_torch_lstm(batch, embed, hidden, layers):
    lstm = make_lstm(embed, hidden, layers)
    x = torch.randn(batch, 30, embed, requires_grad=True)
    h0 = (torch.randn(layers, batch, hidden) * 0.5).requires_grad_()
    c0 = torch.randn(layers, batch, hidden).requires_grad_()
    weights = torch.randn(batch, 30, hidden)
    final_weights = torch.randn(layers, batch, hidden), torch.randn(layers, batch, hidden)

    def grads(run):
        out, (h, c) = run(lstm, x, (h0, c0))
        objective = (out.float() * weights).sum()
        objective = objective + (h * final_weights[0]).sum() + (c * final_weights[1]).sum()
        inputs = [x, h0, c0, *lstm.parameters()]
        return torch.autograd.grad(objective, inputs)

    expected = grads(lambda lstm, x, state: lstm(x, state))
    got = grads(kernel)
    names = ["x", "h0", "c0"] + [name for name, _ in lstm.named_parameters()]
    for name, g, e in zip(names, got, expected, strict=True):
        assert g.shape == e.shape, name
        assert relative_error(g, e) < 2e-2, name


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize(("batch", "layers"), [(32, 2), (5, 1)])
def test_ids_with_an_embedding_match_torch_lstm_on_the_embedded_input(batch, layers):
    # The first layer looks W_ih x + b up in a table instead of multiplying: the same function
    # and the same gradients, the embedding's included.
    lstm = make_lstm(48, 64, layers)
    embedding = torch.randn(30, 48, requires_grad=True)
    ids = torch.randint(0, 30, (batch, 25))
    ids[0, :3] = 29  # a repeated id: its table row gathers gradient from several positions
    state = (torch.randn(layers, batch, 64) * 0.5, torch.randn(layers, batch, 64))
    weights = torch.randn(batch, 25, 64)

    def run(use_kernel):
        if use_kernel:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                outputs, (h, c) = fused_lstm.lstm_forward(lstm, ids.t(), state, embedding=embedding)
            out = outputs[-1].transpose(0, 1)
        else:
            out, (h, c) = lstm(F.embedding(ids, embedding), state)
        objective = (out.float() * weights).sum() + h.sum() - c.sum()
        return out, h, torch.autograd.grad(objective, [embedding, *lstm.parameters()])

    got, got_h, got_grads = run(True)
    expected, h, expected_grads = run(False)
    assert relative_error(got, expected) < 1e-2
    assert relative_error(got_h, h) < 1e-2
    names = ["embedding"] + [name for name, _ in lstm.named_parameters()]
    for name, g, e in zip(names, got_grads, expected_grads, strict=True):
        assert g.shape == e.shape, name
        assert relative_error(g, e) < 2e-2, name
    biases = [g for name, g in zip(names, got_grads, strict=True) if name.startswith("bias")]
    assert len({g.data_ptr() for g in biases}) == len(biases)  # clipping scales each once


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("bad", [-1, 30, 2**32 + 5])
def test_ids_outside_the_table_are_refused_like_torchs_embedding(bad):
    lstm = make_lstm(32, 64, 1)
    embedding = torch.randn(30, 32)
    ids = torch.randint(0, 30, (16, 5))
    ids[3, 2] = bad  # 2**32 + 5 must not wrap around to 5 as the kernel's int32
    with pytest.raises(IndexError):
        F.embedding(ids, embedding)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(IndexError, match="30"):
        fused_lstm.lstm_forward(lstm, ids.t(), None, embedding=embedding)


def raw(*tensors):
    """The kernel's buffers as it takes them: address and size in bytes, one pair a tensor."""
    return [part for t in tensors for part in (t.data_ptr(), t.numel() * t.element_size())]


def lookup_layer_buffers(steps=2, batch=16, hidden=32, vocab=5):
    """A lookup layer's forward and backward buffers for the kernel called directly, bypassing
    the wrapper's checks; every output holds a sentinel, to show what the kernel left alone."""
    torch.manual_seed(0)
    gates, rows, state = 4 * hidden, (steps, batch), (batch, hidden)
    w_hh = torch.randn(gates, hidden) * 0.1
    forward_w, backward_w = fused_lstm._pack(torch.zeros(gates, 0), w_hh, 0)
    saved_bytes = steps * batch * hidden * fused_lstm._fused_lstm.SAVED_BYTES_PER_UNIT
    return {
        "xh": torch.zeros(*rows, hidden, dtype=torch.bfloat16),
        "forward_w": forward_w,
        "table": torch.randn(vocab, gates),
        "ids": torch.randint(0, vocab, rows, dtype=torch.int32),
        "c0": torch.zeros(state),
        "saved": torch.full((saved_bytes,), 0xAB, dtype=torch.uint8),
        "h_out": torch.full((*rows, hidden), 7.0, dtype=torch.bfloat16),
        "h_last": torch.full(state, 7.0),
        "c_last": torch.full(state, 7.0),
        "d_out": torch.ones(*rows, hidden, dtype=torch.bfloat16),
        "backward_w": backward_w,
        "d_gates": torch.full((gates, steps * batch + 32), 7.0, dtype=torch.bfloat16),
        "d_x": torch.empty(*rows, 0, dtype=torch.bfloat16),
        "d_h": torch.full(state, 7.0),
        "d_c": torch.full(state, 7.0),
        "d_table": torch.full((vocab, gates), 7.0),
    }


def call_forward(b, amx, *, steps=2, **replaced):
    b = {**b, **replaced}
    args = raw(b["xh"], b["forward_w"], b["table"], b["ids"], b["c0"], b["saved"], b["h_out"])
    args += raw(b["h_last"], b["c_last"])
    fused_lstm._fused_lstm.forward(steps, 16, 0, 32, *args, 1.0, 0, amx)


def call_backward(b, amx, **replaced):
    b = {**b, **replaced}
    args = raw(b["d_out"], b["backward_w"], b["saved"], b["c0"], b["d_gates"])
    args += [b["d_gates"].stride(0), *raw(b["d_x"], b["d_h"], b["d_c"], b["d_table"], b["ids"])]
    fused_lstm._fused_lstm.backward(2, 16, 0, 32, *args, 1.0, 0, amx)


def untouched(b, names):
    """Whether the outputs ``names`` of lookup_layer_buffers still hold their sentinels."""
    fresh = lookup_layer_buffers()
    return all(torch.equal(b[name], fresh[name]) for name in names)


FORWARD_OUTPUTS = ("xh", "saved", "h_out", "h_last", "c_last")
BACKWARD_OUTPUTS = ("d_gates", "d_h", "d_c", "d_table")


@pytest.mark.parametrize("bad", [5, -1, 2**31 - 1])
def test_the_kernel_itself_refuses_an_id_outside_its_table_before_touching_memory(backend, bad):
    # The wrapper's checks bypassed: the C code checks every id against the rows its table
    # holds before it reads or writes one, forward and backward.
    amx = backend == "amx"
    b = lookup_layer_buffers()
    call_forward(b, amx)  # a control: these buffers are right, and the forward writes them
    assert not untouched(b, ["h_out"])
    b = lookup_layer_buffers()
    b["ids"][1, 7] = bad
    with pytest.raises(IndexError, match="outside the table of 5 rows"):
        call_forward(b, amx)
    assert untouched(b, FORWARD_OUTPUTS)
    with pytest.raises(IndexError, match="outside the table of 5 rows"):
        call_backward(b, amx)
    assert untouched(b, BACKWARD_OUTPUTS)
    # The rows the table's buffer holds bound the ids: with one row fewer, id 4 is out.
    b = lookup_layer_buffers()
    b["ids"][0, 0] = 4
    with pytest.raises(IndexError, match="outside the table of 4 rows"):
        call_forward(b, amx, table=b["table"][:4].clone())
    with pytest.raises(IndexError, match="outside the table of 4 rows"):
        call_backward(b, amx, d_table=b["d_table"][:4].clone())
    assert untouched(b, FORWARD_OUTPUTS + BACKWARD_OUTPUTS)


def test_ids_outside_the_table_fail_in_the_kernel_with_the_wrappers_check_off(backend, monkeypatch):
    monkeypatch.setattr(fused_lstm, "_check_ids", lambda ids, vocab: None)
    lstm = make_lstm(32, 64, 1)
    ids = torch.randint(0, 30, (5, 16))
    ids[2, 3] = 30
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(IndexError, match="30 rows"):
        fused_lstm.lstm_forward(lstm, ids, None, embedding=torch.randn(30, 32))


@pytest.mark.parametrize(
    ("name", "short", "error"),
    [
        ("h_out", torch.empty(2 * 16 * 32 - 16, dtype=torch.bfloat16), "h_out holds 2016 bytes"),
        ("c0", torch.zeros(16 * 32 - 1), "c0 holds 2044 bytes"),
        ("saved", torch.empty(100, dtype=torch.uint8), "saved holds 100 bytes"),
        ("ids", torch.zeros(16, dtype=torch.int32), "ids holds 64 bytes"),
    ],
)
def test_the_kernel_refuses_a_buffer_smaller_than_its_shapes_need(backend, name, short, error):
    b = lookup_layer_buffers()
    with pytest.raises(ValueError, match=error):
        call_forward(b, backend == "amx", **{name: short})
    assert untouched(b, FORWARD_OUTPUTS)


def test_the_kernel_refuses_a_sequence_of_no_steps_and_a_rate_outside_0_1(backend):
    amx = backend == "amx"
    b = lookup_layer_buffers()
    with pytest.raises(ValueError, match="no steps"):
        call_forward(b, amx, steps=0)
    args = raw(*(b[name] for name in ("xh", "forward_w", "table", "ids", "c0", "saved")))
    args += raw(b["h_out"], b["h_last"], b["c_last"])
    with pytest.raises(ValueError, match="rate"):
        fused_lstm._fused_lstm.forward(2, 16, 0, 32, *args, -0.5, 1, amx)
    assert untouched(b, FORWARD_OUTPUTS)


@pytest.mark.parametrize(
    ("tensor", "dtype", "shape", "error", "message"),
    [
        (torch.zeros(4, 8), torch.bfloat16, (4, 8), TypeError, "must be torch.bfloat16"),
        (torch.zeros(4, 8, dtype=torch.int64), torch.int32, (4, 8), TypeError, "torch.int32"),
        (torch.zeros(4, 8), torch.float32, (4, 9), ValueError, r"must be \(4, 9\)"),
        (torch.zeros(8, 4).t(), torch.float32, (4, 8), ValueError, "contiguous"),
        (torch.zeros(4, 16)[:, ::2], torch.float32, (4, 8), ValueError, "contiguous"),
        (torch.zeros(4, 8, device="meta"), torch.float32, (4, 8), ValueError, "on the CPU"),
        (bytearray(128), torch.float32, (4, 8), TypeError, "must be a tensor"),
    ],
)
def test_every_buffer_handed_to_the_kernel_is_checked(tensor, dtype, shape, error, message):
    # Raised errors, not asserts: `python -O` keeps them (see the next test).
    with pytest.raises(error, match=message):
        fused_lstm._buffers(("c0", tensor, dtype, shape))
    good = torch.zeros(4, 8)
    parts = fused_lstm._buffers(("c0", good, torch.float32, (4, 8)), ("ids", None, torch.int32, ()))
    assert parts == [good.data_ptr(), 128, 0, 0]  # None: no buffer, NULL to the kernel


@pytest.mark.slow
def test_the_checks_hold_under_python_O():
    code = """
import torch
from charlstm import fused_lstm
assert False, "-O strips asserts"  # stripped: execution goes on
lstm = torch.nn.LSTM(32, 64, 2)
for call, error in [
    (lambda: fused_lstm._buffers(("h", torch.zeros(8, 4).t(), torch.float32, (4, 8))), ValueError),
    (lambda: fused_lstm._buffers(("h", torch.zeros(4, 8), torch.bfloat16, (4, 8))), TypeError),
    (lambda: fused_lstm._check_ids(torch.tensor([[3, 30]]), 30), IndexError),
    (lambda: fused_lstm._check_ids(torch.tensor([[-1, 3]]), 30), IndexError),
    (lambda: fused_lstm.lstm_forward(
        lstm, torch.randn(5, 16, 32), (torch.zeros(2, 8, 64), torch.zeros(2, 8, 64))),
     ValueError),
]:
    try:
        call()
    except error:
        continue
    raise SystemExit(f"no {error.__name__}")
print("refused")
"""
    done = subprocess.run(
        [sys.executable, "-O", "-c", code], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "refused"


@pytest.mark.usefixtures("backend")
def test_lstm_forward_refuses_inputs_torchs_lstm_would():
    lstm = make_lstm(32, 64, 2).float()
    x, embedding = torch.randn(5, 16, 32), torch.randn(30, 32)
    state = torch.zeros(2, 16, 64), torch.zeros(2, 16, 64)
    ids = torch.randint(0, 30, (5, 16))
    cases = [
        (ValueError, "each state part", lambda: (x, (state[0][:, :8], state[1][:, :8]), None)),
        (ValueError, "each state part", lambda: (x, (state[0], state[1][..., :32]), None)),
        (ValueError, r"x must be \(T, B, 32\)", lambda: (x[..., :16], state, None)),
        (ValueError, "x must be", lambda: (x[0], None, None)),
        (TypeError, "int32 or int64", lambda: (ids.float(), None, embedding)),
        (TypeError, "int32 or int64", lambda: (ids.to(torch.int16), None, embedding)),
        (ValueError, r"ids must be \(T, B\)", lambda: (ids[None], None, embedding)),
        (ValueError, "the embedding must be", lambda: (ids, None, embedding[:, :16])),
    ]
    for error, message, make in cases:
        given, given_state, given_embedding = make()
        with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(error, match=message):
            fused_lstm.lstm_forward(lstm, given, given_state, embedding=given_embedding)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # int32 ids, as torch's embedding takes
        int32, _ = fused_lstm.lstm_forward(lstm, ids.int(), state, embedding=embedding)
        int64, _ = fused_lstm.lstm_forward(lstm, ids, state, embedding=embedding)
    assert torch.equal(int32[-1], int64[-1])


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize(("steps", "batch"), [(0, 5), (0, 16), (3, 0)])
@pytest.mark.parametrize("lookup", [False, True])
def test_an_empty_sequence_gives_empty_outputs_and_the_state_as_given(steps, batch, lookup):
    lstm = make_lstm(32, 64, 2)
    embedding = torch.randn(30, 32) if lookup else None
    x = torch.randint(0, 30, (steps, batch)) if lookup else torch.randn(steps, batch, 32)
    state = tuple(torch.randn(2, batch, 64).requires_grad_() for _ in range(2))
    generator, other = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs, (h, c) = fused_lstm.lstm_forward(
            lstm, x, state, embedding=embedding, rate=0.3, generator=generator
        )
        step = torch.randint(0, 30, (1, 16)) if lookup else torch.randn(1, 16, 32)
        fused_lstm.lstm_forward(lstm, step, None, embedding=embedding, rate=0.3, generator=other)
    assert [tuple(o.shape) for o in outputs] == [(steps, batch, 64)] * 2
    assert all(o.dtype == torch.bfloat16 for o in outputs)
    assert torch.equal(h, state[0]) and torch.equal(c, state[1])
    assert h.dtype == c.dtype == torch.float32
    # The same seeds drawn as for any length: the next call's masks do not depend on this one's.
    assert torch.equal(generator.get_state(), other.get_state())
    if batch:  # the state passes through: its gradient is the identity
        d_h, d_c = torch.autograd.grad(h.sum() + 2 * c.sum(), state)
        assert torch.equal(d_h, torch.ones_like(d_h)) and torch.equal(d_c, 2 * torch.ones_like(d_c))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fresh_outputs, (fresh_h, _) = fused_lstm.lstm_forward(lstm, x, None, embedding=embedding)
    assert fresh_outputs[0].shape == (steps, batch, 64)
    assert torch.equal(fresh_h, torch.zeros(2, batch, 64))


@pytest.mark.usefixtures("backend")
def test_charrnn_on_the_kernel_path_takes_an_empty_chunk_like_any_other(monkeypatch):
    # [B, 0] ids: [B, 0, V] logits and the state as given; a chunk after it runs as if the
    # empty one had not been there, and matches torch's LSTM (which refuses T = 0 itself).
    torch.manual_seed(0)
    net = CharRNN(ModelConfig(embed_dim=32, hidden_dim=64, n_layers=2), 20).eval()
    x = torch.randint(0, 20, (9, 25))
    state = tuple(torch.randn(2, 9, 64) * 0.5 for _ in range(2))
    calls = []
    original = fused_lstm.lstm_forward
    monkeypatch.setattr(
        fused_lstm, "lstm_forward", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        empty, after_empty = net(x[:, :0], state)
        logits, final = net(x, after_empty)
        direct, direct_final = net(x, state)
        monkeypatch.setattr(fused_lstm, "available", lambda: False)
        reference, reference_final = net(x, state)
    assert calls == [1, 1]  # the empty chunk never reaches the kernel: nothing to run
    assert empty.shape == (9, 0, 20)
    for part, given in zip(after_empty, state, strict=True):
        assert torch.equal(part, given)
    assert torch.equal(logits, direct)
    assert all(torch.equal(a, b) for a, b in zip(final, direct_final, strict=True))
    assert relative_error(logits.float(), reference.float()) < 1e-2
    for s, e in zip(final, reference_final, strict=True):
        assert relative_error(s, e.float()) < 1e-2


def mix32(x: np.ndarray) -> np.ndarray:
    """The kernel's 32-bit hash (fused_lstm.c, mix32), in numpy's wrapping uint32."""
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def reference_mask(keep: float, seed: int, index: np.ndarray) -> np.ndarray:
    """The factor (0 or 1 / keep) of each element index (uint64): the low 32 bits hashed with
    the seed as the kernel always has; a nonzero high word moves the second seed (mix32(0) is
    0, so below 2^32 nothing changes)."""
    low = (index & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    second_seed = np.uint32(seed >> 32) + mix32((index >> np.uint64(32)).astype(np.uint32))
    x = mix32(mix32(low ^ np.uint32(seed & 0xFFFFFFFF)) + second_seed)
    kept = (x >> np.uint32(8)) < np.uint32(int(keep * 2**24 + 0.5))
    return np.where(kept, np.float32(1 / keep), np.float32(0))


def kernel_mask(keep, seed, batch, hidden, step) -> np.ndarray:
    factors = fused_lstm._fused_lstm.mask(keep, seed, batch, hidden, step)
    return np.frombuffer(factors, dtype=np.float32).reshape(batch, hidden)


@pytest.mark.usefixtures("backend")
def test_dropout_mask_indices_past_2_32_do_not_wrap_around():
    # Element (t, b, j) has index t * B * H + b * H + j. At B * H = 512, step 2^23 starts at
    # index 2^32: with 32-bit indices it would repeat step 0's mask. The kernel's own mask for
    # any step is asked of it directly, without running (or allocating) 2^23 steps; it is
    # checked first to be the very mask the layer applies.
    batch, hidden, keep = 16, 32, 0.7
    lstm = make_lstm(32, hidden, 1)
    x = torch.randn(batch, 6, 32)
    out, _ = kernel(lstm, x, rate=1 - keep, generator=torch.Generator().manual_seed(4))
    seed = int(torch.randint(2**62, (), generator=torch.Generator().manual_seed(4)))
    for t in range(6):
        applied = (out[:, t].float() != 0).numpy()
        assert np.array_equal(applied, kernel_mask(keep, seed, batch, hidden, t) != 0)
    # Bit for bit the hash of the low 32 bits as before, so masks below 2^32 are unchanged
    # (runs resumed from earlier checkpoints draw the same ones).
    for t in (0, 5, 2**23 - 1):
        index = np.arange(t * 512, (t + 1) * 512, dtype=np.uint64).reshape(batch, hidden)
        assert np.array_equal(
            kernel_mask(keep, seed, batch, hidden, t), reference_mask(keep, seed, index)
        )
    for t in (2**23, 2**23 + 1, 2**31 - 1):
        index = np.arange(t * 512, (t + 1) * 512, dtype=np.uint64).reshape(batch, hidden)
        past = kernel_mask(keep, seed, batch, hidden, t)
        assert np.array_equal(past, reference_mask(keep, seed, index))
        assert not np.array_equal(past, kernel_mask(keep, seed, batch, hidden, t - 2**23))
        assert 0.6 < float((past != 0).mean()) < 0.8


@pytest.mark.usefixtures("backend")
def test_dropout_masks_keep_the_rate_scale_and_repeat_with_the_seed():
    lstm = make_lstm(32, 64, 1)
    x = torch.randn(64, 50, 32)
    plain, _ = kernel(lstm, x)
    dropped, (h, _) = kernel(lstm, x, rate=0.3, generator=torch.Generator().manual_seed(4))
    again, _ = kernel(lstm, x, rate=0.3, generator=torch.Generator().manual_seed(4))
    other, _ = kernel(lstm, x, rate=0.3, generator=torch.Generator().manual_seed(5))
    zero = dropped == 0
    assert abs(float(zero.float().mean()) - 0.3) < 0.01
    kept = dropped[~zero].float() / plain[~zero].float()
    assert torch.allclose(kept, torch.full_like(kept, 1 / 0.7), rtol=1e-2)
    assert torch.equal(dropped, again)
    assert not torch.equal(dropped, other)
    # The final state is the layer's own, never dropped out.
    torch.testing.assert_close(h, kernel(lstm, x)[1][0])


@pytest.mark.usefixtures("backend")
def test_dropout_gradient_uses_the_forward_mask():
    # Each layer's output is dropped, and the next layer reads it so; the backward must zero
    # exactly the elements the forward dropped. Compare with torch.nn.LSTM layers joined by
    # the very masks the kernel drew (read off its outputs).
    lstm = make_lstm(24, 64, 2)
    first, second = make_lstm(24, 64, 1), make_lstm(64, 64, 1)
    for name, param in lstm.named_parameters():
        target = first if name.endswith("l0") else second
        getattr(target, name[:-1] + "0").data.copy_(param.data)
    x = torch.randn(16, 30, 24, requires_grad=True)
    weights = torch.randn(16, 30, 64)
    generator = torch.Generator().manual_seed(3)
    (out_first, out), _ = kernel_layers(lstm, x, rate=0.5, generator=generator)
    first_mask, mask = ((o.float() != 0).float() / 0.5 for o in (out_first, out))
    assert 0.45 < float((first_mask == 0).float().mean()) < 0.55
    assert not any(bool((m == m[:, :1]).all()) for m in (first_mask, mask))  # fresh each step
    hidden_first, _ = first(x)
    expected_out = second(hidden_first * first_mask)[0] * mask
    assert relative_error(out, expected_out) < 1e-2
    got = torch.autograd.grad((out.float() * weights).sum(), [x, *lstm.parameters()])
    expected = torch.autograd.grad(
        (expected_out * weights).sum(), [x, *first.parameters(), *second.parameters()]
    )
    for g, e in zip(got, expected, strict=True):
        assert relative_error(g, e) < 2e-2


@pytest.mark.usefixtures("backend")
def test_charrnn_uses_the_kernel_under_bf16_autocast_and_matches_torch(monkeypatch):
    torch.manual_seed(0)
    net = CharRNN(ModelConfig(embed_dim=32, hidden_dim=64, dropout=0.0), 20)
    x, y = torch.randint(0, 20, (9, 25)), torch.randint(0, 20, (9, 25))
    calls = []
    original = fused_lstm.lstm_forward
    monkeypatch.setattr(
        fused_lstm, "lstm_forward", lambda *a, **k: calls.append(1) or original(*a, **k)
    )

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, state = net(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        return loss, torch.autograd.grad(loss, list(net.parameters())), state

    loss, grads, state = run()
    assert calls == [1]
    monkeypatch.setattr(fused_lstm, "available", lambda: False)
    ref_loss, ref_grads, ref_state = run()
    assert calls == [1]  # the fallback: torch's LSTM under autocast
    assert abs(loss.item() - ref_loss.item()) < 1e-3
    for g, e in zip(grads, ref_grads, strict=True):
        assert relative_error(g, e) < 3e-2
    for s, e in zip(state, ref_state, strict=True):
        assert relative_error(s, e.float()) < 1e-2


@pytest.fixture
def two_threads():
    """Two shards of each batch, each on its own thread, as training on 2 cores runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def metrics(run_dir):
    return [(r["step"], r["kind"], r["loss"]) for r in read_metrics(run_dir)]


@pytest.mark.slow
@pytest.mark.usefixtures("backend")
@pytest.mark.usefixtures("two_threads")
def test_training_through_the_kernel_learns_repeats_and_resumes_exactly(small_corpus, tmp_path):
    # Dropout on and two shards: every mask comes from a seed drawn in order, so a second run
    # and a run stopped at step 60 and resumed end with the same bytes as the first.
    settings = {"precision": "bf16", "dropout": 0.2, "lr": 1e-2}
    settings.update(schedule="constant")
    settings.update(eval_every=30, log_every=10)

    def run(name, steps, **extra):
        config = tiny_config(small_corpus, tmp_path / name, max_steps=steps, **settings, **extra)
        return charlstm.train(config, progress=False)

    first = run("first", 120)
    assert first.best_val.loss < 2.6  # from ln(vocab) ~ 4: it learnt
    second = run("second", 120)
    run("split", 60)
    run("split", 120, resume=str(tmp_path / "split"))
    for other in ("second", "split"):
        for name in ("best/model.safetensors", "last/model.safetensors"):
            assert (tmp_path / other / name).read_bytes() == (first.run_dir / name).read_bytes()
        assert metrics(tmp_path / other) == metrics(first.run_dir)
    assert second.steps == 120


def test_the_environment_can_turn_the_kernel_off(monkeypatch):
    monkeypatch.setenv("CHARLSTM_FUSED", "0")
    assert not fused_lstm.available()


def test_the_environment_picks_a_back_end_only_if_this_cpu_has_it(monkeypatch):
    for name in ("amx", "avx512"):
        monkeypatch.setenv("CHARLSTM_FUSED", name)
        assert fused_lstm.backend() == (name if name in BACKENDS else None)
    monkeypatch.setenv("CHARLSTM_FUSED", "1")
    assert fused_lstm.backend() == (BACKENDS[0] if BACKENDS else None)
    monkeypatch.delenv("CHARLSTM_FUSED")
    assert fused_lstm.backend() == (BACKENDS[0] if BACKENDS else None)


def test_fp32_and_other_cells_never_take_the_kernel(monkeypatch):
    monkeypatch.setattr(fused_lstm, "lstm_forward", lambda *a, **k: pytest.fail("kernel used"))
    x = torch.randint(0, 20, (3, 7))
    lstm = CharRNN(ModelConfig(embed_dim=8, hidden_dim=32), 20)
    lstm(x)  # fp32, no autocast
    gru = CharRNN(ModelConfig(cell="gru", embed_dim=8, hidden_dim=32), 20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gru(x)
