"""Bad input gets a clear error (or a documented skip-and-warn), never a silently corrupt store."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from conftest import SkipsNonFiniteInputs, blobs, fit, small_mlp
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_attr import AttributionCallback, ResponseStore, StoreError
from lightning_attr.models import Classifier


def _trainer(callbacks, **kwargs):
    return L.Trainer(
        max_epochs=2, callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, **kwargs,
    )  # fmt: skip


def test_batch_without_source_index(tmp_path):
    x, y = blobs(n=32)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)  # labels would pass for indices: refused
    with pytest.raises(MisconfigurationException, match="IndexedDataset"):
        _trainer([AttributionCallback(tmp_path / "r", horizon=2, mode="online")]).fit(small_mlp(6, 3), loader)
    loader = DataLoader(TensorDataset(x), batch_size=8)  # batches are [x]: no index at all
    with pytest.raises(ValueError, match="IndexedDataset"):
        _trainer([AttributionCallback(tmp_path / "r2", horizon=2, num_examples=32, mode="online")]).fit(small_mlp(6, 3), loader)


def test_index_out_of_range(tmp_path):
    x, y = blobs(n=32)
    bad = TensorDataset(x, y, torch.arange(32) + 100)  # an own index column: num_examples confirms it
    with pytest.raises(IndexError, match=r"outside \[0, 32\)"):
        _trainer([AttributionCallback(tmp_path / "r", horizon=2, num_examples=32, mode="online")]).fit(small_mlp(6, 3), DataLoader(bad, batch_size=8))


def test_non_finite_gradients_are_skipped_and_reported(tmp_path):
    x, y = blobs(n=48)
    x[5] = float("nan")
    model = SkipsNonFiniteInputs(nn.Sequential(nn.Linear(6, 3)))
    cb = AttributionCallback(tmp_path / "r", mode="end", horizon=5, curvature_batch_size=16)
    with pytest.warns(UserWarning, match="non-finite"):
        fit(model, x, y, [cb], epochs=2, batch_size=16)
    assert not any(p.isnan().any() for p in model.parameters())
    store = ResponseStore.load(cb.dirpath)
    assert store.checkpoint_info("final")["n_valid"] == 47
    assert not bool(store.source_stats("final")["valid"][5])
    queries = (x[:3].nan_to_num(), y[:3])
    scores = model.attribute(queries, responses=cb.dirpath)
    assert scores[:, 5].isnan().all() and scores[:, torch.arange(48) != 5].isfinite().all()
    top = model.attribute(queries, responses=cb.dirpath, top_k=3)
    assert 5 not in top.proponent_indices and 5 not in top.opponent_indices


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_sharded_strategies_are_refused(tmp_path, strategy):
    cb = AttributionCallback(tmp_path / "r", mode="online")

    class FakeStrategy:
        pass

    FakeStrategy.__name__ = {"fsdp": "FSDPStrategy", "deepspeed": "DeepSpeedStrategy"}[strategy]
    trainer = _trainer([cb])
    trainer.strategy.__class__ = type(FakeStrategy.__name__, (type(trainer.strategy),), {})
    with pytest.raises(MisconfigurationException, match="does not support"):
        cb.setup(trainer, small_mlp(6, 3), "fit")


def test_constructor_validates_arguments():
    for kwargs, message in [
        ({"horizon": 0}, "horizon"),
        ({"damping": -1.0}, "damping"),
        ({"mode": "later"}, "mode"),
        ({"curvature": "fisher"}, "curvature"),
        ({"store_dtype": "int8"}, "store_dtype"),
        ({"checkpoint_epochs": [0]}, "checkpoint_epochs"),
    ]:
        with pytest.raises(MisconfigurationException, match=message):
            AttributionCallback(**kwargs)


def test_module_without_contract_is_refused(tmp_path):
    class Plain(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(6, 3)

    with pytest.raises(MisconfigurationException, match="AttributionMixin"):
        AttributionCallback(tmp_path / "r", mode="online").setup(_trainer([]), Plain(), "fit")


def test_online_needs_a_known_end(tmp_path):
    x, y = blobs(n=32)
    trainer = L.Trainer(max_epochs=-1, max_steps=-1, callbacks=[AttributionCallback(tmp_path / "r", mode="online")], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    from torch.utils.data import DataLoader as DL

    from lightning_attr import IndexedDataset

    with pytest.raises(MisconfigurationException, match="max_epochs or max_steps"):
        trainer.fit(small_mlp(6, 3), DL(IndexedDataset(TensorDataset(x, y)), batch_size=8))


def test_short_fit_finishes_on_replayed_batches(tmp_path):
    """A fit shorter than one epoch + horizon still gives every source its full horizon: what is live when
    the fit ends is propagated on replayed batches at the final weights, and the store says how many."""
    x, y = blobs(n=64)
    cb = AttributionCallback(tmp_path / "r", mode="online", horizon=50)
    fit(small_mlp(6, 3), x, y, [cb], epochs=2, batch_size=16)
    info = ResponseStore.load(cb.dirpath).checkpoint_info("final")
    assert info["n_shortfall"] == 0 and info["n_missing_examples"] == 0
    assert 0 < info["replayed_steps"] <= 50
    assert info["curvature_products"] == 64 * 50 + info["step_rule"]["averaging_products"]


class _Interrupt(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 6:
            raise RuntimeError("simulated crash")


def test_crash_writes_what_is_live_and_records_the_shortfall(tmp_path):
    x, y = blobs(n=64)
    cb = AttributionCallback(tmp_path / "r", mode="online", horizon=50)
    with pytest.warns(UserWarning, match="fewer than 50 steps"), pytest.raises(RuntimeError, match="simulated crash"):
        fit(small_mlp(6, 3), x, y, [cb, _Interrupt()], epochs=4, batch_size=16)
    info = ResponseStore.load(cb.dirpath).checkpoint_info("final")
    assert info["n_shortfall"] > 0 and info["replayed_steps"] == 0
    stats = ResponseStore.load(cb.dirpath).source_stats("final")
    assert int(stats["shortfall"].max()) <= 50


def test_a_crash_before_the_end_mode_simulation_says_what_is_missing(tmp_path):
    """End mode (the default): a fit that fails mid-way never reaches the simulation at the final weights; the
    store keeps the checkpoint listed before the failure, and the warning says 'final' is missing."""
    x, y = blobs(n=64)
    cb = AttributionCallback(tmp_path / "r", checkpoint_epochs=[1])
    with pytest.warns(UserWarning, match=r"no 'final' checkpoint was written.*\['epoch=1'\]"), pytest.raises(RuntimeError, match="simulated crash"):
        fit(small_mlp(6, 3), x, y, [cb, _Interrupt()], epochs=4, batch_size=16)
    assert ResponseStore.load(cb.dirpath).checkpoints == ["epoch=1"]


# ---------------------------------------------------------------------------------------------- queries
@pytest.fixture(scope="module")
def trained_store(tmp_path_factory):
    x, y = blobs(n=64)
    model = small_mlp(6, 3)
    cb = AttributionCallback(tmp_path_factory.mktemp("q") / "r", mode="end", horizon=5, curvature_batch_size=32)
    fit(model, x, y, [cb], epochs=2, batch_size=16)
    return model, cb.dirpath, x, y


@pytest.mark.parametrize(
    ("make_query", "message"),
    [
        (lambda x, y: (x[:4],), r"should be a tuple of 2, got \(Tensor\[B, 6\] float\)"),  # label missing
        (lambda x, y: x[:4], r"should be a tuple of 2, got Tensor\[B, 6\] float"),  # a bare tensor
        (lambda x, y: (x[0], y[:1]), r"batch\[0\] has 1 dimensions, training batches had 2 .*unsqueeze"),
        (lambda x, y: (x[:4, :5], y[:4]), r"batch\[0\] has size 5 in dimension 1, training batches had 6"),
        (lambda x, y: (x[:4], y[:4].float()), r"batch\[1\] holds float values, training batches held int"),
        (lambda x, y: (x[:4], y[:3]), r"disagree on the batch size \(\[3, 4\]\)"),
    ],
    ids=["no-label", "bare-tensor", "no-batch-dim", "feature-size", "label-dtype", "batch-sizes"],
)
def test_query_batch_is_checked_at_the_door(trained_store, make_query, message):
    model, path, x, y = trained_store
    with pytest.raises(ValueError, match=message) as err:
        model.attribute(make_query(x, y), responses=path)
    assert "trained on batches (Tensor[B, 6] float, Tensor[B] int)" in str(err.value) or "batch size" in str(err.value)
    assert model.attribute([x[:4], y[:4]], responses=path).shape == (4, 64)  # a list is a tuple


def test_self_influence_without_the_index_is_refused(trained_store):
    model, path, x, y = trained_store
    with pytest.raises(ValueError, match=r"should be a tuple of 2.*self_influence takes training batches with their"):
        model.self_influence((x[:4], y[:4]), responses=path)  # y would otherwise pass for the index
    assert model.self_influence((x[:4], y[:4], torch.arange(4)), responses=path).shape == (4,)


def test_model_cast_to_another_dtype_is_named(trained_store):
    import copy

    model, path, x, y = trained_store
    with pytest.raises(StoreError, match=r"parameters are float64 but .* simulated for float32 .*dtype changed"):
        copy.deepcopy(model).double().attribute((x[:4].double(), y[:4]), responses=path)
    with pytest.raises(StoreError, match=r"parameters the model has and the store lacks: \['net.4.weight'"):
        Classifier(nn.Sequential(nn.Flatten(), nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3), nn.Linear(3, 3))).attribute(
            (x[:4], y[:4]), responses=path
        )


@pytest.mark.parametrize("epochs", [4, 8])
def test_diverged_training_says_so(tmp_path, epochs):
    """lr=1e6: the outputs saturate (zero curvature) or the loss turns NaN; neither is 'train longer'."""
    x, y = blobs(n=64)
    model = Classifier(nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)), lr=1e6)
    cb = AttributionCallback(tmp_path / "r", mode="online", horizon=5)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        try:
            fit(model, x, y, [cb], epochs=epochs, batch_size=16)
        except ValueError as err:  # saturated outputs: the step rule has no curvature to work with
            assert "degenerate" in str(err) and "diverged" in str(err)
        else:
            assert any("The training loss diverged" in str(w.message) for w in seen)
    assert not any("Train longer" in str(w.message) for w in seen)


def test_batch_format_keeps_what_varies_unchecked():
    """Padded lengths vary between training batches, and collated string ids are not tensors: neither is
    held against a query; the feature size that never varied is."""
    from lightning_attr.batch_format import check_batch, describe, merge, render

    def batch(b, t, f=4):
        return (torch.zeros(b, t, f), torch.zeros(b, dtype=torch.long), [f"id{i}" for i in range(b)])

    seen = merge(describe(batch(16, 5)), describe(batch(7, 9)))
    assert render(seen) == "(Tensor[B, *, 4] float, Tensor[B] int, list)"
    check_batch(batch(3, 2), seen)
    with pytest.raises(ValueError, match="batch\\[0\\] has size 5 in dimension 2, training batches had 4"):
        check_batch(batch(3, 2, f=5), seen)
