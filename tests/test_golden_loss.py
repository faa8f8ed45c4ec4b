"""The loss after a few steps of a fixed run, pinned to stored values: any change to the
numerics of training (initialisation, data order, loss, optimizer, schedule) shows here."""

from __future__ import annotations

import pytest
from conftest import read_metrics, tiny_config, write_text

import charlstm

pytestmark = pytest.mark.usefixtures("one_thread")

# (training loss averaged over steps 1-10, validation loss after step 10), in nats per
# character, for each optimizer; fp32 on one thread.
GOLDEN = {
    "muon": (3.264426922798157, 3.213187941248388),
    "adamw": (3.261121463775635, 3.2049328672320736),
}


@pytest.mark.parametrize("optimizer", sorted(GOLDEN))
def test_the_loss_after_ten_steps_equals_the_stored_value(tmp_path, optimizer):
    data = write_text(tmp_path / "words.txt", lines=400)
    config = tiny_config(
        data, tmp_path / "run", optimizer=optimizer, max_steps=10, log_every=10, eval_every=10,
        dropout=0.1, seed=7,
    )  # fmt: skip
    charlstm.train(config, progress=False)
    records = read_metrics(tmp_path / "run")
    train = next(r["loss"] for r in records if r["kind"] == "train" and r["step"] == 10)
    val = next(r["loss"] for r in records if r["kind"] == "eval" and r["step"] == 10)
    assert (train, val) == pytest.approx(GOLDEN[optimizer], abs=1e-5)
