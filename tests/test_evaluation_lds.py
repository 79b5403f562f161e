"""Accuracy regression: our LDS on a small fixed digits setting stays above a measured floor.

Setting: sklearn digits, MLP 64-64-10, 600 train, SGD(0.05, momentum 0.9, wd 1e-3), batch 64,
20 epochs, callback with its DEFAULTS (online, auto damping and propagation). Ground truth: 40
half-data retrains from the vmapped harness (same recipe), measured on 120 test queries.
The floor is the value measured when this test was written minus a margin for platform noise;
a change that breaks accuracy (signs, damping, readout, injection timing) drops far below it.
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_attr import AttributionCallback, IndexedDataset
from lightning_attr.data import load_digits
from lightning_attr.evaluation import FixedOrderSampler, LinearDatamodelingScore, RetrainingHarness, TrainingRecipe
from lightning_attr.models import Classifier, mlp

# measured 0.642 with the issue-7 defaults (heavy-ball 0.8, horizon 20, online curvature pools of 256;
# torch 2.13 CPU), 0.684 with the earlier Neumann K=100 per live batch (closer to the exact target in
# Pearson: 0.927 vs 0.879 on tests/test_online.py, yet LDS is not monotone in exactness here); margin 0.04
# for platform noise. The rule eta = 1/(lambda_max + lambda) measured 0.557; a sign error gives about -0.5,
# and responses that carry no information about 0.
LDS_FLOOR = 0.60

RECIPE = TrainingRecipe(epochs=20, batch_size=64, lr=0.05, momentum=0.9, weight_decay=1e-3)


def _make(seed: int):
    torch.manual_seed(seed)
    return mlp(64, [64], 10)


def test_digits_lds_stays_above_floor(tmp_path):
    torch.set_num_threads(min(2, torch.get_num_threads()))
    data = load_digits(600, seed=0)
    xq, yq = data.x_test[:120], data.y_test[:120]
    n = len(data.x_train)

    model = Classifier(_make(0), lr=RECIPE.lr, momentum=RECIPE.momentum, weight_decay=RECIPE.weight_decay)
    loader = DataLoader(
        IndexedDataset(TensorDataset(data.x_train, data.y_train)),
        batch_size=RECIPE.batch_size,
        sampler=FixedOrderSampler(n, RECIPE.epochs, seed=0),
    )
    cb = AttributionCallback(dirpath=tmp_path / "responses", mode="online")
    trainer = L.Trainer(
        max_epochs=RECIPE.epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb], default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(model, loader)
    scores = model.eval().attribute((xq, yq), responses=cb.dirpath)
    assert scores.shape == (120, n) and torch.isfinite(scores).all()

    harness = RetrainingHarness(_make, "mlp-64-64-10", data.x_train, data.y_train, xq, yq, None, RECIPE)
    truth = harness.subsets(n_subsets=40, alpha=0.5)
    metric = LinearDatamodelingScore(truth.masks)
    metric.update(scores, truth.values)
    lds = float(metric.compute())
    print(f"digits-600 LDS (online, defaults, 40 subsets, 120 queries): {lds:.4f}")
    assert lds > LDS_FLOOR, f"LDS {lds:.3f} fell below the measured floor {LDS_FLOOR}"
