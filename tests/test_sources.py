"""Data sources: a group's response is the sum of its members'; ids of any kind; mapping errors."""

from __future__ import annotations

import pytest
import torch
from conftest import blobs, fit, small_mlp

from lightning_attr import AttributionCallback, IndexedDataset, ResponseStore
from lightning_attr.sources import SourceMap


def test_group_score_is_sum_of_member_scores(tmp_path):
    x, y = blobs(n=120, d=6, classes=3)
    xq, yq = blobs(n=10, d=6, classes=3, seed=5)
    groups = [f"publisher-{i % 7}" for i in range(120)]
    settings = dict(mode="end", horizon=60, curvature_batch_size=64, damping=0.05)

    torch.manual_seed(0)
    model = small_mlp(6, 3)
    per_example = AttributionCallback(tmp_path / "examples", **settings)
    fit(model, x, y, [per_example], epochs=5)
    grouped = AttributionCallback(tmp_path / "groups", sources=groups, **settings)
    torch.manual_seed(0)
    model2 = small_mlp(6, 3)
    fit(model2, x, y, [grouped], epochs=5)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))

    store = ResponseStore.load(grouped.dirpath)
    assert store.source_ids == [f"publisher-{g}" for g in range(7)]
    by_example = model.attribute((xq, yq), responses=per_example.dirpath)
    by_group = model2.attribute((xq, yq), responses=grouped.dirpath)
    membership = torch.tensor([i % 7 for i in range(120)])
    summed = torch.stack([by_example[:, membership == g].sum(dim=1) for g in range(7)], dim=1)
    torch.testing.assert_close(by_group, summed, rtol=1e-4, atol=1e-7)


def test_online_groups_close_to_member_sum(tmp_path):
    """Online, a group stays live longer than its members would (its last injection resets the
    horizon), so the equality is approximate; it must still hold closely."""
    x, y = blobs(n=120, d=6, classes=3)
    xq, yq = blobs(n=10, d=6, classes=3, seed=5)
    membership = torch.arange(120) % 4
    torch.manual_seed(0)
    a = small_mlp(6, 3)
    b = small_mlp(6, 3)
    b.load_state_dict(a.state_dict())
    per_example = AttributionCallback(tmp_path / "e", mode="online", horizon=30, damping=0.05)
    grouped = AttributionCallback(tmp_path / "g", mode="online", horizon=30, damping=0.05, sources=membership)
    fit(a, x, y, [per_example], epochs=12)
    fit(b, x, y, [grouped], epochs=12)
    summed = torch.stack(
        [a.attribute((xq, yq), responses=per_example.dirpath)[:, membership == g].sum(1) for g in range(4)], 1
    )
    ours = b.attribute((xq, yq), responses=grouped.dirpath)
    assert torch.corrcoef(torch.stack([ours.flatten(), summed.flatten()]))[0, 1] >= 0.95


def test_source_map_from_callable_and_errors():
    m = SourceMap.build(lambda idx: idx // 10, 35)
    assert m.num_sources == 4 and m.sizes().tolist() == [10, 10, 10, 5]
    with pytest.raises(ValueError, match="one source id per training example"):
        SourceMap.build([0, 1], 3)
    with pytest.raises(ValueError, match="integer or string"):
        SourceMap.build(torch.zeros(3), 3)


def test_indexed_dataset_appends_index():
    ds = IndexedDataset(torch.utils.data.TensorDataset(torch.zeros(3, 2), torch.ones(3)))
    x, y, i = ds[2]
    assert i == 2 and x.shape == (2,)
    assert IndexedDataset([10, 20])[1] == (20, 1)
