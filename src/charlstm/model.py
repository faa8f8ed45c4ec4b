"""CharRNN: embedding -> LSTM | GRU | vanilla RNN stack -> dropout -> linear head.

The network knows nothing of text, files or training: it maps integer ids to next-id logits.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from charlstm import fused_lstm
from charlstm.config import ModelConfig

# The recurrent state: (h, c) for an LSTM, (h,) for a GRU or RNN; each tensor is
# (n_layers, batch, hidden_dim). A tuple in every case keeps carrying and saving uniform.
State = tuple[torch.Tensor, ...]

_CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


class CharRNN(nn.Module):
    """A character-level recurrent language model."""

    def __init__(self, config: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, config.embed_dim)
        self.rnn = _CELLS[config.cell](
            config.embed_dim,
            config.hidden_dim,
            config.n_layers,
            # PyTorch applies this dropout between layers only, so it is moot for one layer.
            dropout=config.dropout if config.n_layers > 1 else 0.0,
            batch_first=True,
        )
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden_dim, vocab_size)

    def forward(
        self,
        x: torch.Tensor,
        state: State | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, State]:
        """Logits for the next id at every position, and the state after the last one.

        x: (B, T) integer ids; state: from :meth:`initial_state` or a previous call, or None
        for zeros. Returns logits (B, T, vocab_size) and the new state. ``generator``, if
        given, draws the dropout masks that torch.nn.LSTM does not draw itself (all of them
        on the fused-kernel path), so that threads training shards of one batch stay reproducible.
        """
        p = self.drop.p if self.training else 0.0
        weights = self._recurrent_weights(generator)
        if fused_lstm.applies(self.rnn, x):  # bf16 autocast on a CPU the kernel runs on
            # Time-major there, so that each step's rows lie together in memory.
            between = self.rnn.dropout if self.training else 0.0
            out, new_state = fused_lstm.lstm_forward(
                self.rnn, x.t(), state, embedding=self.embed.weight, between=between, after=p,
                generator=generator, weights=weights,
            )  # fmt: skip
            return self.head(out).transpose(0, 1), new_state
        emb = self.embed(x)  # (B, T, E)
        arguments = (emb, _unpack(state, self.config.cell))
        if weights:
            out, new_state = functional_call(self.rnn, weights, arguments)
        else:
            out, new_state = self.rnn(*arguments)  # (B, T, H)
        logits = self.head(dropout(out, p, generator))  # (B, T, V)
        return logits, _pack(new_state)

    def _recurrent_weights(self, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """In training with --weight-dropout, each layer's W_hh with a fresh mask (one mask for
        the whole batch and every step of it); otherwise nothing to replace."""
        p = self.config.weight_dropout
        if not self.training or p == 0:
            return {}
        names = [f"weight_hh_l{layer}" for layer in range(self.config.n_layers)]
        return {name: dropout(getattr(self.rnn, name), p, generator) for name in names}

    def initial_state(self, batch_size: int) -> State:
        """An all-zero state for ``batch_size`` streams, on the model's device and dtype."""
        weight = self.head.weight
        shape = (self.config.n_layers, batch_size, self.config.hidden_dim)
        count = 2 if self.config.cell == "lstm" else 1
        return tuple(weight.new_zeros(shape) for _ in range(count))

    def num_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def dropout(x: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Zero each element with probability ``p`` and scale the rest by 1 / (1 - p); the mask
    comes from ``generator`` (the global generator if None)."""
    if p == 0:
        return x
    if generator is None:
        return F.dropout(x, p, training=True)
    keep = torch.empty_like(x).bernoulli_(1 - p, generator=generator)
    return x * keep.div_(1 - p)


def detach_state(state: State) -> State:
    """Cut the autograd graph behind a carried state (truncated backpropagation through time)."""
    return tuple(s.detach() for s in state)


def _unpack(state: State | None, cell: str):
    if state is None:
        return None
    # nn.LSTM wants an (h, c) tuple, nn.GRU and nn.RNN a bare h.
    return state if cell == "lstm" else state[0]


def _pack(state) -> State:
    return tuple(state) if isinstance(state, tuple) else (state,)
