"""Reading, decoding, encoding and splitting corpora; the vocabulary."""

# ruff: noqa: RUF001 - texts in Cyrillic and Chinese, with their own punctuation, on purpose

from __future__ import annotations

import codecs
import errno
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import charlstm.data as data_module
from charlstm.config import DataConfig
from charlstm.corpora import data_dir
from charlstm.data import Vocab, load_corpus, read_codepoints, read_text_file, to_codepoints
from charlstm.errors import CharLSTMError

BLOCK = 1 << 20  # the size of the blocks files are read in
UNKNOWN_HINT = "(use --unknown skip or --unknown replace to go on)"


def vocab_of(text: str | bytes) -> Vocab:
    """The vocabulary built from a text's symbol counts, as load_corpus builds it."""
    kind = "bytes" if isinstance(text, bytes) else "text"
    return Vocab.from_counts(kind, np.bincount(to_codepoints(text)))


def load(*paths, **settings) -> data_module.Corpus:
    return load_corpus(DataConfig(data=[str(p) for p in paths], **settings))


def whole_text(corpus) -> str:
    return corpus.vocab.decode(np.concatenate([corpus.train, corpus.val]))


def error_of(action) -> str:
    with pytest.raises(CharLSTMError) as excinfo:
        action()
    return str(excinfo.value)


def read_all(path, encoding) -> np.ndarray:
    return np.concatenate([np.zeros(0, np.uint32), *read_codepoints(path, encoding)])


# --- Vocab --------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(st.text(st.characters(exclude_categories=()), min_size=1))
@example("a\ud800b\udcff")
@example("\ud83d\ude00 vs 😀")
def test_vocab_round_trips_any_text(text):
    """For any text (lone surrogates included), its own vocabulary encodes and decodes it."""
    vocab = vocab_of(text)
    assert vocab.codepoints == tuple(sorted({ord(c) for c in text}))
    ids = vocab.encode(text)
    assert ids.dtype == np.uint8
    assert len(ids) == len(text)
    assert [vocab.codepoints[i] for i in ids] == [ord(c) for c in text]
    assert vocab.decode(ids) == text
    assert vocab.decode(ids.tolist()) == text


def test_vocab_non_ascii_and_emoji():
    text = "naïve café — 日本語 😀👍🏽\n"
    vocab = vocab_of(text)
    assert vocab.kind == "text"
    assert vocab.symbols() == sorted(set(text))
    ids = vocab.encode(text)
    assert vocab.decode(ids) == text
    assert vocab.decode(ids[-4:]) == "😀👍🏽\n"
    assert vocab.symbols()[ids[-3]] == "👍"
    assert vocab.size == len(set(text))


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=1))
def test_bytes_vocab_round_trips_any_bytes(data):
    vocab = vocab_of(data)
    assert vocab.kind == "bytes"
    ids = vocab.encode_codepoints(to_codepoints(data))
    assert ids.dtype == np.uint8
    assert np.asarray(vocab.codepoints, np.uint8)[ids].tobytes() == data
    assert vocab.decode(ids) == data.decode("utf-8", errors="replace")


def test_bytes_vocab_encodes_text_as_utf8():
    text = "é😀 ok"
    vocab = vocab_of(text.encode("utf-8"))
    ids = vocab.encode(text)
    assert len(ids) == len(text.encode("utf-8")) == 9
    assert vocab.decode(ids) == text
    assert vocab.symbols()[:3] == [" ", "k", "o"]
    assert vocab.symbols()[3] == "\\x80"


@pytest.mark.parametrize(
    "vocab",
    [
        Vocab("text", tuple(sorted(map(ord, "\n !abcé—😀")))),
        Vocab("bytes", (0, 10, 65, 200, 255)),
    ],
)
def test_vocab_json_round_trip(vocab):
    restored = Vocab.from_json(json.loads(json.dumps(vocab.to_json())))
    assert restored == vocab


def test_text_vocab_json_is_a_readable_string():
    assert Vocab("text", (10, 97, 233)).to_json() == {"kind": "text", "symbols": "\naé"}
    assert Vocab("bytes", (10, 233)).to_json() == {"kind": "bytes", "symbols": [10, 233]}


def test_text_vocab_with_lone_surrogates_is_stored_as_code_points():
    # As one string, JSON would read a lone high and a lone low surrogate back as one character.
    vocab = Vocab("text", (10, 0xD800, 0xDFFF, 0x1F600))
    assert vocab.to_json() == {"kind": "text", "symbols": [10, 0xD800, 0xDFFF, 0x1F600]}
    assert Vocab.from_json(json.loads(json.dumps(vocab.to_json()))) == vocab


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (["text", "ab"], "the vocabulary entry is malformed"),
        ({"symbols": "ab"}, "the vocabulary entry is malformed"),
        ({"kind": "words", "symbols": "ab"}, "the vocabulary entry is malformed"),
        ({"kind": "text"}, "the text vocabulary is malformed"),
        ({"kind": "text", "symbols": ["a", "b"]}, "the text vocabulary is malformed"),
        ({"kind": "bytes", "symbols": "ab"}, "the byte vocabulary is malformed"),
        ({"kind": "bytes", "symbols": [1, 256]}, "the byte vocabulary is malformed"),
        ({"kind": "bytes", "symbols": [-1, 2]}, "the byte vocabulary is malformed"),
        ({"kind": "bytes", "symbols": [1.0, 2]}, "the byte vocabulary is malformed"),
        ({"kind": "text", "symbols": [97, 0x110000]}, "the text vocabulary is malformed"),
        ({"kind": "text", "symbols": [True, 98]}, "the text vocabulary is malformed"),
        (
            {"kind": "text", "symbols": "aab"},
            "the vocabulary must be non-empty and without repeats",
        ),
        (
            {"kind": "text", "symbols": ""},
            "the vocabulary must be non-empty and without repeats",
        ),
        (
            {"kind": "bytes", "symbols": [3, 3]},
            "the vocabulary must be non-empty and without repeats",
        ),
    ],
)
def test_from_json_rejects_malformed(value, message):
    assert error_of(lambda: Vocab.from_json(value)) == message


def test_unknown_characters_listed_in_order_of_first_appearance():
    vocab = vocab_of("abc \n")
    message = error_of(lambda: vocab.encode("aé—bé—", what="prompt"))
    assert message == (
        f"prompt contains characters not in the model's vocabulary: 'é', '—' {UNKNOWN_HINT}"
    )
    message = error_of(lambda: vocab.encode("zéaz—y"))
    assert message == (
        f"text contains characters not in the model's vocabulary: 'z', 'é', '—', 'y' {UNKNOWN_HINT}"
    )


def test_unknown_characters_list_is_capped_at_twenty():
    vocab = vocab_of("ab")
    letters = "cdefghijklmnopqrstuvwxyz"  # 24 unknown letters
    message = error_of(lambda: vocab.encode(letters))
    shown = ", ".join(repr(c) for c in letters[:20])
    assert message == (
        f"text contains characters not in the model's vocabulary: {shown}, ... {UNKNOWN_HINT}"
    )


def test_unknown_bytes_are_shown_as_bytes():
    vocab = Vocab("bytes", (97, 98))
    assert error_of(lambda: vocab.encode("aéb")) == (
        "text contains characters not in the model's vocabulary: byte 0xc3, byte 0xa9 "
        f"{UNKNOWN_HINT}"
    )


def test_unknown_skip_drops_them():
    vocab = vocab_of("abc \n")
    ids = vocab.encode("aé—bxc", unknown="skip")
    assert vocab.decode(ids) == "abc"
    assert ids.dtype == np.uint8


@pytest.mark.parametrize(
    ("known", "expected"),
    [("abc \n", "a  b c"), ("abc\n", "a\n\nb\nc"), ("bca", "aaabac")],
)
def test_unknown_replace_substitutes_space_else_newline_else_first(known, expected):
    vocab = vocab_of(known)
    assert vocab.decode(vocab.encode("aé—bxc", unknown="replace")) == expected


# ---- a given vocabulary: a fine-tuned model's ------------------------------------------------


def test_an_extended_vocabulary_keeps_every_id_and_round_trips_out_of_order():
    vocab = vocab_of("abc \n")
    counts = np.bincount(to_codepoints("cab{é}\n"))
    assert vocab.unseen(counts) == [ord("{"), ord("}"), ord("é")]
    grown = vocab.extended(vocab.unseen(counts))
    assert grown.codepoints[: vocab.size] == vocab.codepoints
    assert grown.encode("ab c").tolist() == vocab.encode("ab c").tolist()
    assert grown.encode("{é}").tolist() == [vocab.size, vocab.size + 2, vocab.size + 1]
    assert grown.decode(grown.encode("a{é} b}")) == "a{é} b}"
    assert Vocab.from_json(json.loads(json.dumps(grown.to_json()))) == grown


def test_a_text_with_symbols_a_given_vocabulary_lacks_is_refused_naming_them(tmp_path):
    path = tmp_path / "new.txt"
    path.write_text("abc {é} abc {x}\n" * 20, encoding="utf-8")
    vocab = vocab_of("abc \n")
    message = error_of(lambda: load_corpus(DataConfig(data=[str(path)]), vocab=vocab))
    assert message == (
        f"{path} holds 4 characters that the model never saw ('x', '{{', '}}', 'é'; 120 in all): "
        "give --extend-vocab to add them to the model, or --unknown skip to drop them from "
        "the text"
    )


def test_a_given_vocabulary_is_extended_dropped_from_or_replaced_in_the_text(tmp_path):
    path = tmp_path / "new.txt"
    path.write_text("ab {c}\n" * 50, encoding="utf-8")
    vocab = vocab_of("abc \n")
    grown = load_corpus(DataConfig(data=[str(path)], extend_vocab=True), vocab=vocab)
    assert grown.vocab == vocab.extended([ord("{"), ord("}")])
    assert whole_text(grown) == "ab {c}\n" * 50
    skipped = load_corpus(DataConfig(data=[str(path)], unknown="skip"), vocab=vocab)
    assert skipped.vocab == vocab
    assert whole_text(skipped) == "ab c\n" * 50
    replaced = load_corpus(DataConfig(data=[str(path)], unknown="replace"), vocab=vocab)
    assert whole_text(replaced) == "ab  c \n" * 50
    assert skipped.fingerprint == replaced.fingerprint == grown.fingerprint


def test_a_byte_vocabulary_does_not_read_decoded_text_nor_the_other_way(tmp_path):
    path = tmp_path / "new.txt"
    path.write_text("abc abc\n" * 10, encoding="utf-8")
    message = error_of(lambda: load_corpus(DataConfig(data=[str(path)]), vocab=vocab_of(b"abc")))
    assert (
        message
        == f"the model reads raw bytes and {path} is decoded as utf-8: give --encoding bytes"
    )
    message = error_of(
        lambda: load_corpus(DataConfig(data=[str(path)], encoding="bytes"), vocab=vocab_of("abc"))
    )
    assert "the model reads text and" in message
    assert "give a text --encoding such as utf-8" in message


@pytest.mark.parametrize(
    ("size", "dtype"),
    [(2, np.uint8), (256, np.uint8), (257, np.uint16), (65536, np.uint16), (65537, np.uint32)],
)
def test_dtype_is_the_smallest_that_holds_every_id(size, dtype):
    vocab = Vocab("text", tuple(range(size)))
    assert vocab.dtype == np.dtype(dtype)
    ids = vocab.encode(chr(size - 1) + chr(0))
    assert ids.dtype == np.dtype(dtype)
    assert ids.tolist() == [size - 1, 0]


def test_to_codepoints():
    assert to_codepoints("aé😀").tolist() == [97, 233, 0x1F600]
    assert to_codepoints("aé😀").dtype == np.uint32
    assert to_codepoints(b"a\xff").tolist() == [97, 255]
    assert to_codepoints(b"a\xff").dtype == np.uint8


# --- reading and decoding files -----------------------------------------------------------------


def utf8_error(path, offset: int, byte: int) -> str:
    """The start of the message for bytes that are not UTF-8."""
    return f"{path}: not valid UTF-8 at byte {offset:,} (0x{byte:02x})"


MIXED = (
    "; the text before it holds UTF-8 characters, so the file mixes encodings or is damaged "
    "there: repair it or convert it all to UTF-8"
)
NOT_TEXT = (
    "; it does not look like text in a common encoding (a binary file?): name its encoding "
    "with --encoding, or use --encoding bytes to model raw bytes"
)
CUT_SHORT = ": the text ends inside a character (was it cut short?)"


def test_invalid_utf8_reports_the_byte_offset(tmp_path):
    prefix = "héllo wörld 😀\n".encode()
    path = tmp_path / "bad.txt"
    path.write_bytes(prefix + b"\xff" + b"more text")
    assert len(prefix) == 19
    # Valid UTF-8 characters before the bad byte: not a file in another encoding.
    expected = utf8_error(path, 19, 0xFF) + MIXED
    assert error_of(lambda: read_all(path, "utf-8")) == expected
    assert error_of(lambda: load(path)) == expected


def test_invalid_utf8_label_for_codec_alias(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"ab\xc3(")
    assert error_of(lambda: read_all(path, "UTF8")).startswith(utf8_error(path, 2, 0xC3))


def test_truncated_character_at_end_of_file(tmp_path):
    path = tmp_path / "cut.txt"
    path.write_bytes(b"abc" + "€".encode()[:2])
    assert error_of(lambda: read_all(path, "utf-8")) == utf8_error(path, 3, 0xE2) + CUT_SHORT


@pytest.mark.parametrize(
    ("content", "error_at"),
    [
        (b"a" * BLOCK + b"\xff", BLOCK),  # first byte of the second block
        (b"a" * (BLOCK - 1) + b"\xffb", BLOCK - 1),  # last byte of the first block
        (b"a" * (BLOCK - 1) + "€".encode() + b"z", None),  # a character split by the boundary
        (b"a" * (BLOCK - 2) + "😀".encode() + b"\x80", BLOCK + 2),  # stray byte after it
    ],
    ids=["after-boundary", "before-boundary", "split-char", "split-char-then-stray"],
)
def test_utf8_at_the_real_block_boundary(tmp_path, content, error_at):
    """The 1 MiB read blocks neither break characters nor shift error offsets."""
    assert data_module._BLOCK_BYTES == BLOCK
    path = tmp_path / "big.txt"
    path.write_bytes(content)
    if error_at is not None:
        message = error_of(lambda: read_all(path, "utf-8"))
        assert message.startswith(utf8_error(path, error_at, content[error_at]) + ";")
    else:
        blocks = list(read_codepoints(path, "utf-8"))
        assert len(blocks) == 2
        codepoints = np.concatenate(blocks)
        assert len(codepoints) == BLOCK + 1
        assert codepoints[-3:].tolist() == [ord("a"), ord("€"), ord("z")]
        assert (codepoints[:-2] == ord("a")).all()


@pytest.mark.parametrize("block", [1, 2, 3, 5, 7])
def test_small_blocks_decode_multibyte_characters(tmp_path, monkeypatch, block):
    monkeypatch.setattr(data_module, "_BLOCK_BYTES", block)
    text = "a€b😀cé日本語\nx" * 3
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    assert read_all(path, "utf-8").tolist() == [ord(c) for c in text]


# Pieces of a byte string: whole valid characters (1 to 4 bytes) or arbitrary single bytes.
utf8_pieces = st.lists(
    st.one_of(
        st.characters(codec="utf-8").map(lambda c: c.encode("utf-8")),
        st.binary(min_size=1, max_size=1),
    ),
    max_size=30,
).map(b"".join)


@settings(max_examples=200, deadline=None)
@given(content=utf8_pieces, block=st.integers(1, 9))
@example(content=codecs.BOM_UTF8 + b"a\xff", block=1)
@example(content=codecs.BOM_UTF8 + codecs.BOM_UTF8, block=2)
def test_blockwise_utf8_matches_whole_file_decoding(tmp_path_factory, content, block):
    """For any bytes and block size: the same text, or the same error offset, as bytes.decode
    (after a leading byte-order mark, which is not text)."""
    path = tmp_path_factory.mktemp("utf8") / "t.txt"
    path.write_bytes(content)
    body = content.removeprefix(codecs.BOM_UTF8)
    skipped = len(content) - len(body)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data_module, "_BLOCK_BYTES", block)
        try:
            expected = body.decode("utf-8")
        except UnicodeDecodeError as e:
            at = skipped + e.start
            message = error_of(lambda: read_all(path, "utf-8"))
            assert message.startswith(utf8_error(path, at, content[at]))
        else:
            assert read_all(path, "utf-8").tolist() == [ord(c) for c in expected]


# Codecs whose bytes.decode reports the same offsets as the file's (no byte-order mark).
STATELESS_CODECS = ["shift_jis", "euc-jp", "gb18030", "euc-kr", "cp1251", "cp1252", "utf-16-le"]


@settings(max_examples=150, deadline=None)
@given(
    codec=st.sampled_from(STATELESS_CODECS),
    text=st.text(st.characters(codec="utf-8"), max_size=25),
    junk=st.lists(st.tuples(st.integers(0, 200), st.binary(min_size=1, max_size=2)), max_size=2),
    block=st.integers(1, 9),
)
def test_blockwise_decoding_matches_whole_file_decoding_in_any_codec(
    tmp_path_factory, codec, text, junk, block
):
    """Multi-byte codecs read in blocks of any size: the same text, or the same error offset,
    as decoding the whole file at once."""
    content = text.encode(codec, errors="ignore")
    for position, stray in junk:  # bytes dropped in anywhere, valid or not
        content = content[:position] + stray + content[position:]
    path = tmp_path_factory.mktemp("codec") / "t.txt"
    path.write_bytes(content)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data_module, "_BLOCK_BYTES", block)
        try:
            expected = content.decode(codec)
        except UnicodeDecodeError as e:
            message = error_of(lambda: read_all(path, codec))
            assert message.startswith(f"{path}: not valid {codec} at byte {e.start:,} (0x")
        else:
            assert read_all(path, codec).tolist() == [ord(c) for c in expected]


@pytest.mark.parametrize("codec", ["utf-16", "utf-32", "utf-8-sig", "shift_jis", "gb18030"])
@pytest.mark.parametrize("block", [1, 2, 3, 5])
def test_byte_order_marks_and_multibyte_codecs_in_small_blocks(tmp_path, monkeypatch, codec, block):
    monkeypatch.setattr(data_module, "_BLOCK_BYTES", block)
    text = "ab😀cd 日本語 ÿ\n" * 3 if codec not in ("shift_jis",) else "ab日本語かな\n" * 3
    path = tmp_path / "t.txt"
    path.write_bytes(text.encode(codec))
    assert read_all(path, codec).tolist() == [ord(c) for c in text]
    assert whole_text(load(path, encoding=codec, val_fraction=0.25)) == text


def test_error_offset_counts_the_byte_order_mark(tmp_path):
    path = tmp_path / "sig.txt"
    path.write_bytes(codecs.BOM_UTF8 + b"ab\xff")
    assert error_of(lambda: read_all(path, "utf-8-sig")).startswith(
        f"{path}: not valid utf-8-sig at byte 5 (0xff)"
    )


# --- a UTF-8 byte-order mark ---------------------------------------------------------------------


@pytest.mark.parametrize("block", [1, 2, 3, 4, BLOCK])
def test_a_utf8_byte_order_mark_starts_a_file_but_is_not_its_text(tmp_path, monkeypatch, block):
    """Dropped at the start of the file however the reads fall (a pipe may hand over one byte
    at a time), as Python's utf-8-sig does; a U+FEFF later in the text is text and stays."""
    monkeypatch.setattr(data_module, "_BLOCK_BYTES", block)
    text = "hello\nwor\ufeffld\n" * 3
    path = tmp_path / "bom.txt"
    path.write_bytes(codecs.BOM_UTF8 + text.encode("utf-8"))
    assert read_all(path, "utf-8").tolist() == [ord(c) for c in text]
    path.write_bytes(codecs.BOM_UTF8)  # the mark alone: an empty text
    assert read_all(path, "utf-8").tolist() == []


def test_a_byte_order_mark_is_no_symbol_of_the_vocabulary(tmp_path):
    """Each file's own mark is dropped (a directory of files saved by Notepad), so U+FEFF is
    not a symbol and the text is the same, fingerprint included, as without the marks."""
    for name in ("a.txt", "b.txt"):
        (tmp_path / "marked").mkdir(exist_ok=True)
        (tmp_path / "marked" / name).write_bytes(codecs.BOM_UTF8 + b"abc abd\n" * 20)
        (tmp_path / "plain").mkdir(exist_ok=True)
        (tmp_path / "plain" / name).write_bytes(b"abc abd\n" * 20)
    marked, plain = load(tmp_path / "marked"), load(tmp_path / "plain")
    assert 0xFEFF not in marked.vocab.codepoints
    assert whole_text(marked) == whole_text(plain)
    assert marked.fingerprint == plain.fingerprint


def test_a_byte_order_mark_on_standard_input_is_dropped(tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "_stdin_read", [])
    source = tmp_path / "piped.txt"
    source.write_bytes(codecs.BOM_UTF8 + b"piped text\n" * 30)
    with open(source, encoding="utf-8") as stream:
        monkeypatch.setattr(sys, "stdin", stream)
        corpus = load_corpus(DataConfig(data=["-"]))
    assert whole_text(corpus) == "piped text\n" * 30


def test_an_error_offset_counts_a_dropped_byte_order_mark(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(codecs.BOM_UTF8 + b"ab\xff")
    assert error_of(lambda: read_all(path, "utf-8")).startswith(utf8_error(path, 5, 0xFF))


@pytest.mark.parametrize(
    ("codec", "text"),
    [
        ("shift_jis", "a" * (BLOCK - 1) + "あいう\n"),  # a two-byte character split
        ("cp1251", "ж" * (BLOCK + 10)),  # one byte each: bounded reading of a big file
        ("utf-16", "a" * (BLOCK // 2 - 2) + "😀z"),  # a surrogate pair split, after a BOM
        ("gb18030", "a" * (BLOCK - 2) + "😀z"),  # a four-byte character split
    ],
    ids=["shift_jis", "cp1251", "utf-16-surrogates", "gb18030-four-bytes"],
)
def test_other_codecs_at_the_real_block_boundary(tmp_path, codec, text):
    """A large file in another codec is read in 1 MiB blocks (bounded memory), and characters
    split by a block boundary come out whole."""
    path = tmp_path / "big.txt"
    path.write_bytes(text.encode(codec))
    assert path.stat().st_size > BLOCK
    blocks = list(read_codepoints(path, codec))
    assert len(blocks) == 2
    codepoints = np.concatenate(blocks)
    assert len(codepoints) == len(text)
    assert codepoints[-4:].tolist() == [ord(c) for c in text[-4:]]
    assert (codepoints[:100] == ord(text[0])).all()


def test_latin1_reads_every_byte(tmp_path):
    content = b"caf\xe9 \xff\x80\x00z"
    path = tmp_path / "latin.txt"
    path.write_bytes(content)
    assert read_all(path, "latin-1").tolist() == list(content)
    corpus = load(path, encoding="latin-1", val_fraction=0.2)
    assert whole_text(corpus) == content.decode("latin-1")
    assert corpus.vocab.kind == "text"


def test_other_codecs_report_their_name_and_a_likelier_one(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"abc\xe9def")
    assert error_of(lambda: load(path, encoding="ascii")) == (
        f"{path}: not valid ascii at byte 3 (0xe9); it looks like cp1252: try --encoding cp1252"
    )


def test_utf16_file(tmp_path):
    text = "ab😀cd\n" * 4
    path = tmp_path / "u16.txt"
    path.write_bytes(text.encode("utf-16"))
    assert whole_text(load(path, encoding="utf-16", val_fraction=0.25)) == text


# Texts in several languages, to write in their usual legacy encodings.
LANGUAGES = {
    "russian": (
        "Все счастливые семьи похожи друг на друга, каждая несчастливая семья несчастлива "
        "по-своему. Всё смешалось в доме Облонских. Жена узнала, что муж был в связи с "
        "бывшею в их доме француженкою-гувернанткой, и объявила мужу, что не может жить с "
        "ним в одном доме. Положение это продолжалось уже третий день.\n"
    ),
    "french": (
        "Longtemps, je me suis couché de bonne heure. Parfois, à peine ma bougie éteinte, "
        "mes yeux se fermaient si vite que je n'avais pas le temps de me dire : je m'endors. "
        "Et, une demi-heure après, la pensée qu'il était temps de chercher le sommeil "
        "m'éveillait. L'été dernier, à Noël, où ça ? Très bientôt.\n"
    ),
    "german": (
        "Als Gregor Samsa eines Morgens aus unruhigen Träumen erwachte, fand er sich in "
        "seinem Bett zu einem ungeheueren Ungeziefer verwandelt. Er lag auf seinem "
        "panzerartig harten Rücken und sah, wenn er den Kopf ein wenig hob, seinen gewölbten, "
        "braunen, von bogenförmigen Versteifungen geteilten Bauch. Süß.\n"
    ),
    "english": (
        "It was the best of times, it was the worst of times. \u201cWell,\u201d she said "
        "\u2014 \u2018I don\u2019t know.\u2019 The caf\u00e9 was closed, so we walked on.\n"
    ),
    "japanese": (
        "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。何でも薄暗い"
        "じめじめした所でニャーニャー泣いていた事だけは記憶している。吾輩はここで始めて"
        "人間というものを見た。しかもあとで聞くとそれは書生という人間中で一番獰悪な種族"
        "であったそうだ。\n"
    ),
    "chinese": (
        "我从乡下跑到京城里，一转眼已经六年了。其间耳闻目睹的所谓国家大事，算起来也很不少；"
        "但在我心里，都不留什么痕迹，倘要我寻出这些事的影响来说，便只是增长了我的坏脾气，"
        "老实说，便是教我一天比一天的看不起人。这是民国六年的冬天，大北风刮得正猛。\n"
    ),
    "korean": (
        "나는 어릴 때 시골에서 자랐다. 우리 집 앞에는 작은 시냇물이 흘렀고, 여름이면 "
        "친구들과 함께 물고기를 잡으며 하루를 보냈다. 어머니는 저녁마다 맛있는 밥을 "
        "지어 주셨고, 아버지는 밭에서 늦게까지 일하셨다. 그 시절이 가장 행복했던 것 같다.\n"
    ),
}


@pytest.mark.parametrize(
    ("language", "codec", "suggested"),
    [
        ("russian", "cp1251", "cp1251"),
        ("russian", "koi8-r", "koi8-r"),
        ("french", "cp1252", "cp1252"),
        ("german", "latin-1", "cp1252"),  # the same bytes: cp1252 also reads “smart quotes”
        ("english", "cp1252", "cp1252"),
        ("japanese", "shift_jis", "shift_jis"),
        ("japanese", "euc-jp", "euc-jp"),
        ("chinese", "gb18030", "gb18030"),
        ("chinese", "gbk", "gb18030"),  # gb18030 reads GBK (and GB 2312) text
        ("korean", "euc-kr", "euc-kr"),
        ("french", "utf-16-le", "utf-16-le"),
        ("german", "utf-16-be", "utf-16-be"),
    ],
)
def test_a_file_in_another_encoding_names_it(tmp_path, language, codec, suggested):
    """The error names the byte and the encoding to try, and that encoding reads the file."""
    text = "Chapter 1\n\n" + LANGUAGES[language] * 2
    content = text.encode(codec)
    path = tmp_path / f"{language}.txt"
    path.write_bytes(content)
    with pytest.raises(UnicodeDecodeError) as bad:
        content.decode("utf-8")
    offset = bad.value.start
    assert error_of(lambda: load(path)) == (
        utf8_error(path, offset, content[offset])
        + f"; it looks like {suggested}: try --encoding {suggested}"
    )
    assert whole_text(load(path, encoding=suggested, val_fraction=0.1)) == text


@pytest.mark.parametrize(
    ("bom_codec", "name"), [("utf-16", "UTF-16"), ("utf-32", "UTF-32")], ids=["16", "32"]
)
def test_a_byte_order_mark_names_its_encoding(tmp_path, bom_codec, name):
    path = tmp_path / "bom.txt"
    path.write_bytes(LANGUAGES["french"].encode(bom_codec))
    message = error_of(lambda: load(path))
    assert message.endswith(
        f"; it starts with a {name} byte-order mark: try --encoding {bom_codec}"
    )
    assert whole_text(load(path, encoding=bom_codec, val_fraction=0.1)) == LANGUAGES["french"]


def test_too_little_text_to_tell_lists_the_likeliest(tmp_path):
    path = tmp_path / "short.txt"
    path.write_bytes(b"x = \xe9 y\n")  # é in cp1252, й in cp1251: nothing to tell them apart
    assert error_of(lambda: load(path)) == utf8_error(path, 4, 0xE9) + (
        "; it may be cp1252 or cp1251: try --encoding cp1252 or --encoding cp1251"
    )


@pytest.mark.parametrize(
    "content",
    [b"\x89PNG\r\n\x1a\n" + bytes(range(256)), np.random.default_rng(0).bytes(5000)],
    ids=["png", "random"],
)
def test_binary_data_is_not_taken_for_text(tmp_path, content):
    path = tmp_path / "data.bin"
    path.write_bytes(content)
    message = error_of(lambda: load(path))
    assert message.startswith(f"{path}: not valid UTF-8 at byte ")
    assert message.endswith(NOT_TEXT)


def test_a_named_encoding_that_fails_suggests_another(tmp_path):
    text = LANGUAGES["russian"] * 2
    path = tmp_path / "ru.txt"
    path.write_bytes(text.encode("cp1251"))
    message = error_of(lambda: load(path, encoding="shift_jis"))
    assert message.startswith(f"{path}: not valid shift_jis at byte ")
    assert message.endswith("; it looks like cp1251: try --encoding cp1251")


@pytest.mark.parametrize("encoding", ["no-such-codec", "utf-9", "base64", "zlib"])
def test_unknown_or_binary_codec_is_a_clear_error(tmp_path, encoding):
    path = tmp_path / "a.txt"
    path.write_text("hello world\n", encoding="utf-8")
    assert error_of(lambda: load(path, encoding=encoding)) == (
        f"unknown encoding {encoding!r}: use a Python codec name such as utf-8 or latin-1, "
        "or 'bytes'"
    )


def test_bytes_encoding_models_raw_bytes(tmp_path):
    content = b"\xff\xfe abc\x00\xc3" * 10
    path = tmp_path / "raw.bin"
    path.write_bytes(content)
    corpus = load(path, encoding="bytes", val_fraction=0.1)
    assert corpus.vocab.kind == "bytes"
    assert corpus.vocab.codepoints == (0, 32, 97, 98, 99, 0xC3, 0xFE, 0xFF)
    assert corpus.train.dtype == np.uint8
    assert (len(corpus.train), len(corpus.val)) == (72, 8)
    ids = np.concatenate([corpus.train, corpus.val])
    assert np.asarray(corpus.vocab.codepoints, np.uint8)[ids].tobytes() == content


def test_bytes_encoding_joins_files_with_a_blank_line(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"\x01\x02")
    (tmp_path / "b.bin").write_bytes(b"\x03\n")
    corpus = load(tmp_path, encoding="bytes", val_fraction=0.3)
    ids = np.concatenate([corpus.train, corpus.val])
    assert np.asarray(corpus.vocab.codepoints, np.uint8)[ids].tobytes() == b"\x01\x02\n\n\x03\n"


# --- load_corpus --------------------------------------------------------------------------------


def test_load_single_file_split(tmp_path):
    text = "hello world\n" * 50  # 600 characters
    path = tmp_path / "greeting.txt"
    path.write_text(text, encoding="utf-8")
    corpus = load(path, val_fraction=0.1)
    assert corpus.name == "greeting"
    assert corpus.vocab.symbols() == sorted(set(text))
    assert corpus.train.dtype == np.uint8
    assert (len(corpus.train), len(corpus.val)) == (540, 60)
    assert corpus.vocab.decode(corpus.train) == text[:540]
    assert corpus.vocab.decode(corpus.val) == text[540:]
    assert len(corpus.fingerprint) == 64


@pytest.mark.parametrize(
    ("length", "fraction", "n_val"),
    [(1000, 0.1, 100), (1000, 0.25, 250), (37, 0.1, 4), (10, 0.05, 2), (4, 0.1, 2), (9, 0.7, 6)],
)
def test_val_fraction_split_sizes_are_exact(tmp_path, length, fraction, n_val):
    text = ("abcdefg" * 200)[:length]
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    corpus = load(path, val_fraction=fraction)
    assert len(corpus.val) == n_val
    assert len(corpus.train) == length - n_val
    assert corpus.vocab.decode(corpus.val) == text[length - n_val :]


@pytest.mark.parametrize(("text", "fraction"), [("ab", 0.1), ("abc", 0.1), ("abcdefgh", 0.9)])
def test_too_short_to_split(tmp_path, text, fraction):
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    assert error_of(lambda: load(path, val_fraction=fraction)) == (
        f"the text has only {len(text)} characters: too short to hold out "
        f"{fraction:.0%} for validation"
    )


def test_several_files_in_the_given_order(tmp_path):
    """Files join with exactly one blank line, whether or not they end with a newline."""
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "b.txt").write_text("second\n", encoding="utf-8")
    (tmp_path / "c.txt").write_text("third\n", encoding="utf-8")
    corpus = load(tmp_path / "c.txt", tmp_path / "a.txt", tmp_path / "b.txt", val_fraction=0.1)
    assert whole_text(corpus) == "third\n\nfirst\n\nsecond\n"
    assert corpus.name == "c"


@pytest.mark.parametrize(
    "contents",
    [["", "abc", "xyz"], ["abc", "", "xyz"], ["abc", "xyz", ""], ["abc\n", "", "", "xyz"]],
    ids=["empty-first", "empty-middle", "empty-last", "two-empty"],
)
def test_empty_files_add_no_separator(tmp_path, contents):
    """An empty file among several adds nothing, not even a blank line."""
    paths = []
    for index, content in enumerate(contents):
        paths.append(tmp_path / f"{index}.txt")
        paths[-1].write_text(content, encoding="utf-8")
    assert whole_text(load(*paths, val_fraction=0.2)) == "abc\n\nxyz"


def test_directory_sorted_recursive_hidden_skipped(tmp_path):
    root = tmp_path / "plays"
    (root / "sub").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "b.txt").write_text("bee", encoding="utf-8")
    (root / "a.txt").write_text("ay\n", encoding="utf-8")
    (root / "sub" / "c.txt").write_text("sea", encoding="utf-8")
    (root / "sub" / ".notes").write_text("HIDDEN", encoding="utf-8")
    (root / ".hidden.txt").write_text("HIDDEN", encoding="utf-8")
    (root / ".git" / "config").write_text("HIDDEN", encoding="utf-8")
    corpus = load(root, val_fraction=0.2)
    assert whole_text(corpus) == "ay\n\nbee\n\nsea"
    assert corpus.name == "plays"


def test_directory_and_file_mixed(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "x.txt").write_text("xx", encoding="utf-8")
    (tmp_path / "y.txt").write_text("yy\n", encoding="utf-8")
    assert whole_text(load(tmp_path / "y.txt", tmp_path / "dir", val_fraction=0.3)) == ("yy\n\nxx")


def test_explicit_val_data(tmp_path):
    (tmp_path / "train.txt").write_text("abcabc", encoding="utf-8")
    (tmp_path / "val.txt").write_text("cab d", encoding="utf-8")
    corpus = load_corpus(
        DataConfig(data=[str(tmp_path / "train.txt")], val_data=[str(tmp_path / "val.txt")])
    )
    assert corpus.vocab.decode(corpus.train) == "abcabc"
    assert corpus.vocab.decode(corpus.val) == "cab d"
    assert corpus.vocab.symbols() == [" ", "a", "b", "c", "d"]


def test_given_vocab_is_kept(tmp_path):
    """A resumed run's vocabulary decides the ids, even for symbols the text lacks."""
    path = tmp_path / "t.txt"
    path.write_text("dbdbd", encoding="utf-8")
    vocab = Vocab.from_json({"kind": "text", "symbols": "abcd"})
    corpus = load_corpus(DataConfig(data=[str(path)], val_fraction=0.4), vocab=vocab)
    assert corpus.vocab is vocab
    assert corpus.train.tolist() == [3, 1, 3]
    assert corpus.val.tolist() == [1, 3]


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    assert error_of(lambda: load(path)) == (
        f"the training text is empty ({path}); give it some text to learn"
    )


def test_single_distinct_character_is_an_error(tmp_path):
    path = tmp_path / "aaa.txt"
    path.write_text("a" * 100, encoding="utf-8")
    assert error_of(lambda: load(path)) == (
        f"the training text ({path}) has only one distinct character, 'a': "
        "there is nothing to predict"
    )


def test_nonexistent_path_is_an_error(tmp_path):
    missing = tmp_path / "missing.txt"
    assert error_of(lambda: load(missing)) == (
        f"{missing}: no such file or directory (built-in corpora: "
        "shakespeare, tinyshakespeare, enwik8, text8; - reads standard input)"
    )


def test_directory_without_files_is_an_error(tmp_path):
    (tmp_path / "empty" / "nested").mkdir(parents=True)
    (tmp_path / "empty" / ".hidden").write_text("x", encoding="utf-8")
    assert error_of(lambda: load(tmp_path / "empty")) == (
        f"directory {tmp_path / 'empty'} contains no files"
    )


def test_builtin_corpus_cannot_be_mixed_with_files(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("abc", encoding="utf-8")
    assert error_of(lambda: load_corpus(DataConfig(data=[str(path), "enwik8"]))) == (
        "built-in corpus 'enwik8' cannot be mixed with other --data"
    )


def test_fingerprint_follows_text_and_encoding(tmp_path):
    (tmp_path / "one.txt").write_text("hello there\n", encoding="utf-8")
    (tmp_path / "two.txt").write_text("hello there\n", encoding="utf-8")
    (tmp_path / "three.txt").write_text("hello there!", encoding="utf-8")
    one = load(tmp_path / "one.txt").fingerprint
    assert load(tmp_path / "two.txt").fingerprint == one
    assert load(tmp_path / "three.txt").fingerprint != one
    assert load(tmp_path / "one.txt", encoding="latin-1").fingerprint != one
    assert load(tmp_path / "one.txt", encoding="bytes").fingerprint != one


def test_five_megabyte_text_encodes_correctly(tmp_path):
    """A multi-megabyte text with 330 distinct symbols (uint16 ids) encodes exactly."""
    alphabet = np.array(
        [*range(0x20, 0x7F), *range(0xA1, 0x17F), *range(0x1F600, 0x1F610), 10], dtype=np.uint32
    )
    alphabet.sort()
    codepoints = alphabet[np.random.default_rng(0).integers(len(alphabet), size=2_900_000)]
    text = codepoints.tobytes().decode("utf-32-le")
    path = tmp_path / "big.txt"
    path.write_text(text, encoding="utf-8")
    assert path.stat().st_size > 5_000_000
    corpus = load(path, val_fraction=0.1)
    assert corpus.vocab.codepoints == tuple(alphabet.tolist())
    assert corpus.train.dtype == np.uint16
    ids = np.concatenate([corpus.train, corpus.val])
    assert np.array_equal(ids, np.searchsorted(alphabet, codepoints))
    assert len(corpus.val) == 290_000
    assert whole_text(corpus) == text


def test_large_corpus_is_cached_and_memory_mapped(tmp_path, monkeypatch):
    text = "".join(f"line {i}: ünïcödé 😀\n" for i in range(300))
    path = tmp_path / "large.txt"
    path.write_text(text, encoding="utf-8")
    in_memory = load(path, val_fraction=0.1)
    assert not isinstance(in_memory.train, np.memmap)

    monkeypatch.setattr(data_module, "_MMAP_THRESHOLD_BYTES", 100)
    cache = data_dir() / "encoded"
    before = set(cache.glob("*")) if cache.exists() else set()
    mapped = load(path, val_fraction=0.1)
    created = set(cache.glob("*")) - before
    assert len(created) == 2
    (cache_file,) = [p for p in created if p.suffix == ".npy"]
    (scan_file,) = [p for p in created if p.name.endswith(".scan.json")]
    assert isinstance(mapped.train, np.memmap) and isinstance(mapped.val, np.memmap)
    assert np.array_equal(mapped.train, in_memory.train)
    assert np.array_equal(mapped.val, in_memory.val)
    assert mapped.vocab == in_memory.vocab
    assert mapped.fingerprint == in_memory.fingerprint
    assert np.array_equal(np.load(cache_file), np.concatenate([in_memory.train, in_memory.val]))

    # A second load reads the cache files instead of scanning and encoding again: prove it by
    # altering them.
    stamp = cache_file.stat().st_mtime_ns
    again = load(path, val_fraction=0.1)
    assert set(cache.glob("*")) - before == {cache_file, scan_file}
    assert cache_file.stat().st_mtime_ns == stamp
    assert np.array_equal(again.train, in_memory.train)
    np.save(cache_file, np.zeros(len(text), dtype=in_memory.train.dtype))
    assert not load(path, val_fraction=0.1).train.any()
    scan = json.loads(scan_file.read_text(encoding="utf-8"))
    assert scan["fingerprint"] == in_memory.fingerprint
    assert scan["lengths"] == [len(text)]
    scan["fingerprint"] = "f" * 64
    scan_file.write_text(json.dumps(scan), encoding="utf-8")
    assert load(path, val_fraction=0.1).fingerprint == "f" * 64
    scan_file.write_text("{damaged", encoding="utf-8")  # a damaged scan is simply redone
    assert load(path, val_fraction=0.1).fingerprint == in_memory.fingerprint

    # Changing the file (same vocabulary, new size) changes the cache key: a fresh encoding.
    path.write_text(text + "line 0\n", encoding="utf-8")
    changed = load(path, val_fraction=0.1)
    assert changed.vocab == in_memory.vocab
    assert whole_text(changed) == text + "line 0\n"
    assert len(set(cache.glob("*")) - before) == 4
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]


def no_temporary_files(directory) -> bool:
    return not directory.exists() or not [p for p in directory.rglob("*") if ".tmp" in p.name]


def test_an_encoded_cache_that_cannot_be_made_leaves_the_corpus_in_memory(
    tmp_path, monkeypatch, capsys
):
    """A cache directory that cannot be created (here, below a file) costs the cache, not the
    run: the corpus is encoded in memory, with one line that says so and what to do."""
    monkeypatch.setattr(data_module, "_MMAP_THRESHOLD_BYTES", 100)
    (tmp_path / "a-file").write_text("", encoding="utf-8")
    monkeypatch.setenv("CHARLSTM_DATA_DIR", str(tmp_path / "a-file" / "cache"))
    text = "abc abd\n" * 100
    (tmp_path / "large.txt").write_text(text, encoding="utf-8")
    corpus = load(tmp_path / "large.txt")
    assert not isinstance(corpus.train, np.memmap)
    assert whole_text(corpus) == text
    (line,) = capsys.readouterr().err.splitlines()
    assert line == (
        f"warning: cannot cache the encoded corpus in {tmp_path / 'a-file' / 'cache' / 'encoded'} "
        "(Not a directory); encoding it in memory instead (set CHARLSTM_DATA_DIR to a writable "
        "directory to cache it)"
    )


def fail_allocation(fd, offset, length):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_fails_before_encoding_and_leaves_no_temporary_file(
    tmp_path, monkeypatch, capsys
):
    """The cache file is allocated in full first, so a full disk is an OSError at once (never
    a bus error in a mapping later); the .npy.tmp is removed and the corpus held in memory."""
    monkeypatch.setattr(data_module, "_MMAP_THRESHOLD_BYTES", 100)
    monkeypatch.setattr(os, "posix_fallocate", fail_allocation, raising=False)
    monkeypatch.setenv("CHARLSTM_DATA_DIR", str(tmp_path / "cache"))  # its own, to list it
    encoded = []
    blocks = data_module._encoded_blocks
    monkeypatch.setattr(
        data_module, "_encoded_blocks", lambda *a, **k: encoded.append(1) or blocks(*a, **k)
    )
    text = "abc abd\n" * 100
    (tmp_path / "large.txt").write_text(text, encoding="utf-8")
    corpus = load(tmp_path / "large.txt")
    assert whole_text(corpus) == text
    assert encoded == [1]  # encoded once, in memory: the cache file failed before any encoding
    assert "(No space left on device); encoding it in memory" in capsys.readouterr().err
    assert no_temporary_files(data_dir())
    assert not list((data_dir() / "encoded").glob("*.npy"))


def test_a_cache_that_cannot_be_written_nor_held_in_memory_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "_MMAP_THRESHOLD_BYTES", 100)
    monkeypatch.setattr(os, "posix_fallocate", fail_allocation, raising=False)
    monkeypatch.setenv("CHARLSTM_DATA_DIR", str(tmp_path / "cache"))  # its own, to list it
    monkeypatch.setattr(data_module, "available_memory", lambda: 1000)
    (tmp_path / "large.txt").write_text("abc abd\n" * 1000, encoding="utf-8")
    message = error_of(lambda: load(tmp_path / "large.txt"))
    assert message == (
        f"cannot write the encoded corpus to {data_dir() / 'encoded'}: No space left on device, "
        "and its 0 MB would not fit in memory (0 MB available): free some space, or set "
        "CHARLSTM_DATA_DIR to another directory"
    )
    assert no_temporary_files(data_dir())


def test_a_damaged_encoded_cache_is_written_again(tmp_path, monkeypatch):
    """A cache cut short (a crash, a full disk elsewhere) is never mapped past its end."""
    monkeypatch.setattr(data_module, "_MMAP_THRESHOLD_BYTES", 100)
    text = "abc abd\n" * 100
    (tmp_path / "large.txt").write_text(text, encoding="utf-8")
    corpus = load(tmp_path / "large.txt")
    group = data_module.resolve_sources([str(tmp_path / "large.txt")], "utf-8")
    cache = data_module._cache_path(group, corpus.vocab)
    del corpus  # unmapped
    with open(cache, "r+b") as f:
        f.truncate(cache.stat().st_size // 2)
    again = load(tmp_path / "large.txt")
    assert isinstance(again.train, np.memmap)
    assert whole_text(again) == text


def test_available_memory_is_a_positive_number_here():
    meminfo = Path("/proc/meminfo")
    if not meminfo.exists():
        pytest.skip("reads /proc/meminfo (Linux)")
    fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines() if ":" in line)
    total = sum(int(fields.get(key, "0 kB").split()[0]) for key in ("MemTotal", "SwapTotal"))
    available = data_module.available_memory()
    # A number of bytes, and no more than the machine's memory and swap.
    assert isinstance(available, int)
    assert 0 < available <= total * 1024


def test_memory_mapped_explicit_val_data(tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "_MMAP_THRESHOLD_BYTES", 1)
    (tmp_path / "train.txt").write_text("abab\n" * 20, encoding="utf-8")
    (tmp_path / "val.txt").write_text("baba\n", encoding="utf-8")
    corpus = load_corpus(
        DataConfig(data=[str(tmp_path / "train.txt")], val_data=[str(tmp_path / "val.txt")])
    )
    assert isinstance(corpus.train, np.memmap) and isinstance(corpus.val, np.memmap)
    assert corpus.vocab.decode(corpus.train) == "abab\n" * 20
    assert corpus.vocab.decode(corpus.val) == "baba\n"


def test_data_dir_is_isolated(isolated_data_dir):
    assert data_dir() == isolated_data_dir
    assert os.environ["CHARLSTM_DATA_DIR"] == str(isolated_data_dir)


def test_shakespeare_200k(shakespeare_200k):
    text = shakespeare_200k.read_text(encoding="utf-8")
    corpus = load(shakespeare_200k, val_fraction=0.1)
    assert (len(corpus.train), len(corpus.val)) == (180_000, 20_000)
    assert corpus.vocab.size == len(set(text))
    assert corpus.vocab.decode(corpus.val) == text[180_000:]
    assert whole_text(corpus) == text


# --- progress on large corpora ------------------------------------------------------------------


def test_small_corpora_load_silently(tmp_path, capsys):
    path = tmp_path / "small.txt"
    path.write_text("hello world\n" * 1000, encoding="utf-8")
    load(path)
    assert capsys.readouterr().err == ""


def test_large_corpora_show_their_progress_in_bytes(tmp_path, monkeypatch, capsys):
    """Past the threshold (64 MB; lowered here), scanning and encoding report bytes done."""
    monkeypatch.setattr(data_module, "_PROGRESS_BYTES", 10_000)
    monkeypatch.setattr(data_module, "_MMAP_THRESHOLD_BYTES", 10_000)
    path = tmp_path / "large.txt"
    path.write_text("hello world\n" * 2000, encoding="utf-8")
    load(path)
    err = capsys.readouterr().err
    assert "scanning the corpus: 100%" in err
    assert "encoding the corpus: 100%" in err
    assert "23.4k/23.4k" in err  # 24,000 bytes, in KiB
    load(path)  # the second time both come from the cache: nothing to show
    assert capsys.readouterr().err == ""


# --- standard input ------------------------------------------------------------------------------


@pytest.fixture
def stdin_text(tmp_path, monkeypatch):
    """Standard input replaced by a real file holding a text (returned); the file that
    standard input is copied into is isolated per test."""
    monkeypatch.setattr(data_module, "_stdin_read", [])
    text = "".join(f"line {i}: ünïcödé 😀\n" for i in range(200))
    source = tmp_path / "piped.txt"
    source.write_text(text, encoding="utf-8")
    with open(source, encoding="utf-8") as stream:
        monkeypatch.setattr(sys, "stdin", stream)
        yield text


def test_dash_reads_standard_input_and_keeps_a_copy(stdin_text, capsys):
    corpus = load_corpus(DataConfig(data=["-"]))
    assert whole_text(corpus) == stdin_text
    assert corpus.name == "stdin"
    copy = data_module.stdin_copy(corpus.fingerprint)
    assert corpus.stdin_copy == copy
    assert copy.read_text(encoding="utf-8") == stdin_text
    assert capsys.readouterr().err == (
        f"standard input ({len(stdin_text.encode()):,} bytes) is kept in {copy}: eval and "
        "--resume read it from there\n"
    )
    assert not list(copy.parent.glob(".incoming-*"))
    # Standard input is read once: a second "-" in this process is the same text.
    again = load_corpus(DataConfig(data=["-"]))
    assert whole_text(again) == stdin_text
    assert again.fingerprint == corpus.fingerprint
    # Later, the copy stands for "-": the same corpus, without standard input.
    later = load_corpus(DataConfig(data=["-"]), vocab=corpus.vocab, stdin=copy)
    assert later.fingerprint == corpus.fingerprint
    assert np.array_equal(later.val, corpus.val)


def test_standard_input_mixes_with_files_and_validation_files(stdin_text, tmp_path):
    (tmp_path / "val.txt").write_text("line 0: ünïcödé 😀\n", encoding="utf-8")
    (tmp_path / "more.txt").write_text("more\n", encoding="utf-8")
    config = DataConfig(
        data=["-", str(tmp_path / "more.txt")], val_data=[str(tmp_path / "val.txt")]
    )
    corpus = load_corpus(config)
    assert corpus.vocab.decode(corpus.train) == stdin_text + "\nmore\n"  # a blank line between
    assert corpus.vocab.decode(corpus.val) == "line 0: ünïcödé 😀\n"
    assert corpus.stdin_copy.read_text(encoding="utf-8") == stdin_text


def test_standard_input_large_enough_to_map_is_cached_under_its_lasting_name(
    stdin_text, monkeypatch
):
    monkeypatch.setattr(data_module, "_MMAP_THRESHOLD_BYTES", 100)
    corpus = load_corpus(DataConfig(data=["-"]))
    assert isinstance(corpus.train, np.memmap)
    assert whole_text(corpus) == stdin_text
    copy = data_module.stdin_copy(corpus.fingerprint)
    group = data_module.resolve_sources(["-"], "utf-8", stdin=copy)
    assert data_module._scan_path([group]).exists()  # a resumed run reads neither file again
    assert data_module._cache_path(group, corpus.vocab).exists()


def test_standard_input_in_another_encoding(tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "_stdin_read", [])
    text = LANGUAGES["russian"] * 3
    (tmp_path / "ru.txt").write_bytes(text.encode("cp1251"))
    with open(tmp_path / "ru.txt", "rb") as stream:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(stream))
        corpus = load_corpus(DataConfig(data=["-"], encoding="cp1251"))
    assert whole_text(corpus) == text


def test_standard_input_that_does_not_decode_is_not_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "_stdin_read", [])
    (tmp_path / "ru.txt").write_bytes(LANGUAGES["russian"].encode("cp1251"))
    kept = data_dir() / "stdin"
    before = set(kept.iterdir()) if kept.exists() else set()
    with open(tmp_path / "ru.txt", "rb") as stream:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(stream))
        message = error_of(lambda: load_corpus(DataConfig(data=["-"])))
    assert message.startswith("standard input: not valid UTF-8 at byte 0 (0xc2); ")
    assert message.endswith("it looks like cp1251: try --encoding cp1251")
    assert set(kept.iterdir()) == before


def test_empty_standard_input_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "_stdin_read", [])
    (tmp_path / "empty.txt").write_bytes(b"")
    with open(tmp_path / "empty.txt", encoding="utf-8") as stream:
        monkeypatch.setattr(sys, "stdin", stream)
        assert error_of(lambda: load_corpus(DataConfig(data=["-"]))) == (
            "the training text is empty (standard input); give it some text to learn"
        )


@pytest.mark.parametrize(
    "settings",
    [{"data": ["-", "-"]}, {"data": ["-"], "val_data": ["-"]}],
    ids=["twice", "train-and-val"],
)
def test_standard_input_can_be_read_only_once(stdin_text, settings):
    assert error_of(lambda: load_corpus(DataConfig(**settings))) == (
        "standard input (-) can be read only once: give - once"
    )


def test_a_resumed_run_reads_the_kept_copy_when_nothing_is_piped(stdin_text, monkeypatch):
    corpus = load_corpus(DataConfig(data=["-"]))
    config = DataConfig(data=["-"])
    # Text piped in (here, a file as standard input) is read: it must be the same text.
    assert data_module.resume_stdin(config, corpus.fingerprint) is None
    with open(os.devnull, encoding="utf-8") as nothing:  # as under nohup or cron
        monkeypatch.setattr(sys, "stdin", nothing)
        assert data_module.resume_stdin(config, corpus.fingerprint) == corpus.stdin_copy
    monkeypatch.setattr(sys, "stdin", None)  # closed
    assert data_module.resume_stdin(config, corpus.fingerprint) == corpus.stdin_copy
    assert data_module.resume_stdin(DataConfig(data=["a.txt"]), corpus.fingerprint) is None
    corpus.stdin_copy.unlink()
    message = error_of(lambda: data_module.resume_stdin(config, corpus.fingerprint))
    assert message == (
        f"this run was trained on standard input and its copy {corpus.stdin_copy} is gone: "
        "pipe the same text in again (... | charlstm train --resume RUN)"
    )


# ---- read_text_file: what inspect and --prompt-file read -------------------------------------


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
    monkeypatch.setattr(data_module, "_BLOCK_BYTES", 3)
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


def test_a_dash_reads_standard_input(monkeypatch):
    stdin = io.TextIOWrapper(io.BytesIO(codecs.BOM_UTF8 + "héllo\n".encode()))
    monkeypatch.setattr(sys, "stdin", stdin)
    assert read_text_file("-") == "héllo\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"ab\xff")))
    assert error_of(lambda: read_text_file("-")) == "standard input: invalid UTF-8 at byte 2"
