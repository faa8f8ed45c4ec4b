"""The fused LSTM kernel against torch.nn.LSTM: outputs, states, gradients, dropout, training.

The kernel computes its products in bf16 (as bf16 autocast does), so it is held to bf16
tolerances against an fp32 reference. Each test runs once for every back end this CPU has
(AMX, AVX-512 BF16), and is skipped where it has neither; the fallback tests at the end run
everywhere.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

import charlstm
from charlstm import fused_lstm
from charlstm.config import ModelConfig
from charlstm.model import CharRNN, run_lstm_layer_dropping_updates

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
@pytest.mark.parametrize("locked", [False, True])
def test_dropout_gradient_uses_the_forward_mask(locked):
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
    (out_first, out), _ = kernel_layers(lstm, x, rate=0.5, locked=locked, generator=generator)
    first_mask, mask = ((o.float() != 0).float() / 0.5 for o in (out_first, out))
    assert 0.45 < float((first_mask == 0).float().mean()) < 0.55
    # Locked: one mask per stream (row) for every step; otherwise a fresh one at each step.
    held = [bool((m == m[:, :1]).all()) for m in (first_mask, mask)]
    assert held == [locked, locked]
    hidden_first, _ = first(x)
    expected_out = second(hidden_first * first_mask)[0] * mask
    assert relative_error(out, expected_out) < 1e-2
    got = torch.autograd.grad((out.float() * weights).sum(), [x, *lstm.parameters()])
    expected = torch.autograd.grad(
        (expected_out * weights).sum(), [x, *first.parameters(), *second.parameters()]
    )
    for g, e in zip(got, expected, strict=True):
        assert relative_error(g, e) < 2e-2


def kernel_update_mask(batch, steps, hidden, **dropout):
    """The mask the kernel puts on the cell update, read off a layer whose input and forget
    gates are saturated open and shut, with g = 0.5 and o = 1: there h_t = tanh(0.5 m_t)."""
    probe = make_lstm(32, hidden, 1)
    with torch.no_grad():
        for param in probe.parameters():
            param.zero_()
        gates = torch.tensor([30.0, -30.0, math.atanh(0.5), 30.0])
        probe.bias_ih_l0.copy_(gates.repeat_interleave(hidden))
    out, _ = kernel(probe, torch.zeros(batch, steps, 32), **dropout)
    return (out.float() > 0.25).float() / (1 - dropout["recurrent_rate"])


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("locked", [False, True])
def test_recurrent_dropout_matches_the_stepped_layer_with_the_kernels_masks(locked):
    lstm = make_lstm(32, 64, 1)
    x = torch.randn(16, 30, 32, requires_grad=True)
    state = (torch.randn(16, 64) * 0.5, torch.randn(16, 64))
    weights = torch.randn(16, 30, 64)
    dropout = {"recurrent_rate": 0.4, "locked": locked}
    mask = kernel_update_mask(16, 30, 64, **dropout, generator=torch.Generator().manual_seed(3))
    assert 0.35 < float((mask == 0).float().mean()) < 0.45
    assert bool((mask == mask[:, :1]).all()) == locked  # one mask per stream if locked
    out, (h, c) = kernel(
        lstm, x, tuple(s.unsqueeze(0) for s in state), **dropout,
        generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    expected, (expected_h, expected_c) = run_lstm_layer_dropping_updates(
        x, state, list(lstm.parameters()), mask[:, :1] if locked else mask
    )
    assert relative_error(out, expected) < 1e-2
    assert relative_error(h[0], expected_h) < 1e-2
    assert relative_error(c[0], expected_c) < 1e-2
    inputs = [x, *lstm.parameters()]
    got = torch.autograd.grad((out.float() * weights).sum() + c.sum(), inputs)
    reference = torch.autograd.grad((expected * weights).sum() + expected_c.sum(), inputs)
    for g, e in zip(got, reference, strict=True):
        assert relative_error(g, e) < 2e-2


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("weight_dropout", [0.0, 0.4])
def test_charrnn_uses_the_kernel_under_bf16_autocast_and_matches_torch(monkeypatch, weight_dropout):
    torch.manual_seed(0)
    config = ModelConfig(embed_dim=32, hidden_dim=64, dropout=0.0, weight_dropout=weight_dropout)
    net = CharRNN(config, 20)
    x, y = torch.randint(0, 20, (9, 25)), torch.randint(0, 20, (9, 25))
    calls = []
    original = fused_lstm.lstm_forward
    monkeypatch.setattr(
        fused_lstm, "lstm_forward", lambda *a, **k: calls.append(1) or original(*a, **k)
    )

    def run():  # the same DropConnect masks on both paths: they come from the generator
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, state = net(x, generator=torch.Generator().manual_seed(3))
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
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open(encoding="utf-8")]
    return [(r["step"], r["kind"], r["loss"]) for r in rows]


@pytest.mark.usefixtures("backend")
@pytest.mark.usefixtures("two_threads")
def test_training_through_the_kernel_learns_repeats_and_resumes_exactly(small_corpus, tmp_path):
    # Both dropouts on and two shards: every mask comes from a seed drawn in order, so a second
    # run and a run stopped at step 60 and resumed end with the same bytes as the first.
    settings = {"precision": "bf16", "dropout": 0.2, "recurrent_dropout": 0.1, "lr": 1e-2}
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
