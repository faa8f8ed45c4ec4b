"""Which device to run on and which arithmetic to train in."""

from __future__ import annotations

import ctypes
import platform

import torch

from charlstm.errors import CharLSTMError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple's MPS, then the CPU; a named device must be present."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CharLSTMError("--device cuda was asked for but PyTorch sees no CUDA GPU")
    if name == "mps" and not _mps_available():
        raise CharLSTMError("--device mps was asked for but this PyTorch has no MPS device")
    if name not in ("cpu", "cuda", "mps"):
        raise CharLSTMError(f"unknown device {name!r}: use auto, cpu, cuda or mps")
    return torch.device(name)


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for ``--precision`` on ``device``, or None for plain fp32."""
    if precision == "fp32":
        return None
    if precision == "fp16":
        if device.type != "cuda":
            raise CharLSTMError("--precision fp16 needs a CUDA device; use bf16 or fp32")
        return torch.float16
    bf16_ok = _bf16_supported(device)
    if precision == "bf16":
        if not bf16_ok:
            raise CharLSTMError(f"--precision bf16 is not supported on this {device.type} device")
        return torch.bfloat16
    return torch.bfloat16 if bf16_ok else None


def synchronize(device: torch.device) -> None:
    """Wait until the work queued on ``device`` is done (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def keep_freed_memory() -> None:
    """Ask glibc to keep freed memory in the process instead of returning it to the system.

    A training step allocates and frees the same tens of megabytes every time; by default glibc
    serves blocks that large with mmap and unmaps them on free, so every step page-faults them
    in afresh (a fifth of a CPU run's time went to the kernel). No-op off glibc.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, (1 << 31) - 1)


def _bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        # Only CPUs with native bf16 instructions gain from it; elsewhere it is emulated.
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def _mps_available() -> bool:
    return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
