"""A store written after a crash, or after a resume that skipped examples, never passes for a complete one.

Sources that were never injected or were propagated for fewer than ``horizon`` steps score NaN (never a
plain 0), the checkpoint says it is partial in the manifest, and ``attribute()`` warns at query time.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import blobs, small_mlp
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_attr import AttributionCallback, IndexedDataset, ResponseStore

# 64 examples, batch 16 (one live batch per curvature step): 4 steps an epoch, 24 in all; horizon 3 injects during epoch index 4 (steps 16-19)
N, BATCH, EPOCHS, HORIZON = 64, 16, 6, 3


class _CrashAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


def _trainer(tmp_path, callbacks):
    return L.Trainer(
        max_epochs=EPOCHS, callbacks=callbacks, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip


def _loader(x, y):
    L.seed_everything(0, verbose=False)
    return DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=BATCH, shuffle=True)


def _unfinished(store: ResponseStore) -> torch.Tensor:
    stats = store.source_stats("final")
    return (stats["shortfall"] > 0) | (stats["missing_examples"] > 0)


def test_crash_mid_window_scores_nan_for_unpropagated_sources(tmp_path):
    x, y = blobs(n=N)
    model, cb = small_mlp(6, 3), AttributionCallback(tmp_path / "r", mode="online", horizon=HORIZON, curvature_batch_size=BATCH)
    with pytest.warns(UserWarning, match="never injected"), pytest.raises(RuntimeError, match="simulated crash"):
        _trainer(tmp_path, [cb, _CrashAt(19)]).fit(model, _loader(x, y))
    store = ResponseStore.load(cb.dirpath)
    info = store.checkpoint_info("final")
    assert info["complete"] is False and "RuntimeError" in info["stopped_by"]
    stats, unfinished = store.source_stats("final"), _unfinished(store)
    assert int((stats["missing_examples"] > 0).sum()) == 16  # the 4th batch of the injection epoch never came
    assert int((stats["shortfall"] > 0).sum()) > 0 and int((~unfinished).sum()) > 0  # some short, some complete
    assert bool(stats["valid"].all())  # finite: what makes them unusable is the shortfall, not NaN gradients

    with pytest.warns(UserWarning, match=r"partial.*RuntimeError.*score NaN"):
        scores = model.attribute((x[:4], y[:4]), responses=cb.dirpath)
    assert torch.equal(scores.isnan().all(dim=0), unfinished) and scores[:, ~unfinished].isfinite().all()
    with pytest.warns(UserWarning, match="partial"):
        si = model.self_influence((x, y, torch.arange(N)), responses=cb.dirpath)
    assert torch.equal(si.isnan(), unfinished)
    with pytest.warns(UserWarning, match="partial"):
        top = model.attribute((x[:4], y[:4]), responses=cb.dirpath, top_k=3)
    assert not bool(unfinished[top.proponent_indices].any() | unfinished[top.opponent_indices].any())


def test_resume_from_mid_epoch_checkpoint_scores_nan_for_skipped_examples(tmp_path):
    """A resume inside the injection epoch replays a new shuffle of the rest of the epoch: some examples
    are never injected. Their sources score NaN with a warning; the others are complete and finite."""
    x, y = blobs(n=N)
    store_dir, ckpt_dir = tmp_path / "responses", tmp_path / "ckpt"
    first = AttributionCallback(store_dir, mode="online", horizon=HORIZON, curvature_batch_size=BATCH)
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=1, save_top_k=0)
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="simulated crash"):
        _trainer(tmp_path, [first, ckpt, _CrashAt(19)]).fit(small_mlp(6, 3), _loader(x, y))

    model, second = small_mlp(6, 3), AttributionCallback(store_dir, mode="online", horizon=HORIZON, curvature_batch_size=BATCH)
    with pytest.warns(UserWarning, match="never injected"):
        _trainer(tmp_path, [second]).fit(model, _loader(x, y), ckpt_path=str(ckpt_dir / "last.ckpt"))
    store = ResponseStore.load(store_dir)
    info, unfinished = store.checkpoint_info("final"), _unfinished(store)
    assert info["complete"] is True and info["stopped_by"] is None and info["n_missing_examples"] > 0
    assert int(unfinished.sum()) == info["n_missing_examples"]  # one source per example
    with pytest.warns(UserWarning, match="never injected.*score NaN"):
        scores = model.attribute((x[:4], y[:4]), responses=store_dir)
    assert torch.equal(scores.isnan().all(dim=0), unfinished) and scores[:, ~unfinished].isfinite().all()
