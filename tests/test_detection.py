"""What a user does with the stored responses: find flipped labels, find a poisoned data source."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader
from torchmetrics.classification import BinaryAUROC

from lightning_attr import AttributionCallback
from lightning_attr.data import ByColumn, ClassificationDataModule
from lightning_attr.models import Classifier, build_mlp


@pytest.fixture(autouse=True)
def _one_thread():
    # On a small shared CPU, torch's intra-op threads oversubscribe the cores and the simulation
    # (many small vmapped products) slows down several-fold; one thread is faster and steadier.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _fit(datamodule, callback, epochs: int, seed: int = 0) -> Classifier:
    L.seed_everything(seed, verbose=False)
    datamodule.setup("fit")
    net = Classifier(build_mlp(datamodule.input_shape, datamodule.num_classes, hidden=[64]))
    trainer = L.Trainer(max_epochs=epochs, callbacks=[callback], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    trainer.fit(net, train_dataloaders=datamodule.train_dataloader())
    return net.eval()


def test_self_influence_finds_flipped_digits_labels(tmp_path):
    """5% of the digits training labels flipped: self-influence ranks them first (AUC >= 0.9)."""
    dm = ClassificationDataModule("digits", input_shape=[64], num_classes=10, label_noise=0.05, noise_seed=0)
    # 6 epochs: with 4, the online window opens in epoch 0, far from the trained model (AUC 0.86);
    # with 6 it opens in epoch 2 (AUC 0.998, measured with the 1/(2 lambda_max + lambda) step rule).
    cb = AttributionCallback(dirpath=tmp_path / "responses", seed=0, mode="online")
    net = _fit(dm, cb, epochs=6)
    flipped = dm.metadata["flipped"]
    assert int(flipped.sum()) == 70
    auroc = BinaryAUROC()
    for batch in DataLoader(dm.train_dataset(), batch_size=256):
        auroc.update(net.self_influence(batch, responses=cb.dirpath), flipped[batch[-1]].long())
    auc = float(auroc.compute())
    print(f"mislabel detection AUC (digits, 5% flipped, self-influence): {auc:.3f}")
    assert auc >= 0.9


def test_poisoned_group_is_the_top_source_for_triggered_queries(tmp_path):
    """10 random groups of digits; group 3 carries a backdoor (trigger -> label 0). For the test
    queries the trigger flips to 0, group 3 must be the strongest proponent."""
    dm = ClassificationDataModule("digits", input_shape=[64], num_classes=10, n_groups=10, group_seed=0,
                                  poison={"group": 3, "target": 0})
    dm.setup("fit")
    cb = AttributionCallback(dirpath=tmp_path / "responses", sources=ByColumn("group")(dm), seed=0, mode="online")
    net = _fit(dm, cb, epochs=5)
    triggered = dm.query_dataset("triggered")
    x, y_target = triggered.tensors
    with torch.no_grad():
        pred = net(x).argmax(-1)
    affected = (pred == 0) & (dm.split.y_test != 0)  # the trigger changed the prediction to the target
    assert int(affected.sum()) >= 100, "the backdoor did not take; the test would be vacuous"
    top = net.attribute((x[affected], y_target[affected]), responses=cb.dirpath, top_k=1)
    top_ids = [top.source_ids[i] for i in top.proponent_indices[:, 0].tolist()]
    share = sum(s == "group=3" for s in top_ids) / len(top_ids)
    print(f"poisoned group ranks first for {share:.1%} of {len(top_ids)} affected queries")
    assert share >= 0.9
    # and it is not a blanket effect: on clean queries of other classes group 3 rarely leads
    clean = dm.split.y_test != 0
    scores = net.attribute((dm.split.x_test[clean], dm.split.y_test[clean]), responses=cb.dirpath)
    lead = scores.argmax(dim=1)
    assert float((lead == top.source_ids.index("group=3")).float().mean()) < 0.5
