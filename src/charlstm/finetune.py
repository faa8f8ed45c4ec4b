"""Fine-tuning: a run that starts from another run's trained model (``--init-from``).

The source checkpoint is read as every checkpoint is (safetensors and JSON, never unpickled).
The new run takes its model shape, weights and vocabulary; everything else is its own: the
corpus, the run directory, the optimizer, the learning-rate schedule and the metrics. The
corpus is encoded with the source's vocabulary (:func:`charlstm.data.load_corpus` refuses
characters it lacks unless told to append or drop them), and appended characters get new rows
of the embedding and the output head (:func:`charlstm.model.with_more_ids`).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

from charlstm.checkpoint import Checkpoint, read_checkpoint
from charlstm.config import SHAPE_SETTINGS, DataConfig, ModelConfig, RunConfig
from charlstm.data import BYTES
from charlstm.errors import CharLSTMError


def read_source(config: RunConfig, run_dir: Path) -> Checkpoint:
    """The checkpoint that ``config.train.init_from`` names (of a run directory, its best/,
    else last/), refused in one line if it is none or lies in the run directory ``run_dir``
    that this run writes (``--overwrite`` would remove it)."""
    path = config.train.init_from
    assert path is not None
    try:
        source = read_checkpoint(path)
    except CharLSTMError as e:
        raise CharLSTMError(f"--init-from: {e}") from None
    if source.path.resolve().is_relative_to(run_dir.resolve()):
        raise CharLSTMError(
            f"--init-from {path} lies in {run_dir}, the run directory this run writes: give "
            "another --out"
        )
    return source


def adopt_model(config: RunConfig, source: Checkpoint) -> RunConfig:
    """``config`` with the shape of the model of the checkpoint it starts from (a resumed
    run: its own, which is the same). Each setting of the shape left at its default takes the
    source's; one given another value is refused, naming it; dropout is this run's, as every
    learning setting is. A byte model's text is read as bytes unless ``config`` names another
    encoding (which the corpus then refuses)."""
    wanted, model = config.model, source.config.model
    default = ModelConfig()
    changed = [
        name
        for name in SHAPE_SETTINGS
        if getattr(wanted, name) not in (getattr(default, name), getattr(model, name))
    ]
    if changed:
        named = ", ".join(f"--{name.replace('_', '-')} {getattr(wanted, name)}" for name in changed)
        raise CharLSTMError(
            f"--init-from {config.train.init_from} keeps the shape of its model "
            f"({describe_shape(model)}), and {named} would change it: leave "
            f"{'it' if len(changed) == 1 else 'them'} out, or train a new model"
        )
    data = config.data
    if source.vocab.kind == BYTES and data.encoding == DataConfig().encoding:
        data = dataclasses.replace(data, encoding=BYTES)
    adopted = copy.copy(config)  # not dataclasses.replace, which would apply a preset again
    adopted.model, adopted.data = dataclasses.replace(model, dropout=wanted.dropout), data
    return adopted


def describe_shape(model: ModelConfig) -> str:
    """``lstm 2 x 256, embedding 128, head reading all layers``."""
    head = "all layers" if model.head_input == "all" else "the last layer"
    return (
        f"{model.cell} {model.n_layers} x {model.hidden_dim}, embedding {model.embed_dim}, "
        f"head reading {head}"
    )


def describe_origin(origin: dict[str, Any], vocab_size: int) -> str:
    """What a fine-tuning run says it starts from, given the record its checkpoints keep
    (:func:`charlstm.checkpoint.origin_info`) and the size of its own vocabulary."""
    corpus = (origin.get("corpus") or {}).get("name", "an unnamed corpus")
    val = origin.get("val") or {}
    score = f", {val['bpc']:.4f} bpc" if isinstance(val.get("bpc"), (int, float)) else ""
    added = vocab_size - origin["vocab_size"]
    grown = f"; {added} characters added to its vocabulary" if added else ""
    return (
        f"fine-tuning the model of {origin['path']} (step {origin.get('step')} on "
        f"{corpus}{score}){grown}"
    )
