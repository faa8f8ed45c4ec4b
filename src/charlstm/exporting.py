"""Export a trained model as an ONNX step model that runs without PyTorch or charlstm.

The graph reads ``ids`` (int64, [batch, time]) and the carried state (``h``, and ``c`` for an
LSTM, each float32 [layers, batch, hidden]) and returns ``logits`` (float32 [batch, time,
vocabulary]) and the state after the last step (``h_next``, ``c_next``); batch and time are
dynamic. The vocabulary and the sampling defaults travel in the model's metadata, each value
JSON text, so a program that has only ONNX Runtime can turn ids into text (docs/export.md).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import io
import json
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from charlstm import __version__
from charlstm.config import EXPORT_FORMATS, ONNX_OPSET, SampleConfig
from charlstm.data import BYTES
from charlstm.errors import CharLSTMError
from charlstm.lm import CharLM
from charlstm.model import CharRNN

STATE_NAMES = ("h", "c")  # the LSTM's hidden and cell state; GRU and RNN carry h alone
NEXT = "_next"  # an output state's name: its input's, with this suffix
DTYPE = "float32"
# The TorchScript-based exporter: the torch.export-based one (the default from torch 2.9) fixes
# the time axis of torch's recurrent ops to the example's length; this one keeps it dynamic.
# Before torch 2.5, export had no dynamo parameter and was TorchScript-based.
_TORCHSCRIPT_EXPORTER = (
    {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
)


def export(model: CharLM | str | Path, out: str | Path, format: str = "onnx") -> Path:
    """Write ``model`` (a :class:`CharLM`, or a checkpoint or run directory) to ``out`` as an
    ONNX step model, and return ``out``.

    The file is written whole or not at all (through a temporary file beside it); its
    directory must exist. Needs the ``onnx`` package: ``pip install 'charlstm[export]'``.
    """
    if format not in EXPORT_FORMATS:
        raise CharLSTMError(
            f"cannot export to {format!r}: the formats are {', '.join(EXPORT_FORMATS)}"
        )
    _require_onnx()
    out = Path(out)
    temporary = _claim(out)  # before the model loads: a bad target answers at once
    try:
        lm = model if isinstance(model, CharLM) else CharLM.load(model, device="cpu")
        with open(temporary, "wb") as f:
            f.write(onnx_bytes(lm))
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(temporary, out)
    except OSError as e:
        raise CharLSTMError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        temporary.unlink(missing_ok=True)
    return out


def onnx_bytes(lm: CharLM) -> bytes:
    """The serialized ONNX step model of ``lm``, with its vocabulary and sampling defaults as
    metadata (see :func:`metadata`)."""
    import onnx  # the export extra, loaded only to export

    # A float32 copy on the CPU, in eval mode: the caller's model is left as it was, and with
    # no autocast its layers run torch's own LSTM, GRU and RNN ops, which map onto ONNX's.
    net = copy.deepcopy(lm.net).to("cpu", torch.float32).eval()
    state = net.initial_state(2)  # an example to trace: its values do not matter
    names = STATE_NAMES[: len(state)]
    axes = {"ids": {0: "batch", 1: "time"}, "logits": {0: "batch", 1: "time"}}
    axes.update({name + suffix: {1: "batch"} for name in names for suffix in ("", NEXT)})
    buffer = io.BytesIO()
    # Autocast off even inside a caller's bf16 block, where the layers would run the fused C
    # kernel, which no exporter can trace.
    with torch.autocast("cpu", enabled=False), warnings.catch_warnings():
        # The TorchScript exporter's own notices: that it is the older exporter, and that a
        # shape test in CharRNN.features is fixed by the trace (time is at least 1 here).
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _StepModel(net),
            (torch.zeros(2, 3, dtype=torch.long), *state),
            buffer,
            **_TORCHSCRIPT_EXPORTER,
            opset_version=ONNX_OPSET,
            input_names=["ids", *names],
            output_names=["logits", *(name + NEXT for name in names)],
            dynamic_axes=axes,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    proto.doc_string = "charlstm step model: ids and state in, logits and next state out"
    for key, value in metadata(lm).items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def metadata(lm: CharLM) -> dict[str, str]:
    """What a sampler needs besides the graph, each value JSON text: ``encoding`` (``chars``:
    each id is a Unicode character; ``bytes``: a byte of UTF-8 text), ``symbols`` (each id's
    code point or byte value), the sampling defaults of ``charlstm sample`` (``prompt``,
    resolved to this vocabulary as sample resolves its default, ``temperature``, ``top_k``,
    ``top_p``), the ``opset`` and ``dtype``, the ``model``'s shape and the ``charlstm``
    version that wrote it."""
    defaults = SampleConfig()
    # The default prompt, as CharLM reads it: a stand-in symbol when the vocabulary lacks it.
    prompt = lm.vocab.decode(lm.vocab.encode(defaults.prompt, unknown="replace"))
    values = {
        "encoding": "bytes" if lm.vocab.kind == BYTES else "chars",
        "symbols": list(lm.vocab.codepoints),
        "prompt": prompt,
        "temperature": defaults.temperature,
        "top_k": defaults.top_k,
        "top_p": defaults.top_p,
        "opset": ONNX_OPSET,
        "dtype": DTYPE,
        "model": dataclasses.asdict(lm.net.config),
        "charlstm": __version__,
    }
    return {key: json.dumps(value, ensure_ascii=False) for key, value in values.items()}


def _require_onnx() -> None:
    """Refuse at once, naming the extra, where the exporter's onnx package is missing."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise CharLSTMError(
            "exporting to ONNX needs the onnx package: pip install 'charlstm[export]'"
        ) from None


def _claim(out: Path) -> Path:
    """An empty temporary file beside ``out``, to be renamed onto it: proof, before any work,
    that ``out`` can be written."""
    if out.is_dir():
        raise CharLSTMError(f"{out} is a directory; give a file name, such as {out / 'model.onnx'}")
    parent = out.parent
    if not parent.is_dir():
        raise CharLSTMError(
            f"cannot write {out}: the directory {parent} does not exist; create it first"
        )
    temporary = parent / f".tmp-{out.name}"
    try:
        temporary.write_bytes(b"")
    except OSError as e:
        raise CharLSTMError(
            f"cannot write {out}: {e.strerror or e} in {parent}; choose a directory you can "
            "write to"
        ) from None
    return temporary


class _StepModel(nn.Module):
    """:class:`CharRNN` with the state as separate tensors in and out: the flat signature an
    exported graph has."""

    def __init__(self, net: CharRNN) -> None:
        super().__init__()
        self.net = net

    def forward(self, ids: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, new_state = self.net(ids, state)
        return (logits, *new_state)
