"""Shared by the benchmark scripts: the corpus, the machine's description, tables, peak FLOP/s."""

from __future__ import annotations

import multiprocessing
import os
import platform
import resource
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

SHARED_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def corpus_path() -> Path:
    """Tiny Shakespeare from ../shared (or $CHARLSTM_BENCH_CORPUS)."""
    path = Path(os.environ.get("CHARLSTM_BENCH_CORPUS", SHARED_CORPUS))
    if not path.exists():
        raise SystemExit(f"benchmark corpus not found at {path}; set CHARLSTM_BENCH_CORPUS")
    return path


def encoded_corpus() -> tuple[torch.Tensor, torch.Tensor, int]:
    """(train ids, validation ids, vocabulary size), the last 10% held out, as int64."""
    text = corpus_path().read_text(encoding="utf-8")
    chars = sorted(set(text))
    table = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([table[c] for c in text], dtype=torch.long)
    split = len(ids) - round(len(ids) * 0.1)
    return ids[:split], ids[split:], len(chars)


def in_fresh_process(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` run in a new interpreter, for a baseline that nothing charlstm sets in
    its own process reaches (the benchmark's own process may have OMP_WAIT_POLICY set: the new
    process gets OpenMP's default)."""
    context = multiprocessing.get_context("spawn")
    policy = os.environ.pop("OMP_WAIT_POLICY", None)
    try:
        with ProcessPoolExecutor(1, mp_context=context) as pool:
            return pool.submit(function, *args).result()
    finally:
        if policy is not None:
            os.environ["OMP_WAIT_POLICY"] = policy


def machine() -> str:
    """One line naming the CPU, core count, torch build and threads."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, native bf16: {'yes' if bf16 else 'no'}"
    )


def matmul_peak_gflops(dtype: torch.dtype, size: int = 2048, seconds: float = 3.0) -> float:
    """GFLOP/s of the fastest of many large square matmuls: the practical ceiling for dense
    compute on this machine (the fastest one, so that a busy moment does not lower it)."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    a @ b
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        began = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - began)
    return 2 * size**3 / best / 1e9


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def print_table(headers: list[str], rows: list[list[object]]) -> None:
    """A Markdown table, ready to paste into docs/benchmarks.md."""
    cells = [[_cell(v) for v in row] for row in rows]
    print("| " + " | ".join(headers) + " |")
    print("| " + " | ".join("---" for _ in headers) + " |")
    for row in cells:
        print("| " + " | ".join(row) + " |")


def _cell(value: object) -> str:
    if isinstance(value, float | np.floating):
        return f"{value:,.4g}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
