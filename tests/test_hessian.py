"""``curvature="hessian"``, and modules that implement only ``attribution_loss``, against ground truth.

For a linear model under cross-entropy the Hessian of the loss is the GGN, so the explicit damped-GGN
influence matrix is the exact target of the Hessian simulation too.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import blobs, exact_influence, fit, logistic, pearson
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.nn import functional as F

from lightning_attr import AttributionCallback, AttributionMixin, ResponseStore


class LossOnly(AttributionMixin, L.LightningModule):
    """A linear classifier with only ``attribution_loss``: no outputs, so no GGN; the Hessian it is."""

    def __init__(self, d: int, classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, classes))

    def forward(self, x):
        return self.net(x)

    def attribution_loss(self, batch):
        return F.cross_entropy(self(batch[0]), batch[1], reduction="none")

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)


@pytest.mark.parametrize("make_model", [logistic, LossOnly], ids=["outputs-and-loss", "loss-only"])
def test_hessian_curvature_matches_exact_influence(tmp_path, make_model):
    x, y = blobs(n=160, d=6, classes=3)
    xq, yq = blobs(n=24, d=6, classes=3, seed=1)
    torch.manual_seed(0)
    model = make_model(6, 3)
    cb = AttributionCallback(tmp_path / "r", mode="end", curvature="hessian", horizon=200, curvature_batch_size=512, checkpoint_epochs=None)
    fit(model, x, y, [cb], epochs=15)
    info = ResponseStore.load(cb.dirpath).checkpoint_info("final")
    assert info["curvature"] == "hessian" and info["step_rule"]["damping"] > 0

    exact = exact_influence(model, x, y, xq, yq, info["step_rule"]["damping"])
    ours = model.attribute((xq, yq), responses=cb.dirpath)
    assert pearson(ours, exact) >= 0.99
    scale = float((ours * exact).sum() / (exact * exact).sum())  # least-squares slope
    assert abs(scale - 1) <= 0.05, scale
    si = model.self_influence((x[:8], y[:8], torch.arange(8)), responses=cb.dirpath)
    diagonal = exact_influence(model, x, y, x[:8], y[:8], info["step_rule"]["damping"])[:, :8].diagonal()
    assert pearson(si, diagonal) >= 0.99 and bool((si >= 0).all())  # a diagonal of a PSD form


def test_loss_only_module_needs_hessian_curvature(tmp_path):
    x, y = blobs(n=32)
    with pytest.raises(MisconfigurationException, match="curvature='ggn' needs LossOnly.attribution_outputs"):
        fit(LossOnly(6, 3), x, y, [AttributionCallback(tmp_path / "r", curvature="ggn", horizon=2, mode="online")], epochs=1)
