"""LDS / LOO metrics against hand-computed values, and against dattri when it is installed."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import require_peer

from lightning_attr.evaluation import (
    LeaveOneOutCorrelation,
    LinearDatamodelingScore,
    leave_out_correlations,
    linear_datamodeling_scores,
    subset_sums,
)
from lightning_attr.evaluation.metrics import _rank, spearman_columns


def test_subset_sums_by_hand():
    scores = torch.tensor([[1.0, 2.0, 4.0], [0.5, -1.0, 3.0]])  # Q=2, S=3
    masks = torch.tensor([[True, True, False], [False, True, True]])
    # predicted measurement of the subset model = -(sum of kept sources' scores)
    expected = torch.tensor([[-3.0, 0.5], [-6.0, -2.0]], dtype=torch.float64)
    assert torch.equal(subset_sums(scores, masks), expected)
    assert torch.equal(subset_sums(scores, torch.tensor([[0, 1], [1, 2]])), expected)  # index form


def test_rank_averages_ties_like_scipy():
    x = torch.tensor([[3.0], [1.0], [3.0], [2.0], [3.0]])
    assert _rank(x).squeeze(1).tolist() == [4.0, 1.0, 4.0, 2.0, 4.0]


def test_lds_by_hand():
    # 4 subsets of 3 sources, one query
    scores = torch.tensor([[1.0, 2.0, 3.0]])
    masks = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]], dtype=torch.bool)
    # predictions: -1, -2, -3, -3 -> ranks 4, 3, 1.5, 1.5
    measured = torch.tensor([[0.4], [0.3], [0.1], [0.2]])  # ranks 4, 3, 1, 2
    pr = torch.tensor([4.0, 3.0, 1.5, 1.5], dtype=torch.float64)
    mr = torch.tensor([4.0, 3.0, 1.0, 2.0], dtype=torch.float64)
    pr, mr = pr - pr.mean(), mr - mr.mean()
    expected = float((pr * mr).sum() / (pr.norm() * mr.norm()))
    got = linear_datamodeling_scores(scores, masks, measured)
    assert got.shape == (1,)
    assert math.isclose(float(got[0]), expected, rel_tol=1e-12)
    assert expected == pytest.approx(0.9486832980505138)
    # a perfect predictor gets 1, the negated one -1
    perfect = torch.tensor([[-0.4, -0.3, -0.1, -0.2]]).T
    assert float(linear_datamodeling_scores(torch.tensor([[4.0, 3.0, 1.0]]), masks[:3], perfect[:3])[0]) == pytest.approx(1.0)
    assert float(linear_datamodeling_scores(torch.tensor([[-4.0, -3.0, -1.0]]), masks[:3], perfect[:3])[0]) == pytest.approx(-1.0)


def test_lds_metric_accumulates_query_batches_and_skips_undefined():
    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(30, 12, generator=gen) < 0.5
    scores = torch.randn(7, 12, generator=gen)
    measured = subset_sums(scores, masks).float() + 0.3 * torch.randn(30, 7, generator=gen)
    per_query = linear_datamodeling_scores(scores, masks, measured)
    metric = LinearDatamodelingScore(masks)
    metric.update(scores[:3], measured[:, :3])
    metric.update(scores[3:], measured[:, 3:])
    assert float(metric.compute()) == pytest.approx(float(per_query.mean()), rel=1e-6)
    assert float(metric.compute()) > 0.5  # noisy but informative predictions
    # a query whose ground truth is constant has no defined correlation: counted, not averaged
    metric.update(scores[:1], torch.ones(30, 1))
    assert int(metric.undefined) == 1
    assert float(metric.compute()) == pytest.approx(float(per_query.mean()), rel=1e-6)


def test_metric_errors_are_clear():
    with pytest.raises(ValueError, match="Tensor\\[M, Q\\]"):
        linear_datamodeling_scores(torch.zeros(2, 3), torch.ones(4, 3, dtype=torch.bool), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="columns"):
        subset_sums(torch.zeros(2, 3), torch.ones(4, 5, dtype=torch.bool))
    metric = LeaveOneOutCorrelation()
    metric.update(torch.ones(1, 4), torch.randn(4, 1))  # constant predictions: undefined
    with pytest.raises(RuntimeError, match="no query had a defined correlation"):
        metric.compute()


def test_loo_by_hand():
    scores = torch.tensor([[1.0, 2.0, 3.0], [3.0, 1.0, 2.0]])  # Q=2, K=3
    change = torch.tensor([[2.0, 1.0], [4.0, 0.0], [6.0, 2.0]])  # query 0: perfectly linear
    per_query = leave_out_correlations(scores, change)
    assert float(per_query[0]) == pytest.approx(1.0)
    # query 1 by hand: x = (3,1,2) -> (1,-1,0), y = (1,0,2) -> (0,-1,1): r = 1 / (sqrt(2) sqrt(2)) = 0.5
    assert float(per_query[1]) == pytest.approx(0.5)
    metric = LeaveOneOutCorrelation()
    metric.update(scores, change)
    assert float(metric.compute()) == pytest.approx(float(per_query.mean()), rel=1e-6)


def test_spearman_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    gen = torch.Generator().manual_seed(1)
    a = torch.randint(0, 5, (25, 4), generator=gen).double()  # many ties
    b = torch.randn(25, 4, generator=gen).double()
    ours = spearman_columns(a, b)
    for j in range(4):
        assert float(ours[j]) == pytest.approx(scipy_stats.spearmanr(a[:, j], b[:, j]).statistic, abs=1e-12)


def test_equal_to_dattri_lds_and_loo_corr():
    dattri_metrics = require_peer("dattri.metric")
    gen = torch.Generator().manual_seed(2)
    n, q, m = 40, 6, 25
    scores = torch.randn(q, n, generator=gen, dtype=torch.float64)
    indices = torch.stack([torch.randperm(n, generator=gen)[: n // 2] for _ in range(m)])
    losses = torch.randn(m, q, generator=gen, dtype=torch.float64)
    ours = linear_datamodeling_scores(scores, indices, losses)
    # dattri sums scores over the kept indices and correlates with its ground truth directly:
    # with a LOSS as ground truth the same quantity is obtained with negated losses
    theirs, _ = dattri_metrics.lds(scores.T, (-losses, indices))
    assert torch.allclose(ours, theirs.double(), atol=1e-10)
    change = torch.randn(n, q, generator=gen, dtype=torch.float64)
    ours_loo = leave_out_correlations(scores, change)
    theirs_loo, _ = dattri_metrics.loo_corr(scores.T, (change, torch.arange(n)))
    assert torch.allclose(ours_loo, theirs_loo.double(), atol=1e-10)
