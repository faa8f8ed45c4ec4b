"""Every vocabulary size on every path: 255, 256, 257, 300 and 70,000 distinct symbols.

The ids of a vocabulary of up to 256 symbols fit uint8, up to 65,536 uint16, beyond that
uint32; each size here sits on or just past such an edge (or far past it), and goes through
batching, the encoded-corpus cache, the model (fused kernel and fp32), evaluation, both
samplers and a checkpoint's save and reload.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

import charlstm
import charlstm.data as data_module
from charlstm import fused_lstm
from charlstm.batching import IGNORE, make_batcher
from charlstm.checkpoint import write_checkpoint
from charlstm.config import DataConfig, ModelConfig, RunConfig
from charlstm.data import Vocab, load_corpus
from charlstm.model import CharRNN
from charlstm.sample import NumpyStepper, generate_ids

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = [255, 256, 257, 300, 70_000]
# Code points to draw alphabets from, in order: newline, printable ASCII, Cyrillic, CJK,
# Hangul, then CJK Extension B (four UTF-8 bytes each, beyond the Basic Multilingual Plane).
POOL = np.array(
    [10, *range(32, 127), *range(0x400, 0x500), *range(0x4E00, 0xA000), *range(0xAC00, 0xD7A4)],
    dtype=np.uint32,
)
POOL = np.concatenate([POOL, np.arange(0x20000, 0x2A6E0, dtype=np.uint32)])
NEEDS_KERNEL = pytest.mark.skipif(not fused_lstm.available(), reason="no fused LSTM kernel here")


def alphabet(size: int) -> np.ndarray:
    """``size`` distinct code points (sorted), the last ones far from ASCII."""
    return np.sort(POOL[:size])


def corpus_text(size: int, length: int = 20_000) -> str:
    """A text in which each of ``size`` symbols occurs, the first and last ones often."""
    symbols = alphabet(size)
    rng = np.random.default_rng(size)
    # Every symbol once, then draws favouring both ends of the id range (the edges under test).
    ends = np.concatenate([symbols[:50], symbols[-50:]])
    drawn = rng.choice(ends, size=max(length, 2 * size) - size)
    codepoints = np.concatenate([rng.permutation(symbols), drawn])
    return codepoints.astype(np.uint32).tobytes().decode("utf-32-le")


@pytest.fixture(scope="module", params=SIZES, ids=[f"{n}-symbols" for n in SIZES])
def corpus_file(request, tmp_path_factory):
    """A UTF-8 file with exactly that many distinct characters."""
    size = request.param
    path = tmp_path_factory.mktemp("vocab") / f"symbols-{size}.txt"
    path.write_text(corpus_text(size), encoding="utf-8")
    return path, size


def settings(size: int, precision: str) -> dict:
    # A tiny network, and a small validation split: 70,000 logits per scored character.
    return {
        "embed_dim": 8,
        "hidden_dim": 32,
        "n_layers": 1,
        "batch_size": 4,
        "seq_len": 16,
        "max_steps": 3,
        "eval_every": 3,
        "warmup_steps": 1,
        "precision": precision,
        "val_fraction": 0.005 if size > 1000 else 0.05,
        "ema": 0.0,
    }


def test_vocabulary_and_ids_cover_the_whole_range(corpus_file):
    path, size = corpus_file
    corpus = load_corpus(DataConfig(data=[str(path)], val_fraction=0.05))
    assert corpus.vocab.size == size
    assert corpus.vocab.codepoints == tuple(alphabet(size).tolist())
    expected = np.uint8 if size <= 256 else np.uint16 if size <= 65_536 else np.uint32
    assert corpus.train.dtype == expected
    ids = np.concatenate([corpus.train, corpus.val])
    assert ids.max() == size - 1 and ids.min() == 0
    assert corpus.vocab.decode(ids) == path.read_text(encoding="utf-8")


def test_encoded_cache_and_batches_keep_every_id(corpus_file, monkeypatch):
    path, size = corpus_file
    in_memory = load_corpus(DataConfig(data=[str(path)], val_fraction=0.05))
    monkeypatch.setattr(data_module, "_MMAP_THRESHOLD_BYTES", 1)
    for _ in range(2):  # encoded into the cache, then read from it
        mapped = load_corpus(DataConfig(data=[str(path)], val_fraction=0.05))
        assert isinstance(mapped.train, np.memmap)
        assert mapped.train.dtype == in_memory.train.dtype
        assert np.array_equal(mapped.train, in_memory.train)
        assert mapped.fingerprint == in_memory.fingerprint
    # A stateful epoch serves every (input, target) pair once: every id, the highest included.
    batcher = make_batcher("stateful", mapped.train, 8, 64, seed=1)
    served = set()
    for _ in range(batcher.steps_per_epoch):
        batch = batcher.next_batch()
        assert batch.inputs.dtype == batch.targets.dtype == np.int64
        served.update(batch.inputs.ravel().tolist())
        served.update(batch.targets[batch.targets != IGNORE].tolist())
    assert served == set(np.unique(mapped.train).tolist())
    assert max(served) == int(mapped.train.max())
    batch = make_batcher("random", mapped.train, 8, 64, seed=1).next_batch()
    assert batch.inputs.min() >= 0 and batch.targets.max() < size


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=NEEDS_KERNEL)])
def test_train_evaluate_sample_save_and_reload(corpus_file, tmp_path, precision):
    """A few steps of training through charlstm.train (bf16: the fused kernel), then every use
    of the checkpoint it saved."""
    path, size = corpus_file
    config = tiny_config(path, tmp_path / "run", **settings(size, precision))
    result = charlstm.train(config, progress=False)
    model = result.model
    assert model.vocab.size == size
    assert model.net.embed.weight.shape[0] == model.net.head.weight.shape[0] == size
    # Evaluation: the recorded validation loss, re-read from the files; and any text.
    recorded = json.loads((tmp_path / "run" / "best" / "config.json").read_text(encoding="utf-8"))
    assert model.evaluate_validation().loss == pytest.approx(recorded["val"]["loss"], abs=1e-4)
    ends = path.read_text(encoding="utf-8")[-300:]  # drawn from both ends of the id range
    (tmp_path / "ends.txt").write_text(ends, encoding="utf-8")
    loss = model.evaluate(ends).loss
    assert np.isfinite(loss)
    assert model.evaluate_files([str(tmp_path / "ends.txt")]).loss == pytest.approx(loss)
    # Sampling: batch 1 (the numpy stepper) and a batch, from a prompt of the highest ids.
    top = "".join(chr(c) for c in alphabet(size)[-3:])
    single = model.generate(top, length=200, temperature=5.0, seed=0)
    batch = model.generate_batch(3, top, length=100, temperature=5.0, seed=0)
    symbols = set(model.vocab.symbols())
    assert len(single) == 200 and set(single) <= symbols
    assert all(len(b) == 100 and set(b) <= symbols for b in batch)
    # Save and reload: the same vocabulary and weights, the same numbers.
    again = charlstm.load(tmp_path / "run")
    assert again.vocab == model.vocab
    assert again.evaluate(ends).loss == pytest.approx(loss, abs=1e-6)
    assert again.generate(top, length=50, seed=3) == model.generate(top, length=50, seed=3)


@pytest.mark.parametrize("size", SIZES)
def test_numpy_stepper_matches_the_module_on_the_highest_ids(size):
    torch.manual_seed(size)
    net = CharRNN(ModelConfig(embed_dim=8, hidden_dim=32, n_layers=2, dropout=0.0), size).eval()
    prompt = torch.tensor([size - 1, 0, size - 2, size - 1])
    fast = list(generate_ids(net, prompt, 30, temperature=2.0, seed=5))
    slow = list(generate_ids(net, prompt, 30, temperature=2.0, seed=5, fast=False))
    assert [a.tolist() for a in fast] == [b.tolist() for b in slow]
    with torch.inference_mode():
        _, state = net(prompt[None, :-1])
        expected = net(prompt[None, -1:], state)[0][:, -1]
    stepper = NumpyStepper(net, 1)
    stepper.load(slice(0, 1), state)
    got = stepper(np.array([size - 1]))
    assert np.allclose(got, expected.numpy(), atol=1e-4)


@NEEDS_KERNEL
@pytest.mark.parametrize("size", SIZES)
def test_fused_kernel_looks_up_and_trains_the_highest_ids(size, monkeypatch):
    """The kernel's first layer reads row id of a (V, 4H) table of W_ih x embedding + biases,
    and sends each position's gradient back to that row: right for the last rows too."""
    torch.manual_seed(size)
    net = CharRNN(ModelConfig(embed_dim=32, hidden_dim=64, n_layers=1, dropout=0.0), size)
    x = torch.randint(0, size, (5, 20))
    x[:, :4] = size - 1
    x[0, 4:8] = size - 2
    y = torch.roll(x, -1, dims=1)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, _ = net(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        return loss, torch.autograd.grad(loss, net.embed.weight)[0]

    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused_lstm.applies(net.rnn, x)
    loss, grad = run()
    monkeypatch.setattr(fused_lstm, "available", lambda: False)  # torch's LSTM under autocast
    ref_loss, ref_grad = run()
    assert abs(loss.item() - ref_loss.item()) < 1e-2
    for row in (size - 1, size - 2, 0):
        assert torch.allclose(grad[row], ref_grad[row], rtol=5e-2, atol=5e-4)
    unused = torch.ones(size, dtype=torch.bool)
    unused[x.unique()] = False
    assert not grad[unused].any()  # rows of ids that never occur get nothing


@pytest.mark.parametrize("size", SIZES)
def test_vocabulary_survives_the_checkpoint_format(size):
    vocab = Vocab("text", tuple(alphabet(size).tolist()))
    assert Vocab.from_json(json.loads(json.dumps(vocab.to_json(), ensure_ascii=False))) == vocab
    ids = np.array([0, size - 1, size // 2, size - 1])
    assert vocab.encode(vocab.decode(ids)).tolist() == ids.tolist()


def test_lone_surrogates_and_undecodable_file_names_survive_a_checkpoint(tmp_path):
    """A vocabulary holding lone surrogates (a codec such as unicode_escape makes them) and a
    file name that is not UTF-8 (Python holds its bytes as surrogates) are written and read."""
    vocab = Vocab("text", (10, 0x61, 0xD800, 0xDFFF, 0x1F600))
    name = os.fsdecode(b"corpus-\xff.txt")
    config = RunConfig().with_overrides({"data": [name], "embed_dim": 4, "hidden_dim": 8})
    net = CharRNN(config.model, vocab.size)
    write_checkpoint(tmp_path / "ck", config=config, vocab=vocab, weights=net.state_dict(), info={})
    model = charlstm.load(tmp_path / "ck", device="cpu")
    assert model.vocab == vocab
    assert model.config.data.data == config.data.data
