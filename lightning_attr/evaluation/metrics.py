"""Attribution metrics against retraining ground truth: LDS (Spearman) and LOO (Pearson).

Score convention (the whole package, and every peer adapter): ``scores[q, b]`` is the predicted
RISE of query ``q``'s measurement (its loss) if source ``b`` were removed from training; positive
means ``b`` is a proponent. To first order, the measurement of a model trained on the sources in a
subset ``D`` is then ``const - sum_{b in D} scores[q, b]``: that is what :func:`subset_sums`
returns and what LDS ranks against the retrained measurements.

Definitions are those of dattri's ``dattri.metric.lds`` / ``loo_corr`` (per-query Spearman over
subsets, per-query Pearson over left-out sources, averaged over queries). dattri sums the scores
of the subset's members and correlates them with its ground truth directly, so with a LOSS as
ground truth a dattri user negates one of the two; here the sign is fixed by the convention above.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


def _as_mask(subsets: Tensor, n_sources: int) -> Tensor:
    """``Tensor[M, S]`` bool mask, or ``Tensor[M, k]`` int indices -> ``Tensor[M, S]`` float mask."""
    if subsets.dim() != 2:
        raise ValueError(f"subsets must be 2-D (Tensor[M, S] mask or Tensor[M, k] indices), got shape {tuple(subsets.shape)}.")
    if subsets.dtype == torch.bool:
        if subsets.shape[1] != n_sources:
            raise ValueError(f"subset mask has {subsets.shape[1]} columns but scores have {n_sources} sources.")
        return subsets.float()
    if subsets.dtype.is_floating_point:
        raise ValueError("subsets must be a bool mask or integer indices, got a floating tensor.")
    if subsets.numel() and (subsets.min() < 0 or subsets.max() >= n_sources):
        raise ValueError(f"subset indices must lie in [0, {n_sources}), got [{int(subsets.min())}, {int(subsets.max())}].")
    mask = torch.zeros(subsets.shape[0], n_sources)
    mask.scatter_(1, subsets.long(), 1.0)
    return mask


def subset_sums(scores: Tensor, subsets: Tensor) -> Tensor:
    """Predicted measurement (up to a per-query constant) of a model trained on each subset.

    Args:
        scores: ``Tensor[Q, S]``, predicted rise of each query's measurement if a source is removed.
        subsets: ``Tensor[M, S]`` bool (source kept) or ``Tensor[M, k]`` int64 indices of kept sources.

    Returns:
        ``Tensor[M, Q]``: ``-sum_{b in subset m} scores[q, b]``.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be Tensor[Q, S], got shape {tuple(scores.shape)}.")
    mask = _as_mask(subsets.cpu(), scores.shape[1]).to(torch.float64)
    return -(mask @ scores.detach().cpu().to(torch.float64).T)


def _rank(x: Tensor) -> Tensor:
    """Ranks along dim 0 (1-based, ties get their average rank, as ``scipy.stats.rankdata``)."""
    n, cols = x.shape
    order = x.argsort(dim=0, stable=True)
    sorted_x = x.gather(0, order)
    new_group = torch.ones_like(sorted_x, dtype=torch.bool)
    new_group[1:] = sorted_x[1:] != sorted_x[:-1]
    group = new_group.long().cumsum(0) - 1  # group id within each column
    group = group + torch.arange(cols).unsqueeze(0) * n  # unique across columns
    positions = torch.arange(1, n + 1, dtype=torch.float64).unsqueeze(1).expand(n, cols)
    total = torch.zeros(n * cols, dtype=torch.float64).scatter_add_(0, group.reshape(-1), positions.reshape(-1))
    count = torch.zeros(n * cols, dtype=torch.float64).scatter_add_(
        0, group.reshape(-1), torch.ones(n * cols, dtype=torch.float64)
    )
    mean_rank = (total / count.clamp_min(1))[group]
    ranks = torch.empty_like(mean_rank)
    ranks.scatter_(0, order, mean_rank)
    return ranks


def pearson_columns(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of each column pair: ``Tensor[N, Q] x Tensor[N, Q] -> Tensor[Q]`` (NaN if a column is constant)."""
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"expected two Tensor[N, Q] of equal shape, got {tuple(a.shape)} and {tuple(b.shape)}.")
    if a.shape[0] < 2:
        raise ValueError(f"a correlation needs at least 2 points per column, got {a.shape[0]}.")
    a = a.to(torch.float64)
    b = b.to(torch.float64)
    a = a - a.mean(0)
    b = b - b.mean(0)
    denom = a.norm(dim=0) * b.norm(dim=0)
    corr = (a * b).sum(0) / denom
    return torch.where(denom > 0, corr.clamp(-1.0, 1.0), torch.full_like(corr, float("nan")))


def spearman_columns(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation of each column pair (NaN if a column is constant)."""
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"expected two Tensor[N, Q] of equal shape, got {tuple(a.shape)} and {tuple(b.shape)}.")
    return pearson_columns(_rank(a.to(torch.float64)), _rank(b.to(torch.float64)))


def linear_datamodeling_scores(scores: Tensor, subsets: Tensor, measurements: Tensor) -> Tensor:
    """Per-query LDS: Spearman over subsets between predicted and retrained measurements.

    Args:
        scores: ``Tensor[Q, S]`` (package convention, see the module docstring).
        subsets: ``Tensor[M, S]`` bool or ``Tensor[M, k]`` indices of the sources each retrain kept.
        measurements: ``Tensor[M, Q]``: the measurement (e.g. loss) of query ``q`` under the model
            retrained on subset ``m`` (averaged over that subset's seeds).

    Returns:
        ``Tensor[Q]`` float64, NaN where a query's predictions or measurements are constant.
    """
    predicted = subset_sums(scores, subsets)
    if measurements.shape != predicted.shape:
        raise ValueError(
            f"measurements must be Tensor[M, Q] = {tuple(predicted.shape)} (subsets x queries), got {tuple(measurements.shape)}."
        )
    return spearman_columns(predicted, measurements.detach().cpu())


def leave_out_correlations(scores: Tensor, actual_change: Tensor) -> Tensor:
    """Per-query Pearson correlation between predicted and actual change under leave-source-out.

    Args:
        scores: ``Tensor[Q, K]``: scores of the ``K`` left-out sources only (predicted rise).
        actual_change: ``Tensor[K, Q]``: measurement without source ``k`` minus measurement with it
            (same training seed), averaged over seeds.

    Returns:
        ``Tensor[Q]`` float64, NaN where a query's column is constant.
    """
    if scores.dim() != 2 or actual_change.shape != (scores.shape[1], scores.shape[0]):
        raise ValueError(
            f"expected scores Tensor[Q, K] and actual_change Tensor[K, Q]; got {tuple(scores.shape)} and {tuple(actual_change.shape)}."
        )
    return pearson_columns(scores.detach().cpu().T, actual_change.detach().cpu())


class _MeanCorrelation(Metric):
    """Mean over queries of a per-query correlation; undefined (NaN) queries are counted and skipped."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("undefined", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _accumulate(self, per_query: Tensor) -> None:
        finite = torch.isfinite(per_query)
        self.total += per_query[finite].sum().to(self.total.device)
        self.count += int(finite.sum())
        self.undefined += int((~finite).sum())

    def compute(self) -> Tensor:
        if int(self.count) == 0:
            raise RuntimeError(
                f"{type(self).__name__}: no query had a defined correlation ({int(self.undefined)} undefined: "
                "constant predictions or constant ground truth). Call update() with non-degenerate data."
            )
        return (self.total / self.count).float()


class LinearDatamodelingScore(_MeanCorrelation):
    """Linear datamodeling score: per-query Spearman correlation over retrained subsets, averaged.

    Args:
        subsets: ``Tensor[M, S]`` bool mask (or ``Tensor[M, k]`` indices) of the sources each
            retrained model kept. Fixed for the metric's life: updates bring queries, not subsets.

    ``update(scores, measurements)`` takes ``scores: Tensor[Q, S]`` (predicted rise of each query's
    measurement if the source is removed) and ``measurements: Tensor[M, Q]`` (the retrained models'
    measurement of those queries); updates may come in query batches. ``compute()`` is the mean LDS
    over every query seen whose correlation is defined.

    Example:
        >>> metric = LinearDatamodelingScore(subsets)   # doctest: +SKIP
        >>> metric.update(net.attribute(batch, responses=path), losses_on_subsets)  # doctest: +SKIP
        >>> metric.compute()  # doctest: +SKIP
    """

    def __init__(self, subsets: Tensor, **kwargs) -> None:
        super().__init__(**kwargs)
        if subsets.dim() != 2 or subsets.shape[0] < 2:
            raise ValueError(f"subsets must be Tensor[M, S] with M >= 2 retrained subsets, got shape {tuple(subsets.shape)}.")
        self.subsets = subsets.detach().cpu()

    def update(self, scores: Tensor, measurements: Tensor) -> None:
        self._accumulate(linear_datamodeling_scores(scores, self.subsets, measurements))


class LeaveOneOutCorrelation(_MeanCorrelation):
    """Leave-one-out correlation: per-query Pearson over left-out sources, averaged over queries.

    ``update(scores, actual_change)``: ``scores: Tensor[Q, K]`` for the ``K`` left-out sources and
    ``actual_change: Tensor[K, Q]`` (measurement without the source minus with it, seed held fixed).
    With groups of examples as sources this is the group correlation of the data-source regime.
    """

    def update(self, scores: Tensor, actual_change: Tensor) -> None:
        self._accumulate(leave_out_correlations(scores, actual_change))
