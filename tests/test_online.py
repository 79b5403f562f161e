"""Online mode on a real dataset ranks sources like the exact damped influence."""

from __future__ import annotations

import pytest
import torch
from conftest import blobs, exact_influence, fit, logistic, pearson, small_mlp

from lightning_attr import AttributionCallback, ResponseStore
from lightning_attr.data import load_digits
from lightning_attr.models import CNN, Classifier, mlp


def test_online_digits_correlates_with_exact_influence(tmp_path):
    d = load_digits(n_train=1400)
    torch.manual_seed(0)  # the initial weights, whatever ran before in this process (pytest order, xdist)
    model = Classifier(mlp(64, [32], 10), lr=0.05, momentum=0.9, weight_decay=1e-3)
    cb = AttributionCallback(tmp_path / "r", mode="online")  # defaults: heavy-ball, horizon 20, pools of 256
    fit(model, d.x_train, d.y_train, [cb], epochs=30, batch_size=64)

    store = ResponseStore.load(cb.dirpath)
    final = store.checkpoint_info("final")
    assert final["n_valid"] == 1400 and final["n_shortfall"] == 0 and final["n_missing_examples"] == 0
    rule = final["step_rule"]
    assert rule["propagation"] == "heavy_ball" and rule["averaged_rank"] == 32
    # horizon products per source, plus the averaging's: its eigenspace (once) and 32 per pool, 4% here
    assert final["curvature_products"] == 1400 * 20 + rule["averaging_products"] < 1400 * 20 * 1.05

    queries = (d.x_test[:100], d.y_test[:100])
    ours = model.attribute(queries, responses=cb.dirpath)
    exact = exact_influence(model, d.x_train, d.y_train, *queries, final["step_rule"]["damping"])
    correlation = pearson(ours, exact)
    print(f"online vs exact damped-GGN influence on digits: Pearson {correlation:.3f}")
    # measured 0.952 with the defaults (averaged_rank=0, heavy-ball alone: 0.944; Neumann K=100 per live batch: 0.879)
    assert correlation >= 0.94
    # per-query rankings agree too (median over queries of the per-query correlation)
    per_query = torch.tensor([pearson(o, e) for o, e in zip(ours, exact)])
    assert float(per_query.median()) >= 0.6


def _small_cnn(d: int, classes: int) -> Classifier:
    return Classifier(CNN([d], classes, (4, 8)), lr=0.1, momentum=0.9, weight_decay=1e-3)


@pytest.mark.parametrize(
    "make_model, d, floor",
    [(logistic, 6, 0.99), (small_mlp, 6, 0.97), (_small_cnn, 16, 0.95)],
    ids=["logistic", "mlp", "cnn"],
)
def test_online_default_horizon_against_exact_influence(tmp_path, make_model, d, floor):
    """Issue 7's online exactness target (>= 0.90) at the DEFAULT settings (horizon 20, damping_scale 3,
    averaged_rank 32) on tiny models, trained at a small learning rate. Measured (torch 2.13 CPU): logistic
    0.996, MLP 0.983, CNN 0.964 (averaged_rank=0: 0.988 / 0.958 / 0.936; what is left is mostly weight
    motion: the sources' gradients are taken at the weights of their injection, the target's at the final
    ones, docs/propagation.md); the floors sit just under the measurements."""
    x, y = blobs(n=1280, d=d, classes=3)
    xq, yq = blobs(n=24, d=d, classes=3, seed=1)
    torch.manual_seed(0)  # the initial weights: unseeded, they followed the test order (CNN 0.893 to 0.929)
    model = make_model(d, 3)
    model.lr = 0.02
    cb = AttributionCallback(tmp_path / "r", mode="online")
    fit(model, x, y, [cb], epochs=12, batch_size=64)
    info = ResponseStore.load(cb.dirpath).checkpoint_info("final")
    assert info["step_rule"]["propagation"] == "heavy_ball" and info["replayed_steps"] == 0
    exact = exact_influence(model, x, y, xq, yq, info["step_rule"]["damping"])
    correlation = pearson(model.attribute((xq, yq), responses=cb.dirpath), exact)
    print(f"online, default horizon, {make_model.__name__}: Pearson {correlation:.3f}")
    assert correlation >= floor
