"""charlstm.export and `charlstm export`: ONNX step models, run by a real ONNX Runtime."""

from __future__ import annotations

import ast
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import CLI_TIMEOUT, refused, run_cli

import charlstm
from charlstm.cli import main
from charlstm.config import CELLS, HEAD_INPUTS, ModelConfig, RunConfig, SampleConfig
from charlstm.data import Vocab
from charlstm.lm import CharLM
from charlstm.model import CharRNN

pytestmark = pytest.mark.usefixtures("one_thread")

DOCS = Path(__file__).resolve().parents[1] / "docs" / "export.md"
LETTERS = (10, 32, *range(97, 106))  # newline, space, a to i
# Runs a script with torch and charlstm made unimportable: `import torch` raises ImportError.
WITHOUT_TORCH = (
    "import runpy, sys; sys.modules.update(torch=None, charlstm=None); "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)
# Runs `charlstm ARGS` in a process where the onnx package cannot be imported.
WITHOUT_ONNX = (
    "import sys; sys.modules['onnx'] = None; from charlstm.cli import main; sys.exit(main())"
)


def tiny_model(
    cell: str = "lstm", n_layers: int = 2, head_input: str = "all", vocab: Vocab | None = None
) -> CharLM:
    """An untrained model, the same for the same arguments."""
    vocab = vocab or Vocab("text", LETTERS)
    config = ModelConfig(cell=cell, embed_dim=8, hidden_dim=16, n_layers=n_layers, dropout=0.0,
                         head_input=head_input)  # fmt: skip
    torch.manual_seed(0)
    return CharLM(CharRNN(config, vocab.size).eval(), vocab, RunConfig(model=config))


def documented_loop() -> str:
    """The sampling program of docs/export.md, exactly as the page shows it."""
    section = DOCS.read_text(encoding="utf-8").split("## Sampling with ONNX Runtime alone")[1]
    found = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert found is not None, "docs/export.md lost its sampling program"
    return found.group(1)


def run_loop(script: Path, *args: object, cwd: Path) -> subprocess.CompletedProcess:
    """The program in a fresh, isolated interpreter (no PYTHONPATH, no user site) that cannot
    import torch or charlstm, with UTF-8 output."""
    return subprocess.run(
        [sys.executable, "-I", "-X", "utf8", "-c", WITHOUT_TORCH, script, *map(str, args)],
        capture_output=True, text=True, encoding="utf-8", cwd=cwd, timeout=CLI_TIMEOUT,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("cell", "n_layers", "head_input"), list(itertools.product(CELLS, (1, 2, 3), HEAD_INPUTS))
)
def test_onnx_runtime_computes_pytorchs_logits_and_state(tmp_path, cell, n_layers, head_input):
    model = tiny_model(cell, n_layers, head_input)
    path = charlstm.export(model, tmp_path / "model.onnx")
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    parts = ["h", "c"] if cell == "lstm" else ["h"]
    assert names == ["ids", *parts]
    assert [o.name for o in session.get_outputs()] == ["logits", *(p + "_next" for p in parts)]
    generator = torch.Generator().manual_seed(1)
    for batch, time in ((3, 7), (1, 1)):  # one graph, any batch and length
        ids = torch.randint(0, len(LETTERS), (batch, time), generator=generator)
        state = tuple(
            torch.randn(s.shape, generator=generator) for s in model.net.initial_state(batch)
        )
        with torch.inference_mode():
            logits, next_state = model.net(ids, state)
        feed = [ids.numpy(), *(s.numpy() for s in state)]
        got = session.run(None, dict(zip(names, feed, strict=True)))
        assert got[0].shape == (batch, time, len(LETTERS))
        np.testing.assert_allclose(got[0], logits.numpy(), rtol=0, atol=1e-4)
        for part, expected in zip(got[1:], next_state, strict=True):
            np.testing.assert_allclose(part, expected.numpy(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", ["text", "bytes"])
def test_the_metadata_holds_the_vocabulary_and_the_sampling_defaults(tmp_path, kind):
    # No newline in the vocabulary: the default prompt is its stand-in, a space, as in sample.
    symbols = tuple(LETTERS[1:]) if kind == "text" else (32, 0xC3, 0xA9, *range(97, 100))
    model = tiny_model(vocab=Vocab(kind, tuple(sorted(symbols))))
    path = charlstm.export(model, tmp_path / "model.onnx")
    proto = onnx.load(path)
    assert proto.opset_import[0].version == 17
    meta = {entry.key: json.loads(entry.value) for entry in proto.metadata_props}
    defaults = SampleConfig()
    assert meta == {
        "encoding": "chars" if kind == "text" else "bytes",
        "symbols": sorted(symbols),
        "prompt": " ",
        "temperature": defaults.temperature,
        "top_k": defaults.top_k,
        "top_p": defaults.top_p,
        "opset": 17,
        "dtype": "float32",
        "model": {
            "cell": "lstm",
            "embed_dim": 8,
            "hidden_dim": 16,
            "n_layers": 2,
            "dropout": 0.0,
            "head_input": "all",
        },
        "charlstm": charlstm.__version__,
    }
    runtime = ort.InferenceSession(path).get_modelmeta().custom_metadata_map
    assert {k: json.loads(v) for k, v in runtime.items()} == meta


def test_the_documented_loop_imports_nothing_but_numpy_and_onnxruntime():
    imported = set()
    for node in ast.walk(ast.parse(documented_loop())):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported == {"json", "sys", "numpy", "onnxruntime"}


@pytest.mark.slow
def test_the_documented_loop_samples_greedily_exactly_as_charlstm_sample(
    trained_run, isolated_data_dir, tmp_path
):
    model_path = tmp_path / "model.onnx"
    exported = run_cli(["export", trained_run, "--out", model_path], isolated_data_dir, tmp_path)
    assert exported.returncode == 0, exported.stderr
    assert exported.stderr == f"wrote {model_path} (ONNX opset 17, float32)\n"
    script = tmp_path / "sample_onnx.py"
    script.write_text(documented_loop(), encoding="utf-8")

    greedy = run_loop(script, model_path, "ROMEO:", 500, 0, cwd=tmp_path)
    assert greedy.returncode == 0, greedy.stderr
    sampled = run_cli(["sample", trained_run, "--prompt", "ROMEO:", "--length", 500,
                       "--temperature", 0, "--no-echo"], isolated_data_dir, tmp_path)  # fmt: skip
    assert sampled.returncode == 0, sampled.stderr
    assert len(greedy.stdout) == 501
    assert greedy.stdout == sampled.stdout

    # With the metadata's defaults: the default prompt and temperature, 500 characters.
    drawn = run_loop(script, model_path, cwd=tmp_path)
    assert drawn.returncode == 0, drawn.stderr
    vocabulary = set(charlstm.load(trained_run).vocab.symbols())
    assert len(drawn.stdout) == 501
    assert set(drawn.stdout[:-1]) <= vocabulary


def unwritable_directory(tmp_path: Path) -> Path:
    """A directory this process cannot create a file in: one without write permission, or,
    for root, whom permissions do not stop, sysfs, which refuses even root."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.access(locked, os.W_OK):
        locked = Path("/sys")
        if not locked.is_dir():
            pytest.skip("running as root without /sys: no directory refuses this process")
    return locked


@pytest.mark.parametrize("target", ["missing directory", "directory", "unwritable directory"])
def test_a_target_that_cannot_be_written_is_refused_before_the_model_loads(tmp_path, target):
    out = {
        "missing directory": lambda: tmp_path / "nowhere" / "model.onnx",
        "directory": lambda: tmp_path,
        "unwritable directory": lambda: unwritable_directory(tmp_path) / "model.onnx",
    }[target]()
    words = {
        "missing directory": f"cannot write {out}: the directory {out.parent} does not exist",
        "directory": f"{out} is a directory; give a file name, such as {out / 'model.onnx'}",
        "unwritable directory": f"cannot write {out}: Permission denied in {out.parent}",
    }[target]
    before = sorted(tmp_path.rglob("*"))
    # The checkpoint does not exist either: the target is what is refused first.
    with pytest.raises(charlstm.CharLSTMError, match=re.escape(words)):
        charlstm.export(tmp_path / "no-checkpoint", out)
    assert sorted(tmp_path.rglob("*")) == before


def test_a_failed_export_leaves_the_previous_file_as_it_was(tmp_path):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"the previous model")
    with pytest.raises(charlstm.CharLSTMError, match="does not exist"):
        charlstm.export(tmp_path / "no-checkpoint", out)
    assert out.read_bytes() == b"the previous model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_an_unknown_format_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["export", str(tmp_path), "--format", "torchscript"])
    assert stopped.value.code == 2
    assert "invalid choice: 'torchscript'" in capsys.readouterr().err
    with pytest.raises(charlstm.CharLSTMError, match="the formats are onnx"):
        charlstm.export(tiny_model(), tmp_path / "model.pt", format="torchscript")


@pytest.mark.slow
def test_the_command_refuses_an_unwritable_directory_in_one_line(
    trained_run, isolated_data_dir, tmp_path
):
    out = unwritable_directory(tmp_path) / "model.onnx"
    result = run_cli(["export", trained_run, "--out", out], isolated_data_dir, tmp_path)
    refused(result, f"cannot write {out}: Permission denied", "choose a directory")
    assert not out.exists()


@pytest.mark.slow
def test_without_the_onnx_package_the_command_names_the_extra(
    trained_run, isolated_data_dir, tmp_path
):
    out = tmp_path / "model.onnx"
    result = run_cli(["export", trained_run, "--out", out], isolated_data_dir, tmp_path,
                     python=WITHOUT_ONNX)  # fmt: skip
    refused(result, "needs the onnx package: pip install 'charlstm[export]'")
    assert not out.exists()
