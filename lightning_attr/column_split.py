"""Vectors of ``R^P`` held as rows whose ``P`` coordinates (columns) are split among processes.

The Krylov eigenspace finder (:func:`lightning_attr.spectral.adaptive_eigenspace`) keeps its basis ``Q: [m, P]`` and
its products ``G Q: [m, P]``; everything it does with them is an inner product over ``P`` (``[a, m]`` Gram blocks), a
product of a small matrix with the rows, or a QR of a few rows. With the columns split, process ``r`` of ``W`` keeps
the ``r``-th contiguous block of the ``P`` coordinates of every row, so the ``O(m^2 P)`` work and the ``m P`` memory
are split ``W`` ways; what it costs is one all-reduce per inner product (of the small ``[a, b]`` result) and per QR
(of the ``[W b, b]`` stacked triangular factors: the tall-skinny QR of Demmel et al., 2012), and one all-reduce of a
``[b, P]`` block to rebuild a whole row block where the curvature product needs it. The small matrices that come
out of the collectives are identical on every process, so every decision taken from them (when to stop, which
directions to add) is the same everywhere and the processes stay in step.

With one process (``world_size=1``, the default) every method is the plain local operation: no collective, and the
same arithmetic as before the split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class ColumnSplit:
    """Process ``rank`` of ``world_size`` keeps columns ``[start, stop)`` of every row of ``R^P``.

    Attributes:
        dim: ``P``, the length of a whole row.
        rank, world_size: this process and the number of processes (contiguous near-equal blocks of columns).
        reduce_sum: sums a tensor over the processes and returns the same sum on every process (the strategy's
            all-reduce); needed when ``world_size > 1``. Every process must call the methods below in the same
            order with tensors of the same shapes (they are collectives).
    """

    dim: int
    rank: int = 0
    world_size: int = 1
    reduce_sum: Callable[[Tensor], Tensor] | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}.")
        if self.world_size > 1 and self.reduce_sum is None:
            raise ValueError("A split over several processes needs reduce_sum (the all-reduce that sums over them).")

    @property
    def start(self) -> int:
        return self.dim * self.rank // self.world_size

    @property
    def stop(self) -> int:
        return self.dim * (self.rank + 1) // self.world_size

    @property
    def shared(self) -> bool:
        """Whether the columns are shared among several processes (else every method is local)."""
        return self.world_size > 1

    def local(self, rows: Tensor) -> Tensor:
        """``Tensor[..., P]`` (whole rows, the same on every process) -> this process's columns ``Tensor[..., P_r]``."""
        return rows[..., self.start : self.stop] if self.shared else rows

    def gather(self, rows: Tensor) -> Tensor:
        """This process's columns ``Tensor[a, P_r]`` -> the whole rows ``Tensor[a, P]`` on every process."""
        if not self.shared:
            return rows
        whole = torch.zeros(rows.shape[0], self.dim, dtype=rows.dtype, device=rows.device)
        whole[:, self.start : self.stop] = rows
        return self.reduce_sum(whole)  # each column is nonzero on one process: the sum is exact

    def total(self, partial: Tensor) -> Tensor:
        """A sum over the columns, from this process's part of it (e.g. ``a b^T`` on its columns): the sum over all."""
        return self.reduce_sum(partial) if self.shared else partial

    def dot(self, a: Tensor, b: Tensor) -> Tensor:
        """``a b^T`` over all ``P`` columns: ``a: Tensor[x, P_r]``, ``b: Tensor[y, P_r]`` -> ``Tensor[x, y]``."""
        return self.total(a @ b.T)

    def qr(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """The QR factorization of the whole ``rows^T`` (``Tensor[P, a]``, ``a <= P``), on this process's columns.

        Returns ``(q, r)``: ``q: Tensor[a, P_r]``, this process's columns of orthonormal rows, and the upper-triangular
        ``r: Tensor[a, a]``, the same on every process, with ``rows = r^T q`` (over all columns). Split: each process
        factors its block, the stacked ``r`` blocks (one all-reduce) are factored again, and each process's ``q`` is its
        block times its part of the second factor (tall-skinny QR); ``r`` then equals the whole factorization's up to
        the signs of its rows.
        """
        q, r = torch.linalg.qr(rows.T)  # [P_r, c], [c, a] with c = min(P_r, a)
        if not self.shared:
            return q.T, r
        width, height = rows.shape[0], r.shape[0]
        stacked = torch.zeros(self.world_size * width, width, dtype=r.dtype, device=r.device)
        stacked[self.rank * width : self.rank * width + height] = r
        outer, r = torch.linalg.qr(self.reduce_sum(stacked))  # [W a, a], [a, a]
        return (q @ outer[self.rank * width : self.rank * width + height]).T, r
