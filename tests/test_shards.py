"""In-process data parallelism: shards must compute exactly what one whole batch computes."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from charlstm.config import ModelConfig
from charlstm.model import CharRNN, detach_state
from charlstm.shards import Shards, shard_count

VOCAB = 11


def make_step(net: CharRNN, weight: float, seen_threads: list[int]):
    params = list(net.parameters())

    def step(x, y, state, generator):
        seen_threads.append(threading.get_ident())
        logits, new_state = net(x, state, generator=generator)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum") * weight
        return loss.detach(), list(torch.autograd.grad(loss, params)), detach_state(new_state)

    return step


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize(("rows", "count"), [(8, 2), (7, 2), (5, 3), (2, 4)])
def test_shards_add_up_to_the_whole_batch(cell, rows, count):
    torch.manual_seed(0)
    net = CharRNN(ModelConfig(cell=cell, embed_dim=8, hidden_dim=16, dropout=0.0), VOCAB)
    x = torch.randint(0, VOCAB, (rows, 12))
    y = torch.randint(0, VOCAB, (rows, 12))
    y[0, -3:] = -100  # ignored targets count nowhere
    state = tuple(torch.randn_like(s) for s in net.initial_state(rows))
    weight = 1.0 / int((y != -100).sum())

    whole_threads: list[int] = []
    whole = Shards(1).run(make_step(net, weight, whole_threads), x, y, state)
    shards = Shards(count)
    threads: list[int] = []
    try:
        parts = shards.run(make_step(net, weight, threads), x, y, state)
    finally:
        shards.close()

    assert whole_threads == [threading.get_ident()]  # one shard runs in the caller's thread
    assert len(threads) == min(rows, count)
    torch.testing.assert_close(parts[0], whole[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(parts[0], F.cross_entropy(
        net(x, state)[0].flatten(0, 1), y.flatten()).detach(), rtol=1e-6, atol=1e-6)  # fmt: skip
    for got, expected in zip(parts[1], whole[1], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for got, expected in zip(parts[2], whole[2], strict=True):  # the state, rows in order
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_shards_are_deterministic():
    torch.manual_seed(1)
    net = CharRNN(ModelConfig(embed_dim=8, hidden_dim=16, dropout=0.0), VOCAB)
    x, y = torch.randint(0, VOCAB, (6, 10)), torch.randint(0, VOCAB, (6, 10))
    state = net.initial_state(6)
    shards = Shards(3)
    try:
        runs = [shards.run(make_step(net, 0.1, []), x, y, state) for _ in range(5)]
    finally:
        shards.close()
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(other[1], runs[0][1], strict=True))


def test_dropout_masks_come_from_per_shard_generators_seeded_in_order():
    # Dropout after both layers, two shards: the masks depend on the global seed alone, never
    # on which thread ran first, and a shard's rows get masks of their own.
    torch.manual_seed(1)
    net = CharRNN(ModelConfig(embed_dim=8, hidden_dim=16, n_layers=2, dropout=0.5), VOCAB)
    net.train()
    x, y = torch.randint(0, VOCAB, (6, 10)), torch.randint(0, VOCAB, (6, 10))
    state = net.initial_state(6)
    shards = Shards(2)
    try:
        runs = []
        for seed in (7, 7, 8):
            torch.manual_seed(seed)
            runs.append(shards.run(make_step(net, 0.1, []), x, y, state))
    finally:
        shards.close()
    same, other = runs[1], runs[2]
    assert all(torch.equal(a, b) for a, b in zip(same[1], runs[0][1], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(other[1], runs[0][1], strict=True))


def test_workers_run_single_threaded_operations_and_the_caller_keeps_its_threads():
    before = torch.get_num_threads()
    shards = Shards(2)
    try:
        counts = list(shards.pool.map(lambda _: torch.get_num_threads(), range(2)))
    finally:
        shards.close()
    assert counts == [1, 1]
    assert torch.get_num_threads() == before


def test_shard_count():
    cpu = torch.device("cpu")
    threads = torch.get_num_threads()
    assert shard_count(cpu, 64) == threads
    assert shard_count(cpu, 1) == 1
    assert shard_count(torch.device("cuda"), 64) == 1
