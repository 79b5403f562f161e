"""The Krylov eigenspace finder with its columns split among processes (``ColumnSplit``) finds what one process finds.

The processes are threads here, summing through a barrier in rank order (an all-reduce whose result is the same on
every thread, as the strategy's is); ``tests/test_ddp.py`` runs the finder on 2 real processes through Lightning.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch

from lightning_attr.column_split import ColumnSplit
from lightning_attr.spectral import adaptive_eigenspace, top_eigenspace


class _ThreadSum:
    """An all-reduce among ``world_size`` threads: every thread gets the rank-ordered sum of their tensors."""

    def __init__(self, world_size: int) -> None:
        self.parts: list = [None] * world_size
        self.barrier = threading.Barrier(world_size, timeout=60)
        self.calls = 0

    def of(self, rank: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
            self.parts[rank] = tensor.clone()
            self.barrier.wait()
            total = sum(self.parts[1:], self.parts[0].clone())
            if rank == 0:
                self.calls += 1
            self.barrier.wait()  # nobody overwrites a part before every thread has summed
            return total

        return reduce_sum


def _on_threads(world_size: int, work: Callable[[ColumnSplit, Callable], object]) -> tuple[list, int]:
    """``work(split, reduce_sum)`` on ``world_size`` threads: their results (rank order) and the all-reduces they ran."""
    group, results, errors = _ThreadSum(world_size), [None] * world_size, []

    def run(rank: int) -> None:
        try:
            results[rank] = work(rank, group.of(rank))
        except BaseException as err:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(err)
            group.barrier.abort()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results, group.calls


def _psd(dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A PSD ``G = A^T A / n`` (a decaying spectrum, as a GGN's) and its rows ``A: Tensor[n, P]`` (split as data)."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(2 * dim, dim, generator=generator, dtype=torch.float64) * torch.logspace(0, -2, dim, dtype=torch.float64)
    return a.T @ a / a.shape[0], a


@pytest.mark.parametrize("dim", [203, 5])
def test_split_operations_equal_the_whole(dim):
    """Each process's columns: gather, dot and the tall-skinny QR give the whole rows' results (``r`` up to row signs)."""
    rows = torch.randn(4, dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    q_whole, r_whole = torch.linalg.qr(rows.T)

    def work(rank, reduce_sum):
        split = ColumnSplit(dim, rank, 3, reduce_sum)
        local = split.local(rows)
        q, r = split.qr(local)
        return split.gather(local), split.dot(local, 2 * local), split.gather(q), r

    results, _ = _on_threads(3, work)
    for gathered, dot, q, r in results:
        torch.testing.assert_close(gathered, rows, rtol=0, atol=0)
        torch.testing.assert_close(dot, 2 * rows @ rows.T)
        signs = torch.sign(torch.diagonal(r)) * torch.sign(torch.diagonal(r_whole))
        torch.testing.assert_close(r, signs[:, None] * r_whole)
        torch.testing.assert_close(q, signs[:, None] * q_whole.T)
        torch.testing.assert_close(r.T @ q, rows)


@pytest.mark.parametrize("finder", ["adaptive", "fixed"])
def test_split_krylov_finds_the_single_process_eigenspace(finder):
    """Two processes, each holding half of the data (its share of the curvature) and half of the columns of the Krylov
    space, find the eigenpairs, residuals, products and stop of one process with the same curvature products (the
    halves summed in the same order) within float64 rounding; every process returns the same whole vectors."""
    dim = 160
    matrix, data = _psd(dim)
    threshold = float(torch.linalg.eigvalsh(matrix).flip(0)[40])
    half = lambda block, rank: (block.double() @ data[rank::2].T @ data[rank::2] / data.shape[0]).float()  # noqa: E731

    def find(operator, split=None):  # the same Gaussian start on every process: a generator each, the same seed
        options = {"block": 8, "generator": torch.Generator().manual_seed(3)}
        if finder == "adaptive":
            return adaptive_eigenspace(operator, dim, threshold, max_products=dim, min_rank=16, tolerance=0.1, split=split, **options)
        return top_eigenspace(operator, dim, 24, products=64, split=split, **options)

    whole = find(lambda block: half(block, 0).clone() + half(block, 1))

    def work(rank, reduce_sum):  # this process's examples: its half of the curvature, summed over the processes
        return find(lambda block: reduce_sum(half(block, rank)), ColumnSplit(dim, rank, 2, reduce_sum))

    (first, second), calls = _on_threads(2, work)
    assert calls > 0
    for space in (first, second):
        assert (space.rank, space.products, space.stop) == (whole.rank, whole.products, whole.stop)
        torch.testing.assert_close(space.eigenvalues, whole.eigenvalues, rtol=1e-6, atol=0)
        torch.testing.assert_close(space.residuals, whole.residuals, rtol=1e-4, atol=1e-7 * float(whole.eigenvalues[0]))
        torch.testing.assert_close(space.vectors, whole.vectors, rtol=0, atol=1e-5)
    torch.testing.assert_close(first.vectors, second.vectors, rtol=0, atol=0)
    torch.testing.assert_close(first.eigenvalues, second.eigenvalues, rtol=0, atol=0)


def test_a_split_needs_its_all_reduce():
    with pytest.raises(ValueError, match="needs reduce_sum"):
        ColumnSplit(10, 0, 2)
    with pytest.raises(ValueError, match="rank must be in"):
        ColumnSplit(10, 2, 2, lambda t: t)
    with pytest.raises(ValueError, match="needs method='krylov'"):
        top_eigenspace(lambda b: b, 10, 2, method="subspace", split=ColumnSplit(10, 0, 2, lambda t: t))
