"""A fork server for the command-line tests: ``charlstm ARGS`` in processes forked from one that
has imported PyTorch and the package already.

Most of a short command's time goes on starting Python and importing PyTorch, and the tests
run a great many short commands. Each still runs in a process of its own, with its own
standard streams (pipes or /dev/null, as :func:`subprocess.run` gives), environment, working
directory, signals and exit status, and ends as ``python -m charlstm`` ends. What it shares is
the interpreter's start-up: a server is started per value of ``OMP_NUM_THREADS`` (which
OpenMP reads when it loads), and tests of start-up itself (the console script, settings made
before PyTorch loads) start a fresh interpreter instead.

Run as a script, this file is the server: ``python cli_forkserver.py SOCKET``. It serves until
the process that started it is gone.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

# What the commands import, those that are installed (torch._dynamo: every optimizer imports
# it). The server imports only: a process forked after OpenMP started its threads can hang in
# its first parallel region.
PRELOADED = ("torch", "torch._dynamo", "matplotlib.figure", "onnx", "charlstm.cli",
             "charlstm.training", "charlstm.lm", "charlstm.evaluation")  # fmt: skip
_POLL_SECONDS = 0.005  # how soon a finished command's status is sent


# ---- the server -------------------------------------------------------------------------------


def serve(path: str) -> None:
    """Accept one request per connection on the Unix socket ``path``: a JSON object (``args``,
    ``env``, ``cwd``) with the command's stdin, stdout and stderr; answer the child's pid, then
    its exit status (as ``subprocess`` gives it) once it has ended."""
    for name in PRELOADED:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    print("ready", flush=True)
    parent, running = os.getppid(), {}
    with selectors.DefaultSelector() as selector:
        selector.register(listener, selectors.EVENT_READ)
        while os.getppid() == parent:  # a server whose test process is gone ends
            if selector.select(_POLL_SECONDS):
                connection, _ = listener.accept()
                pid = _fork_command(connection, listener)
                running[pid] = connection
            _report_ended(running)


def _fork_command(connection: socket.socket, listener: socket.socket) -> int:
    message, fds, _, _ = socket.recv_fds(connection, 1 << 20, 3)
    request = json.loads(message)
    pid = os.fork()
    if pid == 0:
        listener.close()
        connection.close()
        _become_command(request, fds)  # does not return: the command's exit ends the child
    for fd in fds:
        os.close(fd)
    connection.sendall(f"{pid}\n".encode())
    return pid


def _become_command(request: dict, fds: Sequence[int]) -> None:
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    # Standard streams as Python makes them for pipes and files: UTF-8 (PYTHONIOENCODING),
    # stdout block-buffered, stderr line-buffered and never failing on a character.
    sys.stdin = sys.__stdin__ = _stream(0, "r", "strict", line_buffering=False)
    sys.stdout = sys.__stdout__ = _stream(1, "w", "strict", line_buffering=False)
    sys.stderr = sys.__stderr__ = _stream(2, "w", "backslashreplace", line_buffering=True)
    sys.argv = ["-m", *request["args"]]
    os._exit(_run_as_main())


def _run_as_main() -> int:
    """Run ``python -m charlstm`` and end as the interpreter would (exit status, atexit, the
    final flush), without tearing down every module: that alone takes most of a second once
    PyTorch is loaded, and nothing a command does shows it."""
    import atexit
    import runpy
    import signal
    import traceback

    try:
        runpy.run_module("charlstm", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = _exit_status(e.code)
    except KeyboardInterrupt:
        traceback.print_exc()
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # as Python ends: killed by the signal
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception as e:
            print(f"Exception ignored in: {stream!r}\n{type(e).__name__}: {e}", file=sys.__stderr__)
            code = 120
    return code


def _exit_status(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _stream(fd: int, mode: str, errors: str, line_buffering: bool) -> io.TextIOWrapper:
    raw = io.FileIO(fd, mode, closefd=False)
    buffered = io.BufferedReader(raw) if mode == "r" else io.BufferedWriter(raw)
    return io.TextIOWrapper(buffered, encoding="utf-8", errors=errors,
                            line_buffering=line_buffering)  # fmt: skip


def _report_ended(running: dict[int, socket.socket]) -> None:
    while running:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            return
        connection = running.pop(pid)
        with contextlib.suppress(OSError), connection:  # the test may have given up on it
            connection.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())


# ---- the client -------------------------------------------------------------------------------


class ForkServer:
    """A running server (see the module's docstring) for commands on ``threads`` OpenMP
    threads (None: PyTorch's default)."""

    def __init__(self, threads: int | None) -> None:
        self.folder = tempfile.mkdtemp(prefix="charlstm-cli-")
        self.path = os.path.join(self.folder, "socket")
        env = dict(os.environ, PYTHONIOENCODING="utf-8")
        env.pop("PYTHONUNBUFFERED", None)
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        self.process = subprocess.Popen(
            [sys.executable, __file__, self.path], env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.process.stdout is not None
        if self.process.stdout.readline() != "ready\n":
            raise RuntimeError(f"the CLI fork server did not start (exit {self.process.wait()})")

    def run(
        self, args: Sequence[str], env: dict[str, str], cwd: Path, input: str | None,
        timeout: float,
    ) -> subprocess.CompletedProcess:  # fmt: skip
        """``charlstm ARGS`` in a forked process, as :func:`subprocess.run` with
        ``capture_output=True, text=True`` would give it."""
        deadline = time.monotonic() + timeout
        out_read, out_write = os.pipe()
        err_read, err_write = os.pipe()
        if input is None:
            in_read, in_write = os.open(os.devnull, os.O_RDONLY), -1
        else:
            in_read, in_write = os.pipe()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.connect(self.path)
            request = json.dumps({"args": list(args), "env": env, "cwd": str(cwd)})
            socket.send_fds(connection, [request.encode()], [in_read, out_write, err_write])
            for fd in (in_read, out_write, err_write):
                os.close(fd)
            answers = connection.makefile("r")
            pid = int(answers.readline())
            if input is not None:
                threading.Thread(target=_write_all, args=(in_write, input), daemon=True).start()
            try:
                stdout, stderr = _read_both(out_read, err_read, deadline)
                connection.settimeout(max(deadline - time.monotonic(), 0.001))
                code = int(answers.readline())
            except TimeoutError as e:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
                raise subprocess.TimeoutExpired(["charlstm", *args], timeout) from e
            finally:
                for fd in (out_read, err_read):
                    with contextlib.suppress(OSError):
                        os.close(fd)
        return subprocess.CompletedProcess(["charlstm", *args], code, stdout, stderr)

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


def _write_all(fd: int, text: str) -> None:
    with contextlib.suppress(BrokenPipeError), open(fd, "w", encoding="utf-8") as pipe:
        pipe.write(text)


def _read_both(out_fd: int, err_fd: int, deadline: float) -> tuple[str, str]:
    """Both pipes read to their end (raises TimeoutError at ``deadline``), decoded with
    universal newlines as ``text=True`` does."""
    chunks: dict[int, list[bytes]] = {out_fd: [], err_fd: []}
    with selectors.DefaultSelector() as selector:
        for fd in chunks:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            for key, _ in selector.select(left):
                data = os.read(key.fd, 1 << 16)
                if data:
                    chunks[key.fd].append(data)
                else:
                    selector.unregister(key.fd)
    return tuple(  # type: ignore[return-value]
        io.TextIOWrapper(io.BytesIO(b"".join(chunks[fd])), encoding="utf-8").read()
        for fd in (out_fd, err_fd)
    )


if __name__ == "__main__":
    serve(sys.argv[1])
