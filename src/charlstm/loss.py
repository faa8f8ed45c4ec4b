"""The training loss: summed cross-entropy of the scored targets, and its gradients, taken a
slice of time steps at a time when a large vocabulary's logits would not fit at once."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F

from charlstm.model import CharRNN, State, detach_state

# Logits (and their gradients) the training loss holds at once: fewer than scoring may, as
# backward keeps each slice's softmax too; a large vocabulary's loss runs in slices of steps.
LOSS_LOGITS = 1 << 20


def loss_and_grads(
    net: CharRNN,
    x: torch.Tensor,
    y: torch.Tensor,
    state: State,
    weight: float,
    params: list[torch.Tensor],
    *,
    generator: torch.Generator | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    scale: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss,
    max_logits: int = LOSS_LOGITS,
) -> tuple[torch.Tensor, list[torch.Tensor], State]:
    """``weight`` times the summed cross-entropy of the scored targets ``y`` after inputs
    ``x``, its gradients with respect to ``params`` (of ``scale(loss)``: fp16's loss scale) and
    the new state. When the batch's logits would exceed ``max_logits`` (a large vocabulary),
    the head and the loss run a slice of time steps at a time, and their gradients enter the
    network's backward pass together: the same gradients, without the batch's whole logits."""
    rows, steps = x.shape
    with autocast():  # autocast is per thread: enter it in the shard's own
        features, new_state = net.features(x, state, generator=generator)
    chunk = max(1, max_logits // (rows * net.vocab_size))
    if chunk >= steps:
        with autocast():
            logits = net.head(features)
        loss = summed_loss(logits, y) * weight
        return (
            loss.detach(),
            list(torch.autograd.grad(scale(loss), params)),
            detach_state(new_state),
        )
    held = features.detach().requires_grad_()
    head = [net.head.weight, net.head.bias]
    loss = torch.zeros((), device=x.device)
    feature_grads, head_grads = [], [torch.zeros_like(p) for p in head]
    for t in range(0, steps, chunk):
        part = held[:, t : t + chunk]
        with autocast():
            logits = net.head(part)
        piece = summed_loss(logits, y[:, t : t + chunk]) * weight
        grad_part, *grad_head = torch.autograd.grad(scale(piece), [part, *head])
        feature_grads.append(grad_part)
        for total, grad in zip(head_grads, grad_head, strict=True):
            total += grad
        loss += piece.detach()
    body = [p for p in params if all(p is not h for h in head)]
    body_grads = torch.autograd.grad(features, body, torch.cat(feature_grads, dim=1))
    found = {id(p): g for p, g in zip([*body, *head], [*body_grads, *head_grads], strict=True)}
    return loss, [found[id(p)] for p in params], detach_state(new_state)


def summed_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The cross-entropy of ``logits`` (B, T, V) against targets ``y`` (B, T), summed over the
    scored targets (those not ``IGNORE``), in fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
