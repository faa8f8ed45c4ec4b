"""CharRNN: shapes, state handling, truncated backpropagation and parameter counts."""

from __future__ import annotations

import dataclasses
import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_net as shared_tiny_net

from charlstm.config import DROPOUT_MASKS, ModelConfig
from charlstm.errors import CharLSTMError
from charlstm.model import CharRNN, detach_state, run_lstm_layer_dropping_updates

CELLS = ("lstm", "gru", "rnn")
VOCAB = 11


# Embeddings of 6 and 10 hidden units: the shapes the tests below check.
tiny_net = functools.partial(shared_tiny_net, vocab=VOCAB, embed_dim=6, hidden_dim=10)


def random_ids(batch: int, steps: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, steps), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cell", CELLS)
def test_forward_and_backward_shapes(cell):
    net = tiny_net(cell, n_layers=3)
    x = random_ids(4, 7)
    logits, state = net(x)
    assert logits.shape == (4, 7, VOCAB)
    assert isinstance(state, tuple)
    assert len(state) == (2 if cell == "lstm" else 1)
    for s in state:
        assert s.shape == (3, 4, 10)
    loss = F.cross_entropy(logits.flatten(0, 1), random_ids(4, 7, seed=2).flatten())
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in net.parameters())


@pytest.mark.parametrize("cell", CELLS)
def test_forward_accepts_its_own_state_and_an_empty_chunk_keeps_it(cell):
    net = tiny_net(cell)
    _, state = net(random_ids(2, 5))
    logits2, state2 = net(random_ids(2, 3), state)
    assert logits2.shape == (2, 3, VOCAB)
    assert [s.shape for s in state2] == [s.shape for s in state]
    logits, same = net(random_ids(2, 0), state)
    assert logits.shape == (2, 0, VOCAB)
    assert all(torch.equal(a, b) for a, b in zip(same, state, strict=True))
    _, zeros = net(random_ids(2, 0))
    assert all(not s.any() and s.shape == (2, 2, 10) for s in zeros)


@pytest.mark.parametrize("cell", CELLS)
def test_one_layer_with_dropout(cell):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PyTorch warns about inter-layer dropout with one layer
        net = tiny_net(cell, n_layers=1, dropout=0.5)
    x = random_ids(3, 9)
    net.train()
    torch.manual_seed(5)
    a, _ = net(x)
    b, _ = net(x)
    assert not torch.equal(a, b), "dropout before the head is active in training mode"
    a.sum().backward()
    net.eval()
    c, _ = net(x)
    d, _ = net(x)
    assert torch.equal(c, d)


def dropout_in_training_only(config: ModelConfig, **off) -> tuple[CharRNN, torch.Tensor]:
    """Checks a net with ``config`` against one with the same weights and ``off`` (its dropout
    at 0): in training the masks come from the generator and change the output; in
    evaluation the two agree exactly. Returns the net and a training output."""
    torch.manual_seed(0)
    net = CharRNN(config, VOCAB)
    plain = CharRNN(dataclasses.replace(config, **off), VOCAB)
    plain.load_state_dict(net.state_dict())
    x = random_ids(3, 9)
    net.train()
    a, _ = net(x, generator=torch.Generator().manual_seed(1))
    b, _ = net(x, generator=torch.Generator().manual_seed(1))
    c, _ = net(x, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)  # the masks come from the generator
    assert not torch.allclose(a, c)
    assert not torch.allclose(a, plain.train()(x)[0])
    torch.testing.assert_close(net.eval()(x)[0], plain.eval()(x)[0], rtol=0, atol=0)
    return net, a


@pytest.mark.parametrize("cell", CELLS)
def test_weight_dropout_masks_the_recurrent_weights_in_training_only(cell):
    config = ModelConfig(cell=cell, embed_dim=6, hidden_dim=10, dropout=0.0, weight_dropout=0.5)
    net, out = dropout_in_training_only(config, weight_dropout=0.0)
    # The masked product reaches the parameter: W_hh gets a gradient, zero where masked out.
    out.sum().backward()
    grad = net.rnn.weight_hh_l0.grad
    assert grad is not None and grad.abs().sum() > 0
    assert 0.3 < float((grad == 0).float().mean()) < 0.7


def test_recurrent_dropout_masks_the_cell_update_in_training_only():
    config = ModelConfig(embed_dim=6, hidden_dim=10, dropout=0.0, recurrent_dropout=0.5)
    net, out = dropout_in_training_only(config, recurrent_dropout=0.0)
    out.sum().backward()  # the stepped layer's masked update reaches every LSTM weight
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.rnn.parameters())


@pytest.mark.parametrize("locked", [False, True])
def test_the_stepped_layer_is_the_lstm_when_nothing_is_dropped_and_masks_its_updates(locked):
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(6, 10, batch_first=True)
    weights = list(lstm.parameters())
    x, state = torch.randn(4, 12, 6), (torch.randn(4, 10), torch.randn(4, 10))
    expected, (h, c) = lstm(x, tuple(s.unsqueeze(0) for s in state))
    ones = torch.ones(4, 1 if locked else 12, 10)
    got, (got_h, got_c) = run_lstm_layer_dropping_updates(x, state, weights, ones)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close((got_h, got_c), (h[0], c[0]), rtol=1e-5, atol=1e-6)
    # A unit whose update is dropped at every step only forgets: c_T = c_0 times the forget
    # gates; the others are unchanged up to that unit's influence on them.
    mask = ones.clone()
    mask[:, :, 3] = 0
    _, (_, dropped_c) = run_lstm_layer_dropping_updates(x, state, weights, mask)
    assert torch.all(dropped_c[:, 3].abs() < state[1][:, 3].abs())
    assert torch.all(torch.sign(dropped_c[:, 3]) == torch.sign(state[1][:, 3]))


@pytest.mark.parametrize("cell", CELLS)
def test_every_dropout_mask_comes_from_the_generator(cell):
    # Masks after each layer, drawn from the generator alone: threads that train shards of one
    # batch with generators of their own stay reproducible, and the global generator is untouched.
    net = tiny_net(cell, n_layers=3, dropout=0.3).train()
    x = random_ids(4, 12)
    before = torch.get_rng_state()
    a, _ = net(x, generator=torch.Generator().manual_seed(1))
    b, _ = net(x, generator=torch.Generator().manual_seed(1))
    c, _ = net(x, generator=torch.Generator().manual_seed(2))
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a, net.eval()(x)[0])


@pytest.mark.parametrize("cell", CELLS)
def test_sequence_dropout_masks_hold_for_every_step_of_a_stream(cell):
    # A one-layer net whose head sees only the dropped output: a unit dropped for a stream
    # leaves its head column unread at every step of that stream, and only then.
    config = ModelConfig(cell=cell, embed_dim=6, hidden_dim=10, n_layers=1, dropout=0.5)
    held, seen = {}, {}
    for mask in DROPOUT_MASKS:
        torch.manual_seed(0)
        net = CharRNN(dataclasses.replace(config, dropout_mask=mask), VOCAB).train()
        net.head.register_forward_hook(lambda _m, inputs, _o: seen.update(x=inputs[0]))
        net(random_ids(8, 20), generator=torch.Generator().manual_seed(1))
        dropped = seen["x"] == 0  # (B, T, H)
        assert 0.4 < float(dropped.float().mean()) < 0.6
        held[mask] = bool((dropped == dropped[:, :1]).all())
    assert held == {"step": False, "sequence": True}


@pytest.mark.parametrize("cell", CELLS)
def test_the_head_reads_every_layer_or_only_the_last(cell):
    torch.manual_seed(0)
    every = CharRNN(ModelConfig(cell=cell, embed_dim=6, hidden_dim=10, n_layers=3), VOCAB).eval()
    last_only = ModelConfig(cell=cell, embed_dim=6, hidden_dim=10, n_layers=3, head_input="last")
    last = CharRNN(last_only, VOCAB).eval()
    assert every.head.in_features == 30 and last.head.in_features == 10
    last.load_state_dict({**every.state_dict(), "head.weight": every.head.weight[:, 20:]})
    x = random_ids(2, 9)
    # Layer 3's columns of the head alone give the last-layer model's logits.
    assert not torch.allclose(every(x)[0], last(x)[0])
    with torch.no_grad():
        every.head.weight[:, :20] = 0
    torch.testing.assert_close(every(x)[0], last(x)[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cell", CELLS)
def test_initial_state_is_zeros_and_equals_no_state(cell):
    net = tiny_net(cell)
    state = net.initial_state(5)
    assert len(state) == (2 if cell == "lstm" else 1)
    for s in state:
        assert s.shape == (2, 5, 10)
        assert s.dtype == torch.float32
        assert torch.count_nonzero(s) == 0
    net.eval()
    x = random_ids(5, 4)
    with_zeros, _ = net(x, state)
    without, _ = net(x)
    assert torch.equal(with_zeros, without)
    net.double()
    assert all(s.dtype == torch.float64 for s in net.initial_state(1))


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("split", [1, 6, 12])
def test_carried_state_continues_the_sequence_exactly(cell, split):
    net = tiny_net(cell, dropout=0.4).eval()
    x = random_ids(3, 13)
    whole, whole_state = net(x)
    first, state = net(x[:, :split])
    second, end_state = net(x[:, split:], state)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, rtol=0, atol=1e-6)
    for a, b in zip(end_state, whole_state, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_step_by_step_equals_one_pass():
    net = tiny_net("lstm").eval()
    x = random_ids(2, 10)
    whole, _ = net(x)
    state, steps = None, []
    for t in range(x.shape[1]):
        logits, state = net(x[:, t : t + 1], state)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, rtol=0, atol=1e-6)


def test_a_different_state_changes_the_output():
    net = tiny_net("lstm").eval()
    x = random_ids(2, 4)
    _, warm = net(random_ids(2, 6, seed=9))
    cold, _ = net(x)
    hot, _ = net(x, warm)
    assert not torch.allclose(cold, hot)


@pytest.mark.parametrize("cell", CELLS)
def test_detach_state_stops_gradients_into_the_previous_batch(cell):
    net = tiny_net(cell)
    start = tuple(s.clone().requires_grad_(True) for s in net.initial_state(2))
    x1, x2 = random_ids(2, 5, seed=3), random_ids(2, 5, seed=4)

    _, state = net(x1, start)
    carried = detach_state(state)
    assert all(not s.requires_grad for s in carried)
    assert all(torch.equal(a, b) for a, b in zip(carried, state, strict=True))
    logits, _ = net(x2, carried)
    logits.sum().backward()
    assert all(s.grad is None for s in start)
    assert all(p.grad is not None for p in net.parameters())

    net.zero_grad()
    _, state = net(x1, start)
    logits, _ = net(x2, state)  # not detached: batch 2's loss reaches back through batch 1
    logits.sum().backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in start)


def _hand_count(cell: str, vocab: int, embed: int, hidden: int, layers: int) -> int:
    gates = {"lstm": 4, "gru": 3, "rnn": 1}[cell]
    count = vocab * embed  # embedding
    for layer in range(layers):
        width_in = embed if layer == 0 else hidden
        count += gates * hidden * width_in  # input weights
        count += gates * hidden * hidden  # recurrent weights
        count += 2 * gates * hidden  # two bias vectors
    return count + layers * hidden * vocab + vocab  # output head, reading every layer


@pytest.mark.parametrize("cell", CELLS)
def test_num_parameters_matches_a_hand_count(cell):
    net = tiny_net(cell, n_layers=2)
    assert net.num_parameters() == _hand_count(cell, VOCAB, 6, 10, 2)
    # LSTM, 5 symbols, embed 3, hidden 4, one layer: 15 + 16*3 + 16*4 + 32 + 20 + 5 = 184.
    small = CharRNN(ModelConfig(cell="lstm", embed_dim=3, hidden_dim=4, n_layers=1), 5)
    assert small.num_parameters() == 184


def test_num_parameters_counts_only_trainable():
    net = tiny_net("rnn")
    total = net.num_parameters()
    net.embed.weight.requires_grad_(False)
    assert net.num_parameters() == total - VOCAB * 6


@pytest.mark.parametrize(
    "changes",
    [{"cell": "transformer"}, {"hidden_dim": 0}, {"n_layers": 0}, {"dropout": 1.0}],
)
def test_invalid_shapes_are_refused(changes):
    config = ModelConfig(embed_dim=4, hidden_dim=4, n_layers=1)
    for key, value in changes.items():
        setattr(config, key, value)
    with pytest.raises(CharLSTMError):
        CharRNN(config, VOCAB)
