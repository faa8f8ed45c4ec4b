"""Presets: the settings that learn best in a given wall-clock budget, and how one is picked.

A preset fills the settings a configuration leaves at their defaults (:func:`apply_preset`);
``RunConfig`` applies its ``preset`` when it is built, so a configuration made in Python holds
the preset's settings just as one made by the command line does. ``preset = "auto"`` leaves
the choice to :func:`train <charlstm.training.train>`, which measures this machine's speed
once the corpus is read and picks with :func:`choose_preset`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from charlstm.config import RunConfig

# Chosen by experiment (benchmarks/time_to_quality.py, docs/experiments.md): the settings that
# reach the lowest validation loss on Tiny Shakespeare within each wall-clock budget on a
# 2-core CPU. The configuration's defaults are the 5-minute preset itself.
PRESETS: dict[str, dict[str, Any]] = {
    # A short run cannot overfit: no dropout, and one wide layer with shorter sequences for
    # more updates of a network that learns fast; one evaluation, at the end.
    "1m": {
        "time_budget": "1m",
        "n_layers": 1,
        "hidden_dim": 384,
        "dropout": 0.0,
        "weight_decay": 0.2,
        "seq_len": 64,
        "eval_every": 5000,
    },
    "5m": {"time_budget": "5m"},
    # Long enough for a wider network, which memorises 1 MB of text unless dropout and weight
    # decay are strong (with Muon, 384 units still peak two thirds of the way through), and
    # for a longer weight average, which holds the best weights through that overfitting.
    "20m": {
        "time_budget": "20m",
        "hidden_dim": 384,
        "dropout": 0.5,
        "weight_decay": 0.5,
        "lr": 7e-3,
        "warmup_steps": 100,
        "ema": 0.998,
    },
}
# The value of ``preset`` that asks the run to pick one for this machine and corpus.
AUTO = "auto"
PRESET_CHOICES = (*PRESETS, AUTO)

# The default model's training speed on the machine the presets were tuned on: a 2-core
# AVX-512 BF16 VM (docs/benchmarks.md).
PRESET_MACHINE_SPEED = 80_000.0
# Settings that shape what a run learns; a run given any of them, or a --preset, or a step or
# epoch limit, keeps the settings it was given rather than having a preset picked for it.
LEARNING_SETTINGS = frozenset(
    key
    for settings in PRESETS.values()
    for key in settings
    if key not in ("time_budget", "eval_every")
)

# Passes over the training text that a budget reads above which the best weights may come
# before the end, so the run evaluates about SEVERAL_EPOCHS_EVALUATIONS times (fewer when their
# saves would take more than their share of a short budget) to keep them in best/; and above
# which a preset's network memorises the text part-way through the run unless regularised
# harder, with at least MANY_EPOCHS_DROPOUT (docs/benchmarks.md: the corpus suite).
# A pass over the text makes at least this many steps of a picked preset's batch, so that each
# stream carries its state across several windows: a small text gets fewer streams, and a tiny
# one shorter windows too.
MIN_STEPS_PER_PASS = 8
SEVERAL_EPOCHS = 6.0
SEVERAL_EPOCHS_EVALUATIONS = 10
MANY_EPOCHS = 30.0
MANY_EPOCHS_DROPOUT = 0.5


def apply_preset(config: RunConfig, settings: dict[str, Any]) -> RunConfig:
    """``config`` with ``settings`` (flat ``name: value``, as in :data:`PRESETS`) written over
    every setting it leaves at its default; the settings it was given win. A fine-tuning run
    (``init_from``) keeps the shape of its model: its source's."""
    return dataclasses.replace(config, **preset_sections(config, settings))


def preset_sections(config: RunConfig, settings: dict[str, Any]) -> dict[str, Any]:
    """Each section of ``config`` with ``settings`` written over its defaults (see
    :func:`apply_preset`)."""
    from charlstm.config import SHAPE_SETTINGS

    # A fine-tuning run's model has its source's shape, whatever a preset's is.
    kept = SHAPE_SETTINGS if config.train.init_from else ()
    sections = {}
    for section in dataclasses.fields(config):
        part = getattr(config, section.name)
        fills = {
            f.name: settings[f.name]
            for f in dataclasses.fields(part)
            if f.name in settings and f.name not in kept and getattr(part, f.name) == _default(f)
        }
        sections[section.name] = dataclasses.replace(part, **fills) if fills else part
    return sections


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def picks_preset(overrides: dict[str, Any]) -> bool:
    """Whether a run given these flat overrides leaves its preset to the machine's speed (see
    :func:`preset_for`): no preset, no step or epoch limit, no :data:`LEARNING_SETTINGS`."""
    given = {key.replace("-", "_") for key in overrides}
    return not given & {"preset", "max_steps", "max_epochs", *LEARNING_SETTINGS}


def preset_for(budget_seconds: float, chars_per_second: float) -> str:
    """The preset for a wall-clock budget on a machine that trains the default model at
    ``chars_per_second``: the one tuned for the budget in which the presets' machine
    (:data:`PRESET_MACHINE_SPEED`) trains as many characters, nearest on a log scale."""
    from charlstm.config import parse_duration

    if budget_seconds <= 0 or chars_per_second <= 0:
        raise ValueError("the budget and the speed must be positive")
    equivalent = budget_seconds * chars_per_second / PRESET_MACHINE_SPEED
    tuned = {name: parse_duration(settings["time_budget"]) for name, settings in PRESETS.items()}
    return min(tuned, key=lambda name: abs(math.log(equivalent / tuned[name])))


@dataclass(frozen=True)
class PresetChoice:
    """The preset picked for a run, the settings it brings, and why, in one line."""

    name: str
    settings: dict[str, Any]
    reason: str


def choose_preset(
    budget_seconds: float,
    chars_per_second: float,
    train_chars: int,
    config: RunConfig | None = None,
    picked_speed: float | None = None,
) -> PresetChoice:
    """The preset for a budget on this machine (:func:`preset_for`), with how often it evaluates
    and its regularisation fitted to how many times the budget reads a corpus of
    ``train_chars`` characters. ``config`` is the configuration the preset will be applied to
    (default: the defaults): the batch it sets decides how many steps the budget trains, and an
    ``eval_every`` it sets is kept. ``picked_speed`` is how fast the picked settings train
    (characters per second; default ``chars_per_second``), from which the steps are counted.
    The ``settings`` include the preset's own but its budget: the run keeps the budget it was
    given, which chose the preset."""
    from charlstm.budget import PERIODIC_EVAL_SHARE, SAVE_OVERHEAD_SECONDS
    from charlstm.config import ModelConfig, RunConfig, SessionConfig

    config = RunConfig() if config is None else config
    name = preset_for(budget_seconds, chars_per_second)
    epochs = budget_seconds * chars_per_second / max(train_chars, 1)
    own = {key: value for key, value in PRESETS[name].items() if key != "time_budget"}
    settings: dict[str, Any] = {**own, "preset": name}
    fitted = []
    batch = _fit_batch(config, settings, train_chars)
    if batch:
        fitted.append(batch)
    if epochs > MANY_EPOCHS:
        dropout = settings.get("dropout", ModelConfig.dropout)
        settings["dropout"] = max(dropout, MANY_EPOCHS_DROPOUT)
        fitted.append(f"dropout {settings['dropout']:g}: a small text read many times is memorised")
    # Each evaluation also saves checkpoints: together they keep to their share of the budget.
    affordable = int(PERIODIC_EVAL_SHARE * budget_seconds / SAVE_OVERHEAD_SECONDS)
    evaluations = min(SEVERAL_EPOCHS_EVALUATIONS, affordable)
    evaluates_at_will = config.session.eval_every == SessionConfig.eval_every
    if epochs > SEVERAL_EPOCHS and evaluations >= 2 and evaluates_at_will:
        train = apply_preset(config, settings).train
        speed = chars_per_second if picked_speed is None else picked_speed
        steps = budget_seconds * speed / (train.batch_size * train.seq_len)
        often = max(1, round(steps / evaluations))
        if often < settings.get("eval_every", SessionConfig.eval_every):
            settings["eval_every"] = often
            fitted.append(f"an evaluation every {often} steps, so best/ keeps the best weights")
    reason = (
        f"this machine trains the 5m settings at {chars_per_second:,.0f} chars/s "
        f"({chars_per_second / PRESET_MACHINE_SPEED:.2f}x the machine the presets were tuned "
        f"on), so the budget reads the {train_chars:,} training characters about "
        f"{epochs:.3g} times; {'; '.join(fitted) or 'its own regularisation'}"
    )
    return PresetChoice(name, settings, reason)


def _fit_batch(config: RunConfig, settings: dict[str, Any], train_chars: int) -> str | None:
    """Fewer streams (then shorter ones) for a text too small for :data:`MIN_STEPS_PER_PASS`
    steps of the batch ``config`` and ``settings`` make, unless the run set them; written into
    ``settings``, and said in a phrase."""
    from charlstm.config import TrainConfig

    train = apply_preset(config, settings).train
    batch, seq_len = train.batch_size, train.seq_len
    if config.train.batch_size == TrainConfig.batch_size:
        batch = max(1, min(batch, train_chars // (seq_len * MIN_STEPS_PER_PASS)))
    too_long = batch * seq_len * MIN_STEPS_PER_PASS > train_chars
    if too_long and config.train.seq_len == TrainConfig.seq_len:
        seq_len = max(1, min(seq_len, train_chars // MIN_STEPS_PER_PASS))
    if (batch, seq_len) == (train.batch_size, train.seq_len):
        return None
    settings.update(batch_size=batch, seq_len=seq_len)
    return f"batches of {batch} x {seq_len}, so that a pass over the text is several steps"
