"""CharRNN: embedding -> LSTM | GRU | vanilla RNN stack -> dropout -> linear head.

The head reads every layer's output side by side (``--head-input all``, the default), or the
last layer's alone (``last``, the classic char-rnn). The network knows nothing of text, files
or training: it maps integer ids to next-id logits.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from charlstm import fused_lstm
from charlstm.config import ModelConfig

# The recurrent state: (h, c) for an LSTM, (h,) for a GRU or RNN; each tensor is
# (n_layers, batch, hidden_dim). A tuple in every case keeps carrying and saving uniform.
State = tuple[torch.Tensor, ...]

_CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
# One layer of each cell as a function of explicit weights: the op that nn.LSTM & co. call.
_LAYER_FUNCTIONS = {"lstm": torch.lstm, "gru": torch.gru, "rnn": torch.rnn_tanh}
_GATES = {"lstm": 4, "gru": 3, "rnn": 1}  # rows of each layer's weights, in hidden_dim
WEIGHT_NAMES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


# Logits held at once (batch x time x vocabulary) when scoring or taking the loss: with a large
# vocabulary, fewer time steps per product rather than gigabytes of logits.
MAX_LOGITS = 1 << 22


class CharRNN(nn.Module):
    """A character-level recurrent language model."""

    def __init__(self, config: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, config.embed_dim)
        # Holds the weights only: forward runs the layers one by one (see run_layer) to apply
        # its own dropout masks and to hand every layer's output to the head.
        self.rnn = _CELLS[config.cell](
            config.embed_dim, config.hidden_dim, config.n_layers, batch_first=True
        )
        heads = config.n_layers if config.head_input == "all" else 1
        self.head = nn.Linear(heads * config.hidden_dim, vocab_size)

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
        given, draws every dropout mask, so that threads training shards of one batch stay
        reproducible.
        """
        features, new_state = self.features(x, state, generator=generator)
        return self.head(features), new_state

    def features(
        self,
        x: torch.Tensor,
        state: State | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, State]:
        """What the head reads at every position, (B, T, heads x H), and the new state:
        :meth:`forward` without its last product, for a loss taken a slice at a time."""
        if x.shape[1] == 0:  # no step to run (torch's layers refuse one): the state as given
            width = self.head.in_features
            state = state if state is not None else self.initial_state(x.shape[0])
            return self.head.weight.new_zeros(x.shape[0], 0, width), state
        rate = self.config.dropout if self.training else 0.0
        if fused_lstm.applies(self.rnn, x):  # bf16 autocast on a CPU the kernel runs on
            # Time-major there, so that each step's rows lie together in memory.
            outputs, new_state = fused_lstm.lstm_forward(
                self.rnn, x.t(), state, embedding=self.embed.weight, rate=rate, generator=generator
            )
            return self._head_input(outputs).transpose(0, 1), new_state
        state = state if state is not None else self.initial_state(x.shape[0])
        layer_input = self.embed(x)  # (B, T, E)
        outputs, finals = [], []
        for layer in range(self.config.n_layers):
            weights = [getattr(self.rnn, f"{name}_l{layer}") for name in WEIGHT_NAMES]
            layer_state = tuple(s[layer] for s in state)
            out, final = run_layer(self.config.cell, layer_input, layer_state, weights)
            layer_input = dropout(out, rate, generator)  # (B, T, H)
            outputs.append(layer_input)
            finals.append(final)
        new_state = tuple(torch.stack(parts) for parts in zip(*finals, strict=True))
        return self._head_input(outputs), new_state

    def _head_input(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        """What the head reads: every layer's output, concatenated, or the last one's."""
        return torch.cat(outputs, dim=-1) if self.config.head_input == "all" else outputs[-1]

    def initial_state(self, batch_size: int) -> State:
        """An all-zero state for ``batch_size`` streams, on the model's device and dtype."""
        weight = self.head.weight
        shape = (self.config.n_layers, batch_size, self.config.hidden_dim)
        count = 2 if self.config.cell == "lstm" else 1
        return tuple(weight.new_zeros(shape) for _ in range(count))

    def num_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def weight_shapes(config: ModelConfig, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """The name and shape of every weight of a :class:`CharRNN`, in its ``state_dict``'s order,
    from the configuration alone: a weight file is checked before anything is built. (Building
    one on PyTorch's meta device would import its compiler, a second of every command's
    start-up.)"""
    config.validate()
    hidden, rows = config.hidden_dim, _GATES[config.cell] * config.hidden_dim
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (vocab_size, config.embed_dim)}
    for layer in range(config.n_layers):
        inputs = config.embed_dim if layer == 0 else hidden
        shapes[f"rnn.weight_ih_l{layer}"] = (rows, inputs)
        shapes[f"rnn.weight_hh_l{layer}"] = (rows, hidden)
        shapes[f"rnn.bias_ih_l{layer}"] = (rows,)
        shapes[f"rnn.bias_hh_l{layer}"] = (rows,)
    heads = config.n_layers if config.head_input == "all" else 1
    shapes["head.weight"] = (vocab_size, heads * hidden)
    shapes["head.bias"] = (vocab_size,)
    return shapes


def with_more_ids(weights: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """A :class:`CharRNN`'s weights for ``vocab_size`` ids, the ids it has keeping theirs bit
    for bit. Each new id's embedding is the mean of the others (an input like an average
    one); its output row is zero and its bias the lowest of the others, so that it starts as
    unlikely as the rarest id the network knows and learns from there."""
    embed, head, bias = weights["embed.weight"], weights["head.weight"], weights["head.bias"]
    added = vocab_size - embed.shape[0]
    if added < 0:
        raise ValueError(f"the weights have {embed.shape[0]} ids, more than {vocab_size}")
    return {
        **weights,
        "embed.weight": torch.cat([embed, embed.mean(0, keepdim=True).expand(added, -1)]),
        "head.weight": torch.cat([head, head.new_zeros(added, head.shape[1])]),
        "head.bias": torch.cat([bias, bias.min().expand(added)]),
    }


def dropout(x: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Zero each element with probability ``p`` and scale the rest by 1 / (1 - p); the mask
    comes from ``generator`` (the global generator if None)."""
    if p == 0:
        return x
    if generator is None:
        return F.dropout(x, p, training=True)
    keep = x.new_empty(x.shape).bernoulli_(1 - p, generator=generator)
    return x * keep.div_(1 - p)


def detach_state(state: State) -> State:
    """Cut the autograd graph behind a carried state (truncated backpropagation through time)."""
    return tuple(s.detach() for s in state)


def run_layer(
    cell: str, x: torch.Tensor, state: State, weights: list[torch.Tensor]
) -> tuple[torch.Tensor, State]:
    """One recurrent layer over a batch-first sequence x (B, T, in): its output (B, T, H) and
    its final state, each part (B, H). ``state`` holds (h, c) for an LSTM, (h,) otherwise, each
    (B, H); ``weights`` are W_ih, W_hh, b_ih, b_hh, in PyTorch's layout."""
    hidden = tuple(s.unsqueeze(0).contiguous() for s in state)  # torch's ops want (1, B, H)
    hx = hidden if cell == "lstm" else hidden[0]
    # (warnings' filters are process-wide, so touched only on CUDA, which trains unsharded)
    with _quiet_cudnn() if x.is_cuda else contextlib.nullcontext():
        # Arguments: biases, layers, dropout, training, bidirectional, batch_first.
        out, *final = _LAYER_FUNCTIONS[cell](x, hx, weights, True, 1, 0.0, False, False, True)
    return out, tuple(f.squeeze(0) for f in final)


def reference_lstm_layer(
    x: torch.Tensor, state: State, weights: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One LSTM layer stepped one character at a time in plain PyTorch: the LSTM's equations
    written out once, for whatever needs every step's cell state (torch's ops return only the
    last one) or a reference to hold a faster implementation to.

    x is batch-first (B, T, in); ``state`` holds (h, c), each (B, H); ``weights`` are W_ih,
    W_hh, b_ih, b_hh in PyTorch's layout, gates in its order i, f, g, o. Returns the hidden
    and the cell state after each step, each (B, T, H): the first is the layer's output (as
    :func:`run_layer` returns it), and step T - 1 of both is its final state.
    """
    w_ih, w_hh, b_ih, b_hh = weights
    h, c = state
    projected = F.linear(x, w_ih, b_ih + b_hh)  # every step's input term in one product
    hs = projected.new_empty(*x.shape[:2], w_hh.shape[1])
    cs = torch.empty_like(hs)
    for t in range(x.shape[1]):
        i, f, g, o = (projected[:, t] + F.linear(h, w_hh)).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        hs[:, t], cs[:, t] = h, c
    return hs, cs


@contextlib.contextmanager
def _quiet_cudnn() -> Iterator[None]:
    """cuDNN copies weights that are not one flat buffer into one, and warns on every call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="RNN module weights are not part")
        yield
