"""Checkpoint directories: round trips, finding them, crash recovery and refusing bad files."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import charlstm
from charlstm.checkpoint import (
    CONFIG_FILE,
    FORMAT_VERSION,
    RESUME_JSON_FILE,
    RESUME_TENSORS_FILE,
    WEIGHTS_FILE,
    read_checkpoint,
    read_resume_state,
    read_tensors,
    recover_checkpoint,
    resolve_checkpoint,
    write_checkpoint,
)
from charlstm.config import RunConfig
from charlstm.data import Vocab
from charlstm.errors import CharLSTMError
from charlstm.model import CharRNN

TEXT = "To be, or not to be: that is the question.\n"


def tiny_setup(cell: str = "lstm", seed: int = 0) -> tuple[RunConfig, Vocab, CharRNN]:
    config = RunConfig().with_overrides(
        {"cell": cell, "embed_dim": 5, "hidden_dim": 7, "n_layers": 2, "dropout": 0.1}
    )
    vocab = Vocab("text", tuple(sorted({ord(c) for c in TEXT})))
    torch.manual_seed(seed)
    return config, vocab, CharRNN(config.model, vocab.size)


def save(
    directory: Path, cell: str = "lstm", seed: int = 0, **kw
) -> tuple[RunConfig, Vocab, CharRNN]:
    config, vocab, net = tiny_setup(cell, seed)
    write_checkpoint(
        directory,
        config=config,
        vocab=vocab,
        weights=net.state_dict(),
        info={"step": seed, "val": {"loss": 1.5}},
        **kw,
    )
    return config, vocab, net


def probe_ids(vocab: Vocab) -> torch.Tensor:
    return torch.as_tensor(vocab.encode(TEXT).astype(np.int64)).view(1, -1)


# ---- round trips ------------------------------------------------------------------------


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_write_then_read_is_identical(tmp_path, cell):
    config, vocab, net = save(tmp_path / "ck", cell)
    ck = read_checkpoint(tmp_path / "ck")
    assert ck.path == tmp_path / "ck"
    assert ck.config == config
    assert ck.vocab == vocab
    original = net.state_dict()
    assert set(ck.weights) == set(original)
    for name, tensor in original.items():
        assert ck.weights[name].dtype == tensor.dtype
        assert torch.equal(ck.weights[name], tensor), name
        assert ck.weights[name].device.type == "cpu"
    assert ck.info["step"] == 0
    assert ck.info["val"] == {"loss": 1.5}
    assert ck.info["format_version"] == FORMAT_VERSION
    assert ck.info["versions"]["charlstm"] == charlstm.__version__
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]


def test_byte_vocabulary_round_trips(tmp_path):
    config, _, _ = tiny_setup()
    vocab = Vocab("bytes", (0, 10, 32, 65, 169, 195, 255))
    net = CharRNN(config.model, vocab.size)
    write_checkpoint(tmp_path / "b", config=config, vocab=vocab, weights=net.state_dict(), info={})
    assert read_checkpoint(tmp_path / "b").vocab == vocab


def test_non_ascii_text_vocabulary_round_trips(tmp_path):
    config, _, _ = tiny_setup()
    vocab = Vocab("text", tuple(sorted({ord(c) for c in '\n "\\aé€𝄞'})))
    net = CharRNN(config.model, vocab.size)
    write_checkpoint(tmp_path / "u", config=config, vocab=vocab, weights=net.state_dict(), info={})
    assert read_checkpoint(tmp_path / "u").vocab == vocab


def test_resume_state_round_trips(tmp_path):
    tensors = {"optimizer.0.exp_avg": torch.randn(3, 4), "rng": torch.arange(5, dtype=torch.uint8)}
    save(tmp_path / "last", resume_tensors=tensors, resume_json={"step": 7, "offset": [1, 2]})
    loaded, meta = read_resume_state(tmp_path / "last")
    assert meta == {"step": 7, "offset": [1, 2]}
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    save(tmp_path / "best")
    with pytest.raises(CharLSTMError, match="no resume state"):
        read_resume_state(tmp_path / "best")


def test_load_gives_bit_identical_logits(tmp_path):
    _, vocab, net = save(tmp_path / "ck", "lstm", seed=3)
    model = charlstm.load(str(tmp_path / "ck"), device="cpu")
    assert not model.net.training
    net.eval()
    x = probe_ids(vocab)
    with torch.no_grad():
        expected, expected_state = net(x)
        got, got_state = model.net(x)
    assert torch.equal(got, expected)
    assert all(torch.equal(a, b) for a, b in zip(got_state, expected_state, strict=True))


def test_a_checkpoint_from_before_the_head_read_every_layer_loads_as_it_was(tmp_path):
    # Written when the head read the last layer alone, config.json has no "head_input".
    config, vocab, _ = tiny_setup()
    config = config.with_overrides({"head_input": "last"})
    torch.manual_seed(4)
    net = CharRNN(config.model, vocab.size).eval()
    write_checkpoint(
        tmp_path / "old", config=config, vocab=vocab, weights=net.state_dict(), info={}
    )
    document = as_version_1(json.loads((tmp_path / "old" / CONFIG_FILE).read_text()))
    del document["config"]["model"]["head_input"]
    (tmp_path / "old" / CONFIG_FILE).write_text(json.dumps(document))
    model = charlstm.load(str(tmp_path / "old"), device="cpu")
    assert model.net.config.head_input == "last"
    with torch.no_grad():
        assert torch.equal(model.net(probe_ids(vocab))[0], net(probe_ids(vocab))[0])


def as_version_1(document: dict) -> dict:
    """A format 2 config.json as format 1 wrote it: how a run is carried out inside the train
    table, and the dropout options since removed, off."""
    config = document["config"]
    config["train"].update(config.pop("session"))
    config["model"].update(recurrent_dropout=0.0, weight_dropout=0.0, dropout_mask="step")
    return {**document, "format_version": 1}


def test_a_format_1_checkpoint_loads_with_the_same_settings(tmp_path):
    config, vocab, net = tiny_setup()
    config = config.with_overrides({"max_steps": 7, "out": "runs/old", "eval_every": 3})
    write_checkpoint(
        tmp_path / "old", config=config, vocab=vocab, weights=net.state_dict(), info={}
    )
    path = tmp_path / "old" / CONFIG_FILE
    path.write_text(json.dumps(as_version_1(json.loads(path.read_text()))))
    assert read_checkpoint(tmp_path / "old").config == config


@pytest.mark.parametrize(
    ("option", "value"),
    [("recurrent_dropout", 0.25), ("weight_dropout", 0.1), ("dropout_mask", "sequence")],
)
def test_a_format_1_checkpoint_that_used_a_removed_option_is_refused_by_name(
    tmp_path, option, value
):
    save(tmp_path / "old")
    path = tmp_path / "old" / CONFIG_FILE
    document = as_version_1(json.loads(path.read_text()))
    document["config"]["model"][option] = value
    path.write_text(json.dumps(document))
    message = _one_line_error(tmp_path / "old")
    assert f"{option.replace('_', '-')} {value}" in message
    assert "no longer has" in message and "charlstm 0.1" in message


def test_load_of_a_trained_run_matches_its_best_checkpoint(trained_run):
    model = charlstm.load(str(trained_run), device="cpu")
    ck = read_checkpoint(trained_run / "best")
    for name, tensor in model.net.state_dict().items():
        assert torch.equal(tensor, ck.weights[name]), name
    assert model.info["step"] == ck.info["step"]


def test_rewrite_replaces_and_leaves_no_debris(tmp_path):
    save(tmp_path / "last", seed=1)
    _, _, second = save(tmp_path / "last", seed=2)
    ck = read_checkpoint(tmp_path / "last")
    assert ck.info["step"] == 2
    assert all(torch.equal(ck.weights[k], v) for k, v in second.state_dict().items())
    assert [p.name for p in tmp_path.iterdir()] == ["last"]


def test_weights_on_another_dtype_still_load_on_cpu(tmp_path):
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        config, vocab, net = tiny_setup(seed=4)
        weights = {k: v.to(dtype) for k, v in net.state_dict().items()}
        directory = tmp_path / str(dtype)
        write_checkpoint(directory, config=config, vocab=vocab, weights=weights, info={})
        assert read_checkpoint(directory).weights["head.weight"].dtype == dtype
        model = charlstm.load(str(directory), device="cpu")
        assert model.device.type == "cpu"
        for name, tensor in model.net.state_dict().items():
            assert tensor.dtype == torch.float32
            assert torch.equal(tensor, weights[name].float()), name
        with torch.no_grad():
            logits, _ = model.net(probe_ids(vocab))
        assert torch.isfinite(logits).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_weights_saved_from_a_gpu_load_on_cpu(tmp_path):
    config, vocab, net = tiny_setup(seed=5)
    net.cuda()
    write_checkpoint(tmp_path / "g", config=config, vocab=vocab, weights=net.state_dict(), info={})
    model = charlstm.load(str(tmp_path / "g"), device="cpu")
    for name, tensor in net.state_dict().items():
        assert torch.equal(model.net.state_dict()[name], tensor.cpu())


# ---- finding a checkpoint ---------------------------------------------------------------


def test_resolve_picks_best_of_a_run_directory(tmp_path):
    save(tmp_path / "run" / "best")
    save(tmp_path / "run" / "last")
    assert resolve_checkpoint(tmp_path / "run") == tmp_path / "run" / "best"
    assert resolve_checkpoint(str(tmp_path / "run" / "last")) == tmp_path / "run" / "last"
    assert resolve_checkpoint(tmp_path / "run" / "best") == tmp_path / "run" / "best"


def test_resolve_falls_back_to_last(tmp_path):
    save(tmp_path / "run" / "last")
    assert resolve_checkpoint(tmp_path / "run") == tmp_path / "run" / "last"


def test_resolve_of_the_trained_run(trained_run):
    assert resolve_checkpoint(trained_run) == trained_run / "best"


def test_resolve_refuses_a_file(tmp_path):
    save(tmp_path / "ck")
    with pytest.raises(CharLSTMError, match="is a file; give the checkpoint directory") as info:
        resolve_checkpoint(tmp_path / "ck" / WEIGHTS_FILE)
    assert "\n" not in str(info.value)


def test_resolve_refuses_a_missing_path(tmp_path):
    with pytest.raises(CharLSTMError, match="does not exist") as info:
        resolve_checkpoint(tmp_path / "nowhere")
    assert "run directory or a checkpoint directory" in str(info.value)
    with pytest.raises(CharLSTMError, match="does not exist"):
        charlstm.load(str(tmp_path / "nowhere"))


def test_resolve_refuses_an_empty_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CharLSTMError, match=r"not a charlstm checkpoint or run directory"):
        resolve_checkpoint(tmp_path / "empty")


# ---- crash safety -----------------------------------------------------------------------


def weights_of(directory: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(directory).weights


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("how", ["missing", "no-config", "empty"])
def test_interrupted_replacement_is_read_where_it_waits_and_repaired_by_the_writer(tmp_path, how):
    run = tmp_path / "run"
    _, _, old = save(run / "last", seed=1)
    # A crash between "move the old one aside" and "rename the new one in".
    (run / "last").rename(run / ".last.old")
    if how == "no-config":
        save(run / "partial", seed=2)
        (run / "partial" / CONFIG_FILE).unlink()
        (run / "partial").rename(run / "last")
    elif how == "empty":
        (run / "last").mkdir()
    before = sorted(p.name for p in run.iterdir())
    # A reader (sample, eval, inspect) finds the intact copy and changes nothing...
    assert resolve_checkpoint(run) == run / ".last.old"
    assert resolve_checkpoint(run / "last") == run / ".last.old"
    assert same_weights(weights_of(run), old.state_dict())
    assert sorted(p.name for p in run.iterdir()) == before
    # ...the writer, holding the run's lock, puts it back.
    recover_checkpoint(run / "last")
    assert resolve_checkpoint(run) == run / "last"
    assert same_weights(weights_of(run / "last"), old.state_dict())
    assert not (run / ".last.old").exists()


def test_recover_keeps_a_complete_new_checkpoint(tmp_path):
    run = tmp_path / "run"
    save(run / "last", seed=1)
    shutil.copytree(run / "last", run / ".last.old")
    _, _, new = save(run / "new", seed=2)
    shutil.rmtree(run / "last")
    (run / "new").rename(run / "last")
    # A crash after the new one was renamed in, before the old one was removed.
    recover_checkpoint(run / "last")
    assert not (run / ".last.old").exists()
    assert same_weights(weights_of(run / "last"), new.state_dict())


def test_recover_without_debris_changes_nothing(tmp_path):
    _, _, net = save(tmp_path / "last", seed=1)
    recover_checkpoint(tmp_path / "last")
    recover_checkpoint(tmp_path / "never-written")
    assert same_weights(weights_of(tmp_path / "last"), net.state_dict())
    assert not (tmp_path / "never-written").exists()


def test_leftover_temporary_directory_is_harmless(tmp_path):
    run = tmp_path / "run"
    _, _, old = save(run / "last", seed=1)
    # A crash while the new checkpoint was still being written into its temporary directory.
    tmp = run / ".last.tmp-abc123"
    tmp.mkdir()
    (tmp / WEIGHTS_FILE).write_bytes(b"\x00" * 10)
    assert resolve_checkpoint(run) == run / "last"
    assert same_weights(weights_of(run), old.state_dict())
    _, _, new = save(run / "last", seed=2)  # the next save still works
    assert same_weights(weights_of(run), new.state_dict())
    assert not tmp.exists(), "the next save removes what a killed writer left behind"


def test_crash_between_the_two_renames_with_a_temporary_left(tmp_path):
    run = tmp_path / "run"
    _, _, old = save(run / "last", seed=1)
    save(run / ".last.tmp-xyz", seed=2)  # the new checkpoint, complete but never renamed in
    (run / "last").rename(run / ".last.old")
    assert same_weights(weights_of(run), old.state_dict())  # read where it waits
    _, _, new = save(run / "last", seed=3)  # the writer clears both leftovers
    assert same_weights(weights_of(run / "last"), new.state_dict())


def test_write_finishes_an_earlier_interrupted_replacement(tmp_path):
    run = tmp_path / "run"
    save(run / "last", seed=1)
    (run / "last").rename(run / ".last.old")
    _, _, new = save(run / "last", seed=2)
    assert not (run / ".last.old").exists()
    assert same_weights(weights_of(run / "last"), new.state_dict())


# ---- refusing damaged, foreign and unsafe files -----------------------------------------


class _Payload:
    """Unpickling this creates a file: the stand-in for arbitrary code in a pickle."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def _pickled(kind: str, target: Path) -> bytes:
    payload = {"embed.weight": _Payload(target)}
    if kind == "torch-zip":
        path = target.parent / "zip.pt"
        torch.save(payload, path)
        return path.read_bytes()
    if kind == "torch-legacy":
        path = target.parent / "legacy.pt"
        torch.save(payload, path, _use_new_zipfile_serialization=False)
        return path.read_bytes()
    protocol = int(kind.removeprefix("pickle-"))
    return pickle.dumps(payload, protocol=protocol)


@pytest.mark.parametrize("kind", ["torch-zip", "torch-legacy", "pickle-2", "pickle-5"])
def test_a_pickle_is_refused_without_running_it(tmp_path, kind):
    # First prove that the payload is live: unpickling it really creates a file.
    proof = tmp_path / "proof"
    proof.mkdir()
    data = _pickled(kind, proof / "ran")
    if kind.startswith("torch"):
        (proof / "check.pt").write_bytes(data)
        torch.load(proof / "check.pt", weights_only=False)
    else:
        pickle.loads(data)
    assert (proof / "ran").exists()

    canary = tmp_path / "canary"
    save(tmp_path / "ck")
    (tmp_path / "ck" / WEIGHTS_FILE).write_bytes(_pickled(kind, canary))
    for load in (read_checkpoint, charlstm.load, lambda p: read_tensors(Path(p) / WEIGHTS_FILE)):
        with pytest.raises(CharLSTMError) as info:
            load(str(tmp_path / "ck"))
        message = str(info.value)
        assert "pickle" in message
        assert "never unpickles" in message
        assert "\n" not in message
    assert not canary.exists()


@pytest.mark.parametrize("kind", ["torch-zip", "torch-legacy", "pickle-5"])
def test_a_pickle_given_for_the_checkpoint_is_refused_without_running_it(tmp_path, kind):
    # As users of other tools do: `charlstm sample model.pt`, `--init-from ckpt.pt`.
    canary = tmp_path / "canary"
    path = tmp_path / "model.pt"
    path.write_bytes(_pickled(kind, canary))
    with pytest.raises(CharLSTMError) as info:
        read_checkpoint(path)
    assert str(info.value) == (
        f"{path} is a pickle (torch.save) file, not safetensors; charlstm never unpickles files "
        "because that can run arbitrary code"
    )
    assert not canary.exists()


def test_an_old_protocol_pickle_is_refused_without_running_it(tmp_path):
    canary = tmp_path / "canary"
    save(tmp_path / "ck")
    (tmp_path / "ck" / WEIGHTS_FILE).write_bytes(_pickled("pickle-0", canary))
    with pytest.raises(CharLSTMError, match="not a valid safetensors file"):
        charlstm.load(str(tmp_path / "ck"))
    assert not canary.exists()


def _one_line_error(directory: Path) -> str:
    with pytest.raises(CharLSTMError) as info:
        charlstm.load(str(directory), device="cpu")
    message = str(info.value)
    assert "\n" not in message
    return message


def error_after_changing(directory: Path, name: str, change: Callable[[bytes], bytes]) -> str:
    """Saves a checkpoint in ``directory``, replaces the bytes of its file ``name`` by
    ``change(bytes)``, and returns the one-line error of loading it."""
    save(directory)
    path = directory / name
    path.write_bytes(change(path.read_bytes()))
    return _one_line_error(directory)


def json_edit(edit: Callable[[dict], object]) -> Callable[[bytes], bytes]:
    """A change for :func:`error_after_changing`: ``edit`` applied to the parsed document."""

    def change(data: bytes) -> bytes:
        document = json.loads(data)
        edit(document)
        return json.dumps(document).encode("utf-8")

    return change


def test_truncated_weights(tmp_path):
    message = error_after_changing(tmp_path / "ck", WEIGHTS_FILE, lambda data: data[:-100])
    assert "not a valid safetensors file" in message
    assert WEIGHTS_FILE in message


def test_truncated_header(tmp_path):
    message = error_after_changing(tmp_path / "ck", WEIGHTS_FILE, lambda data: data[:20])
    assert "not a valid safetensors file" in message


def test_zero_byte_weights(tmp_path):
    save(tmp_path / "ck")
    (tmp_path / "ck" / WEIGHTS_FILE).write_bytes(b"")
    message = _one_line_error(tmp_path / "ck")
    assert "is empty" in message
    assert "damaged" in message


def test_random_garbage_weights(tmp_path):
    save(tmp_path / "ck")
    garbage = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    assert not garbage.startswith((b"\x80", b"PK"))
    (tmp_path / "ck" / WEIGHTS_FILE).write_bytes(garbage)
    assert "not a valid safetensors file" in _one_line_error(tmp_path / "ck")


def test_missing_weights(tmp_path):
    save(tmp_path / "ck")
    (tmp_path / "ck" / WEIGHTS_FILE).unlink()
    message = _one_line_error(tmp_path / "ck")
    assert "is missing" in message
    assert "incomplete" in message


def test_foreign_safetensors_names(tmp_path):
    save(tmp_path / "ck")
    safetensors.torch.save_file(
        {"encoder.weight": torch.zeros(3, 4), "decoder.bias": torch.zeros(2)},
        tmp_path / "ck" / WEIGHTS_FILE,
    )
    message = _one_line_error(tmp_path / "ck")
    assert "do not match" in message
    assert "the file lacks weight embed.weight" in message


def test_foreign_safetensors_shapes(tmp_path):
    save(tmp_path / "ck")
    _, vocab, _ = tiny_setup()
    other = RunConfig().with_overrides({"embed_dim": 5, "hidden_dim": 9, "n_layers": 2})
    safetensors.torch.save_file(
        CharRNN(other.model, vocab.size).state_dict(), tmp_path / "ck" / WEIGHTS_FILE
    )
    message = _one_line_error(tmp_path / "ck")
    assert "do not match" in message
    assert "weight rnn.weight_ih_l0 has shape [36, 5], the configuration needs [28, 5]" in message


def test_vocabulary_that_does_not_fit_the_weights(tmp_path):
    drop_two = json_edit(lambda d: d["vocab"].update(symbols=d["vocab"]["symbols"][:-2]))
    message = error_after_changing(tmp_path / "ck", CONFIG_FILE, drop_two)
    assert "vocabulary" in message
    assert "embed.weight has shape [18, 5], the configuration needs [16, 5]" in message


def test_missing_config(tmp_path):
    save(tmp_path / "ck")
    (tmp_path / "ck" / CONFIG_FILE).unlink()
    message = _one_line_error(tmp_path / "ck")
    assert "not a charlstm checkpoint or run directory" in message
    assert CONFIG_FILE in message


def test_malformed_json(tmp_path):
    save(tmp_path / "ck")
    (tmp_path / "ck" / CONFIG_FILE).write_text(
        '{"format": "charlstm-checkpoint",', encoding="utf-8"
    )
    message = _one_line_error(tmp_path / "ck")
    assert "not valid JSON" in message


def test_config_json_that_is_not_an_object(tmp_path):
    save(tmp_path / "ck")
    (tmp_path / "ck" / CONFIG_FILE).write_text("[1, 2]", encoding="utf-8")
    assert "does not hold a JSON object" in _one_line_error(tmp_path / "ck")


def test_config_json_of_another_program(tmp_path):
    save(tmp_path / "ck")
    (tmp_path / "ck" / CONFIG_FILE).write_text('{"model_type": "bert"}', encoding="utf-8")
    assert "is not a charlstm checkpoint configuration" in _one_line_error(tmp_path / "ck")


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda d: d["config"]["model"].update(hidden_dim="wide"), "wrong type"),
        (lambda d: d["config"]["model"].update(depth=3), "unknown setting"),
        (lambda d: d.pop("vocab"), "vocab"),
        (lambda d: d["vocab"].update(symbols="aa"), "without repeats"),
        (lambda d: d.update(config=[1]), "malformed"),
        (lambda d: d.pop("format_version"), "format_version None"),
        (lambda d: d.update(format_version="1"), "format_version '1'"),
        (lambda d: d.update(format_version=0), "format_version 0"),
    ],
)
def test_malformed_config_entries(tmp_path, edit, words):
    message = error_after_changing(tmp_path / "ck", CONFIG_FILE, json_edit(edit))
    assert "malformed" in message
    assert words in message


def test_newer_format_version(tmp_path):
    newer = json_edit(lambda d: d.update(format_version=FORMAT_VERSION + 1))
    message = error_after_changing(tmp_path / "ck", CONFIG_FILE, newer)
    assert f"format {FORMAT_VERSION + 1}" in message
    assert "newer" in message
    assert "upgrade charlstm" in message


def test_every_header_length_reads_back_whatever_its_first_byte(tmp_path):
    # A safetensors file starts with its header's length: 0x80 there once looked like pickle.
    # The writer pads headers to a multiple of 8, so 32 first bytes occur; all of them here.
    residues = set()
    for extra in range(300):
        tensors = {"w" * (1 + extra): torch.arange(extra % 7 + 1, dtype=torch.float32),
                   "step": torch.tensor([extra])}  # fmt: skip
        path = tmp_path / f"{extra}.safetensors"
        safetensors.torch.save_file(tensors, path)
        residues.add(int.from_bytes(path.read_bytes()[:8], "little") % 256)
        loaded = read_tensors(path)
        assert loaded.keys() == tensors.keys()
        assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    assert residues == set(range(0, 256, 8))


@pytest.mark.parametrize("hidden", [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21])
def test_checkpoints_of_many_shapes_read_back(tmp_path, hidden):
    config = RunConfig().with_overrides({"embed_dim": 3, "hidden_dim": hidden, "n_layers": 1})
    vocab = Vocab("text", tuple(range(97, 97 + hidden)))
    weights = CharRNN(config.model, vocab.size).state_dict()
    resume = {f"optim.{i}.exp_avg": torch.zeros(i + 1) for i in range(hidden)}
    write_checkpoint(tmp_path / "ck", config=config, vocab=vocab, weights=weights, info={},
                     resume_tensors=resume, resume_json={"step": 1})  # fmt: skip
    assert same_weights(read_checkpoint(tmp_path / "ck").weights, weights)
    tensors, _ = read_resume_state(tmp_path / "ck")
    assert same_weights(tensors, resume)


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (lambda w: {**w, "head.bias": w["head.bias"].to(torch.int32)}, "not floating point"),
        (lambda w: {**w, "head.bias": w["head.bias"] * float("nan")}, "NaN or infinite"),
        (lambda w: {**w, "head.weight": w["head.weight"] * float("inf")}, "NaN or infinite"),
    ],
)  # fmt: skip
def test_weights_that_are_not_finite_floats_are_refused(tmp_path, damage, words):
    config, vocab, net = tiny_setup()
    write_checkpoint(tmp_path / "ck", config=config, vocab=vocab, info={},
                     weights=damage(net.state_dict()))  # fmt: skip
    assert words in _one_line_error(tmp_path / "ck")


def test_a_config_asking_for_a_huge_network_is_refused_before_anything_is_allocated(tmp_path):
    save(tmp_path / "ck")
    document = json.loads((tmp_path / "ck" / CONFIG_FILE).read_text(encoding="utf-8"))
    for change in ({"hidden_dim": 10**9}, {"n_layers": 10**6}, {"embed_dim": 2**63}):
        model = {**document["config"]["model"], **change}
        changed = {**document, "config": {**document["config"], "model": model}}
        (tmp_path / "ck" / CONFIG_FILE).write_text(json.dumps(changed), encoding="utf-8")
        began = time.monotonic()
        message = _one_line_error(tmp_path / "ck")
        assert time.monotonic() - began < 5
        assert "config.json" in message


@pytest.mark.parametrize(
    "text",
    ["[" * 100_000 + "]" * 100_000, '{"format": ' + "9" * 5001 + "}", '{"a": 1}\xff'],
)
def test_config_json_too_deep_too_long_or_not_utf8_is_one_error(tmp_path, text):
    save(tmp_path / "ck")
    (tmp_path / "ck" / CONFIG_FILE).write_bytes(text.encode("latin-1"))
    assert "not valid JSON" in _one_line_error(tmp_path / "ck")


def test_a_fifo_or_a_sparse_giant_in_place_of_the_weights_is_refused_without_reading_it(tmp_path):
    save(tmp_path / "ck")
    weights = tmp_path / "ck" / WEIGHTS_FILE
    header = weights.read_bytes()
    weights.unlink()
    os.mkfifo(weights)
    assert "not a regular file" in _one_line_error(tmp_path / "ck")
    weights.unlink()
    with open(weights, "wb") as f:  # a real header, then 10 GB of holes
        f.write(header)
        f.truncate(10 << 30)
    began = time.monotonic()
    assert "header describes" in _one_line_error(tmp_path / "ck")
    assert time.monotonic() - began < 5


# ---- fuzzing: any change to any file loads identically or is one CharLSTMError --------------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A last/ checkpoint with resume state, never changed."""
    config, vocab, net = tiny_setup()
    directory = tmp_path_factory.mktemp("pristine") / "last"
    resume = {"optim.0.exp_avg": torch.randn(3, 4), "rng.torch": torch.get_rng_state()}
    write_checkpoint(directory, config=config, vocab=vocab, weights=net.state_dict(),
                     info={"step": 3}, resume_tensors=resume,
                     resume_json={"step": 3, "batcher": {"epoch": 0, "index": 7}})  # fmt: skip
    return directory


def _load_everything(directory: Path):
    checkpoint = read_checkpoint(directory)
    tensors, state = read_resume_state(directory)
    return checkpoint, tensors, state


FILES = [CONFIG_FILE, WEIGHTS_FILE, RESUME_TENSORS_FILE, RESUME_JSON_FILE]
EDITS = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 20)),
    st.tuples(st.just("extend"), st.binary(min_size=1, max_size=64)),
)


def _edited(data: bytes, edit: tuple) -> bytes:
    if edit[0] == "flip":
        at = edit[1] % len(data)
        return data[:at] + bytes([data[at] ^ edit[2]]) + data[at + 1 :]
    if edit[0] == "truncate":
        return data[: edit[1] % len(data)]
    return data + edit[1]


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(FILES), edit=EDITS)
def test_any_changed_byte_loads_identically_or_is_one_error(pristine, tmp_path_factory, name, edit):
    directory = tmp_path_factory.mktemp("fuzz") / "last"
    shutil.copytree(pristine, directory)
    path = directory / name
    path.write_bytes(_edited(path.read_bytes(), edit))
    expected_checkpoint, expected_tensors, expected_state = _load_everything(pristine)
    began = time.monotonic()
    try:
        checkpoint, tensors, state = _load_everything(directory)
    except CharLSTMError as e:
        assert "\n" not in str(e)
    else:  # every file but config.json is checksummed by config.json: the same bytes or nothing
        assert same_weights(checkpoint.weights, expected_checkpoint.weights)
        assert same_weights(tensors, expected_tensors)
        assert state == expected_state
    assert time.monotonic() - began < 5
    shutil.rmtree(directory.parent)
