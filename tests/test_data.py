"""Reading, decoding, encoding and splitting corpora; the vocabulary."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import charlstm.data as data_module
from charlstm.config import DataConfig
from charlstm.corpora import data_dir
from charlstm.data import Vocab, load_corpus, read_codepoints, to_codepoints
from charlstm.errors import CharLSTMError

MIB16 = 1 << 24
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
        (
            {"kind": "text", "symbols": "ba"},
            "the vocabulary must be non-empty, sorted and without repeats",
        ),
        (
            {"kind": "text", "symbols": "aab"},
            "the vocabulary must be non-empty, sorted and without repeats",
        ),
        (
            {"kind": "text", "symbols": ""},
            "the vocabulary must be non-empty, sorted and without repeats",
        ),
        (
            {"kind": "bytes", "symbols": [3, 3]},
            "the vocabulary must be non-empty, sorted and without repeats",
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


def test_invalid_utf8_reports_the_byte_offset(tmp_path):
    prefix = "héllo wörld 😀\n".encode()
    path = tmp_path / "bad.txt"
    path.write_bytes(prefix + b"\xff" + b"more text")
    assert len(prefix) == 19
    expected = f"{path}: invalid UTF-8 at byte 19"
    assert error_of(lambda: read_all(path, "utf-8")) == expected
    assert error_of(lambda: load(path)) == expected


def test_invalid_utf8_label_for_codec_alias(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"ab\xc3(")
    assert error_of(lambda: read_all(path, "UTF8")) == f"{path}: invalid UTF-8 at byte 2"


def test_truncated_character_at_end_of_file(tmp_path):
    path = tmp_path / "cut.txt"
    path.write_bytes(b"abc" + "€".encode()[:2])
    assert error_of(lambda: read_all(path, "utf-8")) == f"{path}: invalid UTF-8 at byte 3"


@pytest.mark.parametrize(
    ("content", "error_at"),
    [
        (b"a" * MIB16 + b"\xff", MIB16),  # first byte of the second block
        (b"a" * (MIB16 - 1) + b"\xffb", MIB16 - 1),  # last byte of the first block
        (b"a" * (MIB16 - 1) + "€".encode() + b"z", None),  # a character split by the boundary
        (b"a" * (MIB16 - 2) + "😀".encode() + b"\x80", MIB16 + 2),  # stray byte after it
    ],
    ids=["after-boundary", "before-boundary", "split-char", "split-char-then-stray"],
)
def test_utf8_at_the_real_block_boundary(tmp_path, content, error_at):
    """The 16 MiB read blocks neither break characters nor shift error offsets."""
    assert data_module._BLOCK_BYTES == MIB16
    path = tmp_path / "big.txt"
    path.write_bytes(content)
    if error_at is not None:
        assert error_of(lambda: read_all(path, "utf-8")) == (
            f"{path}: invalid UTF-8 at byte {error_at}"
        )
    else:
        blocks = list(read_codepoints(path, "utf-8"))
        assert len(blocks) == 2
        codepoints = np.concatenate(blocks)
        assert len(codepoints) == MIB16 + 1
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
def test_blockwise_utf8_matches_whole_file_decoding(tmp_path_factory, content, block):
    """For any bytes and block size: the same text, or the same error offset, as bytes.decode."""
    path = tmp_path_factory.mktemp("utf8") / "t.txt"
    path.write_bytes(content)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data_module, "_BLOCK_BYTES", block)
        try:
            expected = content.decode("utf-8")
        except UnicodeDecodeError as e:
            message = error_of(lambda: read_all(path, "utf-8"))
            assert message == f"{path}: invalid UTF-8 at byte {e.start}"
        else:
            assert read_all(path, "utf-8").tolist() == [ord(c) for c in expected]


def test_latin1_reads_every_byte(tmp_path):
    content = b"caf\xe9 \xff\x80\x00z"
    path = tmp_path / "latin.txt"
    path.write_bytes(content)
    assert read_all(path, "latin-1").tolist() == list(content)
    corpus = load(path, encoding="latin-1", val_fraction=0.2)
    assert whole_text(corpus) == content.decode("latin-1")
    assert corpus.vocab.kind == "text"


def test_other_codecs_report_their_name(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"abc\xe9def")
    assert error_of(lambda: load(path, encoding="ascii")) == f"{path}: invalid ascii at byte 3"


def test_utf16_file(tmp_path):
    text = "ab😀cd\n" * 4
    path = tmp_path / "u16.txt"
    path.write_bytes(text.encode("utf-16"))
    assert whole_text(load(path, encoding="utf-16", val_fraction=0.25)) == text


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


def test_given_vocab_missing_characters_is_an_error(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("abcé", encoding="utf-8")
    vocab = Vocab.from_json({"kind": "text", "symbols": "ab"})
    assert error_of(lambda: load_corpus(DataConfig(data=[str(path)]), vocab=vocab)) == (
        f"notes contains characters not in the model's vocabulary: 'c', 'é' {UNKNOWN_HINT}"
    )


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
        "shakespeare, tinyshakespeare, enwik8, text8)"
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
    assert len(created) == 1
    (cache_file,) = created
    assert cache_file.suffix == ".npy"
    assert isinstance(mapped.train, np.memmap) and isinstance(mapped.val, np.memmap)
    assert np.array_equal(mapped.train, in_memory.train)
    assert np.array_equal(mapped.val, in_memory.val)
    assert mapped.vocab == in_memory.vocab
    assert mapped.fingerprint == in_memory.fingerprint
    assert np.array_equal(np.load(cache_file), np.concatenate([in_memory.train, in_memory.val]))

    # A second load reads the cache file instead of encoding again: prove it by altering it.
    stamp = cache_file.stat().st_mtime_ns
    again = load(path, val_fraction=0.1)
    assert set(cache.glob("*")) - before == {cache_file}
    assert cache_file.stat().st_mtime_ns == stamp
    assert np.array_equal(again.train, in_memory.train)
    np.save(cache_file, np.zeros(len(text), dtype=in_memory.train.dtype))
    assert not load(path, val_fraction=0.1).train.any()

    # Changing the file (same vocabulary, new size) changes the cache key: a fresh encoding.
    path.write_text(text + "line 0\n", encoding="utf-8")
    changed = load(path, val_fraction=0.1)
    assert changed.vocab == in_memory.vocab
    assert whole_text(changed) == text + "line 0\n"
    assert len(set(cache.glob("*")) - before) == 2
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]


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
