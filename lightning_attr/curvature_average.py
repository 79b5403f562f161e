"""Minibatch curvature with less sampling noise: its block in a top-k subspace replaced by a running mean.

Online, propagation step ``j`` multiplies by the curvature ``G_j`` of one pool of live batches. The sampling noise
of ``G_j`` is what limits online exactness (``docs/propagation.md``), and it sits mostly in the top eigendirections,
where the curvature and its spread over minibatches are largest. :class:`CurvatureAverage` keeps a basis
``V: Tensor[k, P]`` (orthonormal rows: the top-``k`` eigenvectors of the first pool's curvature) and replaces the
``k x k`` block of each pool's curvature in it by the mean of the blocks of all the pools it has seen:

    G~_j d = G_j d + ((d V^T) (Mbar_j - M_j)) V,    M_j = V G_j V^T: Tensor[k, k],   Mbar_j = (1/j) sum_{i <= j} M_i

Outside ``span(V)`` (and across it) ``G~_j`` is ``G_j``. The mean ``Mbar_j`` is a control variate: it has the
expectation of ``M_j`` over pools and about ``1/j`` of its variance. Cost: ``k`` curvature products per pool (shared
by every live source) to form ``M_j``, ``O(k P)`` per source-product, and the one-off basis
(:func:`~lightning_attr.spectral.top_eigenspace`). Pure ``torch``; no Lightning.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_attr.curvature import CurvatureOperator
from lightning_attr.column_split import ColumnSplit
from lightning_attr.spectral import top_eigenspace

DEFAULT_AVERAGED_RANK = 32  # measured in docs/propagation.md ("Online: averaging the top of the curvature")


class CurvatureAverage:
    """The running mean of the pools' curvature inside ``span(basis)`` (module docstring).

    Args:
        basis: ``Tensor[k, P]`` with orthonormal rows.
        finder_products: the curvature products spent finding ``basis`` (recorded in :meth:`to_json`).
    """

    def __init__(self, basis: Tensor, finder_products: int = 0) -> None:
        self.basis = basis
        self.total = torch.zeros(basis.shape[0], basis.shape[0], dtype=torch.float64, device=basis.device)
        self.count = 0
        self.products = finder_products  # curvature-vector products spent so far (finder + k per pool)

    @classmethod
    def of(
        cls, operator: CurvatureOperator, dim: int, rank: int, generator: torch.Generator, device: torch.device,
        split: ColumnSplit | None = None,
    ) -> CurvatureAverage:
        """The basis of the top-``min(rank, P)`` eigenvectors of ``operator`` (block Krylov, default budget; ``split``:
        on several processes, :func:`~lightning_attr.spectral.top_eigenspace`'s)."""
        rank = min(rank, dim)
        space = top_eigenspace(operator, dim, rank, generator=generator, device=device, split=split)
        return cls(space.vectors.to(device=device, dtype=torch.float32), space.products)

    @property
    def rank(self) -> int:
        return int(self.basis.shape[0])

    def wrap(self, operator: CurvatureOperator) -> CurvatureOperator:
        """``G~_j`` for the next pool's ``operator`` (``G_j``); adds its block to the mean (``k`` products)."""
        block = (self.basis @ operator(self.basis).T).double()  # M_j = V G_j V^T
        block = (block + block.T) / 2
        self.total = self.total + block  # not in place: a state_dict taken earlier keeps its own
        self.count += 1
        self.products += self.rank
        correction = (self.total / self.count - block).float()
        basis = self.basis

        def averaged(vectors: Tensor) -> Tensor:
            return operator(vectors).add_((vectors @ basis.T) @ correction @ basis)

        return averaged

    def to_json(self) -> dict[str, int]:
        """What a checkpoint records beside its step rule."""
        return {"averaged_rank": self.rank, "averaging_products": self.products}

    def state_dict(self) -> dict[str, Any]:
        return {"basis": self.basis.cpu().clone(), "total": self.total.cpu().clone(), "count": self.count, "products": self.products}

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> CurvatureAverage:
        average = cls(state["basis"].to(device), int(state["products"]))
        average.total, average.count = state["total"].to(device), int(state["count"])
        return average
