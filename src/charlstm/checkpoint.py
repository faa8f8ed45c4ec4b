"""Checkpoint directories: written atomically, read without ever unpickling anything.

A checkpoint is a directory::

    config.json          format, version, RunConfig, vocabulary, corpus identity, metrics
    model.safetensors    the network's weights
    resume.safetensors   optimizer moments, RNG states, carried hidden state  (last/ only)
    resume.json          step, epoch position, clock, optimizer hyper-parameters (last/ only)

It is first written to a hidden temporary directory beside its final place, every file
fsynced, then renamed into place; the previous checkpoint is moved aside first and removed
only after the new one is in place, so an interruption at any moment leaves one whole
checkpoint that :func:`resolve_checkpoint` finds.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch

from charlstm.config import RunConfig
from charlstm.data import Vocab
from charlstm.errors import CharLSTMError

FORMAT = "charlstm-checkpoint"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
RESUME_TENSORS_FILE = "resume.safetensors"
RESUME_JSON_FILE = "resume.json"
_ASIDE = ".{}.old"  # where the previous checkpoint waits while the new one is renamed in
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # pickle protocol 2+, or torch.save's zip archive


@dataclass
class Checkpoint:
    """What a checkpoint directory holds, loaded onto the CPU."""

    path: Path
    config: RunConfig
    vocab: Vocab
    weights: dict[str, torch.Tensor]
    info: dict[str, Any]  # everything else in config.json: step, metrics, corpus, versions


def write_checkpoint(
    directory: Path,
    *,
    config: RunConfig,
    vocab: Vocab,
    weights: dict[str, torch.Tensor],
    info: dict[str, Any],
    resume_tensors: dict[str, torch.Tensor] | None = None,
    resume_json: dict[str, Any] | None = None,
) -> None:
    """Write a checkpoint directory atomically, replacing any previous one at ``directory``."""
    directory = Path(directory)
    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True)
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "vocab": vocab.to_json(),
        **info,
        "versions": _versions(),
    }
    _remove_stale_temporaries(directory)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(directory), dir=parent))
    try:
        _write_file(tmp / WEIGHTS_FILE, _tensor_bytes(weights))
        if resume_tensors is not None:
            _write_file(tmp / RESUME_TENSORS_FILE, _tensor_bytes(resume_tensors))
            _write_file(tmp / RESUME_JSON_FILE, json.dumps(resume_json, indent=1).encode())
        # config.json last: its presence in the final place marks a complete checkpoint.
        _write_file(tmp / CONFIG_FILE, _json_bytes(document))
        _fsync_dir(tmp)
        aside = parent / _ASIDE.format(directory.name)
        recover_checkpoint(directory)
        if directory.exists():
            os.replace(directory, aside)
        os.replace(tmp, directory)
        _fsync_dir(parent)
        shutil.rmtree(aside, ignore_errors=True)
    except OSError as e:
        raise CharLSTMError(
            f"cannot write checkpoint {directory}: {e.strerror or e} "
            "(the previous checkpoint, if any, is intact)"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _json_bytes(document: dict[str, Any]) -> bytes:
    """UTF-8 JSON, readable; a lone surrogate (a vocabulary from a codec such as
    unicode_escape can hold one) is written as its JSON escape, which reads back the same."""
    text = json.dumps(document, indent=2, ensure_ascii=False)
    return text.encode("utf-8", errors="backslashreplace")


def _tmp_prefix(directory: Path) -> str:
    return f".{directory.name}.tmp-"


def _remove_stale_temporaries(directory: Path) -> None:
    # Left by a writer killed mid-write; never a complete checkpoint, so safe to delete.
    for stale in directory.parent.glob(_tmp_prefix(directory) + "*"):
        shutil.rmtree(stale, ignore_errors=True)


def recover_checkpoint(directory: Path) -> None:
    """Finish an interrupted replacement: bring the set-aside checkpoint back if needed."""
    directory = Path(directory)
    aside = directory.parent / _ASIDE.format(directory.name)
    if aside.exists():
        if (directory / CONFIG_FILE).exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            shutil.rmtree(directory, ignore_errors=True)
            os.replace(aside, directory)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a checkpoint path or a run directory (best/, else last/)."""
    path = Path(path).expanduser()
    recover_checkpoint(path)  # a checkpoint may be set aside by an interrupted replacement
    if not path.exists():
        raise CharLSTMError(
            f"{path} does not exist: give a run directory or a checkpoint directory"
        )
    for candidate in (path, path / "best", path / "last"):
        recover_checkpoint(candidate)
        if (candidate / CONFIG_FILE).is_file():
            return candidate
    if path.is_file():
        raise CharLSTMError(
            f"{path} is a file; give the checkpoint directory that holds {CONFIG_FILE} "
            f"and {WEIGHTS_FILE}"
        )
    raise CharLSTMError(f"{path} is not a charlstm checkpoint or run directory (no {CONFIG_FILE})")


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Load a checkpoint's configuration, vocabulary and weights onto the CPU."""
    directory = resolve_checkpoint(path)
    document = _read_json(directory / CONFIG_FILE)
    if document.get("format") != FORMAT:
        raise CharLSTMError(f"{directory / CONFIG_FILE} is not a charlstm checkpoint configuration")
    version = document.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CharLSTMError(
            f"{directory / CONFIG_FILE} is malformed: format_version {version!r} is not a "
            "positive integer"
        )
    if version > FORMAT_VERSION:
        raise CharLSTMError(
            f"{directory} uses checkpoint format {version}, newer than this charlstm reads "
            f"({FORMAT_VERSION}): upgrade charlstm"
        )
    if not isinstance(document.get("config"), dict):
        raise CharLSTMError(f"{directory / CONFIG_FILE} is malformed: it has no config table")
    model = document["config"].get("model")
    if isinstance(model, dict):  # written before the head could read every layer
        model.setdefault("head_input", "last")
    try:
        config = RunConfig.from_dict(document["config"])
        vocab = Vocab.from_json(document["vocab"])
    except (KeyError, TypeError, CharLSTMError) as e:
        raise CharLSTMError(f"{directory / CONFIG_FILE} is malformed: {e}") from None
    weights = read_tensors(directory / WEIGHTS_FILE)
    info = {k: v for k, v in document.items() if k not in ("config", "vocab")}
    return Checkpoint(directory, config, vocab, weights, info)


def read_resume_state(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimizer, RNG and data-position state saved beside a ``last/`` checkpoint."""
    json_path = Path(directory) / RESUME_JSON_FILE
    if not json_path.exists():
        raise CharLSTMError(f"{directory} holds no resume state (only last/ checkpoints do)")
    return read_tensors(Path(directory) / RESUME_TENSORS_FILE), _read_json(json_path)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file; anything else is refused before it is parsed."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CharLSTMError(f"{path} is missing: the checkpoint is incomplete") from None
    except OSError as e:
        raise CharLSTMError(f"cannot read {path}: {e.strerror or e}") from None
    if not data:
        raise CharLSTMError(f"{path} is empty: the checkpoint is damaged")
    if data.startswith(_PICKLE_MAGIC):
        raise CharLSTMError(
            f"{path} is a pickle (torch.save) file, not safetensors; charlstm never unpickles "
            "files because that can run arbitrary code"
        )
    try:
        return safetensors.torch.load(data)
    except Exception as e:  # safetensors raises its own error types for every kind of damage
        raise CharLSTMError(f"{path} is not a valid safetensors file ({_first_line(e)})") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CharLSTMError(f"{path} is missing: the checkpoint is incomplete") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CharLSTMError(f"{path} is not valid JSON ({_first_line(e)})") from None
    if not isinstance(value, dict):
        raise CharLSTMError(f"{path} does not hold a JSON object")
    return value


def _tensor_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return safetensors.torch.save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    # Directory fsync makes the renames durable; some platforms (Windows) cannot open a dir.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _versions() -> dict[str, str]:
    from charlstm import __version__

    return {
        "charlstm": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
