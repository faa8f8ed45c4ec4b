"""charlstm: character-level LSTM / GRU / RNN language models in PyTorch.

Python API::

    import charlstm
    result = charlstm.train(charlstm.RunConfig())          # train on the built-in corpus
    speed = charlstm.measure_speed(charlstm.RunConfig())  # this machine's chars/s
    preset = charlstm.choose_preset(300, speed, train_chars=1_000_000)  # 5 min, 1 MB of text
    model = charlstm.load("runs/shakespeare-.../best")     # or a run directory
    print(model.generate("ROMEO:", length=200, temperature=0.8))
    print(charlstm.evaluate(model, "To be, or not to be").bpc)
    print(model.evaluate_validation(dynamic=True).loss)   # adapting as it reads (Krause 2018)
    charlstm.plot_runs(["runs/a", "runs/b"], "curves.png")  # loss curves, overlaid
    table = charlstm.compare(config, cells=("rnn", "gru", "lstm"), time_budget="10m").table()
    found = charlstm.inspect(model, text)  # units correlated with properties of the text
    charlstm.export(model, "model.onnx")  # an ONNX step model, for ONNX Runtime and others
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

# Public names load with their modules on first use (PEP 562): most of them pull in torch, which
# takes seconds to import, and the command line answers --help and usage mistakes without it.
_EXPORTS = {
    "charlstm.comparison": ("CellResult", "Comparison", "compare"),
    "charlstm.config": (
        "DataConfig",
        "DynamicEvalConfig",
        "ModelConfig",
        "RunConfig",
        "SampleConfig",
        "SessionConfig",
        "TrainConfig",
    ),
    "charlstm.errors": ("CharLSTMError",),
    "charlstm.evaluation": ("EvalResult",),
    "charlstm.exporting": ("export",),
    "charlstm.interpret": ("Inspection", "inspect"),
    "charlstm.lm": ("CharLM", "Sample"),
    "charlstm.model": ("CharRNN",),
    "charlstm.plot": ("plot_runs",),
    "charlstm.budget": ("BudgetTooSmall",),
    "charlstm.presets": ("apply_preset", "choose_preset", "preset_for"),
    "charlstm.training": ("TrainResult", "measure_speed", "train"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

if TYPE_CHECKING:
    from charlstm.budget import BudgetTooSmall
    from charlstm.comparison import CellResult, Comparison, compare
    from charlstm.config import (
        DataConfig,
        DynamicEvalConfig,
        ModelConfig,
        RunConfig,
        SampleConfig,
        SessionConfig,
        TrainConfig,
    )
    from charlstm.errors import CharLSTMError
    from charlstm.evaluation import EvalResult
    from charlstm.exporting import export
    from charlstm.interpret import Inspection, inspect
    from charlstm.lm import CharLM, Sample
    from charlstm.model import CharRNN
    from charlstm.plot import plot_runs
    from charlstm.presets import apply_preset, choose_preset, preset_for
    from charlstm.training import TrainResult, measure_speed, train


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'charlstm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # found once; later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_MODULE_OF})


def load(path: str, device: str = "auto") -> CharLM:
    """Load a trained model from a checkpoint directory or a run directory."""
    from charlstm.lm import CharLM

    return CharLM.load(path, device=device)


def evaluate(
    model: CharLM, text: str, unknown: str = "error", dynamic: bool | DynamicEvalConfig = False
) -> EvalResult:
    """Loss (nats/char), bits per character and perplexity of ``model`` on ``text``; with
    ``dynamic``, the model adapts to the text as it scores it (see CharLM.evaluate)."""
    return model.evaluate(text, unknown=unknown, dynamic=dynamic)


__all__ = [
    "BudgetTooSmall",
    "CellResult",
    "CharLM",
    "CharLSTMError",
    "CharRNN",
    "Comparison",
    "DataConfig",
    "DynamicEvalConfig",
    "EvalResult",
    "Inspection",
    "ModelConfig",
    "RunConfig",
    "Sample",
    "SampleConfig",
    "SessionConfig",
    "TrainConfig",
    "TrainResult",
    "__version__",
    "apply_preset",
    "choose_preset",
    "compare",
    "evaluate",
    "export",
    "inspect",
    "load",
    "measure_speed",
    "plot_runs",
    "preset_for",
    "train",
]
