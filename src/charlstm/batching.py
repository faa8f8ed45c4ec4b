"""Batches of (input, target) ids for training, in two modes.

``stateful`` (the default) reads B contiguous streams side by side; each batch continues every
stream exactly where the previous batch stopped, so the carried hidden state has seen all of
the stream's past although gradients stop after T steps::

    training ids, rotated by a fresh random offset each epoch, cut into B streams of L or L+1
    (input, target) pairs, so that every pair is served exactly once per epoch
    stream 0: |--batch 0--|--batch 1--|--batch 2--| ... |-last-|
    stream 1: |--batch 0--|--batch 1--|--batch 2--| ... |-last-|
    ...         T chars      T chars                      the rest
    a stream one pair shorter than the others has its final target set to IGNORE

``random`` draws B independent windows of T characters at random positions and resets the
state for every batch (the classic char-rnn / seed loop).

Both are pure functions of (seed, position), so their whole state is a couple of integers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from charlstm.errors import CharLSTMError

IGNORE = -100  # the target of a padding position: cross_entropy's default ignore_index


@dataclass
class Batch:
    """Inputs and next-character targets, both (B, T) int64, and whether to zero the state.

    A target equal to ``IGNORE`` marks padding that must not count towards the loss.
    """

    inputs: np.ndarray
    targets: np.ndarray
    reset_state: bool

    def rows(self, rows: slice) -> Batch:
        """Only the streams (rows) ``rows``: one process's share of a global batch."""
        return Batch(self.inputs[rows], self.targets[rows], self.reset_state)


class StatefulBatcher:
    """B contiguous streams over the training ids; the state is carried between batches."""

    def __init__(self, ids: np.ndarray, batch_size: int, seq_len: int, seed: int) -> None:
        _check_length(ids, batch_size, seq_len)
        self.ids, self.batch_size, self.seq_len, self.seed = ids, batch_size, seq_len, seed
        self.pairs = len(ids) - 1  # (input, target) pairs: position i predicts i + 1
        # The first `longer` streams hold one pair more, so the streams tile every pair once.
        self.stream_len, longer = divmod(self.pairs, batch_size)
        streams = np.arange(batch_size)
        self.stream_starts = streams * self.stream_len + np.minimum(streams, longer)
        self.stream_ends = self.stream_starts + self.stream_len + (streams < longer)
        self.longest = self.stream_len + int(longer > 0)
        self.steps_per_epoch = -(-self.longest // seq_len)
        self.epoch = 0
        self.index = 0  # batch index within the epoch

    def next_batch(self) -> Batch:
        """The next batch; ``reset_state`` is true at the start of every epoch."""
        if self.index == self.steps_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        start = self.index * self.seq_len
        length = min(self.seq_len, self.longest - start)
        offset = _epoch_offset(self.seed, self.epoch, self.pairs)
        unrotated = self.stream_starts[:, None] + start + np.arange(length)[None, :]
        padding = unrotated >= self.stream_ends[:, None]
        pair = (offset + unrotated) % self.pairs
        targets = self.ids[pair + 1].astype(np.int64)
        targets[padding] = IGNORE
        batch = Batch(self.ids[pair].astype(np.int64), targets, self.index == 0)
        self.index += 1
        return batch

    @property
    def epochs_done(self) -> float:
        """Fractional number of passes over the training text so far."""
        return self.epoch + self.index / self.steps_per_epoch

    def state_dict(self) -> dict[str, int]:
        """Where the batcher stands: enough to continue exactly."""
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from :meth:`state_dict` output."""
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


class RandomBatcher:
    """B independent windows at random positions; the state is reset for each batch."""

    def __init__(self, ids: np.ndarray, batch_size: int, seq_len: int, seed: int) -> None:
        _check_length(ids, batch_size, seq_len)
        self.ids, self.batch_size, self.seq_len, self.seed = ids, batch_size, seq_len, seed
        self.step = 0

    def next_batch(self) -> Batch:
        """B fresh windows, drawn from a generator keyed on (seed, step)."""
        rng = np.random.default_rng([self.seed, self.step])
        starts = rng.integers(0, len(self.ids) - self.seq_len, size=self.batch_size)
        window = starts[:, None] + np.arange(self.seq_len)[None, :]
        self.step += 1
        return Batch(self.ids[window].astype(np.int64), self.ids[window + 1].astype(np.int64), True)

    @property
    def epochs_done(self) -> float:
        """Characters served so far over the training length."""
        return self.step * self.batch_size * self.seq_len / (len(self.ids) - 1)

    def state_dict(self) -> dict[str, int]:
        """Where the batcher stands: enough to continue exactly."""
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from :meth:`state_dict` output."""
        self.step = int(state["step"])


def make_batcher(
    mode: str, ids: np.ndarray, batch_size: int, seq_len: int, seed: int
) -> StatefulBatcher | RandomBatcher:
    """The batcher for ``--batching`` mode."""
    cls = StatefulBatcher if mode == "stateful" else RandomBatcher
    return cls(ids, batch_size, seq_len, seed)


def _epoch_offset(seed: int, epoch: int, pairs: int) -> int:
    # A fresh rotation each epoch, so stream boundaries and the dropped remainder move around.
    return int(np.random.default_rng([seed, epoch, 0x5EED]).integers(pairs))


def _check_length(ids: np.ndarray, batch_size: int, seq_len: int) -> None:
    needed = batch_size * seq_len + 1
    if len(ids) < needed:
        raise CharLSTMError(
            f"the training text has {len(ids):,} characters but one batch of {batch_size} x "
            f"{seq_len} needs at least {needed:,}: use more text or a smaller --batch-size "
            "or --seq-len"
        )
