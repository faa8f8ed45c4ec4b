"""The weight average: its update, swapping it in and out, and what training saves with it."""

from __future__ import annotations

import pytest
import torch
from conftest import read_metrics, tiny_config
from safetensors.torch import load_file

import charlstm
from charlstm.data import load_corpus
from charlstm.ema import WeightAverage
from charlstm.evaluation import evaluate_ids
from charlstm.model import CharRNN

pytestmark = pytest.mark.usefixtures("one_thread")


def snapshot(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in net.named_parameters()}


def test_update_folds_in_the_weights_with_a_decay_that_ramps_up():
    net = torch.nn.Linear(3, 2)
    start = snapshot(net)
    average = WeightAverage(net, decay=0.9)
    with torch.no_grad():
        net.weight.add_(1.0)
    average.update(step=0)  # decay min(0.9, 1/10): nearly all the new weights
    expected = start["weight"] + 1.0 * (1 - 0.1)
    torch.testing.assert_close(average.average["weight"], expected)
    with torch.no_grad():
        net.weight.add_(1.0)
    average.update(step=1000)  # the full decay by now
    torch.testing.assert_close(average.average["weight"], 0.9 * expected + 0.1 * net.weight)
    torch.testing.assert_close(average.average["bias"], start["bias"])  # unchanged weights


def test_applied_swaps_the_average_in_and_restores_the_training_weights_bit_for_bit():
    torch.manual_seed(0)
    net = torch.nn.Linear(5, 4)
    average = WeightAverage(net, decay=0.5)
    with torch.no_grad():
        net.weight.mul_(1.7).add_(0.3)
    average.update(step=100)
    training = snapshot(net)
    with average.applied():
        assert torch.equal(net.weight, average.average["weight"])
        assert torch.equal(average.training_weights()["weight"], training["weight"])
        with average.applied():  # nested: still the average, and nothing lost on leaving
            assert torch.equal(net.weight, average.average["weight"])
        assert torch.equal(net.weight, average.average["weight"])
    for name, value in snapshot(net).items():
        assert torch.equal(value, training[name]), name
    with pytest.raises(RuntimeError), average.applied():
        raise RuntimeError("an evaluation failed")
    assert torch.equal(net.weight, training["weight"])  # restored on the way out of an error


def test_a_run_evaluates_and_saves_the_average_and_resume_keeps_the_training_weights(
    shakespeare_200k, tmp_path
):
    config = tiny_config(shakespeare_200k, tmp_path / "run", ema=0.95, lr=1e-2)
    result = charlstm.train(config, progress=False)
    saved = load_file(result.run_dir / "last" / "model.safetensors")
    resume = load_file(result.run_dir / "last" / "resume.safetensors")
    training = {k[len("train.") :]: v for k, v in resume.items() if k.startswith("train.")}
    assert training.keys() == saved.keys()
    assert any(not torch.equal(saved[name], training[name]) for name in saved)
    # The logged validation loss is the saved (averaged) model's, not the training weights'.
    logged = read_metrics(result.run_dir, "eval")[-1]["loss"]
    corpus = load_corpus(config.data)
    net = CharRNN(config.model, corpus.vocab.size)
    val = corpus.val
    net.load_state_dict(saved)
    assert evaluate_ids(net, [val]).loss == pytest.approx(logged, abs=1e-5)
    net.load_state_dict(training)
    assert abs(evaluate_ids(net, [val]).loss - logged) > 1e-4


def test_ema_zero_saves_the_training_weights_and_nothing_more(shakespeare_200k, tmp_path):
    config = tiny_config(shakespeare_200k, tmp_path / "run", ema=0.0, max_steps=30)
    result = charlstm.train(config, progress=False)
    resume = load_file(result.run_dir / "last" / "resume.safetensors")
    assert not any(name.startswith("train.") for name in resume)
