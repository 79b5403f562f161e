"""attribute() works inside predict_step under Trainer.predict (inference mode), with every readout."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import blobs, fit
from torch.utils.data import DataLoader, TensorDataset

from lightning_attr import AttributionCallback, ResponseStore, TopKAttribution
from lightning_attr.models import Classifier, mlp


class Explained(Classifier):
    responses: str | None = None
    readout: str = "linear"

    def predict_step(self, batch, batch_idx):
        return self.attribute(batch, responses=self.responses, readout=self.readout)


@pytest.mark.parametrize("readout", ["linear", "central", "step", "gradient"])
def test_predict_step_attributes_under_inference_mode(tmp_path, readout):
    x, y = blobs(n=64, d=6, classes=3)
    model = Explained(mlp(6, [8], 3))
    cb = AttributionCallback(tmp_path / "r", mode="end", horizon=20, curvature_batch_size=32)
    fit(model, x, y, [cb], epochs=3)
    model.responses, model.readout = cb.dirpath, readout
    direct = model.attribute((x[:10], y[:10]), responses=cb.dirpath, readout=readout)

    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    out = trainer.predict(model, DataLoader(TensorDataset(x[:10], y[:10]), batch_size=5))
    predicted = torch.cat(out)
    assert predicted.shape == (10, 64)
    # central/step are differences of losses: float cancellation, so compare at the scores' scale
    torch.testing.assert_close(predicted, direct, rtol=1e-3, atol=1e-3 * float(direct.abs().max()))


def test_top_k_proponents_and_opponents(tmp_path):
    x, y = blobs(n=64, d=6, classes=3)
    model = Classifier(mlp(6, [8], 3))
    cb = AttributionCallback(tmp_path / "r", mode="end", horizon=20, curvature_batch_size=32, checkpoint_epochs=None)
    fit(model, x, y, [cb], epochs=3)
    scores = model.attribute((x[:4], y[:4]), responses=cb.dirpath)
    top = model.attribute((x[:4], y[:4]), responses=cb.dirpath, top_k=5)
    assert top.proponent_scores.shape == top.opponent_indices.shape == (4, 5)
    torch.testing.assert_close(top.proponent_scores, scores.sort(dim=1, descending=True).values[:, :5])
    torch.testing.assert_close(top.opponent_scores, scores.sort(dim=1).values[:, :5])
    assert torch.equal(scores.gather(1, top.proponent_indices), top.proponent_scores)
    assert len(top.source_ids) == 64
    with pytest.raises(ValueError, match="top_k"):
        model.attribute((x[:4], y[:4]), responses=cb.dirpath, top_k=65)
    # self-influence: each training example against its own source is the diagonal of the full matrix
    train_batch = (x[:6], y[:6], torch.arange(6))
    si = model.self_influence(train_batch, responses=cb.dirpath)
    full = model.attribute((x[:6], y[:6]), responses=cb.dirpath)
    torch.testing.assert_close(si, full.diagonal(), rtol=1e-4, atol=1e-9)
    assert bool((si > 0).all())


class ExplainedTopK(Classifier):
    responses: str | None = None

    def predict_step(self, batch, batch_idx):
        return self.attribute(batch, responses=self.responses, top_k=3)


def test_predict_step_returns_top_k(tmp_path):
    """Trainer.predict moves and collects a TopKAttribution per batch (Lightning's apply_to_collection)."""
    x, y = blobs(n=64, d=6, classes=3)
    model = ExplainedTopK(mlp(6, [8], 3))
    cb = AttributionCallback(tmp_path / "r", mode="end", horizon=10, curvature_batch_size=32)
    fit(model, x, y, [cb], epochs=2)
    model.responses = cb.dirpath
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    out = trainer.predict(model, DataLoader(TensorDataset(x[:10], y[:10]), batch_size=5))
    assert len(out) == 2 and all(isinstance(o, TopKAttribution) for o in out)
    direct = model.attribute((x[:10], y[:10]), responses=cb.dirpath, top_k=3)
    for field in ("proponent_scores", "proponent_indices", "opponent_scores", "opponent_indices"):
        predicted = torch.cat([getattr(o, field) for o in out])
        torch.testing.assert_close(predicted, getattr(direct, field), rtol=1e-4, atol=1e-7)
    assert out[0].source_ids == list(range(64))


def test_bf16_model_simulates_and_reads_out_in_fp32(tmp_path):
    x, y = blobs(n=64, d=6, classes=3)
    model = Classifier(mlp(6, [8], 3)).to(torch.bfloat16)
    cb = AttributionCallback(tmp_path / "r", mode="online", horizon=8)
    fit(model, x.bfloat16(), y, [cb], epochs=4, batch_size=16)  # a model trained in bf16 end to end
    assert next(model.parameters()).dtype == torch.bfloat16
    assert ResponseStore.load(cb.dirpath).manifest["parameters"][0]["dtype"] == "bfloat16"
    scores = model.attribute((x[:4].bfloat16(), y[:4]), responses=cb.dirpath)
    assert scores.dtype == torch.float32 and scores.isfinite().all() and scores.abs().sum() > 0
