"""One optimizer for the whole network: Muon for the recurrent weight matrices, AdamW for the rest.

Muon (Keller Jordan, 2024) takes the Nesterov-momentum update of a weight matrix and replaces it
by the semi-orthogonal matrix with the same singular vectors: every direction the update spans
moves by the same step, instead of the few directions that dominate a raw gradient. A quintic
Newton-Schulz iteration finds it in a few small products (in bf16 when training is). Each
gate's block of an RNN weight is a separate linear map, so each is orthogonalised on its own.
The embedding, biases and output head keep AdamW, as in Muon's own recipe.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

# Coefficients of the quintic iteration X <- aX + (b XX^T + c (XX^T)^2) X, chosen to push every
# singular value of a normalised matrix into roughly [0.7, 1.2] in five steps: close enough to
# 1 for an update direction, and far fewer steps than an exact iteration would need.
_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
_STEPS = 5


def orthogonalize(update: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The matrices of ``update`` (..., m, n) with their singular values pushed to about 1,
    computed in ``dtype``."""
    a, b, c = _COEFFICIENTS
    x = update.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the smaller of the two Gram matrices
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(_STEPS):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).to(update.dtype)


class MuonAdamW(torch.optim.Optimizer):
    """Muon for the parameter groups with ``"blocks": n`` (each matrix split into n blocks of
    rows, orthogonalised separately), AdamW for the groups without.

    The orthogonalisation runs in ``dtype``. Every group's ``lr`` is AdamW's learning rate, so
    one schedule drives both; a Muon group steps ``muon_lr / lr`` times it (its ``"scale"``).
    Weight decay is decoupled in both: each step shrinks a parameter by ``lr * weight_decay``.
    """

    def __init__(
        self,
        groups: Iterable[dict[str, Any]],
        *,
        lr: float,
        muon_lr: float,
        betas: tuple[float, float] = (0.9, 0.99),
        momentum: float = 0.95,
        eps: float = 1e-8,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.dtype = dtype  # of the orthogonalisation: bf16 halves its cost where it is native
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": 0.0, "blocks": 0}
        super().__init__(list(groups), defaults)
        for group in self.param_groups:
            group.setdefault("scale", muon_lr / lr)
            group.setdefault("momentum", momentum)

    @torch.no_grad()
    def step(self, closure=None) -> None:  # type: ignore[override]
        """One update of every parameter that has a gradient."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.mul_(1 - group["lr"] * group["weight_decay"])
                if group["blocks"]:
                    self._muon(p, group)
                else:
                    self._adamw(p, group)

    def _muon(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        if "momentum" not in state:
            state["momentum"] = torch.zeros_like(p)
        momentum = group["momentum"]
        state["momentum"].lerp_(p.grad, 1 - momentum)
        nesterov = p.grad.lerp(state["momentum"], momentum)
        blocks = nesterov.view(group["blocks"], -1, p.shape[-1])
        # An update of unit singular values in a tall block changes its outputs less per
        # unit of step: scaled up by sqrt(rows / columns) to compensate.
        scale = math.sqrt(max(1.0, blocks.shape[1] / blocks.shape[2]))
        step = orthogonalize(blocks, self.dtype).view_as(p)
        p.add_(step, alpha=-group["lr"] * group["scale"] * scale)

    def _adamw(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        step = float(state["step"])
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        denominator = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**step)).add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denominator, value=-group["lr"] / (1 - beta1**step))
