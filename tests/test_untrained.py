"""End mode with examples that no training batch held (a sampler over part of the dataset, ``drop_last``): their
sources score NaN with one warning, the manifest records them, and the others are simulated as if the training set were
the examples trained on: the same scores as a fit over that subset."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import blobs, small_mlp
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Subset, SubsetRandomSampler, TensorDataset

from lightning_attr import AttributionCallback, IndexedDataset, ResponseStore

WARNING = r"of \d+ sources were never trained on: no training batch held any of their examples"


def _fit(model, loader, callbacks, epochs=3, ckpt_path=None):
    L.seed_everything(0, verbose=False)
    checkpointing = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    trainer = L.Trainer(
        max_epochs=epochs, callbacks=callbacks, logger=False, enable_checkpointing=checkpointing,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(model, loader, ckpt_path=ckpt_path)


@pytest.mark.parametrize("settings", [{"codec": "dense"}, {"codec": "factored"}, {"codec": "dense", "propagation": "heavy_ball"}])
def test_a_sampler_over_a_subset_scores_the_rest_nan_and_the_subset_as_a_fit_on_it(tmp_path, settings):
    """SubsetRandomSampler over 64 of 96 examples: the 32 others were never trained on (their leave-one-out effect is
    zero): NaN, one warning, ``missing_examples`` in the store. The 64 score as the same fit over ``Subset(data, members)``
    (the same batches: the sampler's permutations taken as positions). Before: all 96 simulated, 32 silent nonzero scores."""
    x, y = blobs(n=96, d=6, classes=3)
    members = torch.randperm(96, generator=torch.Generator().manual_seed(3))[:64].sort().values
    full = IndexedDataset(TensorDataset(x, y))
    options = dict(horizon=6, curvature_batch_size=32, checkpoint_epochs=[1], rank=24, **settings)
    torch.manual_seed(0)
    model, reference = small_mlp(6, 3), small_mlp(6, 3)
    reference.load_state_dict(model.state_dict())
    cb = AttributionCallback(tmp_path / "sampler", **options)
    sampler = SubsetRandomSampler(members.tolist(), generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match=f"32 {WARNING}") as record:
        _fit(model, DataLoader(full, batch_size=16, sampler=sampler), [cb])
    assert sum("never trained on" in str(w.message) for w in record) == 1  # once per fit, not per checkpoint
    on_subset = AttributionCallback(tmp_path / "subset", **options)
    positions = SubsetRandomSampler(range(64), generator=torch.Generator().manual_seed(0))
    _fit(reference, DataLoader(Subset(full, members.tolist()), batch_size=16, sampler=positions), [on_subset])
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))

    store = ResponseStore.load(cb.dirpath)
    assert store.checkpoints == ["epoch=1", "final"] and store.n_sources == 96
    for name in store.checkpoints:
        info = store.checkpoint_info(name)
        assert info["n_missing_examples"] == 32 and info["n_valid"] == 96
        assert info["untrained"] == {"examples": 32, "sources": 32, "partly_trained_sources": 0, "trained_examples": 64}
        assert torch.equal(store.scorable(name), torch.isin(torch.arange(96), members))
    assert ResponseStore.load(on_subset.dirpath).checkpoint_info("final").get("untrained") is None
    query, untrained = (x[:5], y[:5]), ~torch.isin(torch.arange(96), members)
    for name in store.checkpoints:  # each member (a trajectory ensemble normalizes by the std over all S sources)
        with pytest.warns(UserWarning, match="32 of 96 sources score NaN. The fit's batches never held their examples"):
            scores = model.attribute(query, responses=cb.dirpath, checkpoints=name)
        expected = reference.attribute(query, responses=on_subset.dirpath, checkpoints=name)
        assert scores[:, untrained].isnan().all() and scores[:, members].isfinite().all()
        torch.testing.assert_close(scores[:, members], expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))


def test_drop_last_without_shuffle_groups_are_scored_on_their_trained_examples(tmp_path):
    """drop_last=True, no shuffle, 100 examples in batches of 16: 96-99 are never trained on. Group 10 = {98, 99} scores
    NaN; group 9 = {90..97} lost 96 and 97 and scores as the removal of 90..95, the sum of those members' scores (a
    response is linear in the source's gradient); the per-example fit scores 96-99 NaN."""
    x, y = blobs(n=100, d=6, classes=3)
    groups = [i // 10 if i < 98 else 10 for i in range(100)]
    options = dict(horizon=6, curvature_batch_size=32, checkpoint_epochs=None, rank=24, codec="dense")
    torch.manual_seed(0)
    per_example, grouped = small_mlp(6, 3), small_mlp(6, 3)
    grouped.load_state_dict(per_example.state_dict())
    loader = DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=16, drop_last=True)
    a, b = AttributionCallback(tmp_path / "e", **options), AttributionCallback(tmp_path / "g", sources=groups, **options)
    with pytest.warns(UserWarning, match=f"4 {WARNING}"):
        _fit(per_example, loader, [a])
    with pytest.warns(UserWarning, match=f"1 {WARNING}.*; 1 sources that lost some of their examples are scored as the removal"):
        _fit(grouped, loader, [b])
    info = ResponseStore.load(b.dirpath).checkpoint_info("final")
    assert info["n_missing_examples"] == 2 and info["untrained"]["partly_trained_sources"] == 1
    query = (x[:5], y[:5])
    with pytest.warns(UserWarning, match="score NaN"):
        by_example = per_example.attribute(query, responses=a.dirpath)
    with pytest.warns(UserWarning, match="score NaN"):
        by_group = grouped.attribute(query, responses=b.dirpath)
    assert by_example[:, 96:].isnan().all() and by_example[:, :96].isfinite().all()
    assert by_group[:, 10].isnan().all() and by_group[:, :10].isfinite().all()
    membership = torch.tensor(groups[:96])
    summed = torch.stack([by_example[:, :96][:, membership == g].sum(1) for g in range(10)], 1)
    torch.testing.assert_close(by_group[:, :10], summed, rtol=1e-4, atol=1e-6 * float(summed.abs().max()))


def test_a_fit_that_trains_on_every_example_is_unchanged(tmp_path):
    """Every example in some batch (shuffled, drop_last=False): no warning and every source scorable."""
    x, y = blobs(n=48, d=6, classes=3)
    cb = AttributionCallback(tmp_path / "s", horizon=4, curvature_batch_size=16, checkpoint_epochs=None, rank=16)
    with pytest.warns() as record:
        _fit(small_mlp(6, 3), DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=16, shuffle=True), [cb])
    assert not any("never trained on" in str(w.message) for w in record)
    info = ResponseStore.load(cb.dirpath).checkpoint_info("final")
    assert info["n_missing_examples"] == 0 and "untrained" not in info


def test_a_resumed_fit_keeps_the_examples_trained_on_before_the_checkpoint(tmp_path):
    """Epoch 1 trains on examples 0-47, the resumed epoch 2 on 48-95: the callback's state carries the first half, so
    every source is trained on (without it the first half scored NaN, as the first fit's own store does)."""
    x, y = blobs(n=96, d=6, classes=3)
    data = IndexedDataset(TensorDataset(x, y))
    store = tmp_path / "responses"
    options = dict(horizon=4, curvature_batch_size=32, checkpoint_epochs=None, rank=16, codec="dense")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_epochs=1)
    with pytest.warns(UserWarning, match=f"48 {WARNING}"):
        _fit(small_mlp(6, 3), DataLoader(data, batch_size=16, sampler=range(48)), [AttributionCallback(store, **options), ckpt], epochs=1)
    model, resumed = small_mlp(6, 3), AttributionCallback(store, **options)
    with pytest.warns() as record:
        _fit(model, DataLoader(data, batch_size=16, sampler=range(48, 96)), [resumed], 2, str(tmp_path / "ckpt" / "last.ckpt"))
    assert not any("never trained on" in str(w.message) for w in record)
    info = ResponseStore.load(store).checkpoint_info("final")
    assert info["n_missing_examples"] == 0 and info["global_step"] == 6
    assert model.attribute((x[:2], y[:2]), responses=store).isfinite().all()


@pytest.mark.parametrize("codec", ["dense", "eigen"])
def test_batches_that_carry_their_own_index_are_filtered_to_the_examples_trained_on(tmp_path, codec):
    """``num_examples`` (batches carry their own index, no IndexedDataset): the simulation's reads of the training set
    are filtered by index instead of read from a Subset; the same scores as the IndexedDataset fit, the same NaN."""
    x, y = blobs(n=96, d=6, classes=3)
    members = torch.arange(0, 96, 3)  # 32 of 96
    options = dict(horizon=6, curvature_batch_size=32, checkpoint_epochs=None, rank=24, codec=codec)
    torch.manual_seed(0)
    model, own = small_mlp(6, 3), small_mlp(6, 3)
    own.load_state_dict(model.state_dict())
    stores = {}
    for name, net, data, extra in (
        ("indexed", model, IndexedDataset(TensorDataset(x, y)), {}),
        ("own", own, TensorDataset(x, y, torch.arange(96)), {"num_examples": 96}),
    ):
        stores[name] = AttributionCallback(tmp_path / name, **options, **extra)
        sampler = SubsetRandomSampler(members.tolist(), generator=torch.Generator().manual_seed(0))
        with pytest.warns(UserWarning, match=f"64 {WARNING}"):
            _fit(net, DataLoader(data, batch_size=16, sampler=sampler), [stores[name]])
    query = (x[:5], y[:5])
    with pytest.warns(UserWarning, match="score NaN"):
        expected = model.attribute(query, responses=stores["indexed"].dirpath)
    with pytest.warns(UserWarning, match="score NaN"):
        scores = own.attribute(query, responses=stores["own"].dirpath)
    assert scores[:, members].isfinite().all() and scores.isnan().sum() == 5 * 64
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-6 * float(expected[:, members].abs().max()), equal_nan=True)
