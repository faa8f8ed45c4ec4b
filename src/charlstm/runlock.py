"""One writer per run directory: an exclusive lock that a training run holds for its life.

The lock is ``flock`` on ``.lock`` inside the run directory, so the kernel releases it when its
holder exits in any way, kill -9 included; the file holds the holder's process id to name it.
Readers (sample, eval, inspect) take no lock: they never change a run directory.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from charlstm.errors import CharLSTMError

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there go unguarded
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".lock"


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir``'s writer lock for the duration, creating the directory if needed;
    refuse with one line naming the holder if another process holds it."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise CharLSTMError(f"cannot create run directory {run_dir}: {e.strerror or e}") from None
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise CharLSTMError(
                    f"{run_dir} is in use by another training run (pid {_holder(fd)}); wait "
                    "for it to finish or stop it, or give another --out"
                ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def _holder(fd: int) -> str:
    """The process id the holder wrote, or 'unknown' while it has not written it yet."""
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return text if text.isdigit() else "unknown"
