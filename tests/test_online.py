"""Online mode on a real dataset ranks sources like the exact damped influence."""

from __future__ import annotations

import torch
from conftest import exact_influence, fit, pearson

from lightning_attr import AttributionCallback, ResponseStore
from lightning_attr.data import load_digits
from lightning_attr.models import Classifier, mlp


def test_online_digits_correlates_with_exact_influence(tmp_path):
    d = load_digits(n_train=1400)
    model = Classifier(mlp(64, [32], 10), lr=0.05, momentum=0.9, weight_decay=1e-3)
    cb = AttributionCallback(tmp_path / "r", mode="online", horizon=100)
    fit(model, d.x_train, d.y_train, [cb], epochs=30, batch_size=64)

    store = ResponseStore.load(cb.dirpath)
    final = store.checkpoint_info("final")
    assert final["n_valid"] == 1400 and final["n_shortfall"] == 0 and final["n_missing_examples"] == 0
    assert final["curvature_products"] == 1400 * 100

    queries = (d.x_test[:100], d.y_test[:100])
    ours = model.attribute(queries, responses=cb.dirpath)
    exact = exact_influence(model, d.x_train, d.y_train, *queries, final["step_rule"]["damping"])
    correlation = pearson(ours, exact)
    print(f"online vs exact damped-GGN influence on digits: Pearson {correlation:.3f}")
    assert correlation >= 0.6
    # per-query rankings agree too (median over queries of the per-query correlation)
    per_query = torch.tensor([pearson(o, e) for o, e in zip(ours, exact)])
    assert float(per_query.median()) >= 0.6
