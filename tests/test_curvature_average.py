"""CurvatureAverage: inside its basis, each pool's curvature becomes the running mean of the pools so far."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_attr import AttributionCallback
from lightning_attr.curvature_average import CurvatureAverage


def _pools(count: int, dim: int, seed: int = 0) -> list[torch.Tensor]:
    """Explicit PSD 'pool curvatures' ``[dim, dim]`` sharing a dominant part, each with its own noise."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(dim, 4, generator=g) * 3
    out = []
    for _ in range(count):
        noise = torch.randn(dim, dim, generator=g)
        out.append(shared @ shared.T + noise @ noise.T / dim)
    return out


def test_the_basis_is_the_first_pools_top_eigenspace_and_the_block_becomes_the_running_mean():
    dim, rank = 12, 3
    pools = _pools(4, dim)
    average = CurvatureAverage.of(lambda v: v @ pools[0], dim, rank, torch.Generator().manual_seed(0), torch.device("cpu"))
    top = torch.linalg.eigh(pools[0].double())[1][:, -rank:].T.float()  # [rank, dim]
    torch.testing.assert_close(average.basis @ average.basis.T, torch.eye(rank), atol=1e-5, rtol=0)
    # the same subspace (projectors agree)
    torch.testing.assert_close(average.basis.T @ average.basis, top.T @ top, atol=1e-4, rtol=0)
    finder = average.products
    V = average.basis
    blocks = []
    d = torch.randn(5, dim, generator=torch.Generator().manual_seed(1))
    for j, G in enumerate(pools, start=1):
        wrapped = average.wrap(lambda v, G=G: v @ G)
        blocks.append(V @ G @ V.T)
        mean = torch.stack(blocks).mean(0)
        # inside span(V): the mean of the pools so far; the rest of G_j unchanged
        torch.testing.assert_close(V @ wrapped(V.clone()).T, mean, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(wrapped(d.clone()), d @ G + (d @ V.T) @ (mean - blocks[-1]) @ V, atol=1e-4, rtol=1e-5)
        assert average.products == finder + rank * j
    restored = CurvatureAverage.from_state(average.state_dict(), torch.device("cpu"))
    assert restored.count == 4 and restored.products == average.products and restored.to_json() == average.to_json()
    torch.testing.assert_close(restored.wrap(lambda v: v @ pools[0])(d.clone()), average.wrap(lambda v: v @ pools[0])(d.clone()))


def test_the_rank_is_capped_at_the_parameter_count():
    pools = _pools(1, 5)
    average = CurvatureAverage.of(lambda v: v @ pools[0], 5, 32, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert average.rank == 5


@pytest.mark.parametrize("bad", [-1, 2.5, "32", True])
def test_a_bad_averaged_rank_is_a_clear_error(tmp_path, bad):
    with pytest.raises(MisconfigurationException, match="averaged_rank must be an int >= 0"):
        AttributionCallback(tmp_path / "r", mode="online", averaged_rank=bad)
