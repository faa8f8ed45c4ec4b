"""What a person sees while a model trains: one status line, kept up to date.

On a terminal, a tqdm bar redrawn in place; elsewhere (a log file, a batch job) its
carriage-return frames would pile up into one unreadable line, so the same status is a plain
line every :data:`PLAIN_EVERY_SECONDS`. Losses are in bits per character, as the plots are.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import TextIO

from tqdm import tqdm

from charlstm.budget import format_seconds

# Without a terminal, a status line at most this often: enough to see that a run is alive and
# how it goes, few enough that a day-long run's log stays readable.
PLAIN_EVERY_SECONDS = 30.0
# On a terminal, a redraw at most this often: smooth to the eye, and no cost to training.
REDRAW_EVERY_SECONDS = 0.1


class TrainingProgress:
    """Step, share of the budget (or of ``max_steps``), training loss, speed, best validation
    loss and time left, which with a ``budget`` (seconds) counts evaluation as the budget does.

    ``enabled=False`` (torchrun ranks but 0) shows nothing, messages included. ``quiet=True``
    hides the bar and status lines only: :meth:`write` still prints, the trainer choosing which
    messages a quiet run gets. ``clock`` (monotonic seconds) paces redraws; tests replace it.
    """

    def __init__(
        self,
        *,
        budget: float | None = None,
        max_steps: int | None = None,
        enabled: bool = True,
        quiet: bool = False,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.budget = budget if budget else None
        self.max_steps = max_steps
        self.enabled = enabled
        self.stream: TextIO = stream if stream is not None else sys.stderr
        self.show_bar = enabled and not quiet
        self.tty = _isatty(self.stream)
        self.clock = clock
        self.step, self.elapsed = 0, 0.0
        self.loss: float | None = None  # nats per character, like the values passed in
        self.speed: float | None = None
        self.best_val: float | None = None
        self._start: tuple[int, float] | None = None  # (step, elapsed) at the first update
        self._last_shown = clock()
        self._bar: tqdm | None = None

    def update(self, step: int, elapsed: float) -> None:
        """Record the step reached after ``elapsed`` seconds of the run (set-up, evaluation
        and earlier sessions of a resumed run included); redraws when one is due."""
        self.step, self.elapsed = step, elapsed
        if self._start is None:
            self._start = (step, elapsed)
        every = REDRAW_EVERY_SECONDS if self.tty else PLAIN_EVERY_SECONDS
        if self.show_bar and self.clock() - self._last_shown >= every:
            self._show(self.status())

    def show_training(self, loss_nats: float, chars_per_s: float) -> None:
        """The mean training loss (nats per character) and speed of the last few steps."""
        self.loss, self.speed = loss_nats, chars_per_s

    def show_validation(self, best_val_nats: float) -> None:
        """The best validation loss so far, in nats per character (shown in bpc)."""
        self.best_val = best_val_nats

    def write(self, line: str) -> None:
        """Print a message line above the bar (or between status lines), leaving it intact."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            self.stream.write(line + "\n")
            self.stream.flush()

    def finish(self, step: int, elapsed: float) -> None:
        """Show the final figures, after the last evaluation, whatever the pacing."""
        self.step, self.elapsed = step, elapsed
        if self.show_bar:
            self._show(self.status(final=True))

    def close(self) -> None:
        """End the bar, leaving its last frame on screen; later output starts a new line."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> TrainingProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def status(self, final: bool = False) -> str:
        """The status as one line, e.g. ``step 400 | 43% of 5m00s | train 2.337 bpc |
        81,000 chars/s | val 2.410 bpc | 2m50s left`` (the share is left to a drawn bar)."""
        parts = [f"step {self.step:,}" + (f"/{self.max_steps:,}" if self.max_steps else "")]
        done, total = self._done()
        if total and not self.tty:
            of = f" of {format_seconds(self.budget)}" if self.budget else ""
            parts.append(f"{100 * done / total:.0f}%{of}")
        if self.loss is not None:
            parts.append(f"train {_bpc(self.loss):.3f} bpc")
        if self.speed is not None:
            parts.append(f"{self.speed:,.0f} chars/s")
        if self.best_val is not None:
            parts.append(f"val {_bpc(self.best_val):.3f} bpc")
        left = self._seconds_left()
        if final or left is None:
            parts.append(f"{format_seconds(self.elapsed)} {'in all' if final else 'elapsed'}")
        else:
            parts.append(f"{format_seconds(left)} left")
        return " | ".join(parts)

    def _done(self) -> tuple[float, float | None]:
        """How far the run is, of what total: budget seconds, else steps (None: open-ended)."""
        total = self.budget or self.max_steps
        done = self.elapsed if self.budget else self.step
        return (min(done, total) if total else done), total

    def _seconds_left(self) -> float | None:
        if self.budget:  # the budget ends the run, whatever the steps cost
            return max(0.0, self.budget - self.elapsed)
        if not self.max_steps or self._start is None or self.step <= self._start[0]:
            return None
        # At this session's pace per step, evaluations included: they recur at the same rate.
        pace = (self.elapsed - self._start[1]) / (self.step - self._start[0])
        return max(0, self.max_steps - self.step) * pace

    def _show(self, line: str) -> None:
        self._last_shown = self.clock()
        if not self.tty:
            self.stream.write(line + "\n")
            self.stream.flush()
            return
        done, total = self._done()  # the bar's total: the budget's seconds, else the steps
        if self._bar is None:  # made at the first frame, so nothing shows before training
            self._bar = tqdm(
                total=total,
                initial=done,
                desc=line,
                file=self.stream,
                bar_format="{percentage:3.0f}%|{bar}| {desc}" if total else "{desc}",
                dynamic_ncols=True,
                disable=False,  # shown on any stream that calls itself a terminal
            )
        else:
            self._bar.n = done
            self._bar.set_description_str(line, refresh=False)
            self._bar.refresh()


def _bpc(nats: float) -> float:
    return nats / math.log(2)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
