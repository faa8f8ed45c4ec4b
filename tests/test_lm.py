"""CharLM: generating text, streaming, batches, prompts, evaluation, and byte-level models."""

# ruff: noqa: RUF001 - a text in Cyrillic on purpose

from __future__ import annotations

import importlib.resources
import inspect
import json
import math
import string
import subprocess
import sys
import typing

import numpy as np
import pytest
import torch
from conftest import CLI_TIMEOUT, tiny_config

import charlstm
from charlstm.config import DynamicEvalConfig, RunConfig, SampleConfig
from charlstm.data import Vocab
from charlstm.errors import CharLSTMError
from charlstm.evaluation import dynamic_evaluate_ids, evaluate_ids
from charlstm.lm import CharLM
from charlstm.model import CharRNN
from charlstm.sample import NumpyStepper, generate_ids

ALPHABET = "\n !',.:;?" + string.ascii_letters


def text_model(seed: int = 0, cell: str = "lstm") -> CharLM:
    config = RunConfig().with_overrides(
        {"cell": cell, "embed_dim": 8, "hidden_dim": 16, "n_layers": 2, "dropout": 0.0}
    )
    vocab = Vocab("text", tuple(sorted(ord(c) for c in ALPHABET)))
    torch.manual_seed(seed)
    net = CharRNN(config.model, vocab.size)
    with torch.no_grad():
        net.head.weight.mul_(4)  # an untrained head is nearly uniform; make choices clear-cut
    return CharLM(net.eval(), vocab, config)


def byte_model(codepoints: tuple[int, ...], seed: int = 0) -> CharLM:
    config = RunConfig().with_overrides(
        {"cell": "gru", "embed_dim": 8, "hidden_dim": 16, "n_layers": 1, "dropout": 0.0}
    )
    vocab = Vocab("bytes", codepoints)
    torch.manual_seed(seed)
    return CharLM(CharRNN(config.model, vocab.size).eval(), vocab, config)


def cycling_byte_model() -> CharLM:
    """A byte model whose greedy output cycles A, 0xC3, 0xA9 ('A', then 'é' in two bytes)."""
    vocab = Vocab("bytes", (0x41, 0xA9, 0xC3))  # ids: A=0, 0xA9=1, 0xC3=2
    config = RunConfig().with_overrides(
        {"cell": "rnn", "embed_dim": 3, "hidden_dim": 3, "n_layers": 1, "dropout": 0.0}
    )
    net = CharRNN(config.model, vocab.size)
    follows = {0: 2, 2: 1, 1: 0}
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        net.embed.weight.copy_(torch.eye(3) * 3)
        net.rnn.weight_ih_l0.copy_(torch.eye(3))  # the hidden state is the current byte
        for current, following in follows.items():
            net.head.weight[following, current] = 10.0
    return CharLM(net.eval(), vocab, config)


# ---- generation -------------------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 37])
def test_generate_returns_the_requested_length(length):
    model = text_model()
    text = model.generate("To be", length=length, seed=1)
    assert isinstance(text, str)
    assert len(text) == length
    assert set(text) <= set(ALPHABET)


def test_generate_refuses_length_zero():
    with pytest.raises(CharLSTMError, match=r"^length must be at least 1, got 0$"):
        text_model().generate("To be", length=0)


def test_generate_with_a_trained_model(trained_run):
    model = charlstm.load(str(trained_run), device="cpu")
    text = model.generate("ROMEO:", length=120, temperature=0.8, seed=0)
    assert len(text) == 120
    assert set(text) <= set(model.vocab.symbols())
    assert text == model.generate("ROMEO:", length=120, temperature=0.8, seed=0)
    # 60 steps are enough to learn that letters are likelier than punctuation.
    assert sum(c.isalpha() or c.isspace() for c in text) > 80


def test_generate_is_the_decoded_id_stream():
    model = text_model()
    settings = {"temperature": 1.0, "top_k": 5, "top_p": 0.9, "seed": 42}
    text = model.generate("Hello", length=50, **settings)
    prompt = torch.as_tensor(model.vocab.encode("Hello").astype(np.int64))
    ids = [int(s[0]) for s in generate_ids(model.net, prompt, 50, **settings)]
    assert text == model.vocab.decode(ids)


def test_seed_reproduces_and_settings_matter():
    model = text_model()
    a = model.generate("a", length=60, temperature=1.0, seed=7)
    assert a == model.generate("a", length=60, temperature=1.0, seed=7)
    assert a != model.generate("a", length=60, temperature=1.0, seed=8)
    greedy = model.generate("a", length=60, temperature=0)
    assert greedy == model.generate("a", length=60, top_k=1, seed=3)
    assert greedy == model.generate("a", length=60, top_k=1, seed=4)


def test_stream_yields_one_character_per_step():
    model = text_model()
    pieces = list(model.stream("It is", length=33, seed=5))
    assert len(pieces) == 33
    assert all(isinstance(p, str) and len(p) == 1 for p in pieces)
    assert "".join(pieces) == model.generate("It is", length=33, seed=5)


def test_stream_is_lazy_and_incremental(monkeypatch):
    model = text_model()
    calls = []
    handle = model.net.register_forward_hook(lambda *args: calls.append("prompt"))
    step = NumpyStepper.__call__
    monkeypatch.setattr(
        NumpyStepper, "__call__", lambda self, ids: calls.append(1) or step(self, ids)
    )
    try:
        stream = model.stream("abc", length=1000, seed=0)
        assert calls == []
        for _ in range(3):
            next(stream)
        assert calls == ["prompt", 1, 1]  # the prompt pass, then one step per further character
        stream.close()
    finally:
        handle.remove()


def test_generate_batch_returns_num_samples_strings():
    model = text_model()
    samples = model.generate_batch(4, "The ", length=40, temperature=1.0, seed=9)
    assert len(samples) == 4
    assert all(isinstance(s, str) and len(s) == 40 for s in samples)
    assert len(set(samples)) == 4
    assert samples == model.generate_batch(4, "The ", length=40, temperature=1.0, seed=9)
    greedy = model.generate_batch(3, "The ", length=40, temperature=0)
    assert greedy == [model.generate("The ", length=40, temperature=0)] * 3


def test_sample_i_is_the_same_in_a_batch_of_any_size():
    """Each sample has its own generator, seeded from the seed and its index."""
    model = text_model()
    five = model.generate_batch(5, "The ", length=40, temperature=1.0, top_k=6, seed=9)
    assert model.generate_batch(2, "The ", length=40, temperature=1.0, top_k=6, seed=9) == five[:2]
    assert model.generate("The ", length=40, temperature=1.0, top_k=6, seed=9) == five[0]


def test_prompt_with_unknown_characters_is_refused_listing_them():
    model = text_model()
    with pytest.raises(CharLSTMError) as info:
        model.generate("caf\u00e9 \u20ac \u00e9", length=5)
    message = str(info.value)
    assert "prompt contains characters not in the model's vocabulary" in message
    assert "'\u00e9'" in message
    assert "'\u20ac'" in message
    assert message.count("'\u00e9'") == 1
    assert "--unknown skip" in message
    assert "\n" not in message


def test_unknown_characters_are_refused_before_any_step():
    model = text_model()
    with pytest.raises(CharLSTMError):
        model.stream("\u20ac", length=5)  # no iteration needed
    with pytest.raises(CharLSTMError, match="temperature"):
        model.stream("a", length=5, temperature=-1)
    with pytest.raises(CharLSTMError, match="top_p"):
        model.generate_batch(2, "a", length=5, top_p=0)
    with pytest.raises(TypeError):
        model.generate("a", length=5, temprature=0.5)


def test_unknown_skip_and_replace():
    model = text_model()
    skipped = model.generate("to\u20acbe", length=30, temperature=0, unknown="skip")
    assert skipped == model.generate("tobe", length=30, temperature=0)
    replaced = model.generate("to\u20acbe", length=30, temperature=0, unknown="replace")
    assert replaced == model.generate("to be", length=30, temperature=0)
    assert skipped != replaced


def test_empty_prompt_is_refused():
    model = text_model()
    with pytest.raises(CharLSTMError, match="the prompt is empty"):
        model.generate("", length=5)
    with pytest.raises(CharLSTMError, match="the prompt is empty"):
        model.generate("\u20ac\u20ac", length=5, unknown="skip")


def test_default_prompt_is_a_newline():
    model = text_model()
    assert model.generate(length=20, temperature=0) == model.generate("\n", 20, temperature=0)


# ---- the typed sampling API --------------------------------------------------------------


def test_samples_report_the_seed_that_draws_them_again():
    model = text_model()
    drawn = model.samples("The ", 30, num_samples=3, temperature=1.0, top_p=0.9)
    seed = drawn[0].settings.seed  # none was given: one was drawn, the same for every sample
    assert isinstance(seed, int) and 0 <= seed < 2**63
    again = model.generate_batch(3, "The ", 30, temperature=1.0, top_p=0.9, seed=seed)
    assert [s.text for s in drawn] == again
    assert [s.index for s in drawn] == [0, 1, 2]
    assert drawn[2].as_dict() == {
        "prompt": "The ",
        "text": again[2],
        "settings": {"length": 30, "temperature": 1.0, "top_k": 0, "top_p": 0.9,
                     "unknown": "error"},
        "seed": seed,
        "index": 2,
    }  # fmt: skip
    (given,) = model.samples("The ", np.int64(30), temperature=np.float32(0.5), seed=np.int64(7))
    assert given.text == model.generate("The ", 30, temperature=0.5, seed=7)
    as_json = json.loads(json.dumps(given.as_dict()))  # numpy numbers become JSON's
    assert (as_json["seed"], as_json["settings"]["length"]) == (7, 30)
    assert model.samples("The ", 30)[0].settings.seed != seed  # a fresh one for every call


def test_summary_of_a_checkpoint_and_of_a_model_in_memory(trained_run):
    model = charlstm.load(str(trained_run), device="cpu")
    facts = model.summary()
    assert facts["name"] == trained_run.name
    assert facts["path"] == str(trained_run / "best")
    assert (facts["cell"], facts["layers"], facts["hidden"], facts["embed"]) == ("lstm", 2, 64, 32)
    assert facts["parameters"] == model.net.num_parameters()
    assert facts["vocabulary"] == model.vocab.size
    assert facts["corpus"] == model.info["corpus"]["name"]
    assert facts["step"] == 60
    assert facts["val_bpc"] == model.info["val"]["bpc"]
    unsaved = text_model()
    unsaved.info = {"val": {"bpc": math.inf}}  # JSON holds no infinity: not known
    assert {k: v for k, v in unsaved.summary().items() if v is None} == {
        "name": None, "path": None, "corpus": None, "step": None, "val_bpc": None,
    }  # fmt: skip


SAMPLING = ("temperature", "top_k", "top_p", "seed", "unknown")


@pytest.mark.parametrize("method", ["generate", "stream", "generate_batch", "samples"])
def test_sampling_settings_are_typed_keyword_only_with_sample_config_defaults(method):
    signature = inspect.signature(getattr(CharLM, method), eval_str=True)
    params = signature.parameters
    defaults = SampleConfig()
    hints = typing.get_type_hints(SampleConfig)
    for name in SAMPLING:
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY
        assert params[name].default == getattr(defaults, name)
        assert params[name].annotation == hints[name]
    for name in ("prompt", "length"):  # positional as before: generate("ROMEO:", 200)
        assert params[name].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        assert params[name].default == getattr(defaults, name)
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    assert "temperature: float = 0.8" in str(signature)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"temperature": -1.0}, "temperature must be 0 (greedy) or positive, got -1.0"),
        ({"temperature": math.nan}, "temperature must be a finite number, got nan"),
        ({"top_k": -2}, "top_k must be 0 (off) or positive, got -2"),
        ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
        ({"top_p": math.inf}, "top_p must be a finite number, got inf"),
        ({"seed": -1}, "seed must be in [0, 2**63) (a 64-bit seed), got -1"),
        ({"unknown": "ignore"}, "unknown must be one of error, skip, replace, not 'ignore'"),
        ({"length": 0}, "length must be at least 1, got 0"),
    ],
)
@pytest.mark.parametrize("method", ["generate", "stream", "generate_batch", "samples"])
def test_a_bad_setting_is_refused_naming_the_parameter_not_the_flag(method, settings, message):
    model = text_model()
    args = (2, "a") if method == "generate_batch" else ("a",)
    with pytest.raises(CharLSTMError) as info:
        getattr(model, method)(*args, **settings)
    assert str(info.value) == message
    assert "--" not in str(info.value)


def test_num_samples_is_refused_by_its_name():
    with pytest.raises(CharLSTMError, match=r"^num_samples must be at least 1, got 0$"):
        text_model().generate_batch(0, "a", length=5)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"temperature": "0.5"}, "temperature must be float, not str '0.5'"),
        ({"top_k": 2.5}, "top_k must be int, not float 2.5"),
        ({"top_k": True}, "top_k must be int, not bool True"),
        ({"seed": "7"}, "seed must be int or None, not str '7'"),
        ({"unknown": None}, "unknown must be str, not NoneType None"),
        ({"length": 5.0}, "length must be int, not float 5.0"),
    ],
)
def test_a_setting_of_the_wrong_type_is_a_type_error_naming_it(settings, message):
    with pytest.raises(TypeError) as info:
        text_model().generate("a", **{"length": 5, **settings})
    assert str(info.value) == message


def test_numpy_numbers_are_numbers():
    model = text_model()
    a = model.generate("a", np.int64(20), temperature=np.float32(1.0), seed=np.int64(3))
    assert a == model.generate("a", 20, temperature=1.0, seed=3)


def test_unknown_or_positional_settings_are_type_errors():
    model = text_model()
    with pytest.raises(TypeError, match="temprature"):
        model.generate("a", length=5, temprature=0.5)
    with pytest.raises(TypeError, match="top_q"):
        model.stream("a", length=5, top_q=0.5)
    with pytest.raises(TypeError, match="tempreature"):
        model.generate_batch(2, "a", 5, tempreature=0.5)
    with pytest.raises(TypeError):
        model.generate("a", 5, 0.8)  # temperature is keyword-only


def test_the_command_line_still_names_its_flags():
    config = SampleConfig(top_p=0.0)
    with pytest.raises(CharLSTMError, match=r"^--top-p must be in \(0, 1\], got 0\.0$"):
        config.validate()


def test_repr_of_an_unsaved_model_is_its_shape():
    model = text_model()
    text = repr(model)
    assert text == (
        f"<CharLM lstm 2x16, {model.net.num_parameters():,} parameters, "
        f"vocabulary {len(ALPHABET)}, cpu>"
    )


def test_repr_names_corpus_device_and_validation_bpc():
    model = text_model()
    model.info = {
        "step": 60,
        "corpus": {"name": "tinyshakespeare", "fingerprint": "x"},
        "val": {"loss": 1.256, "bpc": 1.256 / math.log(2), "characters": 1000},
    }
    text = repr(model)
    assert "\n" not in text
    for fact in ("lstm 2x16", "parameters", f"vocabulary {len(ALPHABET)}", "tinyshakespeare",
                 "cpu", "val 1.812 bpc"):  # fmt: skip
        assert fact in text
    model.info["val"] = None  # last/ saved before any evaluation
    assert "bpc" not in repr(model)


def test_repr_of_a_loaded_checkpoint(trained_run):
    model = charlstm.load(str(trained_run), device="cpu")
    text = repr(model)
    assert text.startswith("<CharLM lstm ") and text.endswith(" bpc>")
    assert f"vocabulary {model.vocab.size}" in text


def test_the_package_is_marked_as_typed():
    marker = importlib.resources.files("charlstm") / "py.typed"
    assert marker.is_file()


# ---- evaluation -------------------------------------------------------------------------

SAMPLE = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"


def test_evaluate_text_and_files_agree(tmp_path):
    model = text_model()
    path = tmp_path / "sample.txt"
    path.write_text(SAMPLE, encoding="utf-8")
    from_text = model.evaluate(SAMPLE)
    assert from_text.characters == len(SAMPLE) - 1
    assert math.isfinite(from_text.loss) and from_text.loss > 0
    assert model.evaluate_files([str(path)]) == from_text
    assert charlstm.evaluate(model, SAMPLE) == from_text
    ids = model.vocab.encode(SAMPLE)
    assert evaluate_ids(model.net, [ids]) == from_text


def test_evaluate_files_joins_files_with_a_blank_line(tmp_path):
    model = text_model()
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("All:\nSpeak.\n", encoding="utf-8")
    (tmp_path / "docs" / "b.txt").write_text(
        "First Citizen:\nYou are all resolved", encoding="utf-8"
    )
    (tmp_path / "docs" / "c.txt").write_text("rather to die.", encoding="utf-8")
    joined = "All:\nSpeak.\n" + "\n" + "First Citizen:\nYou are all resolved" + "\n\n"
    joined += "rather to die."
    expected = model.evaluate(joined)
    files = [str(tmp_path / "docs" / n) for n in ("a.txt", "b.txt", "c.txt")]
    assert model.evaluate_files(files) == expected
    assert model.evaluate_files([str(tmp_path / "docs")]) == expected


def test_evaluate_of_the_trained_run_matches_its_recorded_validation(trained_run):
    model = charlstm.load(str(trained_run), device="cpu")
    assert model.info["val"]["characters"] > 0
    text = "ROMEO:\nBut soft, what light through yonder window breaks?\n"
    result = model.evaluate(text)
    assert result.characters == len(text) - 1
    # A trained model beats the uniform guess over its vocabulary.
    assert result.loss < math.log(model.vocab.size)


def test_evaluate_validation_rereads_the_split_the_run_recorded(trained_run):
    model = charlstm.load(str(trained_run), device="cpu")
    result = model.evaluate_validation()
    assert result.characters == model.info["val"]["characters"]
    assert result.loss == pytest.approx(model.info["val"]["loss"], abs=1e-6)


def test_dynamic_evaluation_through_every_entry_point(tmp_path):
    model = text_model()
    text = SAMPLE * 6
    path = tmp_path / "sample.txt"
    path.write_text(text, encoding="utf-8")
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    settings = DynamicEvalConfig(dynamic_lr=1e-2, dynamic_segment=16)
    adapted = model.evaluate(text, dynamic=settings)
    assert adapted.characters == len(text) - 1
    assert adapted.loss < model.evaluate(text).loss - 0.3  # the text repeats: learn it
    assert model.evaluate_files([str(path)], dynamic=settings) == adapted
    assert charlstm.evaluate(model, text, dynamic=settings) == adapted
    ids = model.vocab.encode(text)
    assert dynamic_evaluate_ids(model.net, [ids], settings) == adapted
    assert model.evaluate(text, dynamic=True) == model.evaluate(text, dynamic=DynamicEvalConfig())
    assert all(torch.equal(v, model.net.state_dict()[k]) for k, v in before.items())
    with pytest.raises(CharLSTMError, match="dynamic= takes True, False or a DynamicEvalConfig"):
        model.evaluate(text, dynamic="yes")


def test_evaluate_unknown_policies(tmp_path):
    model = text_model()
    text = "caf\u00e9 au lait"
    with pytest.raises(CharLSTMError, match="'\u00e9'"):
        model.evaluate(text)
    assert model.evaluate(text, unknown="skip") == model.evaluate("caf au lait")
    assert model.evaluate(text, unknown="replace") == model.evaluate("caf  au lait")
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(CharLSTMError, match="not in the model's vocabulary"):
        model.evaluate_files([str(path)])
    assert model.evaluate_files([str(path)], unknown="skip") == model.evaluate("caf au lait")


def test_evaluate_files_with_the_wrong_kind_of_encoding(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("abc", encoding="utf-8")
    with pytest.raises(CharLSTMError, match="this model reads text; --encoding bytes"):
        text_model().evaluate_files([str(path)], encoding="bytes")
    with pytest.raises(CharLSTMError, match="this model reads raw bytes"):
        byte_model((97, 98, 99)).evaluate_files([str(path)], encoding="utf-8")


def test_evaluate_files_latin1(tmp_path):
    model = text_model()
    path = tmp_path / "latin.txt"
    path.write_bytes("Speak, speak.".encode("latin-1"))
    assert model.evaluate_files([str(path)], encoding="latin-1") == model.evaluate("Speak, speak.")


def test_evaluate_files_reads_standard_input(tmp_path, monkeypatch):
    model = text_model()
    path = tmp_path / "sample.txt"
    path.write_text(SAMPLE, encoding="utf-8")
    with open(path, encoding="utf-8") as stream:
        monkeypatch.setattr(sys, "stdin", stream)
        assert model.evaluate_files(["-"]) == model.evaluate(SAMPLE)
    with open(path, encoding="utf-8") as stream:  # with files, in the order given
        monkeypatch.setattr(sys, "stdin", stream)
        assert model.evaluate_files([str(path), "-"]) == model.evaluate(SAMPLE + "\n" + SAMPLE)


RUSSIAN = "Все счастливые семьи похожи друг на друга, каждая несчастливая семья несчастлива.\n"


@pytest.fixture(scope="module")
def cp1251_run(tmp_path_factory):
    """A run trained with --encoding cp1251 on a cp1251 file (returned with the run)."""
    tmp = tmp_path_factory.mktemp("cp1251")
    text = "".join(f"{i} {RUSSIAN}" for i in range(300))
    corpus = tmp / "ru.txt"
    corpus.write_bytes(text.encode("cp1251"))
    settings = {"max_steps": 4, "eval_every": 4, "hidden_dim": 32, "encoding": "cp1251"}
    charlstm.train(tiny_config(corpus, tmp / "run", **settings), progress=False)
    return tmp / "run", corpus, text


def test_a_run_evaluates_in_the_encoding_it_was_trained_with(cp1251_run, tmp_path):
    run, corpus, text = cp1251_run
    model = charlstm.load(run, device="cpu")
    assert model.config.data.encoding == "cp1251"
    # Its validation split, read again from the cp1251 file.
    assert model.evaluate_validation().loss == pytest.approx(model.info["val"]["loss"], abs=1e-6)
    # Other files: cp1251 unless told otherwise.
    new = tmp_path / "new.txt"
    new.write_bytes(RUSSIAN.encode("cp1251"))
    assert model.evaluate_files([str(new)]) == model.evaluate(RUSSIAN)
    assert model.evaluate_files([str(corpus)]) == model.evaluate(text)
    utf8 = tmp_path / "utf8.txt"
    utf8.write_text(RUSSIAN, encoding="utf-8")
    assert model.evaluate_files([str(utf8)], encoding="utf-8") == model.evaluate(RUSSIAN)
    with pytest.raises(CharLSTMError, match=r"not valid UTF-8 at byte 0 \(0xc2\)"):
        model.evaluate_files([str(new)], encoding="utf-8")


# ---- byte-level models ------------------------------------------------------------------


def test_byte_model_decodes_multibyte_characters_incrementally():
    model = cycling_byte_model()
    pieces = list(model.stream("A", length=9, temperature=0))
    # Bytes C3 A9 are one character: nothing is shown for the lead byte, then the 'é'.
    assert pieces == ["", "\u00e9", "A"] * 3
    assert model.generate("A", length=9, temperature=0) == "\u00e9A\u00e9A\u00e9A"
    assert model.generate_batch(2, "A", length=6, temperature=0) == ["\u00e9A\u00e9A"] * 2
    # A prompt that is itself multi-byte is encoded to its bytes.
    assert model.generate("\u00e9", length=3, temperature=0) == "A\u00e9"


def test_byte_model_output_ending_inside_a_character_is_not_lost():
    model = cycling_byte_model()
    text = model.generate("A", length=4, temperature=0)  # C3 A9 41 C3: ends mid-character
    assert text == model.vocab.decode([2, 1, 0, 2])
    assert text == "\u00e9A\ufffd"


def test_byte_model_generates_valid_text():
    symbols = sorted(set("h\u00e9llo w\u00f6rld \u20ac \U0001d11e\n".encode()))
    model = byte_model(tuple(symbols), seed=3)
    prompt = "h\u00e9"
    for seed in range(3):
        text = model.generate(prompt, length=200, temperature=1.5, seed=seed)
        assert isinstance(text, str)
        text.encode("utf-8")  # no lone surrogates: valid, printable str
        prompt_ids = torch.as_tensor(model.vocab.encode(prompt).astype(np.int64))
        steps = generate_ids(model.net, prompt_ids, 200, temperature=1.5, seed=seed)
        assert text == model.vocab.decode([int(s[0]) for s in steps])
    samples = model.generate_batch(3, prompt, length=100, temperature=1.5, seed=0)
    assert len(samples) == 3 and all(isinstance(s, str) for s in samples)


def test_byte_model_evaluates_text_and_files(tmp_path):
    text = "h\u00e9llo w\u00f6rld \u20ac\n"
    model = byte_model(tuple(sorted(set(text.encode()))), seed=1)
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    result = model.evaluate(text)
    assert result.characters == len(text.encode()) - 1
    assert model.evaluate_files([str(path)]) == result


def test_loading_and_sampling_a_model_leave_pytorchs_compiler_unimported(trained_run):
    # Importing torch._dynamo takes about a second: a command that samples must not pay it.
    script = (
        "import sys, charlstm; model = charlstm.CharLM.load(sys.argv[1]); "
        "model.generate(length=5, seed=0); print('torch._dynamo' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(trained_run)],
        capture_output=True, text=True, timeout=CLI_TIMEOUT,
    )  # fmt: skip
    assert done.stdout == "False\n", done.stderr
