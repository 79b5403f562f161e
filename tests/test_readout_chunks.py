"""How many sources one vmapped readout call takes: the automatic chunk follows the activations of the query
batch, and no chunking changes a score (against one ``torch.func.jvp`` per source, the plain definition; the
``gradient`` readout, query gradients times the responses, gives the linear readout's scores)."""

from __future__ import annotations

import pytest
import torch
from conftest import blobs, small_mlp
from torch.func import jvp

from lightning_attr.functional import functional_view
from lightning_attr.models import CNN, Classifier
from lightning_attr.readout import activation_floats, auto_chunk_size, score_sources


def _cnn() -> Classifier:
    torch.manual_seed(0)
    return Classifier(CNN((1, 8, 8), 3, channels=(4, 6))).eval()


def _mlp() -> Classifier:
    torch.manual_seed(0)
    return small_mlp(6, 3).eval()


def _batch(model: Classifier, n: int):
    x, y = blobs(n=n, d=64 if isinstance(model.net, CNN) else 6, classes=3, seed=4)
    return x, y


def test_activation_floats_counts_every_leaf_output():
    model = _mlp()  # Flatten 6 -> Linear 16 -> Tanh 16 -> Linear 3, outputs 3
    with functional_view(model) as (fm, theta):
        assert activation_floats(fm, theta, _batch(model, 5)) == 5 * (6 + 16 + 16 + 3 + 3)
        assert fm.module.net[1]._forward_hooks == {}  # the counting hooks are gone


def test_auto_chunk_takes_every_source_for_one_query_and_bounds_the_chunk_for_many():
    model = _mlp()
    per_example_bytes = 4 * (6 + 16 + 16 + 3 + 3)
    with functional_view(model) as (fm, theta):
        assert auto_chunk_size(fm, theta, _batch(model, 1), 5000) == 5000
        mb = 1000 * 20 * per_example_bytes / 2**20  # room for exactly 1000 sources of 20 queries
        assert auto_chunk_size(fm, theta, _batch(model, 20), 10**6, activation_mb=mb) == 1000
        assert auto_chunk_size(fm, theta, _batch(model, 20), 10**6, activation_mb=1e-9) == 1


@pytest.mark.parametrize("make", [_mlp, _cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize("kind", ["linear", "central", "step", "gradient"])
def test_no_chunk_size_changes_a_score(make, kind):
    model = make()
    batch = _batch(model, 7)
    with functional_view(model) as (fm, theta):
        g = torch.Generator().manual_seed(1)
        responses = 1e-2 * torch.randn(37, theta.numel(), generator=g)
        f = lambda th: fm.measurement(th, batch)  # noqa: E731
        if kind in ("linear", "gradient"):  # the definition, one source at a time (gradient: the same scores)
            expected = torch.stack([jvp(f, (theta,), (r,))[1] for r in responses]).T
        else:
            expected = score_sources(fm, theta, responses, batch, kind, chunk_size=1)
        # central / step difference two forward passes: float32 rounding of the measurement itself (f ~ 1 here),
        # which convolution kernels chosen per batch size may round differently
        atol = 1e-6 * float(expected.abs().max()) if kind in ("linear", "gradient") else 1e-6 * float(f(theta).abs().max())
        for chunk in (None, 1, 5, 37, 256):
            got = score_sources(fm, theta, responses, batch, kind, chunk_size=chunk)
            assert got.shape == (7, 37)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=atol)


def test_the_gradient_readout_needs_flat_responses():
    from lightning_attr.readout import readout_along

    with pytest.raises(ValueError, match="readout='gradient' needs each response as one flat vector.*readout='linear'"):
        readout_along(lambda e, r: e * r, "gradient")


def test_the_gradient_readout_in_query_chunks_gives_the_same_scores(monkeypatch):
    import lightning_attr.readout as readout
    from lightning_attr.readout import paired_readout

    model = _cnn()
    batch = _batch(model, 5)
    with functional_view(model) as (fm, theta):
        responses = 1e-2 * torch.randn(11, theta.numel(), generator=torch.Generator().manual_seed(2))
        whole = score_sources(fm, theta, responses, batch, "gradient")
        paired = paired_readout(fm, theta, responses[:5], batch, "gradient")
        monkeypatch.setattr(readout, "CHUNK_ACTIVATION_MB", 1e-9)  # one query per chunk
        torch.testing.assert_close(score_sources(fm, theta, responses, batch, "gradient"), whole)
        torch.testing.assert_close(paired_readout(fm, theta, responses[:5], batch, "gradient"), paired)
        torch.testing.assert_close(paired, whole[:, :5].diagonal())
