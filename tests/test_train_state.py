"""TrainState: the resume payload round-trips through its files, and one that does not fit a
run is refused naming what is wrong."""

from __future__ import annotations

import json

import pytest
import torch

from charlstm.train_state import TrainState


def a_state(**changes) -> TrainState:
    values = dict(
        step=12,
        elapsed=3.5,
        best_val=1.25,
        batcher={"position": 4, "epoch": 1},
        param_groups=[{"lr": 0.01, "params": [0, 1]}],
        optimizer_moments={0: {"exp_avg": torch.ones(6), "step": torch.tensor(12.0)},
                           1: {"exp_avg": torch.zeros(3), "step": torch.tensor(12.0)}},
        scaler={},
        log_window=(2.5, 2),
        eval_slice=None,
        world_size=2,
        carried=(torch.randn(2, 4, 8), torch.randn(2, 4, 8)),
        rng=[torch.get_rng_state(), torch.get_rng_state()],
        training_weights={"head.bias": torch.arange(3.0)},
    )  # fmt: skip
    return TrainState(**{**values, **changes})


def test_files_round_trip():
    state = a_state()
    tensors, document = state.to_files()
    back = TrainState.from_files(tensors, json.loads(json.dumps(document)))
    assert (back.step, back.elapsed, back.best_val, back.log_window) == (12, 3.5, 1.25, (2.5, 2))
    assert back.batcher == state.batcher and back.world_size == 2
    assert torch.equal(back.optimizer_moments[0]["exp_avg"], torch.ones(6))
    assert all(torch.equal(a, b) for a, b in zip(back.carried, state.carried, strict=True))
    assert len(back.rng) == 2 and torch.equal(back.rng[1], state.rng[1])
    assert torch.equal(back.training_weights["head.bias"], torch.arange(3.0))


def test_a_run_without_carried_state_round_trips_none():
    tensors, document = a_state(carried=None).to_files()
    assert TrainState.from_files(tensors, document).carried is None


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda d: d.pop("step"), "lacks step"),
        (lambda d: d.update(step=-1), "step = -1"),
        (lambda d: d.update(elapsed=float("nan")), "elapsed = nan"),
        (lambda d: d.update(batcher={}), "batcher"),
        (lambda d: d.update(log_window=[1.0]), "log_window"),
        (lambda d: d.update(carried_state="yes"), "carried_state"),
    ],
)
def test_a_document_a_run_would_not_write_is_refused_by_field(edit, words):
    tensors, document = a_state().to_files()
    edit(document)
    with pytest.raises((KeyError, ValueError), match=words):
        TrainState.from_files(tensors, document)


def test_moments_or_carried_state_of_another_model_do_not_fit():
    state = a_state()
    state.check_fits([6, 3], torch.Size([2, 4, 8]))  # fits: nothing raised
    with pytest.raises(ValueError, match=r"optim\.0\.exp_avg has 6 values for a parameter of 5"):
        state.check_fits([5, 3], torch.Size([2, 4, 8]))
    with pytest.raises(ValueError, match=r"state.0 has shape \[2, 4, 8\], not \[2, 4, 16\]"):
        state.check_fits([6, 3], torch.Size([2, 4, 16]))
    with pytest.raises(ValueError, match="parameter 1 of 1"):
        state.check_fits([6], torch.Size([2, 4, 8]))
