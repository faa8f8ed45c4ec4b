"""Validation during training: how much of the validation text each evaluation scores, and
how much of a time budget to keep for the closing one (the plan comes from
:mod:`charlstm.budget`; this applies it to a running run)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from charlstm import distributed
from charlstm.budget import SAVE_OVERHEAD_SECONDS, BudgetPlan, check_budget, plan_budget
from charlstm.checkpoint import read_checkpoint, write_checkpoint
from charlstm.config import RunConfig
from charlstm.data import Corpus
from charlstm.distributed import World
from charlstm.evaluation import EvalResult, eval_result, measure_score_speed, score_ids
from charlstm.model import CharRNN

# Bytes a checkpoint writes per parameter (weights, two optimizer moments and their average),
# and the disk speed assumed, until a save has been timed.
_SAVE_BYTES_PER_PARAMETER, _ASSUMED_DISK_SPEED = 16, 200e6


class Validation:
    """Scores a training run's network on (a prefix of) the validation split, to a plan."""

    def __init__(
        self, corpus: Corpus, net: CharRNN, budget: float | None,
        world: World = distributed.SINGLE,
    ) -> None:  # fmt: skip
        self.val, self.vocab, self.net = corpus.val, corpus.vocab, net
        self.budget, self.world = budget, world
        self.plan: BudgetPlan | None = None  # with a budget: what evaluations may cost
        # The prefix that periodic evaluations score: fixed at the first one, so the curve
        # is comparable (None: the whole split).
        self.slice_chars: int | None = None
        self.last_eval_seconds: float | None = None  # the last evaluation and its saves
        self.last_save_seconds: float | None = None  # the last saves alone

    def plan_evaluation(
        self, train_speed: float | None, chars_per_step: int, elapsed: float
    ) -> None:
        """With a time budget, measure how fast this model is scored and plan what each
        evaluation scores; given the training speed (a fresh run), refuse a budget that cannot
        train :data:`~charlstm.budget.MIN_STEPS` steps. Without a budget, every evaluation
        scores the whole validation split."""
        if self.budget is None:
            return
        # Each process scores its share of the segments: together, the sum of their speeds.
        speed = self.world.sum([measure_score_speed(self.net)])[0]
        self.plan = plan_budget(self.budget, speed, len(self.val))
        if train_speed is not None:
            check_budget(self.plan, train_speed, chars_per_step, elapsed, self.save_cost())

    def periodic_chars(
        self, steps_per_second: float, seconds_left: float, eval_every: int
    ) -> int | None:
        """How many validation characters a periodic evaluation scores (None: all of them),
        chosen at the first one from the training speed and the seconds left for training."""
        if self.plan is None or self.slice_chars is not None:
            return self.slice_chars
        chosen = self.plan.slice_chars(seconds_left, steps_per_second, eval_every)
        self.slice_chars = int(self.world.max([chosen])[0])  # every process the same slice
        return self.slice_chars

    def rescores_best(self) -> bool:
        """Whether the closing evaluation scores the best model on more than the periodic
        evaluations did."""
        plan = self.plan
        return (
            plan is not None
            and self.slice_chars is not None
            and plan.final_chars > self.slice_chars
        )

    def reserve(self, evaluated: bool) -> float:
        """Seconds to keep at the end of a budget for the closing evaluation and saves
        (``evaluated``: whether the run has evaluated yet)."""
        assert self.plan is not None
        closing = self.plan.score_seconds(self.plan.final_chars) + self.save_cost()
        if not evaluated:
            return closing  # one evaluation, of the closing size
        periodic = self.last_eval_seconds or 0.0
        return periodic + closing if self.rescores_best() else periodic

    def save_cost(self) -> float:
        """Seconds to save checkpoints and redraw the curves: measured once there was a save."""
        if self.last_save_seconds is not None:
            return self.last_save_seconds
        written = _SAVE_BYTES_PER_PARAMETER * self.net.num_parameters()
        return SAVE_OVERHEAD_SECONDS + written / _ASSUMED_DISK_SPEED

    def score(self, chars: int | None, should_stop: Callable[[], bool] | None) -> EvalResult:
        """The network's loss on the first ``chars`` validation characters (None: all).
        ``should_stop`` ends a long evaluation early (EvaluationStopped)."""
        # Each process scores its share of the validation text; the sums make the same whole.
        part = (self.world.rank, self.world.size)
        text = self.val if chars is None else self.val[:chars]
        nats, count = score_ids(self.net, [text], part=part, should_stop=should_stop)
        nats, count = self.world.sum([nats, count])
        return eval_result(nats, int(count))

    def rescore_best(
        self, best: Path, config: RunConfig, chars: int
    ) -> tuple[int, EvalResult] | None:
        """Score the checkpoint ``best`` (loaded into the network) on the first ``chars``
        validation characters and record the score there, the periodic one kept beside it;
        returns its step and score, or None if it was rescored already."""
        checkpoint = read_checkpoint(best)
        if "val_slice" in checkpoint.info:
            return None
        self.net.load_state_dict(checkpoint.weights)
        result = self.score(chars, None)
        info = {**checkpoint.info, "val": result.as_dict(), "val_slice": checkpoint.info["val"]}
        self.world.on_main(write_checkpoint, best, config=config, vocab=self.vocab,
                           weights=checkpoint.weights, info=info)  # fmt: skip
        return checkpoint.info["step"], result

    def scored_words(self, chars: int) -> str:
        """``all 111,538 validation characters`` or ``the first 1,000,000 of 10,000,000 ...``
        for a prefix of ``chars`` characters (it scores one fewer: the first has no context)."""
        total = len(self.val)
        if chars >= total:
            return f"all {total:,} validation characters"
        return f"the first {chars:,} of {total:,} validation characters"
