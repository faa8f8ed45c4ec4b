"""Batches of (input, target) ids for training, in two modes.

``stateful`` (the default) reads B contiguous streams side by side; each batch continues every
stream exactly where the previous batch stopped, so the carried hidden state has seen all of
the stream's past although gradients stop after T steps::

    training ids, rotated by a fresh random offset each epoch, cut into B streams of L pairs
    stream 0: |--batch 0--|--batch 1--|--batch 2--| ... |-last-|
    stream 1: |--batch 0--|--batch 1--|--batch 2--| ... |-last-|
    ...         T chars      T chars                      L mod T

``random`` draws B independent windows of T characters at random positions and resets the
state for every batch (the classic char-rnn / seed loop).

Both are pure functions of (seed, position), so their whole state is a couple of integers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from charlstm.errors import CharLSTMError


@dataclass
class Batch:
    """Inputs and next-character targets, both (B, T) int64, and whether to zero the state."""

    inputs: np.ndarray
    targets: np.ndarray
    reset_state: bool


class StatefulBatcher:
    """B contiguous streams over the training ids; the state is carried between batches."""

    def __init__(self, ids: np.ndarray, batch_size: int, seq_len: int, seed: int) -> None:
        _check_length(ids, batch_size, seq_len)
        self.ids, self.batch_size, self.seq_len, self.seed = ids, batch_size, seq_len, seed
        self.pairs = len(ids) - 1  # (input, target) pairs: position i predicts i + 1
        self.stream_len = self.pairs // batch_size
        self.steps_per_epoch = -(-self.stream_len // seq_len)
        self.epoch = 0
        self.index = 0  # batch index within the epoch

    def next_batch(self) -> Batch:
        """The next batch; ``reset_state`` is true at the start of every epoch."""
        if self.index == self.steps_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        start = self.index * self.seq_len
        length = min(self.seq_len, self.stream_len - start)
        offset = _epoch_offset(self.seed, self.epoch, self.pairs)
        streams = np.arange(self.batch_size)[:, None] * self.stream_len
        pair = (offset + streams + start + np.arange(length)[None, :]) % self.pairs
        batch = Batch(
            self.ids[pair].astype(np.int64), self.ids[pair + 1].astype(np.int64), self.index == 0
        )
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
