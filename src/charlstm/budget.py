"""How a wall-clock budget is spent: measured speeds, evaluation slices and the end's reserve.

A budgeted run measures how fast this machine trains its model and how fast it scores text,
before the first step. From those two rates it decides how many validation characters the
periodic evaluations score (one fixed prefix of the split, the same every time, so the curve
is comparable), how many the closing evaluation scores (the whole split, or the largest prefix
that fits its share of the budget), how much time to keep for that end, and whether the budget
can train anything at all: a budget that leaves fewer than :data:`MIN_STEPS` steps is refused
with the smallest one that would not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from charlstm.errors import CharLSTMError

# A run shorter than this many optimizer steps has learnt little more than character counts.
MIN_STEPS = 50
# The closing evaluation may take this share of the budget; past it, a prefix is scored.
FINAL_EVAL_SHARE = 0.1
# All periodic evaluations of a run together aim at this share of the budget.
PERIODIC_EVAL_SHARE = 0.05
# Saving checkpoints and redrawing the curves after an evaluation takes at least this long, as
# far as anything is known before the first save was timed.
SAVE_OVERHEAD_SECONDS = 1.0
# A periodic slice is at least this long (or the whole split), so its loss is not noise.
MIN_SLICE = 16_384
# Scoring primes each of up to this many segments with this many unscored characters.
EVAL_SEGMENTS, EVAL_PRIME = 64, 256
# Scoring runs this much slower than its probe predicts, at worst seen (other processes on the
# cores, colder caches): plans allow for it so that a budget ends on time.
SCORE_MARGIN = 1.2


class BudgetTooSmall(CharLSTMError):
    """The time budget cannot train :data:`MIN_STEPS` steps of this model on this machine."""


@dataclass(frozen=True)
class BudgetPlan:
    """What a run with a wall-clock budget spends on evaluation, decided from measured speeds."""

    budget: float  # seconds, evaluation and saving included
    score_speed: float  # characters per second at which this machine scores the run's model
    val_chars: int  # length of the validation split
    final_chars: int  # how many of its characters the closing evaluation scores

    @property
    def final_is_whole(self) -> bool:
        """Whether the closing evaluation covers the whole validation split."""
        return self.final_chars >= self.val_chars

    def score_seconds(self, characters: int) -> float:
        """Seconds to score ``characters`` validation characters, their priming included."""
        return score_seconds(characters, self.score_speed)

    def slice_chars(self, seconds_left: float, steps_per_second: float, eval_every: int) -> int:
        """Length of the prefix that every periodic evaluation scores: all of them together
        take about :data:`PERIODIC_EVAL_SHARE` of the budget, given how many are still to come
        in ``seconds_left`` at ``steps_per_second``."""
        evaluations = 1 + seconds_left * steps_per_second / eval_every
        seconds = PERIODIC_EVAL_SHARE * self.budget / evaluations
        fits = int(seconds * self.score_speed / SCORE_MARGIN) - EVAL_SEGMENTS * EVAL_PRIME
        return min(self.val_chars, max(MIN_SLICE, fits))


def plan_budget(budget: float, score_speed: float, val_chars: int) -> BudgetPlan:
    """The plan for a run of ``budget`` seconds that scores ``score_speed`` characters per
    second and has ``val_chars`` to validate on."""
    fits = int(FINAL_EVAL_SHARE * budget * score_speed / SCORE_MARGIN) - EVAL_SEGMENTS * EVAL_PRIME
    final = min(val_chars, max(MIN_SLICE, fits))
    return BudgetPlan(budget, score_speed, val_chars, final)


def check_budget(
    plan: BudgetPlan,
    train_speed: float,
    chars_per_step: int,
    elapsed: float,
    save_seconds: float,
) -> None:
    """Raise :class:`BudgetTooSmall` when ``plan`` leaves fewer than :data:`MIN_STEPS` steps at
    ``train_speed`` characters per second after ``elapsed`` seconds of start-up, naming the
    smallest budget that would not."""
    reserve = plan.score_seconds(plan.final_chars) + save_seconds
    steps = max(0.0, plan.budget - elapsed - reserve) * train_speed / chars_per_step
    if steps >= MIN_STEPS:
        return
    training = MIN_STEPS * chars_per_step / train_speed
    whole = plan.score_seconds(plan.val_chars)
    # The closing evaluation takes the whole split if that fits its share, else its share.
    smallest = elapsed + save_seconds + training + whole
    if whole > FINAL_EVAL_SHARE * smallest:
        smallest = (elapsed + save_seconds + training) / (1 - FINAL_EVAL_SHARE)
    raise BudgetTooSmall(
        f"a time budget of {format_seconds(plan.budget)} trains about {steps:.0f} steps of this "
        f"model here ({train_speed:,.0f} characters/s, {chars_per_step:,} a step, after "
        f"{format_seconds(elapsed)} of start-up and {format_seconds(reserve)} kept to evaluate "
        f"and save): give --time-budget {format_seconds(_round_up(smallest))} or more, or a "
        "smaller model (--hidden-dim, --n-layers, --batch-size)"
    )


def score_seconds(characters: int, chars_per_second: float) -> float:
    """Seconds to score ``characters`` at ``chars_per_second``, each segment's priming included."""
    segments = max(1, min(EVAL_SEGMENTS, characters // (4 * EVAL_PRIME)))
    return SCORE_MARGIN * (characters + segments * EVAL_PRIME) / chars_per_second


def format_seconds(seconds: float) -> str:
    """``42s``, ``3m05s`` or ``1h20m``."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _round_up(seconds: float) -> float:
    """Up to a budget a person would type: whole 10 s below 5 minutes, whole minutes above."""
    step = 10 if seconds < 300 else 60
    return math.ceil(seconds / step) * step
