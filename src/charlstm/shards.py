"""Data parallelism across the cores of one CPU, inside one process.

At the batch sizes a char-RNN trains with, PyTorch's own multi-threading of each operation
scales poorly (two cores give 1.5x one core on a 2 x 256 LSTM). Splitting the batch's streams
into one shard per core, each run forward and backward on its own thread with single-threaded
operations, gives close to 2x; the shards' gradients are then added in a fixed order, so the
result does not depend on which thread finishes first. Each shard draws its dropout masks from
a generator of its own, seeded from the global one in the caller's thread, for the same reason.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

# forward_backward(inputs, targets, state, generator) -> (loss summed over the shard, gradients,
# new state); the generator (None for a single shard: the global one) draws dropout masks.
ShardStep = Callable[
    [torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...], torch.Generator | None],
    tuple[torch.Tensor, list[torch.Tensor], tuple[torch.Tensor, ...]],
]


class Shards:
    """Runs a forward-backward function over row slices of a batch, one thread per shard."""

    def __init__(self, count: int) -> None:
        self.count = max(1, count)
        self.pool = None
        if self.count > 1:
            # Each worker makes its own operations single-threaded; the caller's stay as they are.
            self.pool = ThreadPoolExecutor(
                self.count, initializer=torch.set_num_threads, initargs=(1,)
            )

    def run(
        self,
        step: ShardStep,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        state: tuple[torch.Tensor, ...],
    ) -> tuple[torch.Tensor, list[torch.Tensor], tuple[torch.Tensor, ...]]:
        """The summed loss, the summed gradients and the new state of the whole batch."""
        bounds = _bounds(len(inputs), self.count)
        generators: list[torch.Generator | None] = [None]
        if len(bounds) > 1:  # seeds drawn here, in order: the same masks whatever the timing
            seeds = torch.randint(2**62, (len(bounds),)).tolist()
            generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        jobs = [
            (inputs[a:b], targets[a:b], tuple(s[:, a:b] for s in state), generator)
            for (a, b), generator in zip(bounds, generators, strict=True)
        ]
        if self.pool is None or len(jobs) == 1:
            results = [step(*job) for job in jobs]
        else:
            results = list(self.pool.map(lambda job: step(*job), jobs))
        loss = sum((r[0] for r in results[1:]), results[0][0])
        grads = [sum(g[1:], g[0]) for g in zip(*(r[1] for r in results), strict=True)]
        new_state = tuple(
            torch.cat(parts, dim=1) for parts in zip(*(r[2] for r in results), strict=True)
        )
        return loss, grads, new_state

    def close(self) -> None:
        """Stop the worker threads."""
        if self.pool is not None:
            self.pool.shutdown()


def shard_count(device: torch.device, batch_size: int) -> int:
    """One shard per CPU thread (at most one per row); one on GPUs."""
    if device.type != "cpu":
        return 1
    return max(1, min(torch.get_num_threads(), batch_size))


def _bounds(rows: int, count: int) -> list[tuple[int, int]]:
    edges = [rows * k // count for k in range(count + 1)]
    return [(a, b) for a, b in itertools.pairwise(edges) if b > a]
