"""The baselines: a character LSTM trained and sampled the way people write it by hand.

Deliberately plain, as in tutorials and the code charlstm grew from: random windows gathered
with a list comprehension and ``torch.stack``, fp32, AdamW at 3e-4, loss on every position,
gradient clipping at 1.0; a sampler that runs the model on the last character with the carried
state, takes a softmax, sorts the whole distribution for top-p and calls ``torch.multinomial``.
Nothing here is tuned; every benchmark reports charlstm as a ratio against these.
"""

from __future__ import annotations

import random
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class PlainCharLSTM(nn.Module):
    """Embedding -> 2-layer LSTM -> linear head, the usual hand-written module."""

    def __init__(self, vocab_size: int, embed_dim: int = 128, hidden: int = 256, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.lstm = nn.LSTM(embed_dim, hidden, layers, batch_first=True, dropout=0.2)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, x, state=None):
        out, state = self.lstm(self.embed(x), state)
        return self.head(out), state


class PlainTrainer:
    """The hand-written loop: random windows, fp32, AdamW 3e-4, clip 1.0."""

    def __init__(self, data: torch.Tensor, vocab_size: int, batch: int = 64, seq: int = 128):
        torch.manual_seed(0)
        random.seed(0)
        self.data, self.batch, self.seq = data, batch, seq
        self.model = PlainCharLSTM(vocab_size)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=3e-4)

    def get_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = [random.randint(0, len(self.data) - self.seq - 2) for _ in range(self.batch)]
        x = torch.stack([self.data[s : s + self.seq] for s in starts])
        y = torch.stack([self.data[s + 1 : s + self.seq + 1] for s in starts])
        return x, y

    def step(self) -> float:
        self.model.train()
        x, y = self.get_batch()
        logits, _ = self.model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        self.optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        return loss.item()

    def train_for(self, seconds: float) -> int:
        """Train until ``seconds`` have passed; returns the number of steps."""
        steps, end = 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            self.step()
            steps += 1
        return steps


@torch.no_grad()
def plain_sample(
    model: PlainCharLSTM, start_id: int, length: int, temperature: float, top_p: float
) -> list[int]:
    """One character at a time: softmax, sort the whole distribution for top-p, multinomial."""
    model.eval()
    x = torch.tensor([[start_id]])
    state, out = None, []
    for _ in range(length):
        logits, state = model(x, state)
        probs = F.softmax(logits[0, -1] / temperature, dim=-1)
        sorted_probs, sorted_ids = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        sorted_probs[cumulative - sorted_probs > top_p] = 0.0
        sorted_probs = sorted_probs / sorted_probs.sum()
        choice = torch.multinomial(sorted_probs, 1)
        next_id = sorted_ids[choice].item()
        out.append(next_id)
        x = torch.tensor([[next_id]])
    return out
