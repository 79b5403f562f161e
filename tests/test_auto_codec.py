"""codec="auto" (the default): dense while one checkpoint's dense responses fit attribute()'s default memory budget,
the eigen codec beyond it (end mode, GGN curvature), recorded in the manifest."""

from __future__ import annotations

import pytest
import torch
from conftest import blobs, fit, small_mlp

from lightning_attr import AttributionCallback, ResponseStore
from lightning_attr import codecs
from lightning_attr.codecs import auto_codec


def test_auto_codec_is_dense_up_to_the_memory_budget_and_eigen_beyond():
    limit = 4 * 1000 * 2**18  # bytes of 1,000 x 2**18 float32 responses: 1,000 MB
    assert auto_codec(1000, 2**18, "end", "ggn", limit_mb=1000) == "dense"
    assert auto_codec(1001, 2**18, "end", "ggn", limit_mb=1000) == "eigen"
    assert limit == 1000 * 2**20
    # the eigen codec simulates at fixed weights on the GGN: online mode and the Hessian keep dense responses
    assert auto_codec(10**6, 10**6, "online", "ggn") == "dense"
    assert auto_codec(10**6, 10**6, "end", "hessian") == "dense"
    # the default limit is attribute()'s memory budget (1 GiB): MNIST-1D's 4,000 x 15,210 stays dense
    assert auto_codec(4000, 15210, "end", "ggn") == "dense"
    assert auto_codec(60000, 10**5, "end", "ggn") == "eigen"


@pytest.mark.parametrize("budget_mb, expected", [(None, "dense"), (0.05, "eigen")])
def test_default_codec_resolves_at_fit_start_and_is_recorded(tmp_path, monkeypatch, budget_mb, expected):
    x, y = blobs(n=120, d=6, classes=3)
    xq, yq = blobs(n=8, d=6, classes=3, seed=1)
    if budget_mb is not None:  # 120 sources x 163 parameters x 4 bytes = 0.075 MB > 0.05 MB
        monkeypatch.setattr(codecs, "DEFAULT_MEMORY_BUDGET_MB", budget_mb)
    torch.manual_seed(0)
    model = small_mlp(6, 3)
    cb = AttributionCallback(tmp_path / "auto", rank=16, curvature_batch_size=64, checkpoint_epochs=None)
    assert cb.codec == "auto"
    fit(model, x, y, [cb], epochs=4)
    store = ResponseStore.load(cb.dirpath)
    assert cb.codec == expected and store.manifest["settings"]["codec"] == expected
    assert store.checkpoint_info("final").get("codec", "dense") == expected
    # the same fit with the codec named gives the same scores
    torch.manual_seed(0)
    named_model = small_mlp(6, 3)
    named = AttributionCallback(tmp_path / expected, codec=expected, rank=16, curvature_batch_size=64, checkpoint_epochs=None)
    fit(named_model, x, y, [named], epochs=4)
    assert torch.allclose(model.attribute((xq, yq), responses=cb.dirpath), named_model.attribute((xq, yq), responses=named.dirpath), atol=1e-6)
