"""Peer adapters: shapes, the package's sign convention, source sums. Skipped where a peer is not installed (`make test`); `make test-peers` (CI) installs them and requires them."""

from __future__ import annotations

import pytest
import torch
from conftest import require_peer

from lightning_attr.evaluation import TrainingRecipe, train_many
from lightning_attr.evaluation.peers import sum_over_sources
from lightning_attr.models import mlp


def test_sum_over_sources_by_hand():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, -1.0, 1.0, 5.0]])
    groups = torch.tensor([1, 0, 1, 2])
    assert sum_over_sources(scores, groups).tolist() == [[2.0, 4.0, 4.0], [-1.0, 1.0, 5.0]]
    assert sum_over_sources(scores, groups, n_sources=4)[:, 3].abs().sum() == 0
    with pytest.raises(ValueError, match="source_ids"):
        sum_over_sources(scores, torch.tensor([0, 1]))


@pytest.fixture(scope="module")
def tiny():
    gen = torch.Generator().manual_seed(0)
    n, d, classes = 120, 8, 3
    w = torch.randn(d, classes, generator=gen)
    x = torch.randn(n, d, generator=gen)
    y = (x @ w).argmax(1)
    y[:6] = (y[:6] + 1) % classes  # a few mislabelled examples: large, self-proponent gradients

    def make(seed):
        torch.manual_seed(seed)
        return mlp(d, [16], classes)

    recipe = TrainingRecipe(epochs=15, batch_size=16)
    params = train_many(make, x, y, torch.ones(2, n, dtype=torch.bool), torch.tensor([0, 1]), recipe)
    models = []
    for i in range(2):
        m = make(0)
        m.load_state_dict({k: v[i] for k, v in params.items()})
        models.append(m.eval())
    return x, y, models


def _peers():
    from lightning_attr.evaluation import peers

    return [
        ("dattri", lambda: peers.DattriTRAK(2, proj_dim=64, regularization=1e-2)),
        ("dattri", lambda: peers.DattriIFCG(regularization=1e-2)),
        ("dattri", lambda: peers.DattriTracIn([1.0])),
        # proj_dim > 100: traker 0.3.2's BasicProjector loses its matrix after finalize_features when it fits in one block
        ("trak", lambda: peers.TraKerTRAK(1, proj_dim=128, lambda_reg=1e-2)),
        ("kronfluence", lambda: peers.KronfluenceEKFAC(damping_factor=1e-3)),
    ]


@pytest.mark.parametrize("index", range(len(_peers())))
def test_peer_scores_follow_the_package_convention(tiny, index):
    """A mislabelled training example used as the query is its own strongest proponent: positive self-score."""
    package, make_peer = _peers()[index]
    require_peer(package)
    x, y, models = tiny
    peer = make_peer()
    peer.setup(models[: peer.n_models], x, y)
    queries = torch.arange(6)
    scores = peer.score(x[queries], y[queries])
    assert scores.shape == (6, len(x)) and torch.isfinite(scores).all(), peer.name
    self_scores = scores[torch.arange(6), queries]
    assert (self_scores > 0).all(), f"{peer.name}: self-scores {self_scores.tolist()} should be positive (proponents)"
    # and among the strongest proponents of the query
    rank = (scores > self_scores.unsqueeze(1)).sum(1)
    assert (rank < 5).float().mean() >= 0.5, f"{peer.name}: self ranks {rank.tolist()}"
    single = peer.score(x[:1], y[:1])
    assert single.shape == (1, len(x))
    floor, kept = _expected_storage_floor(peer, n_train=len(x)), peer.storage_bytes()
    assert kept >= floor if floor else kept == 0, f"{peer.name}: keeps {kept} bytes, expected {floor or 'none'}"


def _expected_storage_floor(peer, n_train: int) -> int:
    """Bytes a peer must keep between setup and queries: float32 projected features [n_train, proj_dim] per model
    (TRAK), the EK-FAC factors of the MLP's two Linear layers (covariances (in+1)^2 and out^2), or nothing
    (methods that recompute everything per query)."""
    name = type(peer).__name__
    if name in ("DattriTRAK", "TraKerTRAK"):
        return peer.config["n_models"] * n_train * peer.config["proj_dim"] * 4
    if name == "KronfluenceEKFAC":
        return 4 * sum((i + 1) ** 2 + o**2 for i, o in ((8, 16), (16, 3)))
    return 0
