"""The Kronecker-factored eigenbasis (EK-FAC's, lightning_attr/kronecker.py) against explicit matrices on a tiny MLP."""

from __future__ import annotations

import pytest
import torch
from conftest import blobs, explicit_ggn
from torch import nn

from lightning_attr.evaluation.exact import ExactInfluence
from lightning_attr.kronecker import fit_basis, kronecker_scores, loss_factors, projected_ggn, subspace_scores
from lightning_attr.models import mlp
from lightning_attr.parameters import ParameterSpace


def _tiny(bias_last: bool = True) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x, y = blobs(n=60, d=5, classes=3)
    net = mlp(5, [7, 6], 3).double()
    if not bias_last:
        net[-1] = nn.Linear(6, 3, bias=False).double()
    opt = torch.optim.SGD(net.parameters(), lr=0.2)
    for _ in range(30):  # a few full-batch steps: a trained-ish point, softmax away from uniform
        opt.zero_grad()
        nn.functional.cross_entropy(net(x.double()), y).backward()
        opt.step()
    return net, x.double(), y


def _layout(net: nn.Module) -> tuple[list[str], list[torch.Size]]:
    return [n for n, _ in net.named_parameters()], [p.shape for p in net.parameters()]


def _explicit_rotation(basis, names, shapes) -> torch.Tensor:
    """``K: Tensor[P, P]`` built independently: per layer ``Q_G (x) Q_A`` (row-major ``[W | c]``) placed at the layer's
    parameters, so that the coordinates of a flat gradient ``g`` are ``K^T g``."""
    offsets, start = {}, 0
    for name, shape in zip(names, shapes):
        offsets[name] = start
        start += shape.numel()
    k = torch.zeros(start, start, dtype=torch.float64)
    column = 0
    for layer in basis.layers:
        out, width = layer.shape
        rows = []  # the parameter index of each entry (i, j) of [W | c], row-major
        for i in range(out):
            for j in range(width):
                has_bias_column = layer.bias is not None and j == width - 1
                rows.append(offsets[layer.bias] + i if has_bias_column else offsets[layer.weight] + i * (width - (layer.bias is not None)) + j)
        block = torch.kron(layer.out_basis, layer.in_basis)  # [(i, j), (a, b)]
        k[torch.tensor(rows), column : column + out * width] = block
        column += out * width
    return k


@pytest.mark.parametrize("bias_last", [True, False])
def test_coordinates_eigenvalues_and_scores_against_explicit_matrices(bias_last):
    net, x, y = _tiny(bias_last)
    names, shapes = _layout(net)
    basis = fit_basis(net, x, chunk_size=25)  # 3 chunks: the accumulation is exercised
    k = _explicit_rotation(basis, names, shapes)
    assert torch.allclose(k.T @ k, torch.eye(len(k), dtype=k.dtype), atol=1e-10)  # an orthonormal basis of R^P

    # the coordinates of each example's gradient, from its factors, equal its explicit gradient in the basis
    exact = ExactInfluence(net, x, y)
    gradients = exact.gradients(x, y)  # [n, P]
    coordinates = basis.coordinates(loss_factors(net, x, y))
    assert torch.allclose(coordinates, gradients @ k, atol=1e-10)
    assert torch.allclose(basis.gradient_coordinates(gradients, ParameterSpace.of(net)), coordinates, atol=1e-10)

    # EK-FAC's eigenvalues are the explicit GGN's diagonal in the basis (each layer's block), not K-FAC's products
    ggn = explicit_ggn(net, x)
    assert torch.allclose(basis.eigenvalues(), (k.T @ ggn @ k).diagonal(), rtol=1e-8, atol=1e-14)
    assert not torch.allclose(basis.eigenvalues(corrected=False), basis.eigenvalues(), rtol=1e-2)

    # at full k the scores are (1/n) g_q^T K diag(1/(lambda + damping)) K^T g_b, the explicit matrix
    damping = 0.01
    explicit = k @ torch.diag(1 / (basis.eigenvalues() + damping)) @ k.T
    assert torch.allclose(basis.explicit_inverse(damping, ParameterSpace.of(net)), explicit, rtol=1e-8, atol=1e-10)
    xq, yq = blobs(n=9, d=5, classes=3, seed=1)
    g_query = exact.gradients(xq.double(), yq)
    expected = g_query @ explicit @ gradients.T / len(x)
    got = kronecker_scores(basis.coordinates(loss_factors(net, xq.double(), yq)), coordinates, basis.eigenvalues(), damping, len(x))
    assert torch.allclose(got, expected, rtol=1e-8, atol=1e-12 * expected.abs().max())
    # an approximation of the exact damped-GGN influence: block-diagonal (it drops the curvature between layers), so
    # only roughly (Pearson 0.78 measured here, scores 2.1x the target's std), but correlated (a wrong sign fails)
    target = g_query @ torch.linalg.solve(ggn + damping * torch.eye(len(ggn), dtype=ggn.dtype), gradients.T) / len(x)
    assert torch.corrcoef(torch.stack([got.flatten(), target.flatten()]))[0, 1] > 0.6


def test_the_ggn_within_kronecker_directions_and_its_scores():
    net, x, y = _tiny()
    names, shapes = _layout(net)
    basis = fit_basis(net, x)
    k = _explicit_rotation(basis, names, shapes)
    ggn = explicit_ggn(net, x)
    mask = basis.top_coordinates(25)
    directions = basis.directions(mask, ParameterSpace.of(net))
    assert torch.allclose(directions, k[:, mask].T, atol=1e-12)
    curvature = projected_ggn(net, x, directions, chunk_size=25)  # 3 chunks
    assert torch.allclose(curvature, directions @ ggn @ directions.T, rtol=1e-8, atol=1e-14)

    # every direction: the exact damped-GGN influence (Rayleigh-Ritz over the whole space)
    everything = torch.arange(basis.num_coordinates)
    full = projected_ggn(net, x, basis.directions(everything, ParameterSpace.of(net)))
    coordinates = basis.coordinates(loss_factors(net, x, y))
    xq, yq = blobs(n=9, d=5, classes=3, seed=1)
    queries = basis.coordinates(loss_factors(net, xq.double(), yq))
    exact = ExactInfluence(net, x, y)
    g_query, g_train = exact.gradients(xq.double(), yq), exact.gradients(x, y)
    target = g_query @ torch.linalg.solve(ggn + 0.01 * torch.eye(len(ggn), dtype=ggn.dtype), g_train.T) / len(x)
    got = subspace_scores(queries, coordinates, full, 0.01, len(x))
    assert torch.allclose(got, target, rtol=1e-6, atol=1e-9 * target.abs().max())
    # fewer directions: the inverse within their span, D^T (D G D^T + damping)^-1 D
    part = subspace_scores(queries[:, mask], coordinates[:, mask], curvature, 0.01, len(x))
    inverse = directions.T @ torch.linalg.solve(directions @ ggn @ directions.T + 0.01 * torch.eye(25, dtype=ggn.dtype), directions)
    assert torch.allclose(part, g_query @ inverse @ g_train.T / len(x), rtol=1e-6, atol=1e-9 * part.abs().max())
    with pytest.raises(ValueError, match="damping must be > 0"):
        subspace_scores(queries, coordinates, full, -1.0, len(x))


def test_top_coordinates_and_truncated_scores():
    net, x, y = _tiny()
    basis = fit_basis(net, x)
    eigenvalues = basis.eigenvalues()
    mask = basis.top_coordinates(20)
    assert mask.shape == (20,) and torch.equal(mask, mask.sort().values)
    assert eigenvalues[mask].min() >= eigenvalues[torch.ones_like(eigenvalues, dtype=torch.bool).index_fill(0, mask, False)].max()
    weights = torch.arange(basis.num_coordinates, dtype=torch.float64)
    assert torch.equal(basis.top_coordinates(5, weights), torch.arange(basis.num_coordinates - 5, basis.num_coordinates))
    coordinates = basis.coordinates(loss_factors(net, x, y))
    full = kronecker_scores(coordinates, coordinates, eigenvalues, 0.01, len(x))
    part = kronecker_scores(coordinates[:, mask], coordinates[:, mask], eigenvalues[mask], 0.01, len(x))
    left = torch.ones(basis.num_coordinates, dtype=torch.bool).index_fill(0, mask, False)
    rest = kronecker_scores(coordinates[:, left], coordinates[:, left], eigenvalues[left], 0.01, len(x))
    assert torch.allclose(part + rest, full, atol=1e-12 * full.abs().max())
    for bad in (0, basis.num_coordinates + 1):
        with pytest.raises(ValueError, match="k must be in"):
            basis.top_coordinates(bad)
    with pytest.raises(ValueError, match="damping must be > 0"):
        kronecker_scores(coordinates, coordinates, eigenvalues, 0.0, len(x))


def test_networks_outside_the_scope_are_refused_by_name():
    x = torch.randn(8, 1, 6)
    conv = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"not covered: \['0.weight', '0.bias'\]"):
        fit_basis(conv, x)
    twice = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="called more than once"):
        fit_basis(nn.Sequential(twice, nn.Tanh(), twice), torch.randn(8, 3))
