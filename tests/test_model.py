"""CharRNN: shapes, state handling, truncated backpropagation and parameter counts."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_net as shared_tiny_net

from charlstm.config import ModelConfig
from charlstm.errors import CharLSTMError
from charlstm.model import (
    CharRNN,
    detach_state,
    reference_lstm_layer,
    weight_shapes,
    with_more_ids,
)

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


def test_the_reference_lstm_layer_is_torchs_lstm_and_gives_every_steps_cell_state():
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(6, 10, batch_first=True)
    weights = list(lstm.parameters())
    x = torch.randn(4, 12, 6, requires_grad=True)
    state = (torch.randn(4, 10), torch.randn(4, 10))
    expected, (h, c) = lstm(x, tuple(s.unsqueeze(0) for s in state))
    hs, cs = reference_lstm_layer(x, state, weights)
    assert hs.shape == cs.shape == (4, 12, 10)
    torch.testing.assert_close(hs, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close((hs[:, -1], cs[:, -1]), (h[0], c[0]), rtol=1e-5, atol=1e-6)
    # Step t's cell state is the final one of torch's LSTM run over the first t + 1 steps.
    for t in (0, 6):
        _, (_, c_t) = lstm(x[:, : t + 1], tuple(s.unsqueeze(0) for s in state))
        torch.testing.assert_close(cs[:, t], c_t[0], rtol=1e-5, atol=1e-6)
    # Differentiable like torch's, in the input and the weights.
    inputs = [x, *weights]
    got = torch.autograd.grad(hs.sum() + cs[:, -1].sum(), inputs)
    reference = torch.autograd.grad(expected.sum() + c.sum(), inputs)
    for g, e in zip(got, reference, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
    empty_h, empty_c = reference_lstm_layer(x[:, :0], state, weights)
    assert empty_h.shape == empty_c.shape == (4, 0, 10)


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
def test_dropout_masks_are_fresh_at_every_step(cell):
    # A one-layer net whose head sees only the dropped output: the units it leaves unread
    # change from one step of a stream to the next.
    torch.manual_seed(0)
    config = ModelConfig(cell=cell, embed_dim=6, hidden_dim=10, n_layers=1, dropout=0.5)
    net = CharRNN(config, VOCAB).train()
    seen = {}
    net.head.register_forward_hook(lambda _m, inputs, _o: seen.update(x=inputs[0]))
    net(random_ids(8, 20), generator=torch.Generator().manual_seed(1))
    dropped = seen["x"] == 0  # (B, T, H)
    assert 0.4 < float(dropped.float().mean()) < 0.6
    assert not bool((dropped == dropped[:, :1]).all())


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


@pytest.mark.parametrize("head_input", ["all", "last"])
def test_more_ids_keep_every_weight_and_start_as_the_rarest(head_input):
    torch.manual_seed(3)
    config = ModelConfig(embed_dim=6, hidden_dim=10, dropout=0.0, head_input=head_input)
    source = CharRNN(config, VOCAB)
    weights = {name: t.clone() for name, t in source.state_dict().items()}
    grown = with_more_ids(weights, VOCAB + 3)
    for name, tensor in weights.items():  # every weight of the old ids, bit for bit
        assert torch.equal(grown[name][: tensor.shape[0]], tensor), name
        if name not in ("embed.weight", "head.weight", "head.bias"):
            assert torch.equal(grown[name], tensor), name
    assert torch.equal(grown["embed.weight"][VOCAB:], weights["embed.weight"].mean(0).expand(3, -1))
    assert not grown["head.weight"][VOCAB:].any()
    assert torch.equal(grown["head.bias"][VOCAB:], weights["head.bias"].min().expand(3))
    bigger = CharRNN(config, VOCAB + 3)
    bigger.load_state_dict(grown)  # the shapes of a network of the larger vocabulary
    ids = random_ids(2, 5)
    assert torch.allclose(bigger(ids)[0][..., :VOCAB], source(ids)[0], atol=1e-6)
    same = with_more_ids(weights, VOCAB)
    assert all(torch.equal(same[name], tensor) for name, tensor in weights.items())
    with pytest.raises(ValueError, match="more than"):
        with_more_ids(weights, VOCAB - 1)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("head_input", ["all", "last"])
@pytest.mark.parametrize("n_layers", [1, 3])
def test_weight_shapes_are_a_built_networks_in_order(cell, head_input, n_layers):
    config = ModelConfig(cell=cell, n_layers=n_layers, embed_dim=5, hidden_dim=7,
                         head_input=head_input)  # fmt: skip
    built = {name: tuple(t.shape) for name, t in CharRNN(config, 11).state_dict().items()}
    assert list(weight_shapes(config, 11).items()) == list(built.items())
