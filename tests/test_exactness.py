"""Ground truth: end-of-training responses reproduce the explicit damped-GGN influence matrix."""

from __future__ import annotations

import pytest
import torch
from conftest import blobs, exact_influence, fit, logistic, pearson, small_mlp

from lightning_attr import AttributionCallback, ResponseStore


@pytest.mark.parametrize("make_model", [logistic, small_mlp], ids=["logistic", "mlp"])
def test_end_mode_matches_exact_damped_ggn_influence(tmp_path, make_model):
    x, y = blobs(n=160, d=6, classes=3)
    xq, yq = blobs(n=24, d=6, classes=3, seed=1)
    model = make_model(6, 3)
    # Full-batch curvature (batch >= n) and a long horizon: the Neumann series has converged.
    cb = AttributionCallback(tmp_path / "r", mode="end", horizon=800, curvature_batch_size=512)
    fit(model, x, y, [cb], epochs=15)
    damping = ResponseStore.load(cb.dirpath).checkpoint_info("final")["step_rule"]["damping"]
    assert damping > 0

    exact = exact_influence(model, x, y, xq, yq, damping)
    ours = model.attribute((xq, yq), responses=cb.dirpath)
    assert ours.shape == exact.shape == (24, 160)
    assert pearson(ours, exact) >= 0.99
    scale = float((ours * exact).sum() / (exact * exact).sum())  # least-squares slope
    assert abs(scale - 1) <= 0.05, scale

    central = model.attribute((xq, yq), responses=cb.dirpath, readout="central")
    step = model.attribute((xq, yq), responses=cb.dirpath, readout="step")
    assert pearson(ours, central) >= 0.999
    assert pearson(ours, step) >= 0.99


def test_sign_convention_removing_a_proponent_raises_the_query_loss(tmp_path):
    """The score predicts the *rise* of the query loss on removal: check against actual retraining of a
    strongly convex model (logistic regression trained to convergence, full batch)."""
    x, y = blobs(n=80, d=4, classes=2, seed=3)
    xq, yq = x[:1], y[:1]  # a training example queried against itself: its own removal raises its loss
    model = logistic(4, 2)
    cb = AttributionCallback(tmp_path / "r", mode="end", horizon=400, curvature_batch_size=512)
    fit(model, x, y, [cb], epochs=5)
    scores = model.attribute((xq, yq), responses=cb.dirpath)
    assert scores[0, 0] > 0
    assert scores[0, 0] == scores[0].max()
