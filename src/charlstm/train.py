"""The training recipe: data, model, AdamW with warm-up and cosine decay, evaluation, checkpoints.

``train(config)`` runs one run directory from start (or from its last checkpoint) to a stopping
limit, writing ``metrics.jsonl``, ``best/`` and ``last/`` as it goes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from charlstm.batching import IGNORE, make_batcher
from charlstm.checkpoint import (
    read_checkpoint,
    read_resume_state,
    recover_checkpoint,
    write_checkpoint,
)
from charlstm.config import RunConfig, TrainConfig
from charlstm.data import Corpus, load_corpus
from charlstm.device import autocast_dtype, keep_freed_memory, resolve_device
from charlstm.errors import CharLSTMError, TrainingInterrupted
from charlstm.evaluate import EvalResult, evaluate_ids
from charlstm.lm import CharLM
from charlstm.model import CharRNN, State, detach_state
from charlstm.shards import Shards, shard_count

METRICS_FILE = "metrics.jsonl"
# What a run directory may hold before its first last/ checkpoint (best/ is written just before).
PRE_CHECKPOINT_FILES = frozenset({METRICS_FILE, "best"})
# Settings a resumed run may change: they steer when to stop and what to log, not what is learnt.
RESUMABLE_CHANGES = frozenset(
    {"max_steps", "max_epochs", "time_budget", "eval_every", "log_every", "device", "out",
     "resume", "overwrite", "sample_length", "max_bad_steps"}
)  # fmt: skip


@dataclass
class TrainResult:
    """What a finished run returns."""

    run_dir: Path
    steps: int
    elapsed: float  # seconds, over all sessions of the run
    best_val: EvalResult | None
    model: CharLM = field(repr=False)


def train(config: RunConfig, *, progress: bool = True) -> TrainResult:
    """Train a model as ``config`` says; returns the best checkpoint loaded as a CharLM.

    SIGINT (Ctrl-C) and SIGTERM let the current step finish, save ``last/`` and raise
    :class:`~charlstm.errors.TrainingInterrupted`; a second Ctrl-C stops at once.
    """
    started = time.monotonic()
    config.validate()
    resume_from = find_resume_checkpoint(config.train)
    run_dir = resume_from.parent if resume_from else _new_run_dir(config)
    saved = read_checkpoint(resume_from) if resume_from else None
    if saved is not None:
        changed = _check_resume_compatible(saved.config, config)
        if changed:
            print(f"resuming with changed settings: {', '.join(changed)}", file=sys.stderr)
    device = resolve_device(config.train.device)
    if device.type == "cpu":
        keep_freed_memory()
    corpus = load_corpus(config.data, vocab=saved.vocab if saved else None)
    if saved is not None and saved.info.get("corpus", {}).get("fingerprint") != corpus.fingerprint:
        raise CharLSTMError(
            f"the training text differs from the one {run_dir} was trained on; resume with the "
            "same --data, or start a new run"
        )
    torch.manual_seed(config.train.seed)
    net = CharRNN(config.model, corpus.vocab.size).to(device)
    trainer = _Trainer(config, corpus, net, device, run_dir, progress, started)
    if resume_from is None:
        # Only now, with every input checked, may an --overwrite'd old run be removed.
        _create_run_dir(run_dir, replace=config.train.overwrite or config.train.resume == "auto")
    if saved is not None and resume_from is not None:
        trainer.restore(resume_from, saved.weights)
    try:
        with _stop_signals(trainer):
            return trainer.run()
    finally:
        trainer.shards.close()


@contextlib.contextmanager
def _stop_signals(trainer: _Trainer) -> Iterator[None]:
    """Turn SIGINT / SIGTERM into a request to stop after the current step."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return

    def request_stop(signum: int, frame: Any) -> None:
        if trainer.stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        trainer.stop_signal = signum

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _Trainer:
    """The state of one training session and the loop that advances it."""

    def __init__(
        self,
        config: RunConfig,
        corpus: Corpus,
        net: CharRNN,
        device: torch.device,
        run_dir: Path,
        progress: bool,
        started: float,
    ) -> None:
        self.config, self.tc = config, config.train
        self.corpus, self.net, self.device, self.run_dir = corpus, net, device, run_dir
        self.progress, self.started = progress, started
        self.optimizer = _make_optimizer(net, self.tc)
        self.params = [p for p in net.parameters() if p.requires_grad]
        self.shards = Shards(shard_count(device, self.tc.batch_size, config.model.dropout))
        self.autocast = autocast_dtype(device, self.tc.precision)
        # fp16 needs loss scaling to keep small gradients representable; bf16 and fp32 do not.
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.autocast == torch.float16)
        self.batcher = make_batcher(
            self.tc.batching, corpus.train, self.tc.batch_size, self.tc.seq_len, self.tc.seed
        )
        self.budget = self.tc.budget_seconds()
        self.step = 0
        self.state: State | None = None
        self.best_val: float | None = None
        self.elapsed_before = 0.0  # seconds spent by earlier sessions of a resumed run
        self.last_eval_seconds: float | None = None
        self.bad_steps = 0
        self.stop_signal: int | None = None  # set by SIGINT / SIGTERM: stop after this step
        self.window_loss, self.window_steps, self.window_start = 0.0, 0, 0.0

    # ---- the loop -------------------------------------------------------------------------

    def run(self) -> TrainResult:
        """Train until a limit is reached, evaluating and checkpointing on the way."""
        self._announce()
        bar = tqdm(
            total=self.tc.max_steps,
            initial=self.step,
            unit="step",
            disable=not self.progress,
            file=sys.stderr,
            dynamic_ncols=True,
            mininterval=0.1 if sys.stderr.isatty() else 10.0,  # keep logs of batch jobs short
        )
        last_eval_step = self.step if self.step > 0 else -1
        self.window_start = self.elapsed()
        with bar, self._open_metrics() as metrics:
            while not self._should_stop():
                loss = self._train_step()
                if loss is None:
                    continue  # a skipped non-finite step: nothing learnt, nothing to log
                # Kept on self (and in resume state) so a resumed run logs the same averages.
                self.window_loss, self.window_steps = self.window_loss + loss, self.window_steps + 1
                bar.update(1)
                if self.step % self.tc.log_every == 0:
                    self._log_train(metrics, bar)
                if self.step % self.tc.eval_every == 0:
                    self._evaluate_and_save(metrics, bar)
                    last_eval_step = self.step
                    self.window_start = self.elapsed()  # keep evaluation out of the speed figure
            if self.stop_signal is not None:
                self._save(self.run_dir / "last", self._info(None), with_resume_state=True)
                raise TrainingInterrupted(self.stop_signal, self.run_dir, self.step)
            if last_eval_step != self.step:
                self._evaluate_and_save(metrics, bar)
        total = self.elapsed()
        best = read_checkpoint(self.run_dir / "best")
        best_val = best.info.get("val")
        print(
            f"done: {self.step} steps in {_format_seconds(total)}; best validation loss "
            f"{best_val['loss']:.4f} nats/char ({best_val['bpc']:.4f} bpc) -> {self.run_dir}",
            file=sys.stderr,
        )
        model = CharLM.load(self.run_dir / "best", device=str(self.device))
        val = EvalResult(best_val["loss"], best_val["characters"])
        return TrainResult(self.run_dir, self.step, total, val, model)

    def _log_train(self, metrics, bar) -> None:
        now = self.elapsed()
        chars = self.window_steps * self.tc.batch_size * self.tc.seq_len
        speed = chars / max(now - self.window_start, 1e-9)
        train_loss = self.window_loss / self.window_steps
        self._log(metrics, kind="train", loss=train_loss, chars_per_s=speed)
        bar.set_postfix(self._postfix(train_loss, speed), refresh=False)
        self.window_loss, self.window_steps, self.window_start = 0.0, 0, now

    def _open_metrics(self):
        try:
            return open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")
        except OSError as e:
            raise CharLSTMError(f"cannot write {self.run_dir / METRICS_FILE}: {e}") from None

    def _train_step(self) -> float | None:
        """One optimizer step; returns its loss, or None if the step was skipped as non-finite."""
        batch = self.batcher.next_batch()
        if batch.reset_state or self.state is None:
            self.state = self.net.initial_state(self.tc.batch_size)
        x = torch.from_numpy(batch.inputs).to(self.device, non_blocking=True)
        y = torch.from_numpy(batch.targets).to(self.device, non_blocking=True)
        # The mean over the whole batch's scored targets, whichever shard each one is in.
        scored = max(int((batch.targets != IGNORE).sum()), 1)
        step = functools.partial(self._forward_backward, weight=1.0 / scored)
        loss, grads, new_state = self.shards.run(step, x, y, self.state)
        for parameter, grad in zip(self.params, grads, strict=True):
            parameter.grad = grad
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(
            self.net.parameters(), self.tc.grad_clip if self.tc.grad_clip > 0 else math.inf
        )
        value = loss.item()
        if not (math.isfinite(value) and math.isfinite(float(norm))):
            return self._skip_bad_step(value)
        self.bad_steps = 0
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.state = new_state
        self.step += 1
        return value

    def _forward_backward(
        self, x: torch.Tensor, y: torch.Tensor, state: State, weight: float
    ) -> tuple[torch.Tensor, list[torch.Tensor], State]:
        """Loss (weighted sum over this shard), its gradients and the new state, for one shard."""
        with self._autocast():  # autocast is per thread: enter it in the shard's own
            logits, new_state = self.net(x, state)
        losses = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
        loss = losses * weight
        grads = torch.autograd.grad(self.scaler.scale(loss), self.params)
        return loss.detach(), list(grads), detach_state(new_state)

    def _skip_bad_step(self, value: float) -> None:
        # Applying a non-finite update would poison every weight: drop it and keep the old state.
        self.bad_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.update()
        if self.bad_steps >= self.tc.max_bad_steps:
            hint = f"try a lower --lr (now {self.tc.lr:g})"
            if self.autocast is not None:
                hint += " or --precision fp32"
            raise CharLSTMError(
                f"the loss was not finite ({value}) for {self.bad_steps} steps in a row at step "
                f"{self.step + 1}; {hint}"
            )

    def _lr(self) -> float:
        """Linear warm-up, then cosine decay over the run's progress (or constant)."""
        warmup = min(1.0, (self.step + 1) / self.tc.warmup_steps) if self.tc.warmup_steps else 1.0
        if self.tc.schedule == "constant":
            return self.tc.lr * warmup
        floor = self.tc.min_lr_ratio
        decay = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * self._progress()))
        return self.tc.lr * warmup * decay

    def _progress(self) -> float:
        """How far through the run we are, 0..1, by whichever limit is nearest."""
        fractions = [0.0]
        if self.tc.max_steps:
            fractions.append(self.step / self.tc.max_steps)
        if self.tc.max_epochs:
            fractions.append(self.batcher.epochs_done / self.tc.max_epochs)
        if self.budget:
            fractions.append(self.elapsed() / self.budget)
        return min(1.0, max(fractions))

    def _should_stop(self) -> bool:
        if self.stop_signal is not None:
            return True
        if self.tc.max_steps is not None and self.step >= self.tc.max_steps:
            return True
        if self.tc.max_epochs is not None and self.batcher.epochs_done >= self.tc.max_epochs:
            return True
        if self.budget is not None:
            # Keep enough of the budget for the final evaluation and checkpoint.
            reserve = self.last_eval_seconds or self._estimated_eval_seconds()
            return self.step > 0 and self.elapsed() + reserve >= self.budget
        return False

    def _estimated_eval_seconds(self) -> float:
        # Before the first evaluation: a forward pass costs about a third of a training step.
        steps = max(self.step, 1)
        per_char = self.elapsed() / (steps * self.tc.batch_size * self.tc.seq_len)
        return 1.0 + len(self.corpus.val) * per_char / 3

    # ---- evaluation, checkpoints, logs ---------------------------------------------------

    def _evaluate_and_save(self, metrics, bar) -> None:
        began = time.monotonic()
        result = evaluate_ids(self.net, [self.corpus.val])
        if not math.isfinite(result.perplexity):
            raise CharLSTMError(
                f"the validation loss is {result.loss:g} at step {self.step}; the model "
                f"diverged, so it is not saved: try a lower --lr (now {self.tc.lr:g})"
            )
        improved = self.best_val is None or result.loss < self.best_val
        if improved:
            self.best_val = result.loss
        self._log(metrics, kind="eval", **result.as_dict())
        info = self._info(result)
        if improved:
            self._save(self.run_dir / "best", info, with_resume_state=False)
        self._save(self.run_dir / "last", info, with_resume_state=True)
        self.last_eval_seconds = time.monotonic() - began
        bar.write(
            f"step {self.step}: validation loss {result.loss:.4f} nats/char, "
            f"{result.bpc:.4f} bpc, perplexity {result.perplexity:.2f}"
            + ("  (best so far)" if improved else ""),
            file=sys.stderr,
        )

    def _info(self, val: EvalResult | None) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.batcher.epochs_done,
            "elapsed": self.elapsed(),
            "val": val.as_dict() if val is not None else None,
            "corpus": {
                "name": self.corpus.name,
                "fingerprint": self.corpus.fingerprint,
                "train_characters": len(self.corpus.train),
                "val_characters": len(self.corpus.val),
            },
        }

    def _save(self, directory: Path, info: dict[str, Any], with_resume_state: bool) -> None:
        resume_tensors = resume_json = None
        if with_resume_state:
            resume_tensors, resume_json = self._resume_state()
        write_checkpoint(
            directory,
            config=self.config,
            vocab=self.corpus.vocab,
            weights=self.net.state_dict(),
            info=info,
            resume_tensors=resume_tensors,
            resume_json=resume_json,
        )

    def _resume_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        for i, s in enumerate(self.state or ()):
            tensors[f"state.{i}"] = s
        optimizer = self.optimizer.state_dict()
        for index, values in optimizer["state"].items():
            for key, value in values.items():
                tensors[f"optim.{index}.{key}"] = torch.as_tensor(value)
        json_state = {
            "step": self.step,
            "elapsed": self.elapsed(),
            "best_val": self.best_val,
            "batcher": self.batcher.state_dict(),
            "param_groups": optimizer["param_groups"],
            "scaler": self.scaler.state_dict(),
            "carried_state": self.state is not None,
            "log_window": [self.window_loss, self.window_steps],
        }
        return tensors, json_state

    def restore(self, directory: Path, weights: dict[str, torch.Tensor]) -> None:
        """Continue from a ``last/`` checkpoint: weights, optimizer, clock, data position, RNG."""
        tensors, state = read_resume_state(directory)
        self.net.load_state_dict(weights)
        optimizer_state: dict[int, dict[str, torch.Tensor]] = {}
        for name, value in tensors.items():
            if name.startswith("optim."):
                _, index, key = name.split(".", 2)
                optimizer_state.setdefault(int(index), {})[key] = value
        self.optimizer.load_state_dict(
            {"state": optimizer_state, "param_groups": state["param_groups"]}
        )
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.elapsed_before = float(state["elapsed"])
        self.best_val = state["best_val"]
        self.batcher.load_state_dict(state["batcher"])
        self.window_loss, self.window_steps = state["log_window"]
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        if state.get("carried_state"):
            count = len([k for k in tensors if k.startswith("state.")])
            self.state = tuple(tensors[f"state.{i}"].to(self.device) for i in range(count))
        _truncate_metrics(self.run_dir / METRICS_FILE, self.step)
        print(f"resuming {self.run_dir} at step {self.step}", file=sys.stderr)

    def elapsed(self) -> float:
        """Seconds of the run so far, earlier sessions of a resumed run included."""
        return self.elapsed_before + time.monotonic() - self.started

    def _log(self, metrics, **values: Any) -> None:
        record = {"step": self.step, "elapsed": round(self.elapsed(), 3), **values}
        if values.get("kind") == "train":
            record["lr"] = self.optimizer.param_groups[0]["lr"]
            record["epoch"] = round(self.batcher.epochs_done, 6)
        # One write per whole line, flushed, so a crash leaves whole lines only.
        try:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
        except OSError as e:
            raise CharLSTMError(
                f"cannot write {self.run_dir / METRICS_FILE}: {e.strerror or e} (the last "
                "checkpoint is intact; free some space and resume)"
            ) from None

    def _postfix(self, loss: float, speed: float) -> dict[str, str]:
        postfix = {"loss": f"{loss:.3f}", "chars/s": f"{speed:,.0f}"}
        if self.best_val is not None:
            postfix["val"] = f"{self.best_val:.3f}"
        if self.budget:
            postfix["left"] = _format_seconds(max(0.0, self.budget - self.elapsed()))
        return postfix

    def _announce(self) -> None:
        corpus, mc = self.corpus, self.config.model
        precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.autocast]
        limits = []
        if self.tc.max_steps:
            limits.append(f"{self.tc.max_steps} steps")
        if self.tc.max_epochs:
            limits.append(f"{self.tc.max_epochs:g} epochs")
        if self.budget:
            limits.append(_format_seconds(self.budget))
        lines = [
            f"corpus {corpus.name}: {len(corpus.train):,} training and {len(corpus.val):,} "
            f"validation characters, vocabulary of {corpus.vocab.size}",
            f"model: {mc.cell} {mc.n_layers}x{mc.hidden_dim}, embedding {mc.embed_dim}, "
            f"{self.net.num_parameters():,} parameters",
            f"training on {self.device} in {precision}, batch {self.tc.batch_size} x "
            f"{self.tc.seq_len} ({self.tc.batching}), stopping at {' or '.join(limits)}",
            f"run directory: {self.run_dir}",
        ]
        print("\n".join(lines), file=sys.stderr)

    def _autocast(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)


def _make_optimizer(net: CharRNN, tc: TrainConfig) -> torch.optim.AdamW:
    # Decay the weight matrices only: shrinking biases or embedding rows only hurts.
    decay, keep = [], []
    for name, p in net.named_parameters():
        (decay if p.dim() >= 2 and not name.startswith("embed.") else keep).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc.weight_decay}, {"params": keep, "weight_decay": 0.0}],
        lr=tc.lr,
        betas=(tc.beta1, tc.beta2),
    )


def find_resume_checkpoint(tc: TrainConfig) -> Path | None:
    """The ``last/`` checkpoint that ``--resume`` points at, or None for a fresh run."""
    if not tc.resume:
        return None
    if tc.resume == "auto":
        if not tc.out:
            raise CharLSTMError("--resume auto needs --out RUN_DIR to know which run to continue")
        last = Path(tc.out).expanduser() / "last"
        recover_checkpoint(last)
        return last if (last / "config.json").is_file() else None
    last = Path(tc.resume).expanduser() / "last"
    recover_checkpoint(last)
    if not (last / "config.json").is_file():
        raise CharLSTMError(
            f"--resume {tc.resume}: not a run directory with a last/ checkpoint to continue"
        )
    return last


def _new_run_dir(config: RunConfig) -> Path:
    """The directory for a fresh run, refused early if it holds a run and --overwrite is off."""
    tc = config.train
    run_dir = Path(tc.out).expanduser() if tc.out else _default_run_dir(config)
    if run_dir.exists() and not run_dir.is_dir():
        raise CharLSTMError(f"--out {run_dir} is a file, not a directory")
    if tc.resume == "auto" and _holds_no_checkpoint(run_dir):
        return run_dir  # a run that stopped before its first checkpoint simply starts again
    if run_dir.exists() and any(run_dir.iterdir()) and not tc.overwrite:
        raise CharLSTMError(
            f"run directory {run_dir} already exists; use --resume {run_dir} to continue it "
            "or --overwrite to replace it"
        )
    return run_dir


def _holds_no_checkpoint(run_dir: Path) -> bool:
    """True if ``run_dir`` is absent or holds only what a run writes before its first ``last/``."""
    if not run_dir.is_dir():
        return True
    return all(
        entry.name in PRE_CHECKPOINT_FILES or ".tmp-" in entry.name for entry in run_dir.iterdir()
    )


def _create_run_dir(run_dir: Path, replace: bool) -> None:
    if replace and run_dir.exists():
        shutil.rmtree(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CharLSTMError(f"cannot create run directory {run_dir}: {e.strerror or e}") from None
    if not os.access(run_dir, os.W_OK):
        raise CharLSTMError(f"run directory {run_dir} is not writable")


def _default_run_dir(config: RunConfig) -> Path:
    name = Path(config.data.data[0]).stem or "corpus"
    return Path("runs") / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"


def _check_resume_compatible(saved: RunConfig, wanted: RunConfig) -> list[str]:
    """Refuse a resume that would change what is being learnt; return the harmless changes."""
    old, new = saved.to_dict(), wanted.to_dict()
    changes = {
        key: f"{key} ({old[section][key]!r} -> {new[section][key]!r})"
        for section in old
        for key in old[section]
        if old[section][key] != new[section][key]
    }
    refused = [text for key, text in changes.items() if key not in RESUMABLE_CHANGES]
    if refused:
        raise CharLSTMError(
            "cannot resume with different settings: " + ", ".join(refused)
            + "; drop those flags or start a new run"
        )  # fmt: skip
    return [text for key, text in changes.items() if key not in ("resume", "out", "overwrite")]


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from, so the log has no repeats."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if record.get("step", 0) <= step:
            kept.append(line + "\n")
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


def _format_seconds(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
