"""The training recipe: data, model, Muon + AdamW with warm-up and cosine decay, evaluation, saving.

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from charlstm import distributed
from charlstm.batching import IGNORE, make_batcher
from charlstm.budget import MIN_STEPS, BudgetPlan, check_budget, format_seconds, plan_budget
from charlstm.checkpoint import (
    read_checkpoint,
    read_resume_state,
    readable_checkpoint,
    recover_checkpoint,
    write_checkpoint,
)
from charlstm.config import RunConfig, TrainConfig
from charlstm.data import Corpus, Vocab, corpus_name, load_corpus, resume_stdin
from charlstm.device import autocast_dtype, keep_freed_memory, resolve_device, synchronize
from charlstm.distributed import World
from charlstm.ema import WeightAverage
from charlstm.errors import CharLSTMError, TrainingInterrupted
from charlstm.evaluate import (
    EvalResult,
    EvaluationStopped,
    eval_result,
    measure_score_speed,
    score_ids,
)
from charlstm.lm import CharLM
from charlstm.model import CharRNN, State, detach_state
from charlstm.muon import MuonAdamW
from charlstm.plot import CURVES_FILE, METRICS_FILE, write_curves
from charlstm.runlock import LOCK_FILE, run_lock
from charlstm.shards import Shards, shard_count

# What a run directory may hold before its first last/ checkpoint (best/ and the curves come first).
PRE_CHECKPOINT_FILES = frozenset({METRICS_FILE, CURVES_FILE, "best"})
# Logits (and their gradients) the training loss holds at once: fewer than scoring may, as
# backward keeps each slice's softmax too; a large vocabulary's loss runs in slices of steps.
LOSS_LOGITS = 1 << 20
# Where resume.safetensors keeps the weights being trained when model.safetensors holds their
# average (--ema).
TRAINING_WEIGHTS = "train."
# Settings a resumed run may change: they steer when to stop and what to log, not what is learnt.
RESUMABLE_CHANGES = frozenset(
    {"max_steps", "max_epochs", "time_budget", "eval_every", "log_every", "device", "out",
     "resume", "overwrite", "sample_length", "max_bad_steps", "preset"}
)  # fmt: skip


@dataclass
class TrainResult:
    """What a finished run returns."""

    run_dir: Path
    steps: int
    elapsed: float  # seconds, over all sessions of the run
    best_val: EvalResult | None  # None on torchrun ranks other than 0
    model: CharLM | None = field(repr=False)  # the best checkpoint; None on ranks other than 0
    # Why this result is weak, if it is: e.g. a budget that ran out after a handful of steps.
    warnings: list[str] = field(default_factory=list)


def train(
    config: RunConfig,
    *,
    progress: bool = True,
    adapt: Callable[[float, Corpus], RunConfig] | None = None,
) -> TrainResult:
    """Train a model as ``config`` says; returns the best checkpoint loaded as a CharLM.

    ``adapt``, for a fresh run, is given this machine's training speed on ``config``'s model
    (characters per second, :func:`measure_speed`, timed once the inputs are checked and
    counted in the budget) and the corpus, and returns the configuration to train instead:
    how ``charlstm train`` picks a preset (:func:`~charlstm.config.preset_for`). Not for a
    run that resumes, which keeps its saved settings.

    With a time budget, the run first measures how fast it trains and scores, refuses a
    budget too small to train :data:`~charlstm.budget.MIN_STEPS` steps
    (:class:`~charlstm.budget.BudgetTooSmall`), and keeps evaluation to a small, measured
    share of the budget (:mod:`charlstm.budget`).

    SIGINT (Ctrl-C) and SIGTERM let the current step finish, save ``last/`` and raise
    :class:`~charlstm.errors.TrainingInterrupted`; a second Ctrl-C stops at once.

    Under torchrun every process calls this and together they train one model with
    DistributedDataParallel (see :mod:`charlstm.distributed`); only rank 0 prints, logs and
    writes checkpoints, and only its result holds the model and the best validation loss.
    """
    started = time.monotonic()
    config.validate()
    world = distributed.world()  # a single process unless started by torchrun
    with world.failures():
        return _train(config, progress, started, world, adapt)


def _train(
    config: RunConfig,
    progress: bool,
    started: float,
    world: World,
    adapt: Callable[[float], RunConfig] | None,
) -> TrainResult:
    world.check_batch(config.train.batch_size)
    # Decided once, by rank 0: the default name holds the time.
    run_dir = Path(world.from_main(lambda: str(_run_dir(config))))
    made = _first_missing(run_dir) if world.is_main else None  # what this run creates
    with contextlib.ExitStack() as lock:
        world.on_main(lock.enter_context, run_lock(run_dir))  # one writer per run directory
        try:
            return _train_locked(config, progress, started, world, adapt, run_dir)
        except BaseException:
            if made is not None and not _wrote_anything(run_dir):  # a failed start leaves nothing
                shutil.rmtree(made, ignore_errors=True)
            raise


def _train_locked(
    config: RunConfig,
    progress: bool,
    started: float,
    world: World,
    adapt: Callable[[float], RunConfig] | None,
    run_dir: Path,
) -> TrainResult:
    if config.train.resume:  # the lock holder alone may put back what a crash set aside
        world.on_main(recover_checkpoint, run_dir / "last")
    resume_from = find_resume_checkpoint(config.train)
    if resume_from is None:
        world.on_main(_check_new_run_dir, config, run_dir)
    saved = read_checkpoint(resume_from) if resume_from else None
    if saved is not None:
        changed = _check_resume_compatible(saved.config, config)
        if changed and world.is_main:
            print(f"resuming with changed settings: {', '.join(changed)}", file=sys.stderr)
    device = world.place(resolve_device(config.train.device))
    if device.type == "cpu":
        keep_freed_memory()
    # One process per machine first: a built-in corpus may be downloaded and cached.
    vocab = saved.vocab if saved else None
    stdin = None  # a run trained on standard input reads its kept copy when none is piped in
    if saved is not None:
        stdin = resume_stdin(config.data, saved.info.get("corpus", {}).get("fingerprint"))
    corpus = world.local_main_first(load_corpus, config.data, vocab=vocab, stdin=stdin)
    if len(corpus.val) < 2:  # nothing to score: refused before the run writes anything
        data = config.data
        where = ", ".join(data.val_data) or f"the last {data.val_fraction:g} of --data"
        raise CharLSTMError(
            f"the validation text ({where}) has {len(corpus.val)} characters: give it some text "
            "to score the model on"
        )
    if saved is not None and saved.info.get("corpus", {}).get("fingerprint") != corpus.fingerprint:
        raise CharLSTMError(
            f"the training text differs from the one {run_dir} was trained on; resume with the "
            "same --data, or start a new run"
        )
    train_speed = None  # characters per second, measured for a fresh budgeted run
    if adapt is not None and saved is None:
        train_speed = measure_speed(config, corpus.vocab.size)
        picked = adapt(train_speed, corpus).validate()
        train_speed = train_speed if _trains_alike(picked, config) else None
        config = picked
    if saved is None and world.size == 1 and config.train.budget_seconds() and not train_speed:
        train_speed = measure_speed(config, corpus.vocab.size)
    torch.manual_seed(config.train.seed)
    net = CharRNN(config.model, corpus.vocab.size).to(device)
    if world.rank:  # the same initial weights everywhere, but each process its own dropout
        torch.manual_seed(distributed.rank_seed(config.train.seed, world.rank))
    trainer = _Trainer(config, corpus, net, device, run_dir, progress, started, world)
    trainer.plan_evaluation(train_speed)  # may refuse the budget: before any file is touched
    if resume_from is None:
        # Only now, with every input checked, may an --overwrite'd old run be removed.
        world.on_main(_prepare_run_dir, run_dir)
    if saved is not None and resume_from is not None:
        trainer.restore(resume_from, saved.weights)
    try:
        with _stop_signals(trainer):
            return trainer.run()
    finally:
        trainer.shards.close()


def measure_speed(config: RunConfig, vocab_size: int = 96, steps: int = 2) -> float:
    """Characters per second at which this machine trains ``config``'s model: ``steps`` real
    training steps (after one to warm up) on random text of ``vocab_size`` symbols, on the
    device and in the arithmetic the run would use. Nothing is written, and a run trained
    afterwards is not affected."""
    config.validate()
    device = resolve_device(config.train.device)
    if device.type == "cpu":
        keep_freed_memory()
    vocab = Vocab("text", tuple(range(32, 32 + vocab_size)))
    length = (steps + 2) * config.train.batch_size * (config.train.seq_len + 1)
    text = np.random.default_rng(0).integers(0, vocab.size, length).astype(vocab.dtype)
    corpus = Corpus("random text", vocab, text, text[:0], fingerprint="")
    net = CharRNN(config.model, vocab.size).to(device)
    trainer = _Trainer(config, corpus, net, device, Path(os.devnull), False, time.monotonic())
    try:
        trainer._train_step()  # pays the one-off costs: kernel set-up, first allocations
        synchronize(device)
        started = time.perf_counter()
        for _ in range(steps):
            trainer._train_step()
        synchronize(device)
        elapsed = time.perf_counter() - started
    finally:
        trainer.shards.close()
    return steps * config.train.batch_size * config.train.seq_len / elapsed


def _trains_alike(a: RunConfig, b: RunConfig) -> bool:
    """Whether two configurations train at the same speed: same network, batch and arithmetic."""
    same = ("batch_size", "seq_len", "precision", "optimizer", "device")
    return a.model == b.model and all(getattr(a.train, k) == getattr(b.train, k) for k in same)


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
        world: World = distributed.SINGLE,
    ) -> None:
        self.config, self.tc = config, config.train
        self.corpus, self.net, self.device, self.run_dir = corpus, net, device, run_dir
        self.progress, self.started = progress, started
        # Under torchrun: this process's streams of each global batch, and the DDP wrapper
        # whose backward() averages the gradients of all processes (None for one process).
        self.world, self.rows = world, world.rows(config.train.batch_size)
        self.ddp = world.wrap(net)
        self.autocast = autocast_dtype(device, self.tc.precision)
        self.optimizer = _make_optimizer(net, self.tc, self.autocast)
        self.params = [p for p in net.parameters() if p.requires_grad]
        self.average = WeightAverage(net, self.tc.ema) if self.tc.ema > 0 else None
        shards = shard_count(device, self.tc.batch_size)
        self.shards = Shards(1 if self.ddp is not None else shards)
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
        # With a budget: what evaluation may cost (plan_evaluation), the length of the prefix
        # of the validation split that periodic evaluations score (fixed at the first one, so
        # the curve is comparable), and the measured cost of the last evaluation and save.
        self.plan: BudgetPlan | None = None
        self.slice_chars: int | None = None
        self.last_eval_seconds: float | None = None
        self.last_save_seconds: float | None = None
        self.session_start = (0, 0.0)  # (step, elapsed) when this session's training began
        self.stopped_by = ""  # the limit that ended the loop: budget, steps, epochs or signal
        self.warnings: list[str] = []
        self.curves_failed = False  # drawing curves.png failed once: do not try again
        self.bad_steps = 0
        self.stop_signal: int | None = None  # set by SIGINT / SIGTERM: stop after this step
        self.interrupted: int | None = None  # the signal the loop stopped for (agreed by all)
        self.clock = 0.0  # under torchrun: the run's elapsed seconds, agreed at the last step
        self.window_loss, self.window_steps, self.window_start = 0.0, 0, 0.0

    # ---- the loop -------------------------------------------------------------------------

    def run(self) -> TrainResult:
        """Train until a limit is reached, evaluating and checkpointing on the way."""
        self._announce()
        bar = tqdm(
            total=self.tc.max_steps,
            initial=self.step,
            unit="step",
            disable=not (self.progress and self.world.is_main),
            file=sys.stderr,
            dynamic_ncols=True,
            mininterval=0.1 if sys.stderr.isatty() else 10.0,  # keep logs of batch jobs short
        )
        last_eval_step = self.step if self.step > 0 else -1
        self.window_start = self.elapsed()
        self.session_start = (self.step, self.window_start)
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
                    with contextlib.suppress(EvaluationStopped):  # a signal: the loop ends next
                        self._evaluate_and_save(metrics, bar, self._periodic_chars(bar))
                    last_eval_step = self.step
                    self.window_start = self.elapsed()  # keep evaluation out of the speed figure
            if self.interrupted is None:
                try:
                    self._closing_evaluation(metrics, bar, last_eval_step)
                except EvaluationStopped:
                    self.interrupted = self.stop_signal
            if self.interrupted is not None:
                self._save(self.run_dir / "last", self._info(None), with_resume_state=True)
                raise TrainingInterrupted(self.interrupted, self.run_dir, self.step)
        self._warn_if_short()
        total = self.elapsed()
        if not self.world.is_main:
            return TrainResult(self.run_dir, self.step, total, None, None, self.warnings)
        best = read_checkpoint(self.run_dir / "best")
        best_val = best.info.get("val")
        print(
            f"done: {self.step} steps in {format_seconds(total)}; best validation loss "
            f"{best_val['loss']:.4f} nats/char ({best_val['bpc']:.4f} bpc) over "
            f"{self._scored_words(best_val['characters'] + 1)} -> {self.run_dir}",
            file=sys.stderr,
        )
        # By type ("cuda", not "cuda:0"): under torchrun, set_device made it this process's GPU.
        model = CharLM.load(self.run_dir / "best", device=self.device.type)
        val = EvalResult(best_val["loss"], best_val["characters"])
        return TrainResult(self.run_dir, self.step, total, val, model, self.warnings)

    # ---- the budget's evaluations ---------------------------------------------------------

    def plan_evaluation(self, train_speed: float | None) -> None:
        """With a time budget, measure how fast this model is scored and plan what each
        evaluation scores; given the training speed (a fresh run), refuse a budget that cannot
        train :data:`MIN_STEPS` steps. Without a budget, every evaluation scores the whole
        validation split."""
        if self.budget is None:
            return
        # Each process scores its share of the segments: together, the sum of their speeds.
        speed = self.world.sum([measure_score_speed(self.net)])[0]
        self.plan = plan_budget(self.budget, speed, len(self.corpus.val))
        if train_speed is not None:
            chars_per_step = self.tc.batch_size * self.tc.seq_len
            check_budget(self.plan, train_speed, chars_per_step, self.elapsed(), self._save_cost())

    def _periodic_chars(self, bar) -> int | None:
        """How many validation characters a periodic evaluation scores (None: all of them)."""
        if self.plan is None or self.slice_chars is not None:
            return self.slice_chars
        first_step, first_elapsed = self.session_start
        steps_per_second = (self.step - first_step) / max(self.elapsed() - first_elapsed, 1e-9)
        seconds_left = self.plan.budget - self.elapsed() - self._reserve()
        chosen = self.plan.slice_chars(seconds_left, steps_per_second, self.tc.eval_every)
        self.slice_chars = int(self.world.max([chosen])[0])  # every process the same slice
        if self.world.is_main:
            bar.write(f"evaluating every {self.tc.eval_every} steps on "
                      f"{self._scored_words(self.slice_chars)}", file=sys.stderr)  # fmt: skip
        return self.slice_chars

    def _closing_evaluation(self, metrics, bar, last_eval_step: int) -> None:
        """Score the end of training; with a budget, score the best model on as much of the
        validation split as the plan allows when periodic evaluations scored less."""
        plan = self.plan
        if plan is None or self.best_val is None:  # no budget, or the run's only evaluation
            # (A run resumed from a Ctrl-C before its first evaluation has no best/ yet.)
            if last_eval_step != self.step or self.best_val is None:
                chars = None if plan is None else plan.final_chars
                self._evaluate_and_save(metrics, bar, chars)
            return
        if last_eval_step != self.step:
            self._evaluate_and_save(metrics, bar, self.slice_chars)
        if self.slice_chars is not None and plan.final_chars > self.slice_chars:
            self._rescore_best(metrics, bar, plan.final_chars)

    def _rescore_best(self, metrics, bar, chars: int) -> None:
        """Score ``best/`` on the first ``chars`` validation characters and record it there."""
        began = time.monotonic()
        best = read_checkpoint(self.run_dir / "best")
        if "val_slice" in best.info:
            return  # scored already: a finished run resumed again
        self.net.load_state_dict(best.weights)  # training is over: the trained weights can go
        result = self._score(chars)
        info = {**best.info, "val": result.as_dict(), "val_slice": best.info["val"]}
        self.world.on_main(write_checkpoint, self.run_dir / "best", config=self.config,
                           vocab=self.corpus.vocab, weights=best.weights, info=info)  # fmt: skip
        seconds = time.monotonic() - began
        self._log(metrics, kind="final", model_step=best.info["step"], seconds=round(seconds, 3),
                  **result.as_dict())  # fmt: skip
        if self.world.is_main:
            bar.write(f"best model (step {best.info['step']}): validation loss "
                      f"{result.loss:.4f} nats/char, {result.bpc:.4f} bpc over "
                      f"{self._scored_words(result.characters + 1)}", file=sys.stderr)  # fmt: skip

    def _reserve(self) -> float:
        """Seconds to keep at the end of a budget for the closing evaluation and saves."""
        assert self.plan is not None
        closing = self.plan.score_seconds(self.plan.final_chars) + self._save_cost()
        if self.best_val is None:
            return closing  # one evaluation, of the closing size
        periodic = self.last_eval_seconds or 0.0
        if self.slice_chars is None or self.plan.final_chars <= self.slice_chars:
            return periodic
        return periodic + closing

    def _save_cost(self) -> float:
        """Seconds to save checkpoints and redraw the curves: measured once there was a save."""
        if self.last_save_seconds is not None:
            return self.last_save_seconds
        # Weights, two optimizer moments and their average, written to disk; the plot.
        return 1.0 + 16 * self.net.num_parameters() / 200e6

    def _scored_words(self, chars: int) -> str:
        """``all 111,538 validation characters`` or ``the first 1,000,000 of 10,000,000 ...``
        for a prefix of ``chars`` characters (it scores one fewer: the first has no context)."""
        total = len(self.corpus.val)
        if chars >= total:
            return f"all {total:,} validation characters"
        return f"the first {chars:,} of {total:,} validation characters"

    def _warn_if_short(self) -> None:
        """A run that the budget stopped after a handful of steps says so: it learnt little."""
        if self.stopped_by != "budget" or self.step >= MIN_STEPS:
            return
        warning = (
            f"only {self.step} steps fitted in the {format_seconds(self.budget or 0)} budget "
            f"(fewer than {MIN_STEPS}): the model has learnt little; give a longer "
            "--time-budget or a smaller model"
        )
        self.warnings.append(warning)
        if self.world.is_main:
            print(f"warning: {warning}", file=sys.stderr)

    def _log_train(self, metrics, bar) -> None:
        now = self.elapsed()
        chars = self.window_steps * self.tc.batch_size * self.tc.seq_len
        speed = chars / max(now - self.window_start, 1e-9)
        train_loss = self.window_loss / self.window_steps
        self._log(metrics, kind="train", loss=train_loss, chars_per_s=speed)
        bar.set_postfix(self._postfix(train_loss, speed), refresh=False)
        self.window_loss, self.window_steps, self.window_start = 0.0, 0, now

    def _open_metrics(self):
        if not self.world.is_main:
            return contextlib.nullcontext()  # rank 0 alone writes the log
        try:
            # Unbuffered: each line is one write, and a full disk cannot fail again at close.
            return open(self.run_dir / METRICS_FILE, "ab", buffering=0)
        except OSError as e:
            raise CharLSTMError(f"cannot write {self.run_dir / METRICS_FILE}: {e}") from None

    def _train_step(self) -> float | None:
        """One optimizer step; returns its loss, or None if the step was skipped as non-finite."""
        batch = self.batcher.next_batch()  # the global batch: the same in every process
        # The mean over the whole batch's scored targets, whichever shard or process each one
        # is in. DDP averages gradients over the processes, hence the factor world.size.
        scored = max(int((batch.targets != IGNORE).sum()), 1)
        if self.world.size > 1:
            batch = batch.rows(self.rows)
        if batch.reset_state or self.state is None:
            self.state = self.net.initial_state(len(batch.inputs))
        x = torch.from_numpy(batch.inputs).to(self.device, non_blocking=True)
        y = torch.from_numpy(batch.targets).to(self.device, non_blocking=True)
        forward_backward = self._forward_backward if self.ddp is None else self._ddp_step
        step = functools.partial(forward_backward, weight=self.world.size / scored)
        loss, grads, new_state = self.shards.run(step, x, y, self.state)
        for parameter, grad in zip(self.params, grads, strict=True):
            parameter.grad = grad
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(
            self.net.parameters(), self.tc.grad_clip if self.tc.grad_clip > 0 else math.inf
        )
        # Summed over the processes, so that all of them skip a step that is bad in any one.
        value, bad_norm = self.world.sum([loss.item(), not math.isfinite(float(norm))])
        value /= self.world.size
        if not math.isfinite(value) or bad_norm:
            return self._skip_bad_step(value)
        self.bad_steps = 0
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.average is not None:
            self.average.update(self.step)
        self.state = new_state
        self.step += 1
        return value

    def _forward_backward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        state: State,
        generator: torch.Generator | None,
        weight: float,
    ) -> tuple[torch.Tensor, list[torch.Tensor], State]:
        """Loss (weighted sum over this shard), its gradients and the new state, for one shard."""
        return loss_and_grads(self.net, x, y, state, weight, self.params, generator=generator,
                              autocast=self._autocast, scale=self.scaler.scale)  # fmt: skip

    def _ddp_step(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        state: State,
        generator: torch.Generator | None,
        weight: float,
    ) -> tuple[torch.Tensor, list[torch.Tensor], State]:
        """:meth:`_forward_backward` through DistributedDataParallel, whose backward() leaves
        in every process the average of all processes' gradients."""
        assert self.ddp is not None
        for parameter in self.params:
            parameter.grad = None
        loss, new_state = self._weighted_loss(self.ddp, x, y, state, weight, generator)
        self.scaler.scale(loss).backward()
        return loss.detach(), [p.grad for p in self.params], detach_state(new_state)

    def _weighted_loss(
        self,
        net: torch.nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        state: State,
        weight: float,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, State]:
        """``weight`` times the summed cross-entropy of the scored targets, and the new state."""
        with self._autocast():  # autocast is per thread: enter it in the shard's own
            logits, new_state = net(x, state, generator=generator)
        return _summed_loss(logits, y) * weight, new_state

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
            # Under torchrun, the clock all processes agreed on: they must use the same rate.
            clock = self.clock if self.world.size > 1 else self.elapsed()
            fractions.append(clock / self.budget)
        return min(1.0, max(fractions))

    def _should_stop(self) -> bool:
        stop_signal, out_of_time = self.stop_signal, self._out_of_time()
        if self.world.size > 1:
            # Signals and clocks are per process: decide together, or the processes part ways.
            agreed = self.world.max([stop_signal or 0, out_of_time, self.elapsed()])
            signum, late, self.clock = agreed
            stop_signal, out_of_time = int(signum) or None, bool(late)
        if stop_signal is not None:
            self.interrupted = stop_signal
            self.stopped_by = "signal"
        elif self.tc.max_steps is not None and self.step >= self.tc.max_steps:
            self.stopped_by = "steps"
        elif self.tc.max_epochs is not None and self.batcher.epochs_done >= self.tc.max_epochs:
            self.stopped_by = "epochs"
        elif out_of_time:
            self.stopped_by = "budget"
        return bool(self.stopped_by)

    def _out_of_time(self) -> bool:
        if self.plan is None:
            return False
        # Keep enough of the budget for the closing evaluation and checkpoints.
        return self.step > 0 and self.elapsed() + self._reserve() >= self.plan.budget

    # ---- evaluation, checkpoints, logs ---------------------------------------------------

    def _score(self, chars: int | None) -> EvalResult:
        """The network's loss on the first ``chars`` validation characters (None: all)."""
        # Each process scores its share of the validation text; the sums make the same whole.
        part = (self.world.rank, self.world.size)
        # A signal stops a long evaluation at once; under torchrun all processes must agree,
        # so there it waits for the evaluation's end.
        should_stop = (lambda: self.stop_signal is not None) if self.world.size == 1 else None
        text = self.corpus.val if chars is None else self.corpus.val[:chars]
        nats, count = score_ids(self.net, [text], part=part, should_stop=should_stop)
        nats, count = self.world.sum([nats, count])
        return eval_result(nats, int(count))

    def _evaluate_and_save(self, metrics, bar, chars: int | None) -> None:
        """Score the first ``chars`` validation characters (None: all) and save checkpoints."""
        began = time.monotonic()
        with self._averaged():  # the model a run reports and saves
            result = self._score(chars)
        if not math.isfinite(result.perplexity):
            raise CharLSTMError(
                f"the validation loss is {result.loss:g} at step {self.step}; the model "
                f"diverged, so it is not saved: try a lower --lr (now {self.tc.lr:g})"
            )
        improved = self.best_val is None or result.loss < self.best_val
        if improved:
            self.best_val = result.loss
        scored = time.monotonic()
        self._log(metrics, kind="eval", seconds=round(scored - began, 3), **result.as_dict())
        info = self._info(result)
        if improved:
            self._save(self.run_dir / "best", info, with_resume_state=False)
        self._save(self.run_dir / "last", info, with_resume_state=True)
        if self.world.is_main:  # after the checkpoints: a failed plot can never cost one
            self._draw_curves(bar)
        self.last_save_seconds = time.monotonic() - scored
        self.last_eval_seconds = time.monotonic() - began
        if not self.world.is_main:
            return
        bar.write(
            f"step {self.step}: validation loss {result.loss:.4f} nats/char, "
            f"{result.bpc:.4f} bpc, perplexity {result.perplexity:.2f}"
            + ("  (best so far)" if improved else ""),
            file=sys.stderr,
        )

    def _draw_curves(self, bar) -> None:
        """Redraw RUN_DIR/curves.png. A picture is not worth stopping a run for: a failure
        (no matplotlib, no fonts, a full disk) is reported once and plotting stops."""
        if self.curves_failed:
            return
        try:
            write_curves(self.run_dir)
        except Exception as e:  # anything at all: the run matters more than its picture
            self.curves_failed = True
            bar.write(f"warning: cannot draw {self.run_dir / CURVES_FILE} ({e}); training goes "
                      "on without it", file=sys.stderr)  # fmt: skip

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
        # Rank 0 writes; the others wait for it, and fail with it if it cannot.
        self.world.on_main(
            write_checkpoint,
            directory,
            config=self.config,
            vocab=self.corpus.vocab,
            weights=self._model_weights(),
            info=info,
            resume_tensors=resume_tensors,
            resume_json=resume_json,
        )

    def _model_weights(self) -> dict[str, torch.Tensor]:
        """What a checkpoint's model.safetensors holds: the weight average, if one is kept."""
        weights = self.net.state_dict()
        if self.average is not None:
            weights.update(self.average.average)
        return weights

    def _averaged(self) -> contextlib.AbstractContextManager:
        """The weight average in the network for the duration (nothing to do without one)."""
        return contextlib.nullcontext() if self.average is None else self.average.applied()

    def _resume_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        # Under torchrun, every process's generators and carried state are gathered (rank 0
        # saves them): the whole batch's state lets a run resume on any number of processes.
        generators = {"rng.torch": torch.get_rng_state}
        if self.device.type == "cuda":
            generators["rng.cuda"] = functools.partial(torch.cuda.get_rng_state, self.device)
        tensors: dict[str, torch.Tensor] = {}
        for name, get_state in generators.items():
            for rank, value in enumerate(self.world.gather(get_state())):
                tensors[f"{name}.rank{rank}" if rank else name] = value
        for i, s in enumerate(self.state or ()):
            parts = self.world.gather(s)
            tensors[f"state.{i}"] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        optimizer = self.optimizer.state_dict()
        for index, values in optimizer["state"].items():
            for key, value in values.items():
                tensors[f"optim.{index}.{key}"] = torch.as_tensor(value)
        if self.average is not None:  # model.safetensors holds the average: these go on
            for name, value in self.average.training_weights().items():
                tensors[f"{TRAINING_WEIGHTS}{name}"] = value
        json_state = {
            "step": self.step,
            "elapsed": self.elapsed(),
            "best_val": self.best_val,
            "batcher": self.batcher.state_dict(),
            "param_groups": optimizer["param_groups"],
            "scaler": self.scaler.state_dict(),
            "carried_state": self.state is not None,
            "log_window": [self.window_loss, self.window_steps],
            "world_size": self.world.size,
            "eval_slice": self.slice_chars,
        }
        return tensors, json_state

    def restore(self, directory: Path, weights: dict[str, torch.Tensor]) -> None:
        """Continue from a ``last/`` checkpoint: weights, optimizer, clock, data position, RNG.
        Resume state that does not fit this run is refused in one line, whatever is wrong."""
        tensors, state = read_resume_state(directory)
        try:
            _check_resume_json(state)
            self._check_resume_tensors(tensors)
            self._restore(directory, weights, tensors, state)
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
            what = f"{type(e).__name__}: {e}".strip().splitlines()[0][:200]
            raise CharLSTMError(
                f"{directory}: its resume state does not fit this run ({what}); start a new run "
                "instead (--overwrite, or another --out)"
            ) from None

    def _check_resume_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Optimizer moments and carried state must have this model's sizes: a mismatch would
        otherwise surface as an error in the middle of the first step."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        for name, value in tensors.items():
            if name.startswith("optim."):
                index = int(name.split(".")[1])
                if value.dim() > 0 and value.numel() != params[index].numel():
                    raise ValueError(f"{name} has {value.numel()} values for a parameter of "
                                     f"{params[index].numel()}")  # fmt: skip
            elif name.startswith("state."):
                wanted = self.net.initial_state(self.tc.batch_size)[0].shape
                if value.shape != wanted:
                    raise ValueError(f"{name} has shape {list(value.shape)}, not {list(wanted)}")

    def _restore(
        self,
        directory: Path,
        weights: dict[str, torch.Tensor],
        tensors: dict[str, torch.Tensor],
        state: dict[str, Any],
    ) -> None:
        self.net.load_state_dict(weights)
        if self.average is not None:
            prefix = len(TRAINING_WEIGHTS)
            training = {k[prefix:]: v for k, v in tensors.items() if k.startswith(TRAINING_WEIGHTS)}
            self.average.restore(weights, training or weights)
        optimizer_state: dict[int, dict[str, torch.Tensor]] = {}
        for name, value in tensors.items():
            if name.startswith("optim."):
                _, index, key = name.split(".", 2)
                optimizer_state.setdefault(int(index), {})[key] = value
        try:
            self.optimizer.load_state_dict(
                {"state": optimizer_state, "param_groups": state["param_groups"]}
            )
        except (ValueError, KeyError) as e:  # e.g. AdamW's state, saved before Muon existed
            raise CharLSTMError(
                f"{directory} holds the state of another optimizer than --optimizer "
                f"{self.tc.optimizer} ({e}); start a new run from it instead of resuming"
            ) from None
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.elapsed_before = float(state["elapsed"])
        self.best_val = state["best_val"]
        self.batcher.load_state_dict(state["batcher"])
        self.window_loss, self.window_steps = state["log_window"]
        self.slice_chars = state.get("eval_slice")  # the same slice as before the stop
        suffix = f".rank{self.world.rank}" if self.world.rank else ""  # this process's own
        if "rng.torch" + suffix in tensors:
            torch.set_rng_state(tensors["rng.torch" + suffix])
        else:  # a process the saving run did not have: a generator of its own
            torch.manual_seed(distributed.rank_seed(self.tc.seed, self.world.rank, self.step))
        if "rng.cuda" + suffix in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda" + suffix], self.device)
        if state.get("carried_state"):
            count = len([k for k in tensors if k.startswith("state.")])
            saved = [tensors[f"state.{i}"] for i in range(count)]  # the whole batch's state
            if self.world.size > 1:
                saved = [s[:, self.rows] for s in saved]
            self.state = tuple(s.to(self.device) for s in saved)
        if self.world.is_main:
            _truncate_metrics(self.run_dir / METRICS_FILE, self.step)
            print(f"resuming {self.run_dir} at step {self.step}", file=sys.stderr)

    def elapsed(self) -> float:
        """Seconds of the run so far, earlier sessions of a resumed run included."""
        return self.elapsed_before + time.monotonic() - self.started

    def _log(self, metrics, **values: Any) -> None:
        if not self.world.is_main:
            return
        record = {"step": self.step, "elapsed": round(self.elapsed(), 3), **values}
        if values.get("kind") == "train":
            record["lr"] = self.optimizer.param_groups[0]["lr"]
            record["epoch"] = round(self.batcher.epochs_done, 6)
        # One write per whole line, flushed, so a crash leaves whole lines only.
        try:
            metrics.write((json.dumps(record) + "\n").encode())
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
            postfix["left"] = format_seconds(max(0.0, self.budget - self.elapsed()))
        return postfix

    def _announce(self) -> None:
        if not self.world.is_main:
            return
        corpus, mc = self.corpus, self.config.model
        precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.autocast]
        limits = []
        if self.tc.max_steps:
            limits.append(f"{self.tc.max_steps} steps")
        if self.tc.max_epochs:
            limits.append(f"{self.tc.max_epochs:g} epochs")
        if self.budget:
            limits.append(format_seconds(self.budget))
        lines = [
            f"corpus {corpus.name}: {len(corpus.train):,} training and {len(corpus.val):,} "
            f"validation characters, vocabulary of {corpus.vocab.size}",
            f"model: {mc.cell} {mc.n_layers}x{mc.hidden_dim}, embedding {mc.embed_dim}, "
            f"{self.net.num_parameters():,} parameters",
            f"training on {self.device} in {precision}, batch {self.tc.batch_size} x "
            f"{self.tc.seq_len} ({self.tc.batching}), stopping at {' or '.join(limits)}",
            f"run directory: {self.run_dir}",
            f"set-up: {self.elapsed() - self.elapsed_before:.1f}s (reading the corpus"
            + (", measuring speeds)" if self.plan else ")"),
        ]
        if self.plan is not None and not self.plan.final_is_whole:
            whole = format_seconds(self.plan.score_seconds(len(corpus.val)))
            lines.append(
                f"the closing evaluation scores {self._scored_words(self.plan.final_chars)}: "
                f"all of them would take {whole} (charlstm eval scores them all)"
            )
        if self.world.size > 1:
            size, kind = self.world.size, self.device.type
            per = self.tc.batch_size // size
            lines.insert(3, f"distributed: {size} processes ({kind}), {per} streams each")
        print("\n".join(lines), file=sys.stderr)

    def _autocast(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)


def loss_and_grads(
    net: CharRNN,
    x: torch.Tensor,
    y: torch.Tensor,
    state: State,
    weight: float,
    params: list[torch.Tensor],
    *,
    generator: torch.Generator | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    scale: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss,
    max_logits: int = LOSS_LOGITS,
) -> tuple[torch.Tensor, list[torch.Tensor], State]:
    """``weight`` times the summed cross-entropy of the scored targets ``y`` after inputs
    ``x``, its gradients with respect to ``params`` (of ``scale(loss)``: fp16's loss scale) and
    the new state. When the batch's logits would exceed ``max_logits`` (a large vocabulary),
    the head and the loss run a slice of time steps at a time, and their gradients enter the
    network's backward pass together: the same gradients, without the batch's whole logits."""
    rows, steps = x.shape
    with autocast():  # autocast is per thread: enter it in the shard's own
        features, new_state = net.features(x, state, generator=generator)
    chunk = max(1, max_logits // (rows * net.vocab_size))
    if chunk >= steps:
        with autocast():
            logits = net.head(features)
        loss = _summed_loss(logits, y) * weight
        return (
            loss.detach(),
            list(torch.autograd.grad(scale(loss), params)),
            detach_state(new_state),
        )
    held = features.detach().requires_grad_()
    head = [net.head.weight, net.head.bias]
    loss = torch.zeros((), device=x.device)
    feature_grads, head_grads = [], [torch.zeros_like(p) for p in head]
    for t in range(0, steps, chunk):
        part = held[:, t : t + chunk]
        with autocast():
            logits = net.head(part)
        piece = _summed_loss(logits, y[:, t : t + chunk]) * weight
        grad_part, *grad_head = torch.autograd.grad(scale(piece), [part, *head])
        feature_grads.append(grad_part)
        for total, grad in zip(head_grads, grad_head, strict=True):
            total += grad
        loss += piece.detach()
    body = [p for p in params if all(p is not h for h in head)]
    body_grads = torch.autograd.grad(features, body, torch.cat(feature_grads, dim=1))
    found = {id(p): g for p, g in zip([*body, *head], [*body_grads, *head_grads], strict=True)}
    return loss, [found[id(p)] for p in params], detach_state(new_state)


def _summed_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")


def _make_optimizer(
    net: CharRNN, tc: TrainConfig, autocast: torch.dtype | None
) -> torch.optim.Optimizer:
    # Decay the weight matrices only: shrinking biases or embedding rows only hurts.
    recurrent, decay, keep = [], [], []
    for name, p in net.named_parameters():
        if tc.optimizer == "muon" and name.startswith("rnn.weight"):
            recurrent.append(p)
        elif p.dim() >= 2 and not name.startswith("embed."):
            decay.append(p)
        else:
            keep.append(p)
    groups = [
        {"params": decay, "weight_decay": tc.weight_decay},
        {"params": keep, "weight_decay": 0.0},
    ]
    betas = (tc.beta1, tc.beta2)
    if tc.optimizer == "muon":
        gates = {"lstm": 4, "gru": 3, "rnn": 1}[net.config.cell]
        muon = {"params": recurrent, "weight_decay": tc.weight_decay, "blocks": gates}
        # Muon's products in bf16 only when training is in bf16: fp32 runs stay fp32 throughout.
        dtype = torch.bfloat16 if autocast == torch.bfloat16 else torch.float32
        return MuonAdamW([muon, *groups], lr=tc.lr, muon_lr=tc.muon_lr, betas=betas, dtype=dtype)
    # The fused update is one kernel for all parameters (4x faster than foreach on a CPU).
    fused = net.head.weight.device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=tc.lr, betas=betas, fused=fused or None)


def find_resume_checkpoint(tc: TrainConfig) -> Path | None:
    """The ``last/`` checkpoint that ``--resume`` points at, or None for a fresh run.

    Changes nothing on disk: a checkpoint that a crash left set aside counts, and the run
    puts it back once it holds the run directory's lock."""
    if not tc.resume:
        return None
    if tc.resume == "auto":
        if not tc.out:
            raise CharLSTMError("--resume auto needs --out RUN_DIR to know which run to continue")
        last = Path(tc.out).expanduser() / "last"
        return last if readable_checkpoint(last) else None
    last = Path(tc.resume).expanduser() / "last"
    if not readable_checkpoint(last):
        raise CharLSTMError(
            f"--resume {tc.resume}: not a run directory with a last/ checkpoint to continue"
        )
    return last


def _check_resume_json(state: dict[str, Any]) -> None:
    """Raise ValueError unless resume.json's fields have the types and ranges a run writes."""

    count = _is_count

    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0

    checks = {
        "step": count,
        "elapsed": lambda v: number(v) and math.isfinite(v),
        "best_val": lambda v: v is None or (number(v) and math.isfinite(v)),
        "batcher": lambda v: isinstance(v, dict) and v and all(map(count, v.values())),
        "param_groups": lambda v: isinstance(v, list) and all(isinstance(g, dict) for g in v),
        "scaler": lambda v: isinstance(v, dict),
        "log_window": lambda v: isinstance(v, list) and len(v) == 2 and number(v[0])
        and count(v[1]),
        "eval_slice": lambda v: v is None or count(v),
    }  # fmt: skip
    optional = ("scaler", "eval_slice")  # absent from runs saved before they existed
    for name, valid in checks.items():
        if name not in state and name not in optional:
            raise KeyError(f"resume.json lacks {name}")
        if name in state and not valid(state[name]):
            raise ValueError(f"resume.json has {name} = {str(state[name])[:60]}")


def _run_dir(config: RunConfig) -> Path:
    """The run directory a run writes: the one it resumes, --out, or a new name."""
    tc = config.train
    resumes = find_resume_checkpoint(tc) is not None  # its errors before anything is created
    if tc.resume and tc.resume != "auto":
        run_dir = Path(tc.resume).expanduser()
        if not run_dir.is_dir():
            raise CharLSTMError(
                f"--resume {tc.resume}: not a run directory with a last/ checkpoint to continue"
            )
    else:
        run_dir = Path(tc.out).expanduser() if tc.out else _default_run_dir(config)
    if run_dir.is_symlink():  # a run must not clear or replace what a link points into
        raise CharLSTMError(
            f"run directory {run_dir} is a symbolic link; give the directory itself, "
            f"{run_dir.resolve()}"
        )
    if run_dir.exists() and not run_dir.is_dir():
        raise CharLSTMError(f"--out {run_dir} is a file, not a directory")
    if not resumes:  # and again once locked, in case another run started there meanwhile
        _check_new_run_dir(config, run_dir)
    return run_dir


def _check_new_run_dir(config: RunConfig, run_dir: Path) -> None:
    """Refuse to start a fresh run in a directory that holds a run, unless --overwrite."""
    tc = config.train
    # What a run leaves that stopped before its first checkpoint: nothing to continue, so the
    # same command starts it again (--resume auto also restarts one that saved only best/).
    restartable = PRE_CHECKPOINT_FILES if tc.resume == "auto" else PRE_CHECKPOINT_FILES - {"best"}
    if all(entry.name in restartable or ".tmp-" in entry.name for entry in _entries(run_dir)):
        return
    if not tc.overwrite:
        raise CharLSTMError(
            f"run directory {run_dir} already exists; use --resume {run_dir} to continue it "
            "or --overwrite to replace it"
        )


def _first_missing(path: Path) -> Path | None:
    """The outermost of ``path`` and its parents that does not exist yet, or None."""
    missing = None
    for place in (path, *path.absolute().parents):
        if place.exists():
            break
        missing = place
    return missing


def _wrote_anything(run_dir: Path) -> bool:
    """True once a run has written something worth keeping: a checkpoint or a log line."""
    return any(entry.is_dir() or entry.stat().st_size for entry in _entries(run_dir))


def _entries(run_dir: Path) -> list[Path]:
    """What ``run_dir`` holds besides the writer's lock."""
    if not run_dir.is_dir():
        return []
    return [entry for entry in run_dir.iterdir() if entry.name != LOCK_FILE]


def _prepare_run_dir(run_dir: Path) -> None:
    """Empty the directory of a fresh run (what :func:`_check_new_run_dir` let it replace),
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
    """Drop log lines written after the checkpoint we resume from, so the log has no repeats;
    lines that are not a record (cut short by a crash, or damaged) go too."""
    if not path.exists():
        return
    if not path.is_file():  # a device such as /dev/zero would be read without end
        raise CharLSTMError(f"{path} is not a regular file; move it away and resume")
    kept = []
    with open(path, encoding="utf-8", errors="replace") as lines:
        for line in lines:
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                continue
            if (
                isinstance(record, dict)
                and _is_count(record.get("step"))
                and record["step"] <= step
            ):
                kept.append(line.rstrip("\n") + "\n")
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CharLSTMError(
            f"cannot write {path}: {e.strerror or e} (the last checkpoint is intact; free some "
            "space and resume)"
        ) from None


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
