"""Data sources: a group's response is the sum of its members'; ids of any kind; mapping errors."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import blobs, fit, small_mlp
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_attr import AttributionCallback, IndexedDataset, ResponseStore
from lightning_attr.models import Classifier, mlp
from lightning_attr.sources import SourceMap


def test_group_score_is_sum_of_member_scores(tmp_path):
    x, y = blobs(n=120, d=6, classes=3)
    xq, yq = blobs(n=10, d=6, classes=3, seed=5)
    groups = [f"publisher-{i % 7}" for i in range(120)]
    settings = dict(mode="end", horizon=60, curvature_batch_size=64, damping=0.05, checkpoint_epochs=None)

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


# ------------------------------------------------------------------------------- dict batches, subsets
class _DictItems(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"features": self.x[i], "label": self.y[i]}


class _DictClassifier(Classifier):
    """The same classifier on dict batches; records the type and keys attribution_outputs receives."""

    seen: list

    def attribution_outputs(self, batch):
        self.seen.append((type(batch).__name__, tuple(sorted(batch))))
        return self(batch["features"])

    def attribution_output_loss(self, outputs, batch):
        return F.cross_entropy(outputs, batch["label"], reduction="none")

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["features"]), batch["label"])


def _fit_loader(model, dataset, callbacks, epochs=3):
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        max_epochs=epochs, callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, DataLoader(dataset, batch_size=16, shuffle=True))


@pytest.mark.parametrize("index_key", ["index", "idx"])
def test_dict_batches_get_one_shape_and_match_tuple_batches(tmp_path, index_key):
    x, y = blobs(n=48, d=6, classes=3)
    settings = dict(mode="online", horizon=4)
    torch.manual_seed(0)
    plain = small_mlp(6, 3)
    dicts = _DictClassifier(mlp(6, [16], 3), lr=0.1, momentum=0.9, weight_decay=1e-3)
    dicts.load_state_dict(plain.state_dict())
    dicts.seen = []
    _fit_loader(plain, IndexedDataset(TensorDataset(x, y)), [AttributionCallback(tmp_path / "t", **settings)])
    cb = AttributionCallback(tmp_path / "d", index_key=index_key, **settings)
    _fit_loader(dicts, IndexedDataset(_DictItems(x, y), index_key=index_key), [cb])
    assert {s for s in dicts.seen} == {("dict", ("features", "label"))}  # training: the dict without its index

    dicts.seen.clear()
    query = {"features": x[:5], "label": y[:5]}
    scores = dicts.attribute(query, responses=cb.dirpath)
    assert {s for s in dicts.seen} == {("dict", ("features", "label"))}  # query time: the same shape
    torch.testing.assert_close(scores, plain.attribute((x[:5], y[:5]), responses=tmp_path / "t"))
    si = dicts.self_influence({**query, index_key: torch.arange(5)}, responses=cb.dirpath)
    torch.testing.assert_close(si, scores.diagonal(), rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match=r"lacks the keys \['label'\].*trained on batches \{'features'"):
        dicts.attribute({"features": x[:5]}, responses=cb.dirpath)
    with pytest.raises(ValueError, match=f"no '{index_key}' key"):
        dicts.self_influence(query, responses=cb.dirpath)


def test_random_split_of_an_indexed_dataset_is_a_training_set(tmp_path):
    """A Subset keeps the base dataset's indices: one source per member, ids = those indices, 1/n = 1/48."""
    x, y = blobs(n=64, d=6, classes=3)
    train, held_out = torch.utils.data.random_split(
        IndexedDataset(TensorDataset(x, y)), [48, 16], generator=torch.Generator().manual_seed(1)
    )
    members = torch.tensor(train.indices)
    settings = dict(mode="end", horizon=10, curvature_batch_size=16)
    torch.manual_seed(0)
    on_subset, on_copy = small_mlp(6, 3), small_mlp(6, 3)
    on_copy.load_state_dict(on_subset.state_dict())
    cb = AttributionCallback(tmp_path / "s", **settings)
    _fit_loader(on_subset, train, [cb])
    copy_cb = AttributionCallback(tmp_path / "c", **settings)  # the same examples, in the same order
    _fit_loader(on_copy, IndexedDataset(TensorDataset(x[members], y[members])), [copy_cb])

    store = ResponseStore.load(cb.dirpath)
    assert store.n_sources == 48 and store.n_examples == 64 and store.source_ids == sorted(members.tolist())
    scores = on_subset.attribute((x[:4], y[:4]), responses=cb.dirpath)
    reference = on_copy.attribute((x[:4], y[:4]), responses=copy_cb.dirpath)  # columns by position in the subset
    position = {int(b): p for p, b in enumerate(members)}
    torch.testing.assert_close(scores, reference[:, [position[b] for b in store.source_ids]], rtol=1e-4, atol=1e-7)
    inside = members[:3]
    si = on_subset.self_influence((x[inside], y[inside], inside), responses=cb.dirpath)
    expected = on_copy.self_influence((x[inside], y[inside], torch.arange(3)), responses=copy_cb.dirpath)
    torch.testing.assert_close(si, expected, rtol=1e-4, atol=1e-7)
    outside = torch.tensor(held_out.indices[:2])
    with pytest.raises(IndexError, match=f"example {int(outside[0])} was not in the training set"):
        on_subset.self_influence((x[outside], y[outside], outside), responses=cb.dirpath)


def test_num_examples_beside_an_indexed_dataset_keeps_its_members_and_is_checked_against_it(tmp_path):
    """``num_examples`` is for batches that carry their own index; given beside an IndexedDataset (or a Subset of one)
    it was taken as the whole training set: the examples outside the subset (or past the dataset's end) became sources
    that end mode never simulated and scored a plain 0, with no warning (online mode: NaN). Now the members are the
    sources, whatever num_examples says, and a num_examples that is not the indexed dataset's length is refused."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    x, y = blobs(n=64, d=6, classes=3)
    full = IndexedDataset(TensorDataset(x, y))
    train = torch.utils.data.random_split(full, [48, 16], generator=torch.Generator().manual_seed(1))[0]
    cb = AttributionCallback(tmp_path / "s", mode="end", checkpoint_epochs=None, num_examples=64)
    _fit_loader(small_mlp(6, 3), train, [cb])
    store = ResponseStore.load(cb.dirpath)
    assert store.n_sources == 48 and store.source_ids == sorted(train.indices)
    with pytest.raises(MisconfigurationException, match=r"num_examples=80.*IndexedDataset of 64 examples.*leave num_examples unset"):
        _fit_loader(small_mlp(6, 3), full, [AttributionCallback(tmp_path / "t", mode="end", num_examples=80)])
