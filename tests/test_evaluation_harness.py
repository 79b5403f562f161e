"""The retraining harness: same recipe as the Lightning fit, subsets / leave-out end to end, cache."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_attr.evaluation import FixedOrderSampler, RetrainingHarness, TrainingRecipe, measure_loss, train_many
from lightning_attr.evaluation import retrain as retrain_mod
from lightning_attr.models import Classifier, mlp


def _data(n=48, q=10, d=6, classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d, classes, generator=gen)
    x = torch.randn(n + q, d, generator=gen)
    y = (x @ w + 0.5 * torch.randn(n + q, classes, generator=gen)).argmax(1)
    return x[:n], y[:n], x[n:], y[n:]


def _make(seed: int):
    torch.manual_seed(seed)
    return mlp(6, [8], 3)


RECIPE = TrainingRecipe(epochs=3, batch_size=10, lr=0.05, momentum=0.9, weight_decay=1e-3)


@pytest.mark.parametrize("recipe", [RECIPE, TrainingRecipe(3, 10, 0.01, 0.0, 1e-3, optimizer="adam")], ids=["sgd", "adam"])
def test_train_many_reproduces_the_lightning_fit(recipe):
    """A full-data harness model with seed s IS the Lightning fit with FixedOrderSampler(seed=s)."""
    x, y, _, _ = _data()
    seed = 5
    model = Classifier(_make(seed), recipe.lr, recipe.momentum, recipe.weight_decay, optimizer=recipe.optimizer)
    loader = DataLoader(TensorDataset(x, y), batch_size=recipe.batch_size, sampler=FixedOrderSampler(len(x), recipe.epochs, seed))
    trainer = L.Trainer(
        max_epochs=recipe.epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(model, loader)
    stacked = train_many(_make, x, y, torch.ones(2, len(x), dtype=torch.bool), torch.tensor([seed, seed + 1]), recipe)
    for name, p in model.net.named_parameters():
        assert torch.allclose(stacked[name][0], p.detach(), atol=1e-6), name
        assert not torch.allclose(stacked[name][1], p.detach(), atol=1e-3), f"seed {seed + 1} should differ ({name})"


def test_subset_models_follow_the_full_order_minus_the_removed():
    x, y, _, _ = _data()
    orders = retrain_mod.training_orders(len(x), 2, seed=3)
    mask = torch.ones(len(x), dtype=torch.bool)
    mask[[0, 7]] = False
    kept = retrain_mod._kept_orders(mask.unsqueeze(0), torch.tensor([3]), 2)[0]
    for e in range(2):
        assert kept[e].tolist() == [i for i in orders[e].tolist() if i not in (0, 7)]


def test_train_many_refuses_unequal_subset_sizes():
    x, y, _, _ = _data()
    masks = torch.ones(2, len(x), dtype=torch.bool)
    masks[1, 0] = False
    with pytest.raises(ValueError, match="same, non-zero number of examples"):
        train_many(_make, x, y, masks, torch.tensor([0, 1]), RECIPE)


def test_harness_end_to_end_and_cache(tmp_path, monkeypatch):
    x, y, xq, yq = _data()
    sources = torch.arange(len(x)) % 6  # 6 sources of 8 examples
    harness = RetrainingHarness(_make, "mlp-6-8-3", x, y, xq, yq, sources, RECIPE, cache_dir=tmp_path)

    subsets = harness.subsets(n_subsets=8, alpha=0.5, n_seeds=2)
    assert subsets.masks.shape == (8, 6) and subsets.masks.sum(1).eq(3).all()
    assert subsets.values.shape == (8, len(xq)) and subsets.per_seed.shape == (2, 8, len(xq))
    assert torch.allclose(subsets.values, subsets.per_seed.mean(0))
    # one subset model recomputed by hand: seeds 1000 + m * n_seeds + j, examples of the kept sources
    m, j = 3, 1
    example_mask = subsets.masks[m][sources].unsqueeze(0)
    params = train_many(_make, x, y, example_mask, torch.tensor([1000 + m * 2 + j]), RECIPE)
    assert torch.allclose(measure_loss(_make, params, xq, yq)[0], subsets.per_seed[j, m], atol=1e-5)

    loo = harness.leave_out([1, 4], n_seeds=2)
    assert loo.values.shape == (2, len(xq)) and loo.removed.tolist() == [1, 4]
    full = measure_loss(_make, train_many(_make, x, y, torch.ones(1, len(x), dtype=torch.bool), torch.tensor([1]), RECIPE), xq, yq)[0]
    without = measure_loss(_make, train_many(_make, x, y, (sources != 4).unsqueeze(0), torch.tensor([1]), RECIPE), xq, yq)[0]
    assert torch.allclose(loo.per_seed[1, 1], without - full, atol=1e-5)
    assert loo.values.abs().max() > 0  # removing a source changes the query losses

    # files: safetensors + JSON with the settings, no pickle
    files = sorted(p.name for p in tmp_path.iterdir())
    assert all(f.endswith((".safetensors", ".json")) for f in files) and len(files) == 4
    meta = json.loads(next(tmp_path.glob("subsets-*.json")).read_text())
    assert meta["settings"]["n_subsets"] == 8 and meta["settings"]["recipe"]["epochs"] == 3

    # a rerun with equal settings trains nothing; other settings train again
    calls = []
    monkeypatch.setattr(retrain_mod, "train_many", lambda *a, **k: calls.append(1) or (_ for _ in ()).throw(AssertionError))
    again = RetrainingHarness(_make, "mlp-6-8-3", x, y, xq, yq, sources, RECIPE, cache_dir=tmp_path).subsets(8, 0.5, n_seeds=2)
    assert torch.equal(again.values, subsets.values) and torch.equal(again.masks, subsets.masks) and not calls
    with pytest.raises(AssertionError):
        harness.subsets(n_subsets=9, alpha=0.5, n_seeds=2)
    assert calls


def test_harness_validates_arguments(tmp_path):
    x, y, xq, yq = _data()
    with pytest.raises(ValueError, match="without gaps"):
        RetrainingHarness(_make, "m", x, y, xq, yq, torch.arange(len(x)) * 2, RECIPE)
    h = RetrainingHarness(_make, "m", x, y, xq, yq, None, RECIPE)
    with pytest.raises(ValueError, match="alpha"):
        h.subsets(4, alpha=1.5)
    with pytest.raises(ValueError, match="distinct ids"):
        h.leave_out([1, 1])
    with pytest.raises(ValueError, match="lr > 0"):
        TrainingRecipe(lr=0.0)


def test_recipe_refuses_an_unknown_optimizer_and_sgd_keys_stay():
    with pytest.raises(ValueError, match="optimizer must be"):
        TrainingRecipe(optimizer="rmsprop")
    x, y, xq, yq = _data()
    harness = RetrainingHarness(_make, "k", x, y, xq, yq, recipe=RECIPE)
    assert "optimizer" not in harness._key_settings({})["recipe"]  # cached SGD ground truth stays valid
    adam = RetrainingHarness(_make, "k", x, y, xq, yq, recipe=TrainingRecipe(optimizer="adam"))
    assert adam._key_settings({})["recipe"]["optimizer"] == "adam"
