"""Muon + AdamW: the orthogonalisation, each half's update, and training with it."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_config

import charlstm
from charlstm.muon import MuonAdamW, orthogonalize

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("shape", [(48, 32), (32, 48), (4, 24, 24)])
def test_orthogonalize_keeps_the_singular_vectors_and_pushes_the_values_near_one(shape):
    torch.manual_seed(0)
    *batch, m, n = shape
    k = min(m, n)
    left = torch.linalg.qr(torch.randn(*batch, m, k)).Q
    right = torch.linalg.qr(torch.randn(*batch, n, k)).Q
    values = torch.logspace(-1, 0, k)  # ill-conditioned: a factor of ten between extremes
    result = orthogonalize(left @ torch.diag_embed(values) @ right.mT).float()
    singular = torch.linalg.svdvals(result)
    assert singular.min() > 0.5 and singular.max() < 1.3
    polar = (left @ right.mT).flatten(-2)  # the exactly orthogonal matrix with those vectors
    cosine = torch.nn.functional.cosine_similarity(result.flatten(-2), polar, dim=-1)
    assert (cosine > 0.95).all(), cosine


def test_adamw_groups_step_as_torch_adamw_does():
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    groups = lambda ps: [  # noqa: E731
        {"params": [ps[0]], "weight_decay": 0.2},
        {"params": [ps[1]], "weight_decay": 0.0},
    ]
    mine = MuonAdamW(groups(ours), lr=1e-2, muon_lr=3e-2, betas=(0.9, 0.99))
    reference = torch.optim.AdamW(groups(theirs), lr=1e-2, betas=(0.9, 0.99))
    for _ in range(5):
        grads = [torch.randn_like(p) for p in ours]
        for optimizer, params in ((mine, ours), (reference, theirs)):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            optimizer.step()
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_muon_group_steps_by_the_orthogonalised_momentum_of_each_block():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(4 * 8, 4))  # 4 gate blocks of 8 x 4: tall
    start = weight.detach().clone()
    group = {"params": [weight], "weight_decay": 0.1, "blocks": 4}
    optimizer = MuonAdamW([group], lr=1e-2, muon_lr=5e-2)
    grad = torch.randn_like(weight)
    weight.grad = grad
    optimizer.step()
    momentum = 0.05 * grad  # the buffer after one step: (1 - 0.95) of the gradient
    nesterov = grad + 0.95 * (momentum - grad)
    blocks = orthogonalize(nesterov.view(4, 8, 4)).view_as(weight)
    expected = start * (1 - 1e-2 * 0.1) - 5e-2 * math.sqrt(8 / 4) * blocks
    torch.testing.assert_close(weight.detach(), expected)
    torch.testing.assert_close(optimizer.state[weight]["momentum"], momentum)


@pytest.mark.slow
def test_muon_learns_faster_than_adamw_on_the_same_steps(shakespeare_200k, tmp_path):
    """The default optimizer is Muon; resuming it exactly (its momentum and AdamW's moments in
    the resume state) is checked by test_train's resume tests, which run with the defaults."""
    losses = {}
    for optimizer in ("muon", "adamw"):
        config = tiny_config(
            shakespeare_200k, tmp_path / optimizer, optimizer=optimizer, max_steps=120,
            eval_every=120, lr=1e-2,
        )  # fmt: skip
        losses[optimizer] = charlstm.train(config, progress=False).best_val.loss
        saved = json.loads((tmp_path / optimizer / "last" / "config.json").read_text())
        assert saved["config"]["train"]["optimizer"] == optimizer
    assert losses["muon"] < losses["adamw"] - 0.02, losses


def test_resuming_a_checkpoint_of_another_optimizer_is_refused_in_one_line(
    shakespeare_200k, tmp_path
):
    """A checkpoint written before Muon existed has no "optimizer" setting, so it reads as the
    default, muon, while its state is AdamW's: a clear error, and the run is left as it was."""
    run = tmp_path / "run"
    first = tiny_config(shakespeare_200k, run, optimizer="adamw", max_steps=20)
    charlstm.train(first, progress=False)
    config_file = run / "last" / "config.json"
    document = json.loads(config_file.read_text())
    del document["config"]["train"]["optimizer"]
    config_file.write_text(json.dumps(document))
    before = (run / "last" / "resume.safetensors").read_bytes()
    resumed = tiny_config(shakespeare_200k, run, max_steps=40, resume=str(run))
    with pytest.raises(charlstm.CharLSTMError) as error:
        charlstm.train(resumed.with_overrides({"optimizer": "muon"}), progress=False)
    message = str(error.value)
    assert "another optimizer than --optimizer muon" in message and "\n" not in message
    assert (run / "last" / "resume.safetensors").read_bytes() == before
