"""TrainingSession: the loop of a run — step, log, evaluate, save — until a limit stops it.

A session drives a :class:`~charlstm.trainer.Trainer` and writes the run directory: every
``eval_every`` steps it scores the validation text (:class:`~charlstm.validation.Validation`)
and saves ``best/`` and ``last/``; it logs to ``metrics.jsonl`` and shows progress. It stops at
``max_steps``, ``max_epochs``, the time budget (keeping time for the closing evaluation) or a
signal, after which it saves ``last/`` and raises TrainingInterrupted.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any

import torch

from charlstm.budget import MIN_STEPS, format_seconds
from charlstm.checkpoint import run_info, write_checkpoint
from charlstm.data import Corpus
from charlstm.errors import CharLSTMError, TrainingInterrupted
from charlstm.evaluation import EvalResult, EvaluationStopped
from charlstm.metrics_log import MetricsLog
from charlstm.optimizer import learning_rate, run_progress
from charlstm.plot import CURVES_FILE, write_curves
from charlstm.progress import TrainingProgress
from charlstm.train_state import TrainState
from charlstm.trainer import Trainer
from charlstm.validation import Validation


class TrainingSession:
    """One process's part in a run, from its start (or resumption) to its stop."""

    def __init__(
        self, trainer: Trainer, corpus: Corpus, run_dir: Path, started: float, *,
        progress: bool = True, quiet: bool = False, origin: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        self.trainer, self.corpus, self.run_dir = trainer, corpus, run_dir
        self.origin = origin  # what a fine-tuning run started from, recorded in its checkpoints
        self.sc = trainer.config.session
        self.world = trainer.world
        self.started, self.elapsed_before = started, 0.0  # earlier sessions of a resumed run
        self.quiet = quiet
        self.budget = self.sc.budget_seconds()
        self.validation = Validation(corpus, trainer.net, self.budget, self.world)
        self.progress = TrainingProgress(
            budget=self.budget, max_steps=self.sc.max_steps, enabled=self.world.is_main,
            quiet=quiet or not progress,
        )  # fmt: skip
        self.best_val: float | None = None
        self.log_window = (0.0, 0, 0.0)  # summed loss, steps, and elapsed at the window's start
        self.stop_signal: int | None = None  # set by SIGINT / SIGTERM: stop after this step
        self.interrupted: int | None = None  # the signal the loop stopped for (agreed by all)
        self.session_start = (0, 0.0)  # (step, elapsed) when this session's training began
        self.stopped_by = ""  # the limit that ended the loop: budget, steps, epochs or signal
        self.clock = 0.0  # under torchrun: the run's elapsed seconds, agreed at the last check
        self.curves_failed = False  # drawing curves.png failed once: do not try again
        self.warnings: list[str] = []

    def run(self) -> None:
        """Train until a limit is reached, evaluating and checkpointing on the way; raises
        TrainingInterrupted (after saving last/) when a signal stopped it."""
        trainer, start = self.trainer, self.trainer.step_count
        last_eval_step = start if start > 0 else -1
        self.session_start = (start, self.elapsed())
        self.log_window = (*self.log_window[:2], self.elapsed())
        with self.progress, MetricsLog(self.run_dir, enabled=self.world.is_main) as log:
            while not self._should_stop():
                # Under torchrun, the clock all processes agreed on: they must use the same rate.
                clock = self.clock if self.world.size > 1 else self.elapsed()
                progress = run_progress(
                    self.sc, trainer.step_count, trainer.batcher.epochs_done, clock
                )
                lr = learning_rate(trainer.tc, trainer.step_count, progress)
                loss = trainer.step(lr)
                if loss is None:
                    continue  # a skipped non-finite step: nothing learnt, nothing to log
                self.log_window = (self.log_window[0] + loss, self.log_window[1] + 1,
                                   self.log_window[2])  # fmt: skip
                self.progress.update(trainer.step_count, self.elapsed())
                if trainer.step_count % self.sc.log_every == 0:
                    self._log_training(log, lr)
                if trainer.step_count % self.sc.eval_every == 0:
                    with contextlib.suppress(EvaluationStopped):  # a signal: the loop ends next
                        self._evaluate_and_save(log, self._periodic_chars())
                    last_eval_step = trainer.step_count
                    self.log_window = (*self.log_window[:2], self.elapsed())  # no eval in speed
            if self.interrupted is None:
                try:
                    self._closing_evaluation(log, last_eval_step)
                except EvaluationStopped:
                    self.interrupted = self.stop_signal
            self.progress.finish(trainer.step_count, self.elapsed())
            if self.interrupted is not None:
                self._save(self.run_dir / "last", None, with_resume_state=True)
                raise TrainingInterrupted(self.interrupted, self.run_dir, trainer.step_count)
        self._warn_if_short()

    # ---- stopping -------------------------------------------------------------------------

    def _should_stop(self) -> bool:
        stop_signal, out_of_time = self.stop_signal, self._out_of_time()
        if self.world.size > 1:
            # Signals and clocks are per process: decide together, or the processes part ways.
            signum, late, self.clock = self.world.max(
                [stop_signal or 0, out_of_time, self.elapsed()]
            )
            stop_signal, out_of_time = int(signum) or None, bool(late)
        step, epochs = self.trainer.step_count, self.trainer.batcher.epochs_done
        if stop_signal is not None:
            self.interrupted, self.stopped_by = stop_signal, "signal"
        elif self.sc.max_steps is not None and step >= self.sc.max_steps:
            self.stopped_by = "steps"
        elif self.sc.max_epochs is not None and epochs >= self.sc.max_epochs:
            self.stopped_by = "epochs"
        elif out_of_time:
            self.stopped_by = "budget"
        return bool(self.stopped_by)

    def _out_of_time(self) -> bool:
        if self.validation.plan is None:
            return False
        # Keep enough of the budget for the closing evaluation and checkpoints.
        reserve = self.validation.reserve(evaluated=self.best_val is not None)
        return (
            self.trainer.step_count > 0 and self.elapsed() + reserve >= self.validation.plan.budget
        )

    def _warn_if_short(self) -> None:
        """A run that the budget stopped after a handful of steps says so: it learnt little."""
        steps = self.trainer.step_count
        if self.stopped_by == "budget" and steps < MIN_STEPS:
            self.warnings.append(
                f"only {steps} steps fitted in the {format_seconds(self.budget or 0)} budget "
                f"(fewer than {MIN_STEPS}): the model has learnt little; give a longer "
                "--time-budget or a smaller model"
            )
            self.say(f"warning: {self.warnings[-1]}", essential=True)

    # ---- evaluation -----------------------------------------------------------------------

    def _periodic_chars(self) -> int | None:
        """How many validation characters a periodic evaluation scores (None: all of them)."""
        validation = self.validation
        if validation.plan is None or validation.slice_chars is not None:
            return validation.slice_chars
        first_step, first_elapsed = self.session_start
        now = self.elapsed()
        steps_per_second = (self.trainer.step_count - first_step) / max(now - first_elapsed, 1e-9)
        seconds_left = validation.plan.budget - now - validation.reserve(self.best_val is not None)
        chars = validation.periodic_chars(steps_per_second, seconds_left, self.sc.eval_every)
        self.say(f"evaluating every {self.sc.eval_every} steps on "
                 f"{validation.scored_words(chars or 0)}")  # fmt: skip
        return chars

    def _closing_evaluation(self, log: MetricsLog, last_eval_step: int) -> None:
        """Score the end of training; with a budget, score the best model on as much of the
        validation split as the plan allows when periodic evaluations scored less."""
        plan, step = self.validation.plan, self.trainer.step_count
        if plan is None or self.best_val is None:  # no budget, or the run's only evaluation
            # (A run resumed from a Ctrl-C before its first evaluation has no best/ yet.)
            if last_eval_step != step or self.best_val is None:
                self._evaluate_and_save(log, None if plan is None else plan.final_chars)
            return
        if last_eval_step != step:
            self._evaluate_and_save(log, self.validation.slice_chars)
        if self.validation.rescores_best():
            self._rescore_best(log, plan.final_chars)

    def _evaluate_and_save(self, log: MetricsLog, chars: int | None) -> None:
        """Score the first ``chars`` validation characters (None: all) and save checkpoints."""
        began, step = time.monotonic(), self.trainer.step_count
        # A signal stops a long evaluation at once; under torchrun all processes must agree,
        # so there it waits for the evaluation's end.
        interrupted = (lambda: self.stop_signal is not None) if self.world.size == 1 else None
        with self.trainer.averaged():  # the model a run reports and saves
            result = self.validation.score(chars, interrupted)
        if not math.isfinite(result.perplexity):
            raise CharLSTMError(
                f"the validation loss is {result.loss:g} at step {step}; the model diverged, "
                f"so it is not saved: try a lower --lr (now {self.trainer.tc.lr:g})"
            )
        improved = self.best_val is None or result.loss < self.best_val
        if improved:
            self.best_val = result.loss
            self.progress.show_validation(result.loss)
        scored = time.monotonic()
        log.write(
            step, self.elapsed(), "eval", seconds=round(scored - began, 3), **result.as_dict()
        )
        if improved:
            self._save(self.run_dir / "best", result, with_resume_state=False)
        self._save(self.run_dir / "last", result, with_resume_state=True)
        if self.world.is_main:  # after the checkpoints: a failed plot can never cost one
            self._draw_curves()
        self.validation.last_save_seconds = time.monotonic() - scored
        self.validation.last_eval_seconds = time.monotonic() - began
        self.say(f"step {step}: validation loss {result.loss:.4f} nats/char, {result.bpc:.4f} "
                 f"bpc, perplexity {result.perplexity:.2f}"
                 + ("  (best so far)" if improved else ""))  # fmt: skip

    def _rescore_best(self, log: MetricsLog, chars: int) -> None:
        """Score ``best/`` on the first ``chars`` validation characters and record it there."""
        began = time.monotonic()
        # Training is over: the network's weights can give way to best/'s.
        rescored = self.validation.rescore_best(self.run_dir / "best", self.trainer.config, chars)
        if rescored is None:
            return  # scored already: a finished run resumed again
        step, result = rescored
        log.write(self.trainer.step_count, self.elapsed(), "final", model_step=step,
                  seconds=round(time.monotonic() - began, 3), **result.as_dict())  # fmt: skip
        over = self.validation.scored_words(result.characters + 1)
        self.say(f"best model (step {step}): validation loss {result.loss:.4f} nats/char, "
                 f"{result.bpc:.4f} bpc over {over}")  # fmt: skip

    # ---- files and messages ---------------------------------------------------------------

    def _log_training(self, log: MetricsLog, lr: float) -> None:
        summed, steps, since = self.log_window
        now = self.elapsed()
        speed = (
            steps * self.trainer.tc.batch_size * self.trainer.tc.seq_len / max(now - since, 1e-9)
        )
        log.write(self.trainer.step_count, now, "train", loss=summed / steps, chars_per_s=speed,
                  lr=lr, epoch=round(self.trainer.batcher.epochs_done, 6))  # fmt: skip
        self.progress.show_training(summed / steps, speed)
        self.log_window = (0.0, 0, now)

    def _save(self, directory: Path, val: EvalResult | None, with_resume_state: bool) -> None:
        trainer = self.trainer
        info = run_info(trainer.step_count, trainer.batcher.epochs_done, self.elapsed(), val,
                        self.corpus, self.origin)  # fmt: skip
        resume = None
        if with_resume_state:
            window = self.log_window[:2]
            state = trainer.train_state(self.elapsed(), self.best_val, window,
                                        self.validation.slice_chars)  # fmt: skip
            resume = state.to_files()
        # Rank 0 writes; the others wait for it, and fail with it if it cannot.
        self.world.on_main(
            write_checkpoint, directory, config=trainer.config, vocab=self.corpus.vocab,
            weights=trainer.model_weights(), info=info,
            resume_tensors=resume[0] if resume else None, resume_json=resume[1] if resume else None,
        )  # fmt: skip

    def restore(self, directory: Path, weights: dict[str, torch.Tensor]) -> None:
        """Continue from a ``last/`` checkpoint: weights, optimizer, clock, data position, RNG.
        Resume state that does not fit this run is refused in one line, whatever is wrong."""
        saved = TrainState.read(directory, lambda state: self.trainer.restore(weights, state))
        self.elapsed_before, self.best_val = saved.elapsed, saved.best_val
        self.log_window = (*saved.log_window, 0.0)
        self.validation.slice_chars = saved.eval_slice  # the same slice as before the stop
        if saved.best_val is not None:
            self.progress.show_validation(saved.best_val)
        if self.world.is_main:
            MetricsLog(self.run_dir).truncate(saved.step)
        self.say(f"resuming {self.run_dir} at step {saved.step}")

    def _draw_curves(self) -> None:
        """Redraw RUN_DIR/curves.png. A picture is not worth stopping a run for: a failure
        (no matplotlib, no fonts, a full disk) is reported once and plotting stops."""
        if self.curves_failed:
            return
        try:
            write_curves(self.run_dir)
        except Exception as e:  # anything at all: the run matters more than its picture
            self.curves_failed = True
            self.say(f"warning: cannot draw {self.run_dir / CURVES_FILE} ({e}); training goes "
                     "on without it", essential=True)  # fmt: skip

    def say(self, line: str, essential: bool = False) -> None:
        """Print a message (rank 0 only); a quiet run prints only the essential ones."""
        if self.world.is_main and (essential or not self.quiet):
            self.progress.write(line)

    def elapsed(self) -> float:
        """Seconds of the run so far, earlier sessions of a resumed run included."""
        return self.elapsed_before + time.monotonic() - self.started
