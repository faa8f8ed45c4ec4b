"""What ``charlstm sample`` reads and prints: the prompt from a file or standard input, samples
as text or as JSON Lines, and the ``--interactive`` loop that samples one prompt per line.

Plain text shows a prompt you give before its continuation (``echo``); the default prompt, a
newline, is never shown. JSON Lines hold one object per sample: prompt, text (the continuation
alone), settings, seed (drawn when none was given, so that every sample can be drawn again),
index and the model. Everything but samples goes to standard error.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, BinaryIO, TextIO

from charlstm.config import DEFAULT_PROMPT, SampleConfig
from charlstm.data import read_text_file
from charlstm.errors import CharLSTMError

if TYPE_CHECKING:  # loading it loads torch: a prompt file's errors answer before that
    from charlstm.lm import CharLM

# The settings an interactive `:name value` line changes: every sampling setting but the prompt.
_COMMANDS = tuple(f.name for f in dataclasses.fields(SampleConfig) if f.name != "prompt")
_FLAGS = re.compile("--(" + "|".join(n.replace("_", "-") for n in _COMMANDS) + r")\b")
_TYPES = typing.get_type_hints(SampleConfig)
# A value that sets an optional setting (the seed) back to none.
_NONE = "none"
INTERACTIVE_HELP = (
    "Each line is a prompt (an empty line: a newline; '::x' is the prompt ':x'). Commands: "
    + ", ".join(f":{name.replace('_', '-')} VALUE" for name in _COMMANDS)
    + " (:seed none draws a new seed for each prompt), :help. End with Ctrl-D."
)


def read_prompt_file(path: str) -> str:
    """The text of ``--prompt-file``, exactly as the UTF-8 file holds it (``-``: standard
    input), or a one-line error naming the file."""
    try:
        return read_text_file(path)
    except CharLSTMError as e:
        raise CharLSTMError(f"--prompt-file {e}") from None


def write_samples(
    model: CharLM,
    settings: SampleConfig,
    out: TextIO,
    *,
    echo: bool = True,
    as_json: bool = False,
    card: dict[str, Any] | None = None,
) -> None:
    """Write the samples of one prompt as ``charlstm sample`` prints them.

    Plain text: one sample streams character by character, several are written whole under
    ``=== sample N ===`` lines; each ends with a newline, and with ``echo`` the prompt comes
    first (unless it is the default newline). ``as_json``: one JSON object per sample and line,
    its ``model`` being ``card`` (default: ``model.summary()``).
    """
    if as_json:
        card = model.summary() if card is None else card
        for sample in model.samples(num_samples=settings.num_samples, **_options(settings)):
            out.write(json.dumps({**sample.as_dict(), "model": card}, allow_nan=False) + "\n")
        out.flush()
        return
    shown = settings.prompt if echo and settings.prompt != DEFAULT_PROMPT else ""
    if settings.num_samples == 1:
        pieces = model.stream(**_options(settings))  # checks the settings: nothing shown yet
        out.write(shown)
        for piece in pieces:
            out.write(piece)
            out.flush()  # each character as it comes: the point of streaming
        out.write("\n")
        out.flush()
        return
    texts = model.generate_batch(settings.num_samples, **_options(settings))
    for index, text in enumerate(texts, 1):
        out.write(f"=== sample {index} ===\n{shown}{text}\n")
    out.flush()


def _options(settings: SampleConfig) -> dict[str, Any]:
    """The settings as :meth:`CharLM.stream` takes them."""
    return {
        "prompt": settings.prompt,
        "length": settings.length,
        "temperature": settings.temperature,
        "top_k": settings.top_k,
        "top_p": settings.top_p,
        "seed": settings.seed,
        "unknown": settings.unknown,
    }


def interactive(
    model: CharLM,
    settings: SampleConfig,
    lines: BinaryIO,
    out: TextIO,
    err: TextIO,
    *,
    echo: bool = True,
    as_json: bool = False,
) -> None:
    """Sample each prompt read from ``lines`` until they end, with ``settings`` as changed by
    ``:name value`` lines; a ``> `` prompt is shown on ``err`` when ``lines`` is a terminal. A
    line that cannot be used gets one ``error:`` line on ``err`` and the loop goes on."""
    terminal = lines.isatty()
    card = model.summary()
    for number, line in enumerate(_read_lines(lines, err if terminal else None), 1):
        try:
            text = _decode(line, number)
            if text.startswith(":") and not text.startswith("::"):
                settings = _command(text, settings, err)
                continue
            prompt = text.removeprefix(":") or DEFAULT_PROMPT  # "::x" is the prompt ":x"
            write_samples(
                model,
                dataclasses.replace(settings, prompt=prompt),
                out,
                echo=echo,
                as_json=as_json,
                card=card,
            )
        except CharLSTMError as e:
            # Worded for the flags (--top-p, --unknown skip): name the commands instead.
            err.write("error: " + _FLAGS.sub(r":\1", str(e)) + "\n")
            err.flush()


def _read_lines(lines: BinaryIO, prompt_to: TextIO | None) -> Iterator[bytes]:
    """Each line of ``lines`` (bytes, without its line ending), after showing ``> `` on
    ``prompt_to`` if given; a newline ends the terminal's last prompt line."""
    while True:
        if prompt_to is not None:
            prompt_to.write("> ")
            prompt_to.flush()
        try:
            line = lines.readline()
        except KeyboardInterrupt:
            if prompt_to is not None:
                prompt_to.write("\n")  # the "interrupted" that follows gets a line of its own
            raise
        if not line:
            if prompt_to is not None:
                prompt_to.write("\n")
                prompt_to.flush()
            return
        yield line.removesuffix(b"\n").removesuffix(b"\r")


def _decode(line: bytes, number: int) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CharLSTMError(
            f"line {number} is not UTF-8 text (byte 0x{line[e.start]:02x} at {e.start}): "
            "type it again"
        ) from None


def _command(text: str, settings: SampleConfig, err: TextIO) -> SampleConfig:
    """``settings`` changed by a ``:name value`` line (or unchanged, after ``:help``); the
    settings in force are written to ``err`` either way."""
    name, _, value = text[1:].strip().partition(" ")
    key, value = name.replace("-", "_"), value.strip()
    if key == "help":
        err.write(INTERACTIVE_HELP + "\n")
    elif key not in _COMMANDS:
        raise CharLSTMError(f"unknown command :{name}; :help lists the commands")
    else:
        changed = dataclasses.replace(settings, **{key: _parse(key, value)})
        changed.validate()
        settings = changed
    err.write(_describe(settings) + "\n")
    err.flush()
    return settings


def _parse(name: str, value: str) -> Any:
    """A typed value of the setting ``name`` from its text."""
    kinds = typing.get_args(_TYPES[name]) or (_TYPES[name],)  # int | None: (int, NoneType)
    if value.lower() == _NONE and type(None) in kinds:
        return None
    kind = next(k for k in kinds if k is not type(None))
    try:
        return kind(value)
    except ValueError:
        flag = name.replace("_", "-")
        raise CharLSTMError(f":{flag} takes {kind.__name__}, not {value!r}") from None


def _describe(settings: SampleConfig) -> str:
    """The settings an interactive session samples with, as one line."""
    values = {name: getattr(settings, name) for name in _COMMANDS}
    shown = ", ".join(
        f"{name.replace('_', '-')} {_NONE if value is None else value}"
        for name, value in values.items()
    )
    return f"settings: {shown}"
