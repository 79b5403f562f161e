"""A fit interrupted inside the simulation window and resumed from its checkpoint finishes the simulation."""

from __future__ import annotations

import lightning as L
from conftest import blobs, small_mlp
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_attr import AttributionCallback, IndexedDataset, ResponseStore


class _StopAfterEpoch(L.Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def _trainer(tmp_path, callbacks):
    return L.Trainer(
        max_epochs=6, callbacks=callbacks, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
    )  # fmt: skip


def test_resume_continues_the_online_simulation(tmp_path):
    x, y = blobs(n=64)
    loader = DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=16, shuffle=True)
    store_dir = tmp_path / "responses"
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_epochs=1)
    # 4 steps per epoch, 24 in all, horizon 6 on curvature batches of 2 live batches (12 steps): sources are
    # injected in epoch index 2 and propagated to step 23
    first = AttributionCallback(store_dir, mode="online", horizon=6, curvature_batch_size=32)
    _trainer(tmp_path, [first, ckpt, _StopAfterEpoch(3)]).fit(small_mlp(6, 3), loader)
    stopped = ResponseStore.load(store_dir).checkpoint_info("final")
    assert stopped["replayed_steps"] > 0  # stopped early: the live perturbations were finished on replay

    second = AttributionCallback(store_dir, mode="online", horizon=6, curvature_batch_size=32)
    model = small_mlp(6, 3)
    _trainer(tmp_path, [second, ModelCheckpoint(dirpath=tmp_path / "ckpt2")]).fit(
        model, loader, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    final = ResponseStore.load(store_dir).checkpoint_info("final")
    assert final["replayed_steps"] == 0  # the resumed fit propagated everything on its own live batches
    assert final["n_shortfall"] == 0 and final["n_missing_examples"] == 0 and final["n_valid"] == 64
    # horizon products per source, plus the curvature averaging's (restored with the window: its products go on)
    assert final["curvature_products"] == 64 * 6 + final["step_rule"]["averaging_products"]
    assert model.attribute((x[:2], y[:2]), responses=store_dir).isfinite().all()
