"""Sampling: the probability filter, drawing ids, and the generation loop."""

from __future__ import annotations

import functools
import importlib
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import refused, run_cli, train_tiny, write_text
from conftest import tiny_net as shared_tiny_net
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import charlstm.sample as sample_module
from charlstm.config import ModelConfig
from charlstm.model import CharRNN
from charlstm.sample import (
    MODULE_BLOCK_ROWS,
    ModuleStepper,
    NumpyStepper,
    draw_ids,
    filter_probs,
    generate_ids,
    next_ids,
    read_prompt,
    sample_rng,
)

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 9

finite_logits = st.lists(
    st.floats(-8, 8, allow_nan=False, allow_infinity=False), min_size=2, max_size=24
)
# Logits and every filter setting, drawn together.
filtered_draws = {
    "logits": finite_logits,
    "temperature": st.floats(0.05, 5),
    "top_k": st.integers(0, 30),
    "top_p": st.floats(0.01, 1.0),
}


# The head sharpened a little, so that greedy choices are far from ties.
tiny_net = functools.partial(shared_tiny_net, vocab=VOCAB, head_scale=4.0)


def random_logits(rows: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, width)) * 2


PROMPT = torch.tensor([1, 4, 2, 7, 3])


def greedy_loop(net: CharRNN, prompt: torch.Tensor, length: int) -> list[int]:
    """The obvious greedy decoder: argmax, feed it back, carry the state."""
    net.eval()
    out = []
    with torch.no_grad():
        logits, state = net(prompt.view(1, -1))
        for _ in range(length):
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            logits, state = net(torch.tensor([[nxt]]), state)
    return out


def collect(steps) -> torch.Tensor:
    """generate_ids' per-step id arrays as a (num_samples, length) tensor."""
    return torch.from_numpy(np.stack(list(steps), axis=1))


# ---- filter_probs -----------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(**filtered_draws)
def test_filter_probs_is_a_distribution(logits, temperature, top_k, top_p):
    probs = filter_probs(np.array([logits, logits[::-1]]), temperature, top_k, top_p)
    assert probs.shape == (2, len(logits))
    assert (probs >= 0).all()
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=0, atol=1e-9)
    assert ((probs > 0).sum(-1) >= 1).all()
    if top_k:
        assert ((probs > 0).sum(-1) <= top_k).all()


@pytest.mark.parametrize("k", [1, 2, 5, 8])
def test_top_k_keeps_exactly_k(k):
    logits = random_logits(4, 12, seed=k)
    probs = filter_probs(logits, 1.0, k, 1.0)
    assert ((probs > 0).sum(-1) == k).all()
    kept = probs > 0
    expected = np.zeros_like(kept)
    np.put_along_axis(expected, np.argsort(-logits, axis=-1)[:, :k], True, axis=-1)
    assert np.array_equal(kept, expected)
    # The survivors keep their relative odds: they are the softmax restricted to the top k.
    restricted = torch.softmax(torch.from_numpy(np.where(expected, logits, -np.inf)), dim=-1)
    np.testing.assert_allclose(probs, restricted.numpy(), rtol=1e-6, atol=1e-9)


@settings(max_examples=100, deadline=None)
@given(logits=finite_logits, top_p=st.floats(0.01, 0.999))
def test_top_p_keeps_the_smallest_prefix_reaching_p(logits, top_p):
    reference = torch.softmax(torch.tensor(logits, dtype=torch.float64), dim=-1)
    ordered = reference.sort(descending=True).values
    before = ordered.cumsum(0) - ordered  # mass of the likelier symbols
    # Stay away from cases where float rounding decides whether a symbol reaches p.
    assume(((before - top_p).abs() > 1e-9).all())
    expected_count = int((before < top_p).sum())  # the prefix that first reaches top_p

    probs = torch.from_numpy(filter_probs(np.array([logits]), 1.0, 0, top_p)[0])
    kept = probs > 0
    assert 1 <= int(kept.sum()) == expected_count
    assert reference[kept].sum() >= top_p - 1e-9
    # Minimal: without its least likely member the kept set falls short of p.
    assert reference[kept].sum() - reference[kept].min() < top_p + 1e-9
    # The likeliest ones: nothing dropped is likelier than anything kept.
    if not kept.all():
        assert reference[~kept].max() <= reference[kept].min() + 1e-12
    # Renormalised survivors in their original proportions.
    torch.testing.assert_close(
        probs[kept], reference[kept] / reference[kept].sum(), atol=1e-9, rtol=0
    )
    assert float(probs.sum()) == pytest.approx(1.0, abs=1e-9)


def test_top_p_tiny_keeps_only_the_likeliest():
    logits = random_logits(5, 10, seed=3)
    probs = filter_probs(logits, 1.0, 0, 1e-6)
    assert np.array_equal(probs.argmax(-1), logits.argmax(-1))
    assert ((probs > 0).sum(-1) == 1).all()
    assert (probs.max(-1) == 1.0).all()


def test_top_p_example():
    logits = np.log([[0.5, 0.3, 0.15, 0.05]])
    assert (filter_probs(logits, 1.0, 0, 0.5)[0] > 0).tolist() == [True, False, False, False]
    assert (filter_probs(logits, 1.0, 0, 0.6)[0] > 0).tolist() == [True, True, False, False]
    kept = filter_probs(logits, 1.0, 0, 0.85)[0]
    assert (kept > 0).tolist() == [True, True, True, False]
    np.testing.assert_allclose(kept[:3], np.array([0.5, 0.3, 0.15]) / 0.95)


def test_top_p_applies_after_top_k():
    logits = np.log([[0.4, 0.3, 0.2, 0.1]])
    # Top-2 renormalises to (4/7, 3/7); p=0.5 is then reached by the first symbol alone.
    probs = filter_probs(logits, 1.0, 2, 0.5)
    assert probs.tolist() == [[1.0, 0.0, 0.0, 0.0]]


def test_no_op_settings_return_the_plain_softmax():
    logits = random_logits(3, 15, seed=7)
    plain = torch.softmax(torch.from_numpy(logits).double(), dim=-1).numpy()
    for top_k in (0, 15, 99):
        np.testing.assert_allclose(filter_probs(logits, 1.0, top_k, 1.0), plain, rtol=1e-12)
    assert (filter_probs(logits, 1.0, 0, 1.0) > 0).all()


@pytest.mark.parametrize("temperature", [0.25, 0.8, 1.0, 3.0])
def test_temperature_scales_the_logits(temperature):
    logits = random_logits(2, 10, seed=11)
    expected = torch.softmax(torch.from_numpy(logits).double() / temperature, dim=-1).numpy()
    np.testing.assert_allclose(filter_probs(logits, temperature, 0, 1.0), expected, rtol=1e-12)


def test_temperature_sharpens_and_flattens():
    logits = random_logits(1, 10, seed=12)

    def entropy(t: float) -> float:
        p = filter_probs(logits, t, 0, 1.0)
        return float(-(p * np.log(np.maximum(p, 1e-300))).sum())

    assert entropy(0.1) < entropy(0.5) < entropy(1.0) < entropy(2.0) < entropy(100.0)
    assert entropy(100.0) == pytest.approx(math.log(10), abs=0.01)
    assert filter_probs(logits, 0.01, 0, 1.0).max() > 0.999


def test_filter_probs_takes_float32_or_float64_and_returns_float64():
    logits = random_logits(2, 6)
    single = filter_probs(logits.astype(np.float32), 1.0, 3, 0.9)
    assert single.dtype == np.float64
    np.testing.assert_allclose(single.sum(-1), 1.0)
    np.testing.assert_allclose(single, filter_probs(logits, 1.0, 3, 0.9), atol=1e-6)


# ---- next_ids ---------------------------------------------------------------------------


def test_temperature_zero_is_argmax():
    logits = random_logits(50, 13, seed=1)
    ids = next_ids(logits, 0.0, 0, 1.0, None)
    assert np.array_equal(ids, logits.argmax(-1))
    # top_k / top_p do not matter to greedy choice
    assert np.array_equal(next_ids(logits, 0, 5, 0.3, None), logits.argmax(-1))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 10.0])
def test_top_k_one_is_greedy(temperature):
    logits = random_logits(50, 13, seed=2)
    ids = next_ids(logits, temperature, 1, 1.0, np.random.default_rng(0))
    assert np.array_equal(ids, logits.argmax(-1))


def test_next_ids_draws_from_the_filtered_distribution():
    logits = np.log(np.tile([0.5, 0.3, 0.15, 0.05], (40_000, 1)))
    rng = np.random.default_rng(0)

    def frequencies(top_k: int, top_p: float) -> np.ndarray:
        return np.bincount(next_ids(logits, 1.0, top_k, top_p, rng), minlength=4) / 40_000

    np.testing.assert_allclose(frequencies(0, 1.0), [0.5, 0.3, 0.15, 0.05], atol=0.01)
    np.testing.assert_allclose(frequencies(2, 1.0), [0.625, 0.375, 0, 0], atol=0.01)
    np.testing.assert_allclose(frequencies(0, 0.9), np.array([0.5, 0.3, 0.15, 0]) / 0.95, atol=0.01)


@settings(max_examples=60, deadline=None)
@given(**filtered_draws, seed=st.integers(0, 2**32 - 1))
def test_next_ids_draws_only_what_the_filter_keeps(logits, temperature, top_k, top_p, seed):
    rows = np.array([logits, logits[::-1]] * 50)
    ids = next_ids(rows, temperature, top_k, top_p, np.random.default_rng(seed))
    kept = filter_probs(rows, temperature, top_k, top_p) > 0
    assert ids.shape == (100,) and ids.dtype == np.int64
    assert kept[np.arange(100), ids].all()


def test_a_symbol_with_zero_probability_is_never_drawn():
    logits = np.tile([0.0, -np.inf, 0.0, -np.inf], (10_000, 1))
    ids = next_ids(logits, 1.0, 0, 1.0, np.random.default_rng(1))
    assert set(ids.tolist()) == {0, 2}


@settings(max_examples=40, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            st.sampled_from([0.0, 0.3, 1.0, 2.5]),
            st.integers(0, 12),
            st.sampled_from([1.0, 0.95, 0.6, 0.1]),
            st.integers(0, 2**32),
        ),
        min_size=1,
        max_size=20,
    )
)
def test_each_row_draws_what_next_ids_draws_for_it_alone(rows):
    logits = random_logits(len(rows), 11, seed=len(rows)).astype(np.float32)
    temperature, top_k, top_p, seeds = (np.array(column) for column in zip(*rows, strict=True))
    rngs = [np.random.default_rng(seed) for seed in seeds]
    together = draw_ids(logits, temperature, top_k, top_p, rngs)
    for i, (t, k, p, seed) in enumerate(rows):
        rng = np.random.default_rng(seed)
        assert together[i] == next_ids(logits[i : i + 1], t, k, p, rng)[0]
        # One number per sampled row, none for a greedy one: the generators stay in step.
        assert rngs[i].random() == rng.random()


def test_next_ids_is_reproducible_with_a_generator():
    logits = random_logits(30, 9, seed=4)
    a = next_ids(logits, 1.0, 0, 1.0, np.random.default_rng(5))
    b = next_ids(logits, 1.0, 0, 1.0, np.random.default_rng(5))
    c = next_ids(logits, 1.0, 0, 1.0, np.random.default_rng(6))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


# ---- generate_ids -----------------------------------------------------------------------


def test_generate_yields_length_steps_of_num_samples_ids():
    net = tiny_net()
    steps = list(generate_ids(net, PROMPT, 17, num_samples=3, seed=0))
    assert len(steps) == 17
    for ids in steps:
        assert ids.shape == (3,)
        assert ids.dtype == np.int64
        assert ((ids >= 0) & (ids < VOCAB)).all()
    assert list(generate_ids(net, PROMPT, 0, seed=0)) == []


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_fixed_seed_reproduces_and_other_seeds_differ(cell):
    net = tiny_net(cell)
    settings_ = {"num_samples": 2, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    a = collect(generate_ids(net, PROMPT, 60, seed=123, **settings_))
    b = collect(generate_ids(net, PROMPT, 60, seed=123, **settings_))
    c = collect(generate_ids(net, PROMPT, 60, seed=124, **settings_))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("fast", [True, False])
def test_sample_i_is_the_same_in_a_batch_of_any_size(fast):
    net = tiny_net()
    settings_ = {"temperature": 1.0, "top_p": 0.9, "seed": 31, "fast": fast}
    three = collect(generate_ids(net, PROMPT, 40, num_samples=3, **settings_))
    twenty = collect(generate_ids(net, PROMPT, 40, num_samples=20, **settings_))
    one = collect(generate_ids(net, PROMPT, 40, **settings_))
    assert torch.equal(twenty[:3], three)
    assert torch.equal(three[:1], one)


def test_sample_generators_are_the_seed_sequences_children():
    children = np.random.SeedSequence(8).spawn(3)
    for i, child in enumerate(children):
        assert sample_rng(8, i).random() == np.random.default_rng(child).random()
    assert sample_rng(None, 0).random() != sample_rng(None, 0).random()


def test_no_seed_gives_fresh_samples():
    net = tiny_net()
    a = collect(generate_ids(net, PROMPT, 60, temperature=1.0))
    b = collect(generate_ids(net, PROMPT, 60, temperature=1.0))
    assert not torch.equal(a, b)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_top_k_one_and_temperature_zero_equal_a_greedy_loop(cell):
    net = tiny_net(cell, dropout=0.5)
    net.train()  # generation must switch dropout off by itself, and restore the mode
    expected = greedy_loop(net, PROMPT, 40)
    net.train()
    top1 = collect(generate_ids(net, PROMPT, 40, temperature=1.0, top_k=1, seed=3))
    assert net.training
    zero = collect(generate_ids(net, PROMPT, 40, temperature=0.0, seed=4))
    assert top1[0].tolist() == expected
    assert zero[0].tolist() == expected
    batch = collect(generate_ids(net, PROMPT, 40, temperature=0.0, num_samples=3))
    assert all(row == expected for row in batch.tolist())


def test_eval_mode_is_kept_after_generation():
    net = tiny_net().eval()
    list(generate_ids(net, PROMPT, 3, seed=0))
    assert not net.training


@pytest.mark.parametrize("num_samples", [1, 4])
def test_prompt_is_read_in_one_pass_then_one_step_per_character(num_samples):
    net = tiny_net()
    calls: list[tuple[tuple[int, ...], bool]] = []

    def hook(module, args, output):
        calls.append((tuple(args[0].shape), len(args) > 1 and args[1] is not None))

    handle = net.register_forward_hook(hook)
    try:
        length = 25
        steps = generate_ids(net, PROMPT, length, num_samples=num_samples, seed=0, fast=False)
        assert calls == []  # nothing runs before the first id is asked for
        first = next(steps)
        # Read once whatever the number of samples: each starts from the same state.
        assert calls == [((1, len(PROMPT)), False)]
        assert first.shape == (num_samples,)
        rest = list(steps)
    finally:
        handle.remove()
    assert len(rest) == length - 1
    assert len(calls) == 1 + (length - 1)
    assert calls[0] == ((1, len(PROMPT)), False)
    # Every step runs one block of the fixed number of rows, the samples and padding.
    assert all(call == ((MODULE_BLOCK_ROWS, 1), True) for call in calls[1:])


def test_each_step_feeds_back_the_id_it_yielded():
    net = tiny_net()
    fed: list[torch.Tensor] = []
    handle = net.register_forward_hook(lambda m, args, out: fed.append(args[0].clone()))
    try:
        out = collect(
            generate_ids(net, PROMPT, 12, num_samples=2, temperature=1.0, seed=8, fast=False)
        )
    finally:
        handle.remove()
    assert torch.equal(fed[0], PROMPT.view(1, -1))  # read once for both samples
    # Each step's block holds the two samples' ids first, then padding.
    assert torch.equal(torch.cat(fed[1:], dim=1)[:2], out[:, :-1])


def test_samples_in_a_batch_are_independent():
    net = tiny_net()
    rows = collect(generate_ids(net, PROMPT, 30, num_samples=16, temperature=1.0, seed=1))
    assert rows.shape == (16, 30)
    assert len({tuple(r) for r in rows.tolist()}) == 16
    # The first ids of many samples follow the prompt's next-symbol distribution.
    n = 20_000
    first = next(generate_ids(net, PROMPT, 1, num_samples=n, temperature=1.0, seed=2))
    with torch.no_grad():
        expected = torch.softmax(net.eval()(PROMPT.view(1, -1))[0][0, -1], dim=-1)
    freq = torch.bincount(torch.from_numpy(first), minlength=VOCAB) / n
    torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)


def test_batched_greedy_rows_do_not_leak_into_each_other():
    """Each row continues its own prompt: a batch equals separate single-sample runs."""
    net = tiny_net(seed=1)  # its greedy continuations of these prompts differ
    prompts = [PROMPT, torch.tensor([0, 0, 8, 8, 5]), torch.tensor([6, 2, 2, 1, 0])]
    singles = [collect(generate_ids(net, p, 20, temperature=0))[0] for p in prompts]
    assert len({tuple(s.tolist()) for s in singles}) >= 2
    for prompt, single in zip(prompts, singles, strict=True):
        batch = collect(generate_ids(net, prompt, 20, num_samples=4, temperature=0))
        assert all(torch.equal(row, single) for row in batch)


def test_prompt_may_be_any_integer_dtype():
    net = tiny_net()
    a = collect(generate_ids(net, PROMPT.to(torch.uint8), 10, temperature=0))
    b = collect(generate_ids(net, PROMPT, 10, temperature=0))
    assert torch.equal(a, b)


# ---- the fast CPU stepper -------------------------------------------------------------------


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("n_layers", [1, 3])
@pytest.mark.parametrize("head_input", ["all", "last"])
@pytest.mark.parametrize(
    "settings_",
    [
        {"temperature": 1.0},
        {"temperature": 0.7, "top_k": 4, "top_p": 0.8},
        {"temperature": 0.0},
    ],
)
def test_fast_stepper_draws_exactly_what_the_module_draws(cell, n_layers, head_input, settings_):
    torch.manual_seed(n_layers)
    config = ModelConfig(cell=cell, embed_dim=8, hidden_dim=16, n_layers=n_layers, dropout=0.3)
    config.head_input = head_input
    net = CharRNN(config, VOCAB)
    with torch.no_grad():
        net.head.weight.mul_(3)
    for num_samples in (1, 5):
        fast = collect(generate_ids(net, PROMPT, 200, num_samples=num_samples, seed=9, **settings_))
        reference = collect(
            generate_ids(net, PROMPT, 200, num_samples=num_samples, seed=9, fast=False, **settings_)
        )
        assert torch.equal(fast, reference)


def test_fast_stepper_logits_match_the_module(products):
    net = tiny_net().eval()
    with torch.no_grad():
        _, state = net(PROMPT.view(1, -1))
        stepper = NumpyStepper(net, 3)
        stepper.load(slice(0, 3), state)
        ids = torch.tensor([0, 4, 8])
        expected, _ = net(ids.view(3, 1), tuple(s.expand(-1, 3, -1) for s in state))
        logits = torch.from_numpy(stepper(ids.numpy()))
        torch.testing.assert_close(logits, expected[:, -1], rtol=1e-5, atol=1e-5)


def odd_net(cell: str) -> CharRNN:
    """Sizes that fill no SIMD register evenly: a row's place in memory varies most."""
    torch.manual_seed(5)
    config = ModelConfig(cell=cell, embed_dim=7, hidden_dim=37, n_layers=2, dropout=0.0)
    return CharRNN(config, VOCAB).eval()


def prompt_state(net: CharRNN, seed: int) -> tuple[np.ndarray, tuple[torch.Tensor, ...]]:
    """A random prompt's logits and state, read as generation reads it (batch 1)."""
    prompt = torch.from_numpy(np.random.default_rng(seed).integers(0, VOCAB, 6))
    with torch.inference_mode():
        logits, state = read_prompt(net, prompt)
    return logits[0].numpy(), state


# How NumpyStepper multiplies: each vector path of row_products.c this CPU runs, and BLAS.
PRODUCTS = [*sample_module._KERNEL_PATHS, "blas"]


@pytest.fixture(params=PRODUCTS)
def products(request, monkeypatch) -> str:
    """NumpyStepper made to multiply one way: a kernel path alone, or BLAS row by row."""
    paths = () if request.param == "blas" else (request.param,)
    monkeypatch.setattr(sample_module, "_KERNEL_PATHS", paths)
    return request.param


@pytest.mark.parametrize(
    ("stepper_class", "products"),
    [*((NumpyStepper, path) for path in PRODUCTS), (ModuleStepper, "blas")],
    indirect=["products"],
)
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_a_row_steps_bit_for_bit_alike_at_any_place_in_any_batch(stepper_class, cell, products):
    """The property batched serving rests on: a row's logits, step after step, are the same
    bits alone as at any place among any number of other rows (whatever they hold)."""
    net = odd_net(cell)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, 12)
    others = [prompt_state(net, 100 + i)[1] for i in range(5)]

    def run(place: int, rows: int) -> list[np.ndarray]:
        stepper = stepper_class(net, rows)
        for row in range(rows):  # the others: other prompts, other ids
            stepper.load(slice(row, row + 1), others[row % len(others)])
        stepper.load(slice(place, place + 1), prompt_state(net, 1)[1])
        out = []
        for i in ids:
            step_ids = rng.integers(0, VOCAB, rows)
            step_ids[place] = i
            out.append(stepper(step_ids)[place].copy())
        return out

    reference = run(0, 1)
    for place, rows in [(0, 2), (1, 2), (7, 8), (5, 20), (63, 64), (100, 300), (299, 300)]:
        assert all(np.array_equal(a, b) for a, b in zip(run(place, rows), reference, strict=True))


@pytest.mark.skipif(not sample_module._KERNEL_PATHS, reason="row_products.c is not built here")
def test_row_products_are_a_matrix_product_with_the_same_bits_on_every_path():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((70, 301), dtype=np.float32)[:, :300]  # rows at a stride
    weight = rng.standard_normal((300, 130), dtype=np.float32)  # columns past a whole panel
    expected = x.astype(np.float64) @ weight
    results = []
    for path in sample_module._KERNEL_PATHS:
        for split in (False, True):
            product = sample_module._RowProducts(x, weight, path, split)
            for rows in (1, 3, 4, 5, 70):  # groups of rows and the rows past the last group
                results.append(product(rows).copy())
                np.testing.assert_allclose(results[-1], expected[:rows], rtol=1e-4, atol=1e-4)
    for got in results:
        assert np.array_equal(got, results[-1][: len(got)])


@pytest.mark.skipif(not sample_module._KERNEL_PATHS, reason="row_products.c is not built here")
def test_a_forked_child_multiplies_with_its_own_second_thread():
    script = """
import os, sys, numpy as np
from charlstm.sample import _RowProducts
x, w = np.ones((4, 64), np.float32), np.ones((64, 256), np.float32)
product = _RowProducts(x, w, split=True)
assert (product(4) == 64).all()  # the parent's second thread is running
child = os.fork()
if child == 0:
    os._exit(0 if (_RowProducts(x, 2 * w, split=True)(4) == 128).all() else 1)
sys.exit(os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]))
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)


def test_moving_a_row_carries_its_state():
    net = odd_net("lstm")
    ids = np.array([3, 1, 4, 1])
    stepper = NumpyStepper(net, 20)
    stepper.load(slice(17, 18), prompt_state(net, 1)[1])
    stepper.move(17, 2)
    alone = NumpyStepper(net, 1)
    alone.load(slice(0, 1), prompt_state(net, 1)[1])
    for i in ids:
        assert np.array_equal(stepper(np.full(3, i))[2], alone(np.array([i]))[0])


def test_fast_path_runs_the_module_only_for_the_prompt():
    net = tiny_net()
    calls = []
    handle = net.register_forward_hook(lambda m, args, out: calls.append(args[0].shape))
    try:
        assert len(collect(generate_ids(net, PROMPT, 30, seed=0))[0]) == 30
    finally:
        handle.remove()
    assert calls == [torch.Size([1, len(PROMPT)])]


def test_stepping_records_no_autograd_graph_between_characters():
    net = tiny_net()
    steps = generate_ids(net, PROMPT, 5, seed=0, fast=False)
    next(steps)
    next(steps)  # one module step, run while the caller is in ordinary grad mode
    state = steps.gi_frame.f_locals["step"].state
    assert torch.is_grad_enabled()
    assert not any(part.requires_grad for part in state)


# ---- the default prompt ----------------------------------------------------------------------


def test_long_prompts_are_read_in_pieces_with_the_state_carried(monkeypatch):
    """A prompt longer than MAX_LOGITS / vocabulary is read piece by piece: the same ids follow
    as from reading it in one pass, and no call holds more than that many logits."""
    net = tiny_net()
    prompt = torch.tensor([1, 4, 2, 7, 3, 0, 8, 6, 5, 2, 2, 1] * 3)
    whole = collect(generate_ids(net, prompt, 20, temperature=0))
    sample_module = importlib.import_module("charlstm.sample")
    monkeypatch.setattr(sample_module, "MAX_LOGITS", 5 * VOCAB)
    shapes = []
    handle = net.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    try:
        pieces = collect(generate_ids(net, prompt, 20, num_samples=3, temperature=0, fast=False))
    finally:
        handle.remove()
    assert shapes[:8] == [(1, 5)] * 7 + [(1, 1)]  # 36 ids: seven pieces of five, then one
    assert all(torch.equal(row, whole[0]) for row in pieces)


@pytest.mark.slow
def test_the_default_prompt_samples_a_model_trained_on_one_line(isolated_data_dir, tmp_path):
    """A text without a newline: `charlstm sample` with no --prompt starts from the model's
    stand-in for one instead of refusing a character the user never typed."""
    text = write_text(tmp_path / "one-line.txt", newline=" ")
    assert "\n" not in text.read_text(encoding="utf-8")
    run = train_tiny(text, tmp_path / "run")
    result = run_cli(["sample", run, "--length", "30", "--seed", "1"], isolated_data_dir, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert len(result.stdout) == 31 and result.stdout.endswith("\n")
    # Any other prompt the model cannot read is still refused, naming its characters.
    result = run_cli(["sample", run, "--prompt", "\t"], isolated_data_dir, tmp_path)
    refused(result, "prompt contains characters not in the model's vocabulary: '\\t'")


def test_sample_help_says_where_the_default_prompt_starts():
    from charlstm.cli import build_parser

    sample = build_parser()._subparsers._group_actions[0].choices["sample"]
    assert "model whose training text had no newline" in " ".join(sample.format_help().split())
