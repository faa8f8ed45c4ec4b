"""A text too long for ``charlstm inspect`` to record in memory, refused before recording it."""

from __future__ import annotations

import pytest
import torch

import charlstm.interpret as interpret_module
from charlstm.config import RunConfig
from charlstm.data import Vocab
from charlstm.errors import CharLSTMError
from charlstm.interpret import inspect
from charlstm.lm import CharLM
from charlstm.model import CharRNN


def error_of(action) -> str:
    with pytest.raises(CharLSTMError) as excinfo:
        action()
    return str(excinfo.value)


def test_a_text_too_long_to_record_in_memory_is_refused_first(monkeypatch):
    vocab = Vocab("text", tuple(map(ord, "ab\n")))
    config = RunConfig().with_overrides({"embed_dim": 4, "hidden_dim": 8, "n_layers": 2})
    torch.manual_seed(0)
    model = CharLM(CharRNN(config.model, vocab.size).eval(), vocab, config)
    recorded = []
    monkeypatch.setattr(interpret_module, "record_activations", lambda *a: recorded.append(a))
    monkeypatch.setattr(interpret_module, "available_memory", lambda: 100_000)
    message = error_of(lambda: inspect(model, "ab\n" * 1000, max_chars=3000))
    assert message == (
        "inspecting 3,000 characters of a model with 32 units needs about 0.0 GB of memory and "
        "0.0 GB is available: use a smaller --max-chars"
    )
    assert recorded == []
