"""An exponential moving average of a network's weights, the model that runs report and save.

On a small corpus the weights that AdamW visits jitter around a better point than any single
one of them; their running average generalises better than the last (on Tiny Shakespeare,
about 0.01 nats per character at the end of a 5-minute run and several times that midway,
while the learning rate is high). Training updates the weights as always; evaluation,
checkpoints and sampling use the average.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn


class WeightAverage:
    """``average = decay * average + (1 - decay) * weights`` after every optimizer step."""

    def __init__(self, net: nn.Module, decay: float) -> None:
        self.net, self.decay = net, decay
        self.average = {name: p.detach().clone() for name, p in net.named_parameters()}
        self._held: dict[str, torch.Tensor] | None = None  # the training weights, while swapped

    def update(self, step: int) -> None:
        """Fold in the weights after optimizer step ``step`` (counted from 0). The decay ramps
        up over the first steps, so that the random initial weights are soon forgotten."""
        decay = min(self.decay, (1 + step) / (10 + step))
        weights = [p.detach() for p in self.net.parameters()]
        torch._foreach_lerp_(list(self.average.values()), weights, 1 - decay)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The average in the network's parameters for the duration, the training weights
        restored (bit for bit) afterwards."""
        if self._held is not None:  # already applied: an inner use changes nothing
            yield
            return
        self._held = {name: p.detach().clone() for name, p in self.net.named_parameters()}
        try:
            self._load(self.average)
            yield
        finally:
            self._load(self._held)
            self._held = None

    def training_weights(self) -> dict[str, torch.Tensor]:
        """The weights being trained, whether or not the average stands in for them now."""
        if self._held is not None:
            return self._held
        return {name: p.detach() for name, p in self.net.named_parameters()}

    def restore(self, average: dict[str, torch.Tensor], training: dict[str, torch.Tensor]) -> None:
        """Continue from a checkpoint: its averaged weights and the weights being trained."""
        for name, value in average.items():
            self.average[name].copy_(value)
        self._load(training)

    @torch.no_grad()
    def _load(self, weights: dict[str, torch.Tensor]) -> None:
        for name, p in self.net.named_parameters():
            p.copy_(weights[name])
