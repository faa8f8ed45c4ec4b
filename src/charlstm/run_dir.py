"""Run directories: which one a run writes, whether a fresh run may start there, what it may
resume from, and the checks that leave a user's files alone when a run cannot start."""

from __future__ import annotations

import dataclasses
import os
import shutil
from datetime import datetime
from pathlib import Path

from charlstm.checkpoint import readable_checkpoint
from charlstm.config import RunConfig, SessionConfig
from charlstm.data import corpus_name
from charlstm.errors import CharLSTMError
from charlstm.metrics_log import METRICS_FILE
from charlstm.plot import CURVES_FILE
from charlstm.runlock import LOCK_FILE

# What a run directory may hold before its first last/ checkpoint (best/ and the curves come first).
PRE_CHECKPOINT_FILES = frozenset({METRICS_FILE, CURVES_FILE, "best"})


def find_resume_checkpoint(sc: SessionConfig) -> Path | None:
    """The ``last/`` checkpoint that ``--resume`` points at, or None for a fresh run.

    Changes nothing on disk: a checkpoint that a crash left set aside counts, and the run
    puts it back once it holds the run directory's lock."""
    if not sc.resume:
        return None
    if sc.resume == "auto":
        if not sc.out:
            raise CharLSTMError("--resume auto needs --out RUN_DIR to know which run to continue")
        last = Path(sc.out).expanduser() / "last"
        return last if readable_checkpoint(last) else None
    last = Path(sc.resume).expanduser() / "last"
    if not readable_checkpoint(last):
        raise CharLSTMError(
            f"--resume {sc.resume}: not a run directory with a last/ checkpoint to continue"
        )
    return last


def run_directory(config: RunConfig) -> Path:
    """The run directory a run writes: the one it resumes, --out, or a new name."""
    sc = config.session
    resumes = find_resume_checkpoint(sc) is not None  # its errors before anything is created
    if sc.resume and sc.resume != "auto":
        run_dir = Path(sc.resume).expanduser()
        if not run_dir.is_dir():
            raise CharLSTMError(
                f"--resume {sc.resume}: not a run directory with a last/ checkpoint to continue"
            )
    else:
        run_dir = Path(sc.out).expanduser() if sc.out else _default_run_dir(config)
    if run_dir.is_symlink():  # a run must not clear or replace what a link points into
        raise CharLSTMError(
            f"run directory {run_dir} is a symbolic link; give the directory itself, "
            f"{run_dir.resolve()}"
        )
    if run_dir.exists() and not run_dir.is_dir():
        raise CharLSTMError(f"--out {run_dir} is a file, not a directory")
    if not resumes:  # and again once locked, in case another run started there meanwhile
        check_new_run_dir(config, run_dir)
    return run_dir


def check_new_run_dir(config: RunConfig, run_dir: Path) -> None:
    """Refuse to start a fresh run in a directory that holds a run, unless --overwrite."""
    sc = config.session
    # What a run leaves that stopped before its first checkpoint: nothing to continue, so the
    # same command starts it again (--resume auto also restarts one that saved only best/).
    restartable = PRE_CHECKPOINT_FILES if sc.resume == "auto" else PRE_CHECKPOINT_FILES - {"best"}
    if all(entry.name in restartable or ".tmp-" in entry.name for entry in _entries(run_dir)):
        return
    if not sc.overwrite:
        raise CharLSTMError(
            f"run directory {run_dir} already exists; use --resume {run_dir} to continue it "
            "or --overwrite to replace it"
        )


def first_missing(path: Path) -> Path | None:
    """The outermost of ``path`` and its parents that does not exist yet, or None."""
    missing = None
    for place in (path, *path.absolute().parents):
        if place.exists():
            break
        missing = place
    return missing


def wrote_anything(run_dir: Path) -> bool:
    """True once a run has written something worth keeping: a checkpoint or a log line."""
    return any(entry.is_dir() or entry.stat().st_size for entry in _entries(run_dir))


def _entries(run_dir: Path) -> list[Path]:
    """What ``run_dir`` holds besides the writer's lock."""
    if not run_dir.is_dir():
        return []
    return [entry for entry in run_dir.iterdir() if entry.name != LOCK_FILE]


def prepare_run_dir(run_dir: Path) -> None:
    """Empty the directory of a fresh run (what :func:`check_new_run_dir` let it replace),
    keeping the lock this run holds in it, and check that the run can write there."""
    for entry in _entries(run_dir):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    if not os.access(run_dir, os.W_OK):
        raise CharLSTMError(f"run directory {run_dir} is not writable")


def _default_run_dir(config: RunConfig) -> Path:
    name = corpus_name(config.data.data)
    return Path("runs") / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"


def check_resume_compatible(saved: RunConfig, wanted: RunConfig) -> list[str]:
    """Refuse a resume that would change what is being learnt (the model, data or train
    settings); return the changes to how it is run, to be reported."""
    refused = saved.changes_to_what_is_learnt(wanted)
    if refused:
        raise CharLSTMError(
            "cannot resume with different settings: " + ", ".join(refused)
            + "; drop those flags or start a new run"
        )  # fmt: skip
    old, new = saved.session, wanted.session
    return [
        f"{f.name} ({getattr(old, f.name)!r} -> {getattr(new, f.name)!r})"
        for f in dataclasses.fields(old)
        if f.name not in _WHERE and getattr(old, f.name) != getattr(new, f.name)
    ]


# The settings that say which directory a run writes: a resumed run names it anew each time.
_WHERE = ("out", "resume", "overwrite")
