"""Stateful and random batching: stream continuity, epochs, coverage, determinism, resuming."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from charlstm.batching import IGNORE, RandomBatcher, StatefulBatcher, make_batcher
from charlstm.errors import CharLSTMError


def positions(n: int) -> np.ndarray:
    """Ids equal to their own positions, so every batch shows where it reads from."""
    return np.arange(n, dtype=np.int64)


def take(batcher, count: int) -> list:
    return [batcher.next_batch() for _ in range(count)]


def served_pairs(batches: list) -> np.ndarray:
    """The input positions whose targets count (padding excluded), over ``batches``."""
    return np.concatenate([b.inputs[b.targets != IGNORE] for b in batches])


def same_batches(first: list, second: list) -> bool:
    return len(first) == len(second) and all(
        np.array_equal(a.inputs, b.inputs)
        and np.array_equal(a.targets, b.targets)
        and a.reset_state == b.reset_state
        for a, b in zip(first, second, strict=True)
    )


# --- StatefulBatcher ----------------------------------------------------------------------------


def test_stateful_geometry():
    """1000 pairs in 4 streams of 250: seven batches of 32 and a last one of 26."""
    batcher = StatefulBatcher(positions(1001), batch_size=4, seq_len=32, seed=0)
    assert (batcher.pairs, batcher.stream_len, batcher.steps_per_epoch) == (1000, 250, 8)
    batches = take(batcher, 8)
    assert [b.inputs.shape for b in batches] == [(4, 32)] * 7 + [(4, 26)]
    assert [b.targets.shape for b in batches] == [(4, 32)] * 7 + [(4, 26)]
    assert all(b.inputs.dtype == np.int64 and b.targets.dtype == np.int64 for b in batches)


def test_stateful_streams_are_the_rotated_corpus():
    """Each stream reads its own contiguous slice of the corpus rotated by the epoch offset."""
    n, batch_size, seq_len = 1001, 4, 32
    pairs = n - 1
    batches = take(StatefulBatcher(positions(n), batch_size, seq_len, seed=3), 8)
    offset = int(batches[0].inputs[0, 0])
    rotated = np.roll(np.arange(pairs), -offset)
    inputs = np.concatenate([b.inputs for b in batches], axis=1)
    targets = np.concatenate([b.targets for b in batches], axis=1)
    stream_len = pairs // batch_size
    for stream in range(batch_size):
        expected = rotated[stream * stream_len : (stream + 1) * stream_len]
        assert np.array_equal(inputs[stream], expected)
        assert np.array_equal(targets[stream], expected + 1)


def test_stateful_batch_continues_where_the_previous_ended():
    """For every stream, batch k+1 starts right after batch k's last target."""
    n = 1001
    pairs = n - 1
    batches = take(StatefulBatcher(positions(n), 4, 32, seed=11), 8)
    for current, following in itertools.pairwise(batches):
        last_targets = current.targets[:, -1]
        first_inputs = following.inputs[:, 0]
        assert np.array_equal(first_inputs, last_targets % pairs)
        assert np.array_equal(first_inputs, (current.inputs[:, -1] + 1) % pairs)


def test_stateful_targets_are_inputs_shifted_by_one_on_real_ids():
    """With arbitrary ids, inputs are ids[p] and targets ids[p + 1] at the same positions p."""
    ids = np.random.default_rng(5).integers(0, 250, size=777).astype(np.uint8)
    for_ids = take(StatefulBatcher(ids, 5, 16, seed=2), 12)
    for_positions = take(StatefulBatcher(positions(777), 5, 16, seed=2), 12)
    for batch, where in zip(for_ids, for_positions, strict=True):
        real = where.targets != IGNORE
        assert batch.inputs.dtype == np.int64
        assert np.array_equal(batch.inputs, ids[where.inputs])
        assert np.array_equal(batch.targets[real], ids[where.inputs + 1][real])
        assert np.array_equal(where.targets[real], where.inputs[real] + 1)
        assert np.array_equal(batch.targets == IGNORE, ~real)


def test_stateful_reads_memory_mapped_uint16_ids(tmp_path):
    values = np.random.default_rng(1).integers(0, 60000, size=500).astype(np.uint16)
    np.save(tmp_path / "ids.npy", values)
    mapped = np.load(tmp_path / "ids.npy", mmap_mode="r")
    batch = StatefulBatcher(mapped, 3, 10, seed=0).next_batch()
    where = StatefulBatcher(positions(500), 3, 10, seed=0).next_batch()
    assert np.array_equal(batch.inputs, values[where.inputs].astype(np.int64))
    assert np.array_equal(batch.targets, values[where.targets].astype(np.int64))


def test_stateful_reset_state_only_at_epoch_starts_and_epochs_done():
    batcher = StatefulBatcher(positions(301), batch_size=3, seq_len=40, seed=0)
    assert batcher.steps_per_epoch == 3  # 100 pairs per stream: 40 + 40 + 20
    assert batcher.epochs_done == 0.0
    resets, done = [], []
    for _ in range(9):
        resets.append(batcher.next_batch().reset_state)
        done.append(batcher.epochs_done)
    assert resets == [True, False, False] * 3
    assert done == pytest.approx([1 / 3, 2 / 3, 1, 4 / 3, 5 / 3, 2, 7 / 3, 8 / 3, 3])
    assert batcher.state_dict() == {"epoch": 2, "index": 3}


def test_stateful_every_epoch_is_a_different_rotation():
    batcher = StatefulBatcher(positions(10_001), batch_size=7, seq_len=100, seed=1337)
    offsets, served = [], []
    for _ in range(6):
        epoch = take(batcher, batcher.steps_per_epoch)
        offsets.append(int(epoch[0].inputs[0, 0]))
        served.append(sorted(served_pairs(epoch).tolist()))
    assert len(set(offsets)) == 6
    # 10,000 pairs in 7 streams (four of 1,429, three of 1,428): every pair, every epoch.
    assert all(s == list(range(10_000)) for s in served)


def test_stateful_seed_changes_the_rotation():
    first = StatefulBatcher(positions(10_001), 4, 16, seed=1).next_batch()
    again = StatefulBatcher(positions(10_001), 4, 16, seed=1).next_batch()
    other = StatefulBatcher(positions(10_001), 4, 16, seed=2).next_batch()
    assert np.array_equal(first.inputs, again.inputs)
    assert not np.array_equal(first.inputs, other.inputs)


@settings(max_examples=60, deadline=None)
@given(
    batch_size=st.integers(1, 8),
    seq_len=st.integers(1, 16),
    extra=st.integers(0, 300),
    seed=st.integers(0, 2**32 - 1),
)
def test_stateful_epoch_serves_every_pair_exactly_once(batch_size, seq_len, extra, seed):
    """Per epoch, across all streams, every (input, target) pair is trained on exactly once."""
    n = batch_size * seq_len + 1 + extra
    pairs = n - 1
    batcher = StatefulBatcher(positions(n), batch_size, seq_len, seed)
    for epoch in range(2):
        batches = take(batcher, batcher.steps_per_epoch)
        assert [b.reset_state for b in batches] == [True] + [False] * (len(batches) - 1)
        assert all(0 < b.inputs.shape[1] <= seq_len for b in batches)
        assert all(b.inputs.shape[0] == batch_size for b in batches)
        assert np.array_equal(np.sort(served_pairs(batches)), np.arange(pairs))
        for b in batches:
            real = b.targets != IGNORE
            assert np.array_equal(b.targets[real], b.inputs[real] + 1)
            # Padding only ever ends a stream: nothing real follows it in the epoch.
            assert not np.any(real[:, 1:] & ~real[:, :-1])
        assert batcher.epochs_done == pytest.approx(epoch + 1)


@pytest.mark.parametrize("stop_after", [0, 5, 8, 13])
def test_stateful_state_dict_resumes_identically(stop_after):
    """A fresh batcher given the saved state yields exactly the batches the original would."""
    ids = np.random.default_rng(0).integers(0, 90, size=1001).astype(np.uint8)
    original = StatefulBatcher(ids, 4, 32, seed=7)  # 8 batches per epoch
    take(original, stop_after)
    state = json.loads(json.dumps(original.state_dict()))
    resumed = StatefulBatcher(ids, 4, 32, seed=7)
    resumed.load_state_dict(state)
    assert resumed.epochs_done == original.epochs_done
    assert same_batches(take(resumed, 12), take(original, 12))
    assert resumed.state_dict() == original.state_dict()


def test_stateful_smallest_corpus():
    """Exactly batch_size * seq_len + 1 ids make one full batch per epoch."""
    batcher = StatefulBatcher(positions(13), batch_size=3, seq_len=4, seed=0)
    assert batcher.steps_per_epoch == 1
    first, second = take(batcher, 2)
    assert first.inputs.shape == (3, 4)
    assert sorted(first.inputs.ravel().tolist()) == list(range(12))
    assert second.reset_state
    assert batcher.epochs_done == 2.0


# --- RandomBatcher ------------------------------------------------------------------------------


def test_random_windows_are_contiguous_and_within_range():
    n, batch_size, seq_len = 50, 4, 8
    batcher = RandomBatcher(positions(n), batch_size, seq_len, seed=0)
    starts = set()
    for _ in range(150):
        batch = batcher.next_batch()
        assert batch.reset_state is True
        assert batch.inputs.shape == batch.targets.shape == (batch_size, seq_len)
        assert batch.inputs.dtype == np.int64
        first = batch.inputs[:, :1]
        assert np.array_equal(batch.inputs, first + np.arange(seq_len))
        assert np.array_equal(batch.targets, batch.inputs + 1)
        starts.update(first.ravel().tolist())
    # Every window that fits is drawn at some point, and none that does not.
    assert starts == set(range(n - seq_len))


def test_random_targets_follow_inputs_on_real_ids():
    ids = np.random.default_rng(3).integers(0, 200, size=400).astype(np.uint8)
    batch = RandomBatcher(ids, 6, 20, seed=4).next_batch()
    where = RandomBatcher(positions(400), 6, 20, seed=4).next_batch()
    assert np.array_equal(batch.inputs, ids[where.inputs])
    assert np.array_equal(batch.targets, ids[where.inputs + 1])


def test_random_is_deterministic_per_seed_and_step():
    ids = positions(5000)
    first = take(RandomBatcher(ids, 8, 32, seed=5), 6)
    assert same_batches(first, take(RandomBatcher(ids, 8, 32, seed=5), 6))
    other = take(RandomBatcher(ids, 8, 32, seed=6), 6)
    assert not any(np.array_equal(a.inputs, b.inputs) for a, b in zip(first, other, strict=True))
    assert not np.array_equal(first[0].inputs, first[1].inputs)
    jumped = RandomBatcher(ids, 8, 32, seed=5)
    jumped.load_state_dict({"step": 4})
    assert same_batches(take(jumped, 2), first[4:])


def test_random_state_dict_resumes_identically():
    ids = positions(3000)
    original = RandomBatcher(ids, 4, 16, seed=9)
    take(original, 3)
    state = json.loads(json.dumps(original.state_dict()))
    assert state == {"step": 3}
    resumed = RandomBatcher(ids, 4, 16, seed=9)
    resumed.load_state_dict(state)
    assert resumed.epochs_done == original.epochs_done
    assert same_batches(take(resumed, 5), take(original, 5))


def test_random_epochs_done_counts_characters_served():
    batcher = RandomBatcher(positions(1001), 4, 25, seed=0)
    take(batcher, 3)
    assert batcher.epochs_done == pytest.approx(3 * 4 * 25 / 1000)


# --- shared -------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [StatefulBatcher, RandomBatcher])
def test_too_short_corpus_says_how_many_characters_are_needed(cls):
    with pytest.raises(CharLSTMError) as excinfo:
        cls(positions(120), 4, 30, 0)
    assert str(excinfo.value) == (
        "the training text has 120 characters but one batch of 4 x 30 needs at least 121: "
        "use more text or a smaller --batch-size or --seq-len"
    )
    with pytest.raises(CharLSTMError, match=r"has 1,500 characters .* needs at least 3,201:"):
        cls(positions(1500), 50, 64, 0)
    cls(positions(121), 4, 30, 0)  # exactly enough


def test_make_batcher_picks_the_mode():
    ids = positions(200)
    stateful = make_batcher("stateful", ids, 2, 8, 0)
    random = make_batcher("random", ids, 2, 8, 0)
    assert type(stateful) is StatefulBatcher and type(random) is RandomBatcher
    assert (stateful.batch_size, stateful.seq_len, stateful.seed) == (2, 8, 0)
    assert random.next_batch().inputs.shape == (2, 8)
