"""The explicit damped-GGN target used by the bench equals the tests' independent dense formula."""

from __future__ import annotations

import pytest
import torch
from conftest import blobs, exact_influence, fit, small_mlp

from lightning_attr.evaluation.exact import ExactInfluence
from lightning_attr.models import CNN1d


def test_exact_influence_equals_the_dense_formula():
    x, y = blobs(n=90, d=6, classes=3)
    xq, yq = blobs(n=12, d=6, classes=3, seed=1)
    model = small_mlp(6, 3)
    fit(model, x, y, [], epochs=5)
    expected = exact_influence(model, x, y, xq, yq, damping=0.05)
    exact = ExactInfluence(model, x, y, chunk_size=32)  # 3 chunks: the accumulation is exercised
    got = exact.scores(xq, yq, damping=0.05)
    assert got.shape == (12, 90)
    assert torch.allclose(got, expected, rtol=1e-3, atol=1e-6 * expected.abs().max())
    # a cached matrix gives the same scores; damping changes them
    again = ExactInfluence(model, x, y, ggn=exact.ggn).scores(xq, yq, damping=0.05)
    assert torch.allclose(again, got)
    assert not torch.allclose(exact.scores(xq, yq, damping=0.5), got, rtol=1e-2)


def test_exact_influence_on_a_conv_net_and_bad_input():
    torch.manual_seed(0)
    net = CNN1d([12], 3, channels=(2,), kernel_size=3)
    x, y = torch.randn(20, 12), torch.randint(0, 3, (20,))
    exact = ExactInfluence(net, x, y, chunk_size=8)
    ggn = exact.ggn
    assert torch.allclose(ggn, ggn.T) and torch.linalg.eigvalsh(ggn).min() > -1e-6 * ggn.diagonal().max()  # symmetric PSD (float32 products)
    assert exact.scores(x[:3], y[:3], 0.1).shape == (3, 20)
    with pytest.raises(ValueError, match="damping must be > 0"):
        exact.scores(x[:3], y[:3], 0.0)
    with pytest.raises(ValueError, match="ggn must be"):
        ExactInfluence(net, x, y, ggn=torch.eye(3))
