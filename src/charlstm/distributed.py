"""Training on many processes with torchrun: the process group, each process's share of the
work, and the few collective operations the trainer needs.

``torchrun --nproc-per-node N -m charlstm train ...`` (on one machine or several) starts N copies
of ``charlstm train``. Each reads its place from torchrun's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``; there is no rank flag) and together they train one model
with DistributedDataParallel. A plain run, without torchrun or with a world of one process,
never touches ``torch.distributed``: :data:`SINGLE` answers every call locally.

The process group uses gloo for CPU tensors and, where CUDA is present, NCCL for GPU tensors:
the model's gradients and hidden states go over whichever matches the training device, while
the small collectives that steer the run (flags, a few sums, error messages, RNG states) use
CPU tensors and so gloo.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from charlstm.errors import CharLSTMError

if TYPE_CHECKING:  # torch loads only once a job needs it: the CLI's errors come before that
    import torch

T = TypeVar("T")


class PeerFailed(CharLSTMError):
    """Raised in every process when another process of the job failed at an agreed point.

    Its message is that process's own error line, so rank 0 can print it for the whole job.
    """


class PeerLost(CharLSTMError):
    """A collective operation failed because another process of the job stopped or died."""


def launched() -> bool:
    """True in a process that torchrun started as one of two or more."""
    try:
        return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def is_main_process() -> bool:
    """False only in torchrun processes of rank 1 and above, which leave talking to rank 0."""
    return not launched() or os.environ.get("RANK") == "0"


class World:
    """This process's place in the job (rank 0 of 1 for a plain run) and its collectives.

    Every collective method must be called by all processes in the same order; with one
    process each is a plain local computation.
    """

    def __init__(self, rank: int = 0, size: int = 1, local_rank: int = 0, local_size: int = 1):
        self.rank, self.size = rank, size
        self.local_rank, self.local_size = local_rank, local_size

    def __repr__(self) -> str:
        return f"World(rank={self.rank}, size={self.size}, local_rank={self.local_rank})"

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that prints, logs and writes checkpoints."""
        return self.rank == 0

    # ---- this process's share ------------------------------------------------------------

    def check_batch(self, batch_size: int) -> None:
        """--batch-size is the global batch: it must split evenly over the processes."""
        if batch_size % self.size:
            lower = batch_size // self.size * self.size
            options = " or ".join(str(n) for n in (lower, lower + self.size) if n > 0)
            raise CharLSTMError(
                f"--batch-size {batch_size} is the global batch and must split evenly over the "
                f"{self.size} processes of this job: use a multiple of {self.size} ({options})"
            )

    def rows(self, batch_size: int) -> slice:
        """This process's streams of a global batch: a contiguous block of ``batch_size/size``."""
        share = batch_size // self.size
        return slice(self.rank * share, (self.rank + 1) * share)

    def place(self, device: torch.device) -> torch.device:
        """The device of this process: GPU ``LOCAL_RANK`` when training on CUDA."""
        if self.size == 1:
            return device
        if device.type == "mps":
            raise CharLSTMError("torchrun trains on CUDA GPUs or CPUs, not MPS: add --device cpu")
        if device.type == "cuda":
            import torch

            count = torch.cuda.device_count()
            if self.local_rank >= count:
                raise CharLSTMError(
                    f"this machine runs {self.local_size} processes but has {count} CUDA GPU(s): "
                    f"use --nproc-per-node {count} (one process per GPU) or --device cpu"
                )
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        return device

    def wrap(self, net: torch.nn.Module) -> torch.nn.Module | None:
        """``net`` in DistributedDataParallel, or None for a single process."""
        if self.size == 1:
            return None
        from torch.nn.parallel import DistributedDataParallel

        device = next(net.parameters()).device
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(net, device_ids=ids)

    # ---- collectives -----------------------------------------------------------------------

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums over all processes (float64)."""
        return self._reduce(values, "SUM")

    def max(self, values: Sequence[float]) -> list[float]:
        """Element-wise maxima over all processes."""
        return self._reduce(values, "MAX")

    def _reduce(self, values: Sequence[float], op: str) -> list[float]:
        if self.size == 1:
            return list(values)
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64)
        dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op))
        return tensor.tolist()

    def gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every process's ``tensor`` (same shape everywhere), in rank order, on every process."""
        if self.size == 1:
            return [tensor]
        import torch
        import torch.distributed as dist

        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor)
        return parts

    def broadcast_text(self, text: str, src: int = 0) -> str:
        """Process ``src``'s ``text`` on every process (others pass anything)."""
        if self.size == 1:
            return text
        import torch
        import torch.distributed as dist

        data = text.encode() if self.rank == src else b""
        length = torch.tensor([len(data)], dtype=torch.int64)
        dist.broadcast(length, src)
        buffer = torch.tensor(list(data), dtype=torch.uint8)
        if self.rank != src:
            buffer = torch.empty(int(length), dtype=torch.uint8)
        if int(length):
            dist.broadcast(buffer, src)
        return bytes(buffer.tolist()).decode()

    # ---- doing things once, and failing together --------------------------------------------

    def local_main_first(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn`` on each machine's local rank 0, then on the others (for per-machine caches)."""
        return self._in_turn(self.local_rank == 0, fn, *args, **kwargs)

    def on_main(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """``fn`` on rank 0 only; the others wait for it and fail with it."""
        result = None
        error = None
        if self.is_main:
            try:
                result = fn(*args, **kwargs)
            except BaseException as e:  # shared with the others, then raised again
                error = e
        self.agree(error)
        return result

    def from_main(self, fn: Callable[[], str]) -> str:
        """A text computed by ``fn`` on rank 0, on every process."""
        return self.broadcast_text(self.on_main(fn) or "")

    def _in_turn(self, first: bool, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self.size == 1:
            return fn(*args, **kwargs)
        result: Any = None
        for turn in (True, False):
            error = None
            if first == turn:
                try:
                    result = fn(*args, **kwargs)
                except BaseException as e:
                    error = e
            self.agree(error)
        return result

    def agree(self, error: BaseException | None) -> None:
        """A barrier that fails everywhere if it failed anywhere.

        A process that brings an error raises it again; the others raise :class:`PeerFailed`
        with the message of the lowest-ranked failed process.
        """
        if self.size == 1:
            if error is not None:
                raise error
            return
        import torch
        import torch.distributed as dist

        flag = torch.tensor([self.rank if error is not None else self.size], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        failed = int(flag)
        if failed == self.size:
            return
        text = self.broadcast_text(_describe(error) if self.rank == failed else "", src=failed)
        if error is not None:
            raise error
        raise PeerFailed(text if failed == 0 else f"process {failed}: {text}")

    @contextlib.contextmanager
    def failures(self) -> Iterator[None]:
        """Turn a collective broken by a process that died into one :class:`PeerLost` line."""
        try:
            yield
        except RuntimeError as e:
            if self.size > 1 and _lost_peer(e):
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise PeerLost(
                    f"lost contact with another process of this job ({first[:200]}); its own "
                    "output says why it stopped. The last checkpoint is intact: run the same "
                    "command with --resume auto (or --resume RUN_DIR) to continue"
                ) from e
            raise


SINGLE = World()
_world: World | None = None
_owned = False  # whether charlstm initialised the process group, and so should destroy it


def world() -> World:
    """This process's :class:`World`; under torchrun, joins the process group the first time."""
    global _world, _owned
    if _world is not None:
        return _world
    if not launched():
        return SINGLE
    import torch.distributed as dist

    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(size)))
    if not dist.is_available():
        raise CharLSTMError("this PyTorch build has no torch.distributed: run without torchrun")
    if not dist.is_initialized():
        if local_size == size:
            _prefer_loopback()  # one machine: nothing needs to listen beyond it
        dist.init_process_group(_backend())
        _owned = True
    elif (dist.get_rank(), dist.get_world_size()) != (rank, size):
        raise CharLSTMError(
            f"the process group (rank {dist.get_rank()} of {dist.get_world_size()}) does not "
            f"match torchrun's RANK={rank} WORLD_SIZE={size}"
        )
    _world = World(rank, size, local_rank, local_size)
    return _world


def shutdown() -> None:
    """Leave the process group if :func:`world` joined it (after a clean end of the job)."""
    global _world, _owned
    if _owned:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    _world, _owned = None, False


def report(line: str) -> None:
    """Print the line that says why this process fails; under torchrun, rank 0 speaks for all.

    torchrun stops every process as soon as the first one exits, so the others wait (a few
    seconds at most) until rank 0 has printed before they exit; one that does not hear from
    rank 0 in time (rank 0 failed differently, or not at all) prints its own line.
    """
    if not launched():
        print(line, file=sys.stderr)
        return
    store = _store()
    if is_main_process():
        print(line, file=sys.stderr, flush=True)
        if store is not None:
            with contextlib.suppress(Exception):
                store.set(_REPORTED, "1")
        return
    if store is None:  # failed before joining the process group: a usage error, as rank 0's
        time.sleep(1.0)
        return
    try:
        store.wait([_REPORTED], datetime.timedelta(seconds=_REPORT_WAIT))
    except Exception:
        print(f"{line} (process {os.environ.get('RANK')})", file=sys.stderr, flush=True)


_REPORTED = "charlstm/rank0-reported"
_REPORT_WAIT = 10.0


def _store() -> Any:
    if _world is None:
        return None
    try:
        from torch.distributed import distributed_c10d

        return distributed_c10d._get_default_store()
    except Exception:
        return None


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The torch seed of process ``rank``'s dropout: ``seed + rank`` at the start of a run,
    mixed with the step when a resumed run has no saved generator state for that rank."""
    if step == 0:
        return seed + rank
    return (seed + rank * 1_000_003 + step * 7_919) % (1 << 63)


def _backend() -> str:
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available() and dist.is_nccl_available():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def _prefer_loopback() -> None:
    # gloo otherwise binds to the address the host name resolves to, which may be a public
    # interface (or one that does not route back to this machine at all).
    if "GLOO_SOCKET_IFNAME" in os.environ:
        return
    try:
        names = [name for _, name in socket.if_nameindex()]
    except (OSError, AttributeError):
        return
    loopback = next((name for name in names if name in ("lo", "lo0")), None)
    if loopback:
        os.environ["GLOO_SOCKET_IFNAME"] = loopback


def _lost_peer(error: RuntimeError) -> bool:
    import torch.distributed as dist

    text = str(error).lower()
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(error, dist_error):
        return True
    return "gloo" in text or "nccl" in text or "connection reset" in text


def _describe(error: BaseException | None) -> str:
    if error is None:
        return ""
    if isinstance(error, CharLSTMError):
        return str(error)
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    return f"{type(error).__name__}: {error}"
