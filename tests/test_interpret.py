"""What ``charlstm inspect`` reads: bounded, from regular files only, in one-line errors; and a
text too long to record in memory, refused before recording it."""

from __future__ import annotations

import codecs
import os

import pytest
import torch

import charlstm.interpret as interpret_module
from charlstm.config import RunConfig
from charlstm.data import Vocab
from charlstm.errors import CharLSTMError
from charlstm.interpret import inspect, read_text_file
from charlstm.lm import CharLM
from charlstm.model import CharRNN


def error_of(action) -> str:
    with pytest.raises(CharLSTMError) as excinfo:
        action()
    return str(excinfo.value)


def test_only_the_characters_wanted_are_read(tmp_path):
    """At most 4 bytes a character (and a byte-order mark): a bad byte beyond never shows."""
    path = tmp_path / "t.txt"
    path.write_bytes("é".encode() * 100 + b"\xff" + b"x" * 10_000)
    assert read_text_file(path, max_chars=100) == "é" * 100
    assert error_of(lambda: read_text_file(path)) == f"{path}: invalid UTF-8 at byte 200"


def test_a_byte_order_mark_is_not_text_and_offsets_count_it(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(codecs.BOM_UTF8 + b"abc\n" * 50)
    assert read_text_file(path, max_chars=5) == "abc\na"
    assert read_text_file(path) == "abc\n" * 50
    path.write_bytes(codecs.BOM_UTF8 + b"ab\xff")
    assert error_of(lambda: read_text_file(path)) == f"{path}: invalid UTF-8 at byte 5"


def test_a_character_split_across_reads_is_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(interpret_module, "_READ_BLOCK", 3)
    path = tmp_path / "t.txt"
    text = "a😀b日本語\n" * 7
    path.write_text(text, encoding="utf-8")
    assert read_text_file(path) == text
    assert read_text_file(path, max_chars=9) == text[:9]


@pytest.mark.parametrize("kind", ["fifo", "device", "directory", "missing"])
def test_what_is_not_a_regular_file_is_refused_without_waiting(tmp_path, kind):
    path = {"device": os.devnull, "directory": tmp_path}.get(kind, tmp_path / kind)
    if kind == "fifo":
        if not hasattr(os, "mkfifo"):
            pytest.skip("no FIFOs here")
        os.mkfifo(path)  # opening it would wait for a writer
    message = error_of(lambda: read_text_file(path, max_chars=10))
    assert message == {
        "missing": f"{path}: no such file",
        "directory": f"{path} is a directory: give a text file",
    }.get(kind, f"{path} is not a regular file (a pipe or device): save the text to a file first")


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
