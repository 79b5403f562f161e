"""Where the callback puts its simulation windows: checkpoint_epochs="auto", and what it says when a
requested checkpoint cannot be honoured or the final window sits at near-initial weights (issue 9, bug 5)."""

from __future__ import annotations

import pytest
import torch
from conftest import blobs, fit, small_mlp

from lightning_attr import AttributionCallback, ResponseStore
import lightning as L

from lightning_attr.callback import early_checkpoint_epochs


def test_auto_epochs_are_early():
    # end mode's default: after 10% and 20% of the epochs
    assert early_checkpoint_epochs(30) == [3, 6]
    assert early_checkpoint_epochs(7) == [1]
    assert early_checkpoint_epochs(10) == [1, 2]
    assert early_checkpoint_epochs(2) == [1]
    assert early_checkpoint_epochs(1) == []


def test_a_checkpoint_that_cannot_be_honoured_is_said(tmp_path):
    # the repro: 4 epochs of 10 batches, horizon 30: the final window injects in epoch 1 (0-based 0)
    x, y = blobs(n=100, d=6, classes=3)
    cb = AttributionCallback(tmp_path / "r", horizon=30, checkpoint_epochs=[2], curvature_batch_size=10, mode="online")
    with pytest.warns(UserWarning) as record:
        fit(small_mlp(6, 3), x, y, [cb], epochs=4, batch_size=10)
    messages = [str(w.message) for w in record]
    dropped = next(m for m in messages if "checkpoint_epochs [2] cannot be honoured" in m)
    assert "10 optimizer steps per epoch, 40 in the fit and horizon=30" in dropped and "lower horizon" in dropped
    early = next(m for m in messages if "near-initial weights" in m)
    assert "injects the sources during epoch 1" in early and "at least 6 epochs" in early and "mode='end'" in early
    assert ResponseStore.load(cb.dirpath).checkpoints == ["final"]
    # pooled curvature batches stretch a window over more optimizer steps: the warning says so
    pooled = AttributionCallback(tmp_path / "pooled", horizon=10, checkpoint_epochs=[2], curvature_batch_size=20, mode="online")
    with pytest.warns(UserWarning, match=r"horizon=10 \(= 20 optimizer steps: one propagation step per curvature_batch_size=20"):
        fit(small_mlp(6, 3), x, y, [pooled], epochs=4, batch_size=10)


def test_a_long_enough_fit_warns_about_nothing(tmp_path):
    x, y = blobs(n=100, d=6, classes=3)
    cb = AttributionCallback(tmp_path / "r", horizon=10, checkpoint_epochs=[3], curvature_batch_size=10, mode="online")
    with pytest.warns() as record:
        fit(small_mlp(6, 3), x, y, [cb], epochs=6, batch_size=10)
    assert not [w for w in record if "cannot be honoured" in str(w.message) or "near-initial" in str(w.message)]
    assert ResponseStore.load(cb.dirpath).checkpoints == ["epoch=3", "final"]


def test_auto_checkpoints_online_and_end(tmp_path):
    x, y = blobs(n=64, d=6, classes=3)
    online = AttributionCallback(tmp_path / "online", horizon=4, curvature_batch_size=16, mode="online")
    assert online.checkpoint_epochs == "auto"  # the default
    fit(small_mlp(6, 3), x, y, [online], epochs=10, batch_size=16)
    assert ResponseStore.load(online.dirpath).checkpoints == ["final"]  # online: no extra windows
    model = small_mlp(6, 3)
    end = AttributionCallback(tmp_path / "end", mode="end", horizon=4, curvature_batch_size=32)
    fit(model, x, y, [end], epochs=12)
    # end mode: after 10% and 20% of the epochs, whatever the propagation
    assert ResponseStore.load(end.dirpath).checkpoints == ["epoch=1", "epoch=2", "final"]
    assert model.attribute((x[:3], y[:3]), responses=end.dirpath, checkpoints="all").isfinite().all()
    step_rule = AttributionCallback(tmp_path / "cheb", mode="end", horizon=4, curvature_batch_size=32, propagation="chebyshev")
    fit(small_mlp(6, 3), x, y, [step_rule], epochs=12)
    assert ResponseStore.load(step_rule.dirpath).checkpoints == ["epoch=1", "epoch=2", "final"]


class _StopAfter(L.Callback):
    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.should_stop = trainer.current_epoch + 1 >= self.epochs


def test_auto_checkpoints_of_a_fit_without_a_known_end_warn_and_keep_the_final_one(tmp_path):
    x, y = blobs(n=64, d=6, classes=3)
    cb = AttributionCallback(tmp_path / "r", mode="end", curvature_batch_size=32)
    with pytest.warns(UserWarning, match=r"fit's end is unknown.*only the final checkpoint.*Set max_epochs or max_steps"):
        fit(small_mlp(6, 3), x, y, [cb, _StopAfter(3)], epochs=-1)
    assert ResponseStore.load(cb.dirpath).checkpoints == ["final"]


def test_end_mode_checkpoint_after_the_last_epoch_is_said(tmp_path):
    x, y = blobs(n=64, d=6, classes=3)
    cb = AttributionCallback(tmp_path / "r", mode="end", horizon=2, curvature_batch_size=32, checkpoint_epochs=[1, 3, 5])
    with pytest.warns(UserWarning, match=r"checkpoint_epochs \[3, 5\] cannot be honoured.*the fit has 3 epochs"):
        fit(small_mlp(6, 3), x, y, [cb], epochs=3)
    assert ResponseStore.load(cb.dirpath).checkpoints == ["epoch=1", "final"]


@pytest.mark.parametrize("bad", ["often", [0], [1.5]])
def test_bad_checkpoint_epochs_are_refused(bad):
    with pytest.raises(Exception, match="checkpoint_epochs must be 'auto' or a list of positive ints"):
        AttributionCallback(checkpoint_epochs=bad, mode="online")
