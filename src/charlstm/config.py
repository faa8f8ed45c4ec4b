"""The one typed configuration shared by the CLI, config files and checkpoints.

Every default lives here and nowhere else. Each field's ``help`` metadata becomes the text of
its ``--kebab-case`` command-line flag; a TOML config file uses the same names (with ``-`` or
``_``), and a checkpoint stores these dataclasses as JSON.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from charlstm.errors import CharLSTMError
from charlstm.presets import PRESET_CHOICES, PRESETS, preset_sections

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib


def option(
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    essential: bool = False,
    **kw: Any,
) -> Any:
    """A dataclass field that also describes its command-line flag (``essential``: listed
    first in ``charlstm train --help``; the rest are under "advanced")."""
    metadata = {"help": help, "choices": choices, "essential": essential}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


CELLS = ("lstm", "gru", "rnn")
HEAD_INPUTS = ("all", "last")
BATCHING = ("stateful", "random")
SCHEDULES = ("cosine", "constant")
OPTIMIZERS = ("muon", "adamw")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda", "mps")
UNKNOWN_POLICIES = ("error", "skip", "replace")
# `charlstm compare` trains these cells, in this order, each for this budget unless told.
COMPARE_CELLS = ("rnn", "gru", "lstm")
COMPARE_BUDGET = "10m"
# `charlstm inspect` reads this many characters of its text unless told.
INSPECT_MAX_CHARS = 20_000
# `charlstm export` writes these formats; its ONNX graphs declare this opset (ONNX Runtime 1.12
# and later run it) and compute in float32.
EXPORT_FORMATS = ("onnx",)
ONNX_OPSET = 17
# A config file holds a few dozen settings: anything far larger is the wrong file.
MAX_CONFIG_BYTES = 1 << 20


@dataclass
class ModelConfig:
    """Shape of the network; stored with its weights so it can be rebuilt without the corpus."""

    cell: str = option("lstm", "recurrent cell type", choices=CELLS, essential=True)
    embed_dim: int = option(128, "width of the character embedding")
    hidden_dim: int = option(256, "hidden units per recurrent layer", essential=True)
    n_layers: int = option(2, "number of stacked recurrent layers", essential=True)
    dropout: float = option(0.2, "dropout on every layer's output, in [0, 1)")
    head_input: str = option(
        "all",
        "what the output head reads: every layer's output side by side, or the last layer's",
        choices=HEAD_INPUTS,
    )

    def validate(self) -> None:
        """Raise CharLSTMError for shapes that cannot build a network."""
        _check_choices(self)
        _check_finite(self)
        for name in ("embed_dim", "hidden_dim", "n_layers"):
            _require(getattr(self, name) >= 1, f"{_flag(name)} must be at least 1")
        _require(0 <= self.dropout < 1, "--dropout must be in [0, 1)")

    def parameter_count(self, vocab_size: int) -> int:
        """The network's trainable parameters, by arithmetic: nothing is allocated, so absurd
        sizes can be refused before building them."""
        gates = {"lstm": 4, "gru": 3, "rnn": 1}[self.cell] * self.hidden_dim
        recurrent = gates * (self.embed_dim + self.hidden_dim + 2)  # W_ih, W_hh, two biases
        recurrent += (self.n_layers - 1) * gates * (2 * self.hidden_dim + 2)
        heads = self.n_layers if self.head_input == "all" else 1
        head = (heads * self.hidden_dim + 1) * vocab_size
        return vocab_size * self.embed_dim + recurrent + head


# The model settings that decide the shapes of the weights (the others may change freely).
SHAPE_SETTINGS = ("cell", "embed_dim", "hidden_dim", "n_layers", "head_input")


@dataclass
class DataConfig:
    """Where the text comes from and how it is split."""

    data: list[str] = option(
        ["shakespeare"],
        "training text: files, directories, or a built-in corpus "
        "(shakespeare, tinyshakespeare, enwik8, text8)",
        essential=True,
    )
    val_data: list[str] = option(
        [], "validation text files (default: the last --val-fraction of --data)", essential=True
    )
    val_fraction: float = option(0.1, "fraction of --data held out for validation, from the end")
    encoding: str = option(
        "utf-8", "text encoding of the files (any Python codec), or 'bytes' to model raw bytes"
    )
    unknown: str = option(
        "error",
        "with --init-from: characters of the text that the model never saw: error, skip them "
        "(dropped from the text) or replace them (by a space, else a newline)",
        choices=UNKNOWN_POLICIES,
    )
    extend_vocab: bool = option(
        False,
        "with --init-from: add the characters of the text that the model never saw to its "
        "vocabulary, with new embedding and output rows (the others keep their ids and weights)",
    )

    def validate(self) -> None:
        """Raise CharLSTMError for settings that cannot produce a split."""
        _check_choices(self)
        _check_finite(self)
        _require(len(self.data) > 0, "--data needs at least one file, directory or corpus name")
        if not self.val_data:
            _require(0 < self.val_fraction < 1, "--val-fraction must be in (0, 1)")


@dataclass
class TrainConfig:
    """How the model learns: batching, optimizer, schedule, arithmetic, seed."""

    batch_size: int = option(64, "parallel streams (sequences) per batch")
    seq_len: int = option(128, "characters per stream per step; gradients are truncated here")
    batching: str = option(
        "stateful",
        "stateful: contiguous streams with the state carried between batches; "
        "random: independent random windows with the state reset",
        choices=BATCHING,
    )
    optimizer: str = option(
        "muon",
        "muon: Muon for the recurrent weight matrices and AdamW for the rest; adamw: AdamW for all",
        choices=OPTIMIZERS,
    )
    lr: float = option(1e-2, "peak learning rate of AdamW")
    muon_lr: float = option(
        3e-2, "peak learning rate of Muon (--optimizer muon), on the same schedule as --lr"
    )
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.99, "AdamW beta2")
    weight_decay: float = option(
        0.4, "decoupled weight decay, scaled by --lr (matrices only, not biases or embedding)"
    )
    warmup_steps: int = option(50, "linear learning-rate warm-up steps")
    schedule: str = option(
        "cosine",
        "learning rate after warm-up: cosine decay to --min-lr-ratio, or constant",
        choices=SCHEDULES,
    )
    min_lr_ratio: float = option(0.1, "final learning rate of the cosine schedule, as a fraction")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0 = off)")
    ema: float = option(
        0.99,
        "decay of an exponential moving average of the weights, the model that evaluation, "
        "checkpoints and sampling use (0 = off: the weights as trained)",
    )
    precision: str = option(
        "auto",
        "arithmetic for training: auto (bf16 where the hardware has it, else fp32), fp32, "
        "bf16 or fp16 (CUDA only)",
        choices=PRECISIONS,
    )
    preset: str | None = option(
        None,
        "start from the settings that reach the lowest validation loss in that wall time on a "
        "2-core AVX-512 CPU: 1m, 5m (the defaults) or 20m, or auto: the one that suits "
        "--time-budget at this machine's measured speed and the corpus's size; other settings "
        "override it. `charlstm train` uses auto unless given --max-steps, --max-epochs or a "
        "setting a preset tunes",
        choices=PRESET_CHOICES,
        essential=True,
        compare=False,  # a run is what its settings are, whichever preset brought them
    )
    init_from: str | None = option(
        None,
        "fine-tune: start from the weights, model shape and vocabulary of this run directory "
        "(its best/) or checkpoint, with a fresh optimizer and schedule, in a new run directory",
        essential=True,
    )
    seed: int = option(
        1337, "random seed: the same seed and settings repeat a CPU run exactly", essential=True
    )

    def validate(self) -> None:
        """Raise CharLSTMError for settings no training run can use."""
        _check_choices(self)
        _check_finite(self)
        _check_seed(self.seed)
        for name in ("batch_size", "seq_len"):
            _require(getattr(self, name) >= 1, f"{_flag(name)} must be at least 1")
        _require(self.lr > 0, "--lr must be greater than 0")
        _require(self.muon_lr > 0, "--muon-lr must be greater than 0")
        _require(0 <= self.beta1 < 1, "--beta1 must be in [0, 1)")
        _require(0 <= self.beta2 < 1, "--beta2 must be in [0, 1)")
        _require(self.weight_decay >= 0, "--weight-decay must not be negative")
        _require(self.warmup_steps >= 0, "--warmup-steps must not be negative")
        _require(0 <= self.min_lr_ratio <= 1, "--min-lr-ratio must be in [0, 1]")
        _require(self.grad_clip >= 0, "--grad-clip must not be negative (0 turns it off)")
        _require(0 <= self.ema < 1, "--ema must be in [0, 1) (0 turns it off)")


@dataclass
class SessionConfig:
    """How a run is carried out: when it stops, what it logs, where it writes, on what
    device. Unlike the other sections, a resumed run may change these."""

    max_steps: int | None = option(None, "stop after this many optimizer steps", essential=True)
    max_epochs: float | None = option(None, "stop after this many passes over the training text")
    time_budget: str | None = option(
        None,
        "stop after this wall time, evaluation and saving included (90, 90s, 5m, 1h); "
        "with no stopping flag at all the budget is 5m",
        essential=True,
    )
    eval_every: int = option(
        1000, "evaluate on the validation text and save a checkpoint every N steps"
    )
    log_every: int = option(10, "append a training line to metrics.jsonl every N steps")
    max_bad_steps: int = option(
        5, "stop after this many consecutive steps with a non-finite loss (each one is skipped)"
    )
    device: str = option(
        "auto", "auto picks cuda, then mps, then cpu", choices=DEVICES, essential=True
    )
    out: str | None = option(
        None, "run directory (default: runs/<corpus>-<timestamp>)", essential=True
    )
    resume: str | None = option(
        None,
        "continue the run in this directory from its last checkpoint; 'auto' resumes --out "
        "if it holds one and starts it otherwise",
        essential=True,
    )
    overwrite: bool = option(False, "replace an existing run directory instead of refusing")
    sample_length: int = option(
        500, "characters to sample at the end of training (0 = none)", essential=True
    )

    def validate(self) -> None:
        """Raise CharLSTMError for settings no training run can use."""
        _check_choices(self)
        _check_finite(self)
        _require(
            not (self.resume and self.overwrite),
            f"--resume {self.resume} continues a run and --overwrite replaces one: give one of "
            "them, not both",
        )
        for name in ("eval_every", "log_every", "max_bad_steps"):
            _require(getattr(self, name) >= 1, f"{_flag(name)} must be at least 1")
        _require(self.max_steps is None or self.max_steps >= 1, "--max-steps must be at least 1")
        _require(self.max_epochs is None or self.max_epochs > 0, "--max-epochs must be above 0")
        _require(self.sample_length >= 0, "--sample-length must not be negative")
        self.budget_seconds()

    def budget_seconds(self) -> float | None:
        """The wall-clock budget in seconds: --time-budget, else 5 minutes if no limit is set."""
        if self.time_budget is not None:
            return parse_duration(self.time_budget)
        if self.max_steps is None and self.max_epochs is None:
            return parse_duration(DEFAULT_TIME_BUDGET)
        return None


DEFAULT_TIME_BUDGET = "5m"


@dataclass
class RunConfig:
    """Everything that defines a training run; saved in every checkpoint's config.json.

    ``model``, ``data`` and ``train`` are what the run learns; ``session`` is how it is run
    (a resumed run may change it). A ``train.preset`` fills the settings left at their defaults
    when the configuration is built: ``RunConfig(train=TrainConfig(preset="20m"))`` holds the
    20-minute settings.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    session: SessionConfig = field(default_factory=SessionConfig)

    def __post_init__(self) -> None:
        if self.train.preset in PRESETS:
            for name, section in preset_sections(self, PRESETS[self.train.preset]).items():
                setattr(self, name, section)

    def validate(self) -> RunConfig:
        """Check every section; returns self so calls can be chained."""
        for section in dataclasses.fields(self):
            getattr(self, section.name).validate()
        data = self.data
        fitting = "--extend-vocab" if data.extend_vocab else f"--unknown {data.unknown}"
        _require(
            bool(self.train.init_from) or (data.unknown == "error" and not data.extend_vocab),
            f"{fitting} fits a text to the vocabulary of a model that training starts from: "
            "give --init-from RUN_DIR too",
        )
        _require(
            not (data.extend_vocab and data.unknown != "error"),
            f"--extend-vocab adds the characters the model never saw and --unknown "
            f"{data.unknown} removes them: give one of them",
        )
        return self

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready nested dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        """Rebuild exactly from :meth:`to_dict` output (a preset named there fills nothing:
        the values are the run's); unknown keys are an error."""
        if not isinstance(values, dict):
            raise CharLSTMError("a configuration must be a table of sections")
        known = [section.name for section in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        _require(
            not unknown,
            f"unknown config section(s) {', '.join(map(repr, unknown))}; valid: {', '.join(known)}",
        )
        sections = {}
        for section in dataclasses.fields(cls):
            raw = values.get(section.name, {})
            if not isinstance(raw, dict):
                raise CharLSTMError(f"config section {section.name!r} must be a table")
            sections[section.name] = _build(section.default_factory, raw)  # type: ignore[misc]
        preset, sections["train"].preset = sections["train"].preset, None
        config = cls(**sections)
        config.train.preset = preset
        return config

    def with_overrides(self, overrides: dict[str, Any]) -> RunConfig:
        """A copy with flat ``field: value`` overrides applied to whichever section owns each.

        A ``preset`` among them applies its settings first; the other overrides win over it.
        A fine-tuning run (``init_from``) keeps the shape of its model: its source's.
        """
        given = {key.replace("-", "_"): value for key, value in overrides.items()}
        preset = given.get("preset")
        if preset in PRESETS:
            settings = PRESETS[preset]
            if given.get("init_from", self.train.init_from):
                settings = {k: v for k, v in settings.items() if k not in SHAPE_SETTINGS}
            overrides = {**settings, **overrides}
        sections = {s: dataclasses.asdict(getattr(self, s)) for s in SECTION_OF.values()}
        for key, value in overrides.items():
            name = key.replace("-", "_")
            if name not in SECTION_OF:
                raise CharLSTMError(f"unknown setting {key!r}; valid settings: {_valid_names()}")
            sections[SECTION_OF[name]][name] = value
        return RunConfig.from_dict(sections)

    def changes_to_what_is_learnt(self, other: RunConfig) -> list[str]:
        """Each setting of ``model``, ``data`` or ``train`` on which ``other`` differs, as
        ``name (old -> new)``: the changes a resumed run refuses."""
        changes = []
        for section in IDENTITY_SECTIONS:
            mine, theirs = getattr(self, section), getattr(other, section)
            for f in dataclasses.fields(mine):
                old, new = getattr(mine, f.name), getattr(theirs, f.name)
                if f.compare and old != new:
                    changes.append(f"{f.name} ({old!r} -> {new!r})")
        return changes


# The sections that say what a run learns; ``session`` says how it is run.
IDENTITY_SECTIONS = ("model", "data", "train")


# Samples start from a newline unless given a prompt: the start of a line of the text.
DEFAULT_PROMPT = "\n"


@dataclass
class SampleConfig:
    """Settings of ``charlstm sample`` and :meth:`CharLM.generate`."""

    prompt: str = option(
        DEFAULT_PROMPT,
        "text the samples continue from (default: a newline, the start of a line; for a "
        "model whose training text had no newline, a space or else its first character)",
    )
    length: int = option(500, "characters to generate per sample")
    temperature: float = option(0.8, "softmax temperature; 0 means greedy (always the likeliest)")
    top_k: int = option(0, "sample only from the k likeliest characters (0 = off)")
    top_p: float = option(1.0, "sample from the smallest set reaching this probability (1 = off)")
    num_samples: int = option(1, "independent samples to draw, generated as one batch")
    seed: int | None = option(None, "random seed for reproducible samples")
    unknown: str = option(
        "error",
        "characters outside the model's vocabulary: error, skip them, or replace them",
        choices=UNKNOWN_POLICIES,
    )

    def validate(self) -> None:
        """Raise CharLSTMError for out-of-range sampling parameters."""
        _check_finite(self)
        if self.seed is not None:
            _check_seed(self.seed)
        _require(self.length >= 1, f"--length must be at least 1, got {self.length}")
        _require(
            math.isfinite(self.temperature) and self.temperature >= 0,
            f"--temperature must be 0 (greedy) or positive, got {self.temperature}",
        )
        _require(self.top_k >= 0, f"--top-k must be 0 (off) or positive, got {self.top_k}")
        _require(0 < self.top_p <= 1, f"--top-p must be in (0, 1], got {self.top_p}")
        _require(self.num_samples >= 1, f"--num-samples must be at least 1, got {self.num_samples}")
        _check_choices(self)


@dataclass
class DynamicEvalConfig:
    """Settings of dynamic evaluation (``charlstm eval --dynamic``, ``CharLM.evaluate``): the
    model goes on learning from the text it has already scored (Krause et al. 2018).

    The defaults were chosen on the first 20,000 characters of Tiny Shakespeare's validation
    split with a 2 x 384 model; steps of 2e-4 to 5e-4 and pulls of 0.005 to 0.03 score within
    0.006 nats of them (docs/experiments.md).
    """

    dynamic_lr: float = option(
        3e-4, "dynamic evaluation: step size, per gradient divided by its running RMS"
    )
    dynamic_decay: float = option(
        0.01, "dynamic evaluation: pull back toward the trained weights per update, in [0, 1]"
    )
    dynamic_segment: int = option(
        64, "dynamic evaluation: characters scored between two weight updates"
    )

    def validate(self) -> None:
        """Raise CharLSTMError for out-of-range settings."""
        _check_finite(self)
        _require(self.dynamic_lr >= 0, f"--dynamic-lr must be 0 or positive, got {self.dynamic_lr}")
        _require(
            self.dynamic_lr <= DYNAMIC_MAX_LR,
            f"--dynamic-lr must be at most {DYNAMIC_MAX_LR:g}, got {self.dynamic_lr:g}: a step "
            f"moves every weight by about this much ({DynamicEvalConfig.dynamic_lr:g} is typical)",
        )
        _require(
            0 <= self.dynamic_decay <= 1,
            f"--dynamic-decay must be in [0, 1], got {self.dynamic_decay}",
        )
        _require(
            self.dynamic_segment >= 1,
            f"--dynamic-segment must be at least 1, got {self.dynamic_segment}",
        )
        _require(
            self.dynamic_segment <= DYNAMIC_MAX_SEGMENT,
            f"--dynamic-segment must be at most {DYNAMIC_MAX_SEGMENT:,}, got "
            f"{self.dynamic_segment:,}: each update backpropagates through the whole segment",
        )


# Dynamic evaluation's largest step and segment: a step moves every weight by about
# --dynamic-lr, so past 1 the weights are noise; a segment's graph is held for its gradient.
DYNAMIC_MAX_LR = 1.0
DYNAMIC_MAX_SEGMENT = 10_000


SECTION_NAMES = tuple(section.name for section in dataclasses.fields(RunConfig))
# Which section of RunConfig owns each flat setting name (names are unique across sections).
SECTION_OF: dict[str, str] = {
    f.name: section.name
    for section in dataclasses.fields(RunConfig)
    for f in dataclasses.fields(section.default_factory)  # type: ignore[arg-type]
}


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file into flat ``field: value`` overrides.

    Keys may be written ``hidden-dim`` or ``hidden_dim``, at the top level or inside
    ``[model]``, ``[data]``, ``[train]`` and ``[session]`` tables.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise CharLSTMError(f"config file {path} does not exist") from None
    except OSError as e:
        raise CharLSTMError(f"cannot read config file {path}: {e.strerror or e}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise CharLSTMError(
            f"config file {path} is over {MAX_CONFIG_BYTES // 1024} KB: not a settings file"
        )
    # An editor's byte-order mark is no part of the settings (as Python's utf-8-sig reads it).
    bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    try:
        raw = tomllib.loads(data[bom:].decode("utf-8"))
    except UnicodeDecodeError as e:
        at = bom + e.start
        raise CharLSTMError(
            f"config file {path} is not UTF-8 text: byte 0x{data[at]:02x} at offset {at} does "
            "not decode; save it as UTF-8"
        ) from None
    except tomllib.TOMLDecodeError as e:
        raise CharLSTMError(f"config file {path} is not valid TOML: {e}") from None
    flat: dict[str, Any] = {}
    spelt: dict[str, str] = {}  # each setting's key as the file wrote it, to name a duplicate
    for key, value in raw.items():
        if key in SECTION_NAMES and isinstance(value, dict):
            entries = [(f"{key}.{k}", k, v) for k, v in value.items()]
        else:
            entries = [(key, key, value)]
        for written, name, setting in entries:
            name = name.replace("-", "_")
            if name in spelt:
                raise CharLSTMError(
                    f"config file {path} sets {name.replace('_', '-')} twice, as "
                    f"{spelt[name]!r} and {written!r}: keep one"
                )
            spelt[name] = written
            flat[name] = setting
    for key in flat:
        if key not in SECTION_OF:
            raise CharLSTMError(
                f"{path}: unknown setting {key!r}; valid settings: {_valid_names()}"
            )
    if isinstance(flat.get("time_budget"), (int, float)) and not isinstance(
        flat["time_budget"], bool
    ):
        flat["time_budget"] = str(flat["time_budget"])  # `time-budget = 90` means 90 seconds
    if isinstance(flat.get("data"), str):
        flat["data"] = [flat["data"]]
    if isinstance(flat.get("val_data"), str):
        flat["val_data"] = [flat["val_data"]]
    return flat


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*$")


def parse_duration(text: str) -> float:
    """Seconds in a duration such as ``90``, ``90s``, ``5m`` or ``1.5h``."""
    match = _DURATION.match(str(text))
    if not match or float(match.group(1)) <= 0:
        raise CharLSTMError(
            f"--time-budget {text!r} is not a positive duration such as 90, 90s, 5m or 1h"
        )
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def _build(cls: type, values: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise CharLSTMError(f"unknown setting(s) {', '.join(map(repr, unknown))} in {cls.__name__}")
    return cls(**{name: _coerce(name, value, hints[name]) for name, value in values.items()})


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check a value read from TOML or JSON against its field's type (ints pass as floats)."""
    is_union = typing.get_origin(hint) in (Union, types.UnionType)
    allowed = typing.get_args(hint) if is_union else (hint,)
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if typing.get_origin(kind) is list and isinstance(value, list):
            if all(isinstance(v, str) for v in value):
                return list(value)
        elif kind in (int, str, bool) and type(value) is kind:
            return value
    raise CharLSTMError(f"setting {_flag(name)[2:]} = {value!r} has the wrong type")


# Seeds seed torch (a signed 64-bit integer) and numpy (non-negative), so both accept them.
SEED_LIMIT = 2**63


def _check_seed(seed: int) -> None:
    _require(0 <= seed < SEED_LIMIT, f"--seed must be in [0, 2**63) (a 64-bit seed), got {seed}")


def _check_finite(config: Any) -> None:
    """Every float setting must be a number: NaN passes every range check, inf most."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise CharLSTMError(f"{_flag(f.name)} must be a finite number, got {value}")


def _check_choices(config: Any) -> None:
    """Every field declared with ``choices`` must hold one (config files bypass argparse)."""
    for f in dataclasses.fields(config):
        choices = f.metadata.get("choices")
        value = getattr(config, f.name)
        _require(
            choices is None or value in choices or (value is None and f.default is None),
            f"{_flag(f.name)} must be one of {', '.join(choices or ())}, not {value!r}",
        )


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise CharLSTMError(message)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _valid_names() -> str:
    return ", ".join(sorted(n.replace("_", "-") for n in SECTION_OF))
