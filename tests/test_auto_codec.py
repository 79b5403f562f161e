"""codec="auto" (the default): "factored" where it holds the spectral default's responses exactly in fewer than half the
numbers (end mode, GGN, per-example sources of a network the layer-bases readout covers); else dense while one
checkpoint's dense responses fit attribute()'s default memory budget, the eigen codec beyond it; recorded in the
manifest."""

from __future__ import annotations

import pytest
import torch
from conftest import blobs, fit, small_mlp
from torch import nn

from lightning_attr import AttributionCallback, ResponseStore
from lightning_attr import codecs
from lightning_attr.codecs import auto_codec
from lightning_attr.factored import factored_numbers
from lightning_attr.models import Classifier
from lightning_attr.parameters import ParameterSpace


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


def test_auto_codec_is_factored_below_half_the_parameters_in_the_spectral_pipeline():
    assert auto_codec(4000, 15210, "end", "ggn", factored_numbers=7604) == "factored"
    assert auto_codec(4000, 15210, "end", "ggn", factored_numbers=7605) == "dense"  # not below P / 2
    assert auto_codec(60000, 10**5, "end", "ggn", factored_numbers=10**5) == "eigen"
    # it stores propagation="spectral"'s responses: another rule, online mode or the Hessian keep the other codecs
    assert auto_codec(4000, 15210, "end", "ggn", propagation="neumann", factored_numbers=100) == "dense"
    assert auto_codec(4000, 15210, "online", "ggn", factored_numbers=100) == "dense"
    assert auto_codec(4000, 15210, "end", "hessian", factored_numbers=100) == "dense"


def test_factored_numbers_count_one_rank_one_factor_per_linear_weight():
    mnist1d = Classifier(nn.Sequential(nn.Linear(40, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10)))
    space = ParameterSpace.of(mnist1d)
    assert space.size == 15210
    # k + (100 + 40) + (100 + 100) + (10 + 100) = 450 factor numbers + 210 biases
    assert factored_numbers(mnist1d, space, 256) == 256 + 450 + 210
    assert factored_numbers(mnist1d, space, 10**6) == 15210 + 450 + 210  # k is capped at P
    narrow = Classifier(nn.Sequential(nn.Linear(2, 1)))  # 1 + 2 factor numbers > the weight's 2: kept dense
    assert factored_numbers(narrow, ParameterSpace.of(narrow), 0) == 2 + 1
    normed = Classifier(nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3)))  # not covered by the layer bases
    assert factored_numbers(normed, ParameterSpace.of(normed), 16) is None


@pytest.mark.parametrize(
    "sources, budget_mb, expected",
    [(None, None, "factored"), ("groups", None, "dense"), ("groups", 0.01, "eigen")],
)
def test_default_codec_resolves_at_fit_start_and_is_recorded(tmp_path, monkeypatch, sources, budget_mb, expected):
    x, y = blobs(n=120, d=6, classes=3)
    xq, yq = blobs(n=8, d=6, classes=3, seed=1)
    if budget_mb is not None:  # 60 sources x 163 parameters x 4 bytes = 0.039 MB > 0.01 MB
        monkeypatch.setattr(codecs, "DEFAULT_MEMORY_BUDGET_MB", budget_mb)
    # per example: 16 + (16 + 6) + (3 + 16) + 19 biases = 76 numbers per source < 163 / 2; sources of two examples
    # are not per example: the other rule
    options = {"rank": 16, "curvature_batch_size": 64, "checkpoint_epochs": None}
    if sources == "groups":
        options["sources"] = (torch.arange(120) // 2).tolist()
    torch.manual_seed(0)
    model = small_mlp(6, 3)
    cb = AttributionCallback(tmp_path / "auto", **options)
    assert cb.codec == "auto"
    fit(model, x, y, [cb], epochs=4)
    store = ResponseStore.load(cb.dirpath)
    assert cb.codec == expected and store.manifest["settings"]["codec"] == expected
    assert store.checkpoint_info("final").get("codec", "dense") == expected
    # the same fit with the codec named gives the same scores
    torch.manual_seed(0)
    named_model = small_mlp(6, 3)
    named = AttributionCallback(tmp_path / expected, codec=expected, **options)
    fit(named_model, x, y, [named], epochs=4)
    assert torch.allclose(model.attribute((xq, yq), responses=cb.dirpath), named_model.attribute((xq, yq), responses=named.dirpath), atol=1e-6)
