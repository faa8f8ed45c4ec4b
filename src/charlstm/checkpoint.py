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

import hashlib
import json
import os
import platform
import secrets
import shutil
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import safetensors
import safetensors.torch
import torch

from charlstm.config import RunConfig
from charlstm.data import Corpus, Vocab
from charlstm.errors import CharLSTMError
from charlstm.model import weight_shapes

if TYPE_CHECKING:
    from charlstm.evaluation import EvalResult

FORMAT = "charlstm-checkpoint"
FORMAT_VERSION = 3
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
RESUME_TENSORS_FILE = "resume.safetensors"
RESUME_JSON_FILE = "resume.json"
FILES_KEY = "files"  # in config.json: each other file's size and SHA-256
INIT_FROM_KEY = "init_from"  # in config.json of a fine-tuned run: the checkpoint it started from
# Tensor names in resume.safetensors (charlstm.train_state reads and writes them): the torch
# and CUDA generators (rank r > 0 of a torchrun run adds ".rankR"), the carried state of the
# whole batch ("state.0", "state.1": h, c), the optimizer's per-parameter moments
# ("optim.INDEX.KEY") and, when model.safetensors holds the weight average, the weights
# being trained ("train.NAME").
RESUME_RNG = "rng.torch"
RESUME_CUDA_RNG = "rng.cuda"
RESUME_RANK_SUFFIX = ".rank{}"
RESUME_CARRIED_STATE = "state."
RESUME_OPTIMIZER = "optim."
RESUME_TRAINING_WEIGHTS = "train."
_ASIDE = ".{}.old"  # where the previous checkpoint waits while the new one is renamed in
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # pickle protocol 2+, or torch.save's zip archive
# safetensors' own limit on the JSON header; config.json and resume.json are far smaller.
MAX_HEADER_BYTES = 100_000_000
MAX_JSON_BYTES = 64 << 20
WEIGHT_DTYPES = frozenset({"F64", "F32", "BF16", "F16"})  # floating point: what a network learns
# A reader that meets a checkpoint being replaced reads it again, this many times at most.
READ_ATTEMPTS = 20


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
    try:
        # Not tempfile.mkdtemp: its 0700 mode would hide the checkpoint from other users.
        tmp = parent / (_tmp_prefix(directory) + secrets.token_hex(6))
        tmp.mkdir()
    except OSError as e:
        raise CharLSTMError(f"cannot write checkpoint {directory}: {e.strerror or e}") from None
    files = {WEIGHTS_FILE: _tensor_bytes(weights)}
    if resume_tensors is not None:
        files[RESUME_TENSORS_FILE] = _tensor_bytes(resume_tensors)
        files[RESUME_JSON_FILE] = json.dumps(resume_json, indent=1).encode()
    # What config.json records of the other files: a changed byte is an error, never a model.
    document[FILES_KEY] = {
        name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        for name, data in files.items()
    }
    try:
        for name, data in files.items():
            _write_file(tmp / name, data)
        # config.json last: its presence in the final place marks a complete checkpoint.
        _write_file(tmp / CONFIG_FILE, _json_bytes(document))
        _fsync_dir(tmp)
        aside = parent / _ASIDE.format(directory.name)
        recover_checkpoint(directory)
        if directory.exists():
            os.replace(directory, aside)
        os.replace(tmp, directory)
        _fsync_dir(parent)
        _remove(aside)
    except OSError as e:
        raise CharLSTMError(
            f"cannot write checkpoint {directory}: {e.strerror or e} "
            "(the previous checkpoint, if any, is intact)"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_info(
    step: int,
    epoch: float,
    elapsed: float,
    val: EvalResult | None,
    corpus: Corpus,
    origin: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What config.json records of the run at a checkpoint: its step, epoch and clock, its
    validation score (None for a checkpoint saved on a signal), the corpus it learnt and,
    for a fine-tuned run, the :func:`origin_info` of the checkpoint it started from."""
    return {
        **({INIT_FROM_KEY: origin} if origin is not None else {}),
        "step": step,
        "epoch": epoch,
        "elapsed": elapsed,
        "val": val.as_dict() if val is not None else None,
        "corpus": {
            "name": corpus.name,
            "fingerprint": corpus.fingerprint,
            "train_characters": len(corpus.train),
            "val_characters": len(corpus.val),
        },
    }


def origin_info(source: Checkpoint) -> dict[str, Any]:
    """What a fine-tuned run records of the checkpoint it started from: where it was, the
    SHA-256 of its weight file (None if it predates those records), its step, corpus,
    validation score and vocabulary size."""
    files = source.info.get(FILES_KEY) or {}
    return {
        "path": str(source.path.absolute()),
        "weights_sha256": files.get(WEIGHTS_FILE, {}).get("sha256"),
        "step": source.info.get("step"),
        "corpus": source.info.get("corpus"),
        "val": source.info.get("val"),
        "vocab_size": source.vocab.size,
    }


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
        _remove(stale)


def _remove(path: Path) -> None:
    """Delete a directory tree, or a file or symbolic link (rmtree refuses a link)."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def recover_checkpoint(directory: Path) -> None:
    """Finish an interrupted replacement: bring the set-aside checkpoint back if needed.

    Only the run's writer, holding its lock (:mod:`charlstm.runlock`), may call this; a
    reader that finds a replacement half done reads the set-aside copy instead."""
    directory = Path(directory)
    aside = directory.parent / _ASIDE.format(directory.name)
    if aside.exists() or aside.is_symlink():
        if (directory / CONFIG_FILE).exists():
            _remove(aside)
        else:
            _remove(directory)
            os.replace(aside, directory)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a checkpoint path or a run directory (best/, else last/).

    Changes nothing on disk: a checkpoint that a live writer has just set aside to put a new
    one in its place is found where it waits."""
    path = Path(path).expanduser()
    if not path.exists() and not _aside(path).exists():
        raise CharLSTMError(
            f"{path} does not exist: give a run directory or a checkpoint directory"
        )
    for candidate in (path, path / "best", path / "last"):
        found = readable_checkpoint(candidate)
        if found is not None:
            return found
    if path.is_file():
        if _starts_like_pickle(path):
            raise _pickle_refused(path)
        raise CharLSTMError(
            f"{path} is a file; give the checkpoint directory that holds {CONFIG_FILE} "
            f"and {WEIGHTS_FILE}"
        )
    raise CharLSTMError(f"{path} is not a charlstm checkpoint or run directory (no {CONFIG_FILE})")


def run_directory_of(path: str | Path) -> Path:
    """The run a checkpoint path belongs to: ``runs/x`` for ``runs/x`` and ``runs/x/best``;
    a lone checkpoint directory is its own."""
    given = Path(path).expanduser().resolve()
    return given.parent if given.name in ("best", "last") else given


def _starts_like_pickle(path: Path) -> bool:
    """Whether a file's first bytes are those of a pickle or of torch.save's archive: a
    PyTorch checkpoint given where a charlstm one belongs. Only those bytes are read."""
    try:
        with open(path, "rb") as f:
            head = f.read(max(len(magic) for magic in _PICKLE_MAGIC))
    except OSError:
        return False
    return head.startswith(_PICKLE_MAGIC)


def readable_checkpoint(directory: Path) -> Path | None:
    """``directory`` if it holds a whole checkpoint, else the copy of it that a replacement
    set aside (still being replaced, or interrupted by a crash), else None."""
    for place in (directory, _aside(directory)):
        if (place / CONFIG_FILE).is_file():
            return place
    return None


def _aside(directory: Path) -> Path:
    return directory.parent / _ASIDE.format(directory.name)


class _Replaced(Exception):
    """A file of the checkpoint being read vanished: a writer replaced it meanwhile."""


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Load a checkpoint's configuration, vocabulary and weights onto the CPU.

    The weight file's header is checked against config.json (names, shapes, floating-point
    types) before its tensors are read, and the weights must be finite. Every file comes from
    the same directory even if a live trainer replaces the checkpoint meanwhile."""
    for attempt in range(READ_ATTEMPTS):
        directory = resolve_checkpoint(path)
        try:
            with _Pinned(directory) as pinned:
                return _read_pinned(pinned)
        except _Replaced:
            time.sleep(0.005 * (attempt + 1))
    raise CharLSTMError(
        f"{directory}: a file is missing, or the checkpoint was replaced {READ_ATTEMPTS} times "
        "while being read; the checkpoint is incomplete"
    )


def _read_pinned(pinned: _Pinned) -> Checkpoint:
    directory = pinned.path
    document = _parse_json(pinned.read(CONFIG_FILE, MAX_JSON_BYTES), directory / CONFIG_FILE)
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
    for older in range(version, FORMAT_VERSION):
        try:
            _MIGRATIONS[older](document["config"])
        except CharLSTMError as e:
            raise CharLSTMError(f"{directory}: {e}") from None
    try:
        config = RunConfig.from_dict(document["config"])
        vocab = Vocab.from_json(document["vocab"])
    except (KeyError, TypeError, ValueError, CharLSTMError) as e:
        raise CharLSTMError(f"{directory / CONFIG_FILE} is malformed: {e}") from None
    weights_path = directory / WEIGHTS_FILE

    def check(head: bytes, size: int) -> None:
        _check_weight_header(weights_path, _tensor_header(head, size, weights_path), config, vocab)

    recorded = _recorded(document, WEIGHTS_FILE, directory)
    weights = _parse_tensors(
        pinned.read(WEIGHTS_FILE, check=check, recorded=recorded), weights_path
    )
    for name, tensor in weights.items():
        if not torch.isfinite(tensor).all():
            raise CharLSTMError(
                f"{weights_path}: weight {name} holds NaN or infinite values (a run that "
                "diverged, or a damaged file); use an earlier checkpoint"
            )
    info = {k: v for k, v in document.items() if k not in ("config", "vocab")}
    return Checkpoint(directory, config, vocab, weights, info)


# ---- older formats: each migration takes a config table one format version up -------------

# Options a version 1 checkpoint may hold that charlstm no longer has (they did not help, see
# docs/experiments.md), with the value that meant "off": a model trained with it off loads.
_REMOVED_OPTIONS = {"recurrent_dropout": 0.0, "weight_dropout": 0.0, "dropout_mask": "step"}
# What version 2 moved from the train section to the session section.
_SESSION_SETTINGS = (
    "max_steps", "max_epochs", "time_budget", "eval_every", "log_every", "max_bad_steps",
    "device", "out", "resume", "overwrite", "sample_length",
)  # fmt: skip


def _version_1_to_2(config: dict[str, Any]) -> None:
    """Version 2 split how a run is carried out (``session``) from what it learns (``train``)
    and removed three dropout options."""
    model, train = config.get("model"), config.get("train")
    if not isinstance(model, dict) or not isinstance(train, dict):
        raise CharLSTMError(f"{CONFIG_FILE} is malformed: it has no model or train table")
    model.setdefault("head_input", "last")  # written before the head could read every layer
    for name, off in _REMOVED_OPTIONS.items():
        value = model.pop(name, off)
        if value != off:
            raise CharLSTMError(
                f"the model was trained with {name.replace('_', '-')} {value}, an option this "
                "charlstm no longer has; load it with charlstm 0.1"
            )
    config["session"] = {key: train.pop(key) for key in _SESSION_SETTINGS if key in train}


def _version_2_to_3(config: dict[str, Any]) -> None:
    """Version 3 added fine-tuning: ``train.init_from`` and ``data.unknown`` and
    ``data.extend_vocab``, whose defaults (none, error, off) are what a version 2 run did, and
    a vocabulary whose appended symbols follow the sorted ones. Nothing to change."""


_MIGRATIONS: dict[int, Callable[[dict[str, Any]], None]] = {1: _version_1_to_2, 2: _version_2_to_3}


def read_resume_state(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimizer, RNG and data-position state saved beside a ``last/`` checkpoint."""
    directory = Path(directory)
    if not (directory / RESUME_JSON_FILE).exists():
        raise CharLSTMError(f"{directory} holds no resume state (only last/ checkpoints do)")
    tensors_path, json_path = directory / RESUME_TENSORS_FILE, directory / RESUME_JSON_FILE
    try:
        with _Pinned(directory) as pinned:
            document = _parse_json(
                pinned.read(CONFIG_FILE, MAX_JSON_BYTES), directory / CONFIG_FILE
            )
            data = pinned.read(
                RESUME_TENSORS_FILE,
                check=lambda head, size: _tensor_header(head, size, tensors_path),
                recorded=_recorded(document, RESUME_TENSORS_FILE, directory),
            )
            text = pinned.read(
                RESUME_JSON_FILE,
                MAX_JSON_BYTES,
                recorded=_recorded(document, RESUME_JSON_FILE, directory),
            )
    except _Replaced:
        raise CharLSTMError(
            f"{directory} is missing a file: the checkpoint is incomplete"
        ) from None
    return _parse_tensors(data, tensors_path), _parse_json(text, json_path)


def _recorded(document: dict[str, Any], name: str, directory: Path) -> dict[str, Any] | None:
    """The size and SHA-256 config.json records for file ``name`` (None: written before
    checkpoints recorded them)."""
    files = document.get(FILES_KEY)
    if files is None:
        return None
    entry = files.get(name) if isinstance(files, dict) else None
    if not (
        isinstance(entry, dict)
        and isinstance(entry.get("bytes"), int)
        and isinstance(entry.get("sha256"), str)
    ):
        raise CharLSTMError(f"{directory / CONFIG_FILE} is malformed: no valid record of {name}")
    return entry


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file, parsed as one whatever its first bytes; a file that is
    not one is refused, and named as a pickle if it looks like one, never unpickled."""
    path = Path(path)
    with _Pinned(path.parent) as pinned:
        try:
            data = pinned.read(path.name, check=lambda head, size: _tensor_header(head, size, path))
        except _Replaced:
            raise CharLSTMError(f"{path} is missing: the checkpoint is incomplete") from None
    return _parse_tensors(data, path)


def _parse_tensors(data: bytes, path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load(data)
    except Exception as e:  # safetensors raises its own error types for every kind of damage
        raise _not_safetensors(path, data, _first_line(e)) from None


def _tensor_header(head: bytes, size: int, path: Path) -> dict[str, Any]:
    """The header of a safetensors file of ``size`` bytes from its first bytes ``head``, its
    tensors' offsets checked to cover the file exactly, so nothing more is read in vain."""
    if size < 8:
        raise _not_safetensors(path, head, f"{size} bytes, shorter than any")
    (length,) = struct.unpack("<Q", head[:8])
    if length > min(MAX_HEADER_BYTES, size - 8) or len(head) < 8 + length:
        raise _not_safetensors(path, head, f"a header of {length:,} bytes in {size:,}")
    try:
        header = json.loads(head[8 : 8 + length].decode("utf-8"))
        tensors = {name: entry for name, entry in header.items() if name != "__metadata__"}
        ends = [int(entry["data_offsets"][1]) for entry in tensors.values()]
    except (ValueError, RecursionError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise _not_safetensors(path, head, f"unreadable header: {_first_line(e)}") from None
    if 8 + length + max(ends, default=0) != size:
        raise _not_safetensors(
            path, head, f"its header describes {max(ends, default=0):,} bytes of tensors, "
            f"the file holds {size - 8 - length:,}"
        )  # fmt: skip
    return tensors


def _not_safetensors(path: Path, data: bytes, why: str) -> CharLSTMError:
    if data.startswith(_PICKLE_MAGIC):
        return _pickle_refused(path)
    if not data:
        return CharLSTMError(f"{path} is empty: the checkpoint is damaged")
    return CharLSTMError(f"{path} is not a valid safetensors file ({why})")


def _pickle_refused(path: Path) -> CharLSTMError:
    return CharLSTMError(
        f"{path} is a pickle (torch.save) file, not safetensors; charlstm never unpickles "
        "files because that can run arbitrary code"
    )


def _check_weight_header(
    path: Path, header: dict[str, Any], config: RunConfig, vocab: Vocab
) -> None:
    """Refuse weights whose names, shapes or types do not fit config.json, before any tensor
    is read or any network is built."""
    mismatch = f"{path}: the weights do not match the configuration and vocabulary in config.json"
    if config.model.n_layers > len(header):  # each layer holds weights: bounds the work below
        raise CharLSTMError(f"{mismatch} ({config.model.n_layers} layers)")
    try:
        expected = weight_shapes(config.model, vocab.size)
    except (RuntimeError, TypeError, ValueError) as e:  # sizes too large to describe
        raise CharLSTMError(f"{mismatch} ({_first_line(e)})") from None
    for name in sorted(set(expected) - set(header))[:1]:
        raise CharLSTMError(f"{mismatch} (the file lacks weight {name})")
    for name in sorted(set(header) - set(expected))[:1]:
        raise CharLSTMError(f"{mismatch} (the configuration has no weight {name})")
    for name, shape in expected.items():
        entry = header[name]
        if entry.get("dtype") not in WEIGHT_DTYPES:
            raise CharLSTMError(
                f"{path}: weight {name} is of type {entry.get('dtype')}, not floating point"
            )
        if tuple(entry.get("shape", ())) != shape:
            raise CharLSTMError(
                f"{mismatch} (weight {name} has shape {entry.get('shape')}, the configuration "
                f"needs {list(shape)})"
            )


class _Pinned:
    """A directory opened once, whose files are then read from that same directory even if it
    is renamed meanwhile: a checkpoint read while a writer replaces it is read whole."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> _Pinned:
        try:
            self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except FileNotFoundError:
            raise _Replaced from None
        except OSError as e:
            raise CharLSTMError(f"cannot read {self.path}: {e.strerror or e}") from None
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)

    def read(
        self,
        name: str,
        limit: int | None = None,
        check: Callable[[bytes, int], object] | None = None,
        recorded: dict[str, Any] | None = None,
    ) -> bytes:
        """The bytes of a regular file in the directory of at most ``limit`` bytes. With
        ``check``, the file is a safetensors one: its header is read first and given to
        ``check`` with the file's size, which raises to stop before the tensors are read.
        ``recorded``: the size and SHA-256 config.json records for the file."""
        path = self.path / name
        try:
            # Non-blocking, so that a FIFO planted in a checkpoint cannot hang the open.
            fd = os.open(name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0), dir_fd=self.fd)
        except FileNotFoundError:
            raise _Replaced from None
        except OSError as e:
            raise CharLSTMError(f"cannot read {path}: {e.strerror or e}") from None
        try:
            status = os.fstat(fd)
            size = status.st_size
            if not stat.S_ISREG(status.st_mode):
                raise CharLSTMError(f"{path} is not a regular file: the checkpoint is damaged")
            if limit is not None and size > limit:
                raise CharLSTMError(
                    f"{path} holds {size:,} bytes, more than a checkpoint's {limit:,}: "
                    "the checkpoint is damaged"
                )
            with os.fdopen(fd, "rb", closefd=False) as f:
                head = b""
                if check is not None:
                    head = f.read(8)
                    length = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
                    head += f.read(min(length, MAX_HEADER_BYTES))
                    check(head, size)
                if recorded is not None and size != recorded["bytes"]:
                    raise CharLSTMError(
                        f"{path} holds {size:,} bytes, config.json records {recorded['bytes']:,}: "
                        "the checkpoint is damaged"
                    )
                data = head + f.read(size - len(head))
            if recorded is not None and hashlib.sha256(data).hexdigest() != recorded["sha256"]:
                raise CharLSTMError(
                    f"{path} differs from the checksum config.json records: the checkpoint is "
                    "damaged"
                )
            return data
        except OSError as e:
            raise CharLSTMError(f"cannot read {path}: {e.strerror or e}") from None
        finally:
            os.close(fd)


def _read_json(path: Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with _Pinned(path.parent) as pinned:
            data = pinned.read(path.name, MAX_JSON_BYTES)
    except _Replaced:
        raise CharLSTMError(f"{path} is missing: the checkpoint is incomplete") from None
    return _parse_json(data, path)


def _parse_json(data: bytes, path: Path) -> dict[str, Any]:
    try:
        value = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, too deep, too many digits
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
