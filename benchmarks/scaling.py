"""Scaling with torchrun: the same training job on 1 process and on N processes of one machine.

    python benchmarks/scaling.py [--processes 1 2] [--budget 60s] [--device cpu]

Each job trains the default model on Tiny Shakespeare for the same wall-clock budget, one after
the other: 1 process as a plain ``charlstm train`` (all cores, its own threading), N > 1 under
``torchrun --standalone --nproc-per-node N`` (cores / N threads each on CPU, one GPU each on
CUDA). Prints characters per second of the whole job (the global batch) and the best validation
loss, each job's speed as a ratio to the single process's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import corpus_path, machine, print_table


def job(processes: int, device: str, budget: str, out: Path) -> dict[str, float]:
    """Train one job and read back what its metrics log says."""
    train = ["train", "--data", str(corpus_path()), "--out", str(out), "--device", device,
             "--time-budget", budget, "--sample-length", "0"]  # fmt: skip
    env = dict(os.environ)
    if processes == 1:
        command = [sys.executable, "-m", "charlstm", *train]
    else:
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
        command = [sys.executable, *launcher, "-m", "charlstm", *train]
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    subprocess.run(command, check=True, env=env, stderr=subprocess.DEVNULL)
    lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    speeds = [r["chars_per_s"] for r in records if r["kind"] == "train"][1:]  # skip warm-up
    return {
        "steps": max(r["step"] for r in records),
        "chars_per_s": sum(speeds) / len(speeds),
        "best": min(r["loss"] for r in records if r["kind"] == "eval"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--budget", default="60s", help="wall-clock budget of each job")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for n in args.processes:
            results[n] = job(n, args.device, args.budget, Path(work) / f"p{n}")
    base = results[args.processes[0]]["chars_per_s"]
    print(machine())
    print(f"default model, Tiny Shakespeare, {args.budget} per job on {args.device}")
    print_table(
        ["processes", "steps", "characters/s", "best validation (nats)", "speed vs first"],
        [[n, int(r["steps"]), r["chars_per_s"], r["best"], f"{r['chars_per_s'] / base:.2f}x"]
         for n, r in results.items()],
    )  # fmt: skip


if __name__ == "__main__":
    main()
