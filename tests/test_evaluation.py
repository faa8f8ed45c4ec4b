"""evaluate_ids: the streamed, segmented score against a plain single-stream computation;
dynamic_evaluate_ids: the same stream read by a model that keeps learning."""

from __future__ import annotations

import functools
import importlib
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import refused, run_cli, train_tiny, write_text
from conftest import tiny_net as shared_tiny_net

import charlstm
from charlstm import cli
from charlstm.config import DynamicEvalConfig, ModelConfig
from charlstm.errors import CharLSTMError
from charlstm.evaluation import EvalResult, dynamic_evaluate_ids, evaluate_ids
from charlstm.model import CharRNN

# charlstm.evaluate is also the name of a function in the package namespace.
evaluate_module = importlib.import_module("charlstm.evaluation")
pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 13


# 24 hidden units: long_memory_net opens the forget gates, rows 24 to 48 of an LSTM's biases.
tiny_net = functools.partial(shared_tiny_net, vocab=VOCAB, hidden_dim=24)


def long_memory_net(seed: int = 0) -> CharRNN:
    """An LSTM whose forget gates are held open, so what it read long ago still matters."""
    net = tiny_net("lstm", seed=seed)
    with torch.no_grad():
        for layer in range(net.config.n_layers):
            getattr(net.rnn, f"bias_ih_l{layer}")[24:48] = 6.0  # gate order i, f, g, o
    return net


def markov_ids(n: int, seed: int = 0) -> np.ndarray:
    """Ids with some structure (a sticky random walk), so a state matters to the loss."""
    rng = np.random.default_rng(seed)
    steps = rng.choice([-1, 0, 0, 1, 3], size=n)
    return (np.cumsum(steps) % VOCAB).astype(np.uint8)


@torch.no_grad()
def single_stream_loss(net: CharRNN, ids: np.ndarray) -> float:
    """One forward over the whole text, batch 1: mean cross-entropy of positions 1..n-1."""
    net.eval()
    x = torch.as_tensor(np.asarray(ids, dtype=np.int64)).view(1, -1)
    logits, _ = net(x[:, :-1])
    return float(F.cross_entropy(logits[0].double(), x[0, 1:]))


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("n", [2, 3, 255, 257, 1500])
def test_one_segment_equals_a_single_stream(cell, n):
    # Below 8 * prime characters there is one segment: the same computation, chunked.
    net = tiny_net(cell)
    ids = markov_ids(n, seed=n)
    result = evaluate_ids(net, [ids])
    assert result.characters == n - 1
    assert result.loss == pytest.approx(single_stream_loss(net, ids), rel=1e-5, abs=1e-6)


def test_chunk_size_does_not_change_a_single_segment():
    net = tiny_net()
    ids = markov_ids(1200)
    reference = single_stream_loss(net, ids)
    for chunk in (1, 7, 256, 5000):
        result = evaluate_ids(net, [ids], chunk=chunk)
        assert result.loss == pytest.approx(reference, rel=1e-5)


def test_segments_cover_every_position_once():
    net = tiny_net()
    ids = markov_ids(5000, seed=3)
    for segments, prime in [(1, 16), (4, 16), (7, 3), (64, 8), (64, 0)]:
        result = evaluate_ids(net, [ids], segments=segments, prime=prime)
        assert result.characters == len(ids) - 1


def test_priming_with_the_whole_past_is_exact():
    # With prime at least the text's length every segment re-reads the text from its start,
    # so the segmented score is exact even with many segments.
    net = long_memory_net()
    ids = markov_ids(600, seed=4)
    reference = single_stream_loss(net, ids)
    result = evaluate_ids(net, [ids], segments=8, prime=600)
    assert result.characters == len(ids) - 1
    assert result.loss == pytest.approx(reference, rel=1e-6)
    # The comparison is sensitive: with 2 characters of priming this model scores ~1e-2 off.
    cold = evaluate_ids(net, [ids], segments=8, prime=2)
    assert cold.characters == len(ids) - 1
    assert abs(cold.loss - reference) > 1e-3


def test_segmented_score_of_a_trained_model_is_within_tolerance(trained_run, shakespeare_200k):
    # Measured on the 60-step model over the last 30,000 characters (loss ~2.86 nats/char):
    # the default 256-character priming (29 segments) differs from one sequential pass by
    # ~2e-9 nats, 16 characters (64 segments) by ~2e-6, 1 character by ~1e-3. The bounds
    # leave a margin of 5-600x over float noise; the last check shows the test is sensitive.
    model = charlstm.load(str(trained_run), device="cpu")
    text = shakespeare_200k.read_text(encoding="utf-8")[-30_000:]
    ids = model.vocab.encode(text)
    reference = single_stream_loss(model.net, ids)
    primed = evaluate_ids(model.net, [ids])
    assert primed.characters == len(ids) - 1
    assert abs(primed.loss - reference) < 1e-6
    short = evaluate_ids(model.net, [ids], prime=16)
    assert short.characters == len(ids) - 1
    assert abs(short.loss - reference) < 1e-5
    cold = evaluate_ids(model.net, [ids], prime=1)
    assert abs(cold.loss - reference) > 1e-4


def test_pieces_stream_like_one_block():
    net = tiny_net()
    ids = markov_ids(3000, seed=6)
    whole = evaluate_ids(net, [ids])
    pieces = np.array_split(ids, [1, 2, 50, 51, 1000, 2999])
    assert evaluate_ids(net, pieces) == whole
    assert evaluate_ids(net, iter(pieces)) == whole
    assert evaluate_ids(net, [ids[:0], ids, ids[:0]]) == whole
    assert evaluate_ids(net, (np.asarray(p, dtype=np.int64) for p in pieces)) == whole


def test_block_boundaries_carry_the_context(monkeypatch):
    # Texts over 1 Mi symbols are scored block by block; a small block size exercises the
    # same path on a short text. With prime >= the text length every block is primed with the
    # whole past, so the result must equal the single stream (a block that forgot its past
    # would be ~2e-3 off with this long-memory model).
    monkeypatch.setattr(evaluate_module, "_BLOCK", 97)
    net = long_memory_net()
    ids = markov_ids(700, seed=7)
    reference = single_stream_loss(net, ids)
    pieces = np.array_split(ids, 13)
    result = evaluate_ids(net, pieces, prime=1000)
    assert result.characters == len(ids) - 1
    assert result.loss == pytest.approx(reference, rel=1e-6)
    # Block boundaries are primed like segment boundaries: the same 64 characters of past.
    primed = evaluate_ids(net, pieces, prime=64, segments=1)
    assert primed.characters == len(ids) - 1
    assert primed.loss == pytest.approx(reference, rel=5e-3)
    assert primed.loss != pytest.approx(reference, rel=1e-6)


def test_memoryless_model_over_a_million_symbols_is_exact():
    # A 1-layer RNN with no recurrent weights predicts from the current symbol only, so the
    # exact loss is a cheap batch computation even for a text that spans two real blocks.
    torch.manual_seed(0)
    config = ModelConfig(cell="rnn", embed_dim=4, hidden_dim=6, n_layers=1, dropout=0.0)
    net = CharRNN(config, VOCAB).eval()
    with torch.no_grad():
        net.rnn.weight_hh_l0.zero_()
    n = (1 << 20) + 12_345
    ids = markov_ids(n, seed=8)
    with torch.no_grad():
        x = torch.as_tensor(ids.astype(np.int64))
        logits, _ = net(x[:-1].view(-1, 1))
        exact = float(F.cross_entropy(logits[:, 0].double(), x[1:]))
    pieces = np.array_split(ids, 5)
    result = evaluate_ids(net, pieces)
    assert result.characters == n - 1
    assert result.loss == pytest.approx(exact, rel=1e-5)


def test_training_mode_is_restored_and_dropout_ignored():
    net = tiny_net(dropout=0.5)
    ids = markov_ids(400)
    net.train()
    a = evaluate_ids(net, [ids])
    assert net.training
    net.eval()
    b = evaluate_ids(net, [ids])
    assert not net.training
    assert a == b


def test_too_short_to_score():
    net = tiny_net()
    for blocks in ([markov_ids(1)], []):
        with pytest.raises(CharLSTMError, match="needs at least 2 characters"):
            evaluate_ids(net, blocks)


def test_perplexity_of_a_huge_loss_is_infinite_not_an_overflow():
    assert EvalResult(loss=800.0, characters=10).perplexity == math.inf


def test_eval_result_units():
    result = EvalResult(loss=1.3, characters=10)
    assert result.bpc == pytest.approx(1.3 / math.log(2))
    assert result.perplexity == pytest.approx(math.exp(1.3))
    assert result.as_dict() == {
        "loss": 1.3,
        "bpc": result.bpc,
        "perplexity": result.perplexity,
        "characters": 10,
    }
    uniform = EvalResult(loss=math.log(65), characters=1)
    assert uniform.perplexity == pytest.approx(65)
    assert uniform.bpc == pytest.approx(math.log2(65))


def test_an_untrained_model_scores_near_uniform():
    net = tiny_net()
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.zero_()
    result = evaluate_ids(net, [markov_ids(500)])
    assert result.loss == pytest.approx(math.log(VOCAB), rel=1e-6)
    assert result.perplexity == pytest.approx(VOCAB, rel=1e-5)


# ---- dynamic evaluation ---------------------------------------------------------------------


def frozen(segment: int = 64) -> DynamicEvalConfig:
    """Dynamic evaluation that never moves the weights: a plain sequential pass."""
    return DynamicEvalConfig(dynamic_lr=0.0, dynamic_decay=0.0, dynamic_segment=segment)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("segment", [1, 7, 64, 5000])
def test_dynamic_without_learning_is_the_single_stream(cell, segment):
    net = tiny_net(cell)
    ids = markov_ids(900, seed=9)
    result = dynamic_evaluate_ids(net, [ids], frozen(segment))
    assert result.characters == len(ids) - 1
    assert result.loss == pytest.approx(single_stream_loss(net, ids), rel=1e-5)


@pytest.mark.parametrize("n", [2, 3, 64, 65, 66, 129])
def test_dynamic_scores_every_symbol_after_the_first_once(n):
    result = dynamic_evaluate_ids(tiny_net(), [markov_ids(n)], DynamicEvalConfig())
    assert result.characters == n - 1


def test_dynamic_learns_a_text_that_repeats():
    # 150 random symbols said 20 times: no static model can predict them, but one that keeps
    # learning does better each time round. Measured: static 2.56 nats, dynamic 1.10 over
    # the whole text and 2.58 over its first round.
    net = tiny_net()
    block = np.random.default_rng(10).integers(0, VOCAB, 150).astype(np.uint8)
    ids = np.tile(block, 20)
    static = evaluate_ids(net, [ids]).loss
    settings = DynamicEvalConfig(dynamic_lr=3e-2, dynamic_decay=0.0, dynamic_segment=16)
    first = dynamic_evaluate_ids(net, [ids[:151]], settings).loss
    whole = dynamic_evaluate_ids(net, [ids], settings).loss
    assert static > math.log(VOCAB) - 0.2
    assert whole < static - 1.0
    assert whole < first - 1.0


def test_dynamic_decay_pulls_back_to_the_trained_model():
    # The harder the weights are pulled back after each update, the less the model keeps of
    # a repeated text; a pull of 1 undoes nearly every update at once, leaving the static
    # loss. Measured: 1.89, 2.08, 2.51 and 2.5685 against 2.5687 static.
    net = tiny_net()
    block = np.random.default_rng(11).integers(0, VOCAB, 150).astype(np.uint8)
    ids = np.tile(block, 12)
    static = evaluate_ids(net, [ids]).loss
    losses = [
        dynamic_evaluate_ids(
            net, [ids], DynamicEvalConfig(dynamic_lr=3e-2, dynamic_decay=d, dynamic_segment=16)
        ).loss
        for d in (0.0, 0.01, 0.1, 1.0)
    ]
    assert losses[0] < losses[1] - 0.1 < losses[2] - 0.2
    assert losses[3] == pytest.approx(static, abs=0.01)


def test_dynamic_leaves_the_network_as_it_was():
    net = tiny_net(dropout=0.3)
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    dynamic_evaluate_ids(net, [markov_ids(500)], DynamicEvalConfig(dynamic_lr=1e-2))
    assert net.training
    assert all(p.grad is None for p in net.parameters())
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_dynamic_pieces_and_blocks_stream_like_one_text(monkeypatch):
    net = tiny_net()
    ids = markov_ids(1000, seed=12)
    settings = DynamicEvalConfig(dynamic_lr=1e-3, dynamic_segment=50)
    whole = dynamic_evaluate_ids(net, [ids], settings)
    pieces = np.array_split(ids, [1, 2, 50, 51, 400, 999])
    assert dynamic_evaluate_ids(net, iter(pieces), settings) == whole
    monkeypatch.setattr(evaluate_module, "_BLOCK", 97)  # the path of texts over 1 Mi symbols
    assert dynamic_evaluate_ids(net, pieces, settings) == whole


def test_dynamic_too_short_or_out_of_range():
    net = tiny_net()
    with pytest.raises(CharLSTMError, match="needs at least 2 characters"):
        dynamic_evaluate_ids(net, [markov_ids(1)], DynamicEvalConfig())
    with pytest.raises(CharLSTMError, match="--dynamic-segment must be at least 1"):
        dynamic_evaluate_ids(net, [markov_ids(9)], DynamicEvalConfig(dynamic_segment=0))


# ---- `charlstm eval`: a changed training text, and results JSON cannot hold -------------------


@pytest.fixture
def own_run(tmp_path) -> tuple:
    """A tiny run on a text of its own, which a test may change."""
    text = write_text(tmp_path / "corpus.txt")
    return train_tiny(text, tmp_path / "run"), text


@pytest.mark.slow
def test_eval_refuses_the_validation_split_of_a_training_text_that_changed(
    own_run, isolated_data_dir, tmp_path, capsys
):
    """Without --data, eval re-reads the training files: once they changed (the recorded
    fingerprint differs), their last tenth is no longer what the model held out."""
    run, text = own_run
    assert cli.main(["eval", str(run), "--json"]) == 0  # unchanged: scored
    assert json.loads(capsys.readouterr().out)["characters"] > 0
    with open(text, "a", encoding="utf-8") as f:
        f.write("a line added after training\n")
    result = run_cli(["eval", run], isolated_data_dir, tmp_path)
    refused(result, f"the training text ({text}) changed since the model was trained on it",
            "give --data FILE to score other text")  # fmt: skip
    assert result.stdout == ""
    with pytest.raises(CharLSTMError, match="changed since the model was trained on it"):
        charlstm.load(str(run)).evaluate_validation()


@pytest.mark.parametrize("dynamic", [False, True])
def test_eval_json_has_no_infinity_an_overflowed_perplexity_is_null(
    own_run, monkeypatch, capsys, dynamic
):
    run, text = own_run
    monkeypatch.setattr(charlstm.CharLM, "evaluate_files", lambda *a, **k: EvalResult(800.0, 10))
    argv = ["eval", str(run), "--data", str(text), "--json"] + (["--dynamic"] if dynamic else [])
    assert cli.main(argv) == 0
    out = capsys.readouterr().out

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    values = json.loads(out, parse_constant=refuse)
    assert values["loss"] == 800.0 and values["perplexity"] is None
    assert values["dynamic"] is dynamic


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_eval_of_a_loss_that_is_not_a_number_is_one_line(own_run, monkeypatch, capsys, json_flag):
    run, text = own_run
    monkeypatch.setattr(charlstm.CharLM, "evaluate_files", lambda *a, **k: EvalResult(math.nan, 10))
    assert cli.main(["eval", str(run), "--data", str(text), *json_flag]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"error: the loss of {text} came out as nan (the model's predictions overflowed): try an "
        "earlier checkpoint of the run\n"
    )
