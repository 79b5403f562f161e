"""Codec "factored"'s query side reads a folded bias with its weight (``[W | b] = U [V; 1]^T``), not as a dense row:
``(J U) (X V + 1)`` in the factors order, the rebuilt matrices with ``U 1`` below ``U V^T`` otherwise. Each block here
is random (orthonormal basis, coordinates with one NaN source, factors of rank 2 on every Linear / Conv weight) and its
scores must equal its responses rebuilt dense times each query's autograd gradient, in every contraction order: a fold
read twice, or not at all, or a bias that failed the agreement read as folded, changes them."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import blobs
from torch import nn

from lightning_attr import codecs, factored
from lightning_attr.basis_readout import basis_layers, query_factors
from lightning_attr.factored import FactoredResponses, factor_products, rebuilt_products
from lightning_attr.functional import functional_view
from lightning_attr.lowrank import LowRankResponses
from lightning_attr.models import Classifier


class _Conv1dNet(nn.Module):
    """12 samples -> Conv1d 1->2 k3 (10 positions: read along its 8 parameters) -> Conv1d 2->4 k3 s2 (4 positions:
    read along its outputs) -> Linear 16 -> 3."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2, self.fc = nn.Conv1d(1, 2, 3), nn.Conv1d(2, 4, 3, stride=2), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.conv2(torch.tanh(self.conv1(x.unsqueeze(1))))).flatten(1))


class _Conv2dNet(nn.Module):
    """4x4 images -> Conv2d 1->3 3x3 p1 (16 positions) -> Conv2d 3->4 3x3 s2 p1 (2x2 positions) -> Linear 16 -> 3."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2, self.fc = nn.Conv2d(1, 3, 3, padding=1), nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.conv2(torch.tanh(self.conv1(x.view(-1, 1, 4, 4))))).flatten(1))


def _mlp(bias: bool = True, bias_first: bool = False) -> nn.Module:
    """Linear 6 -> 8 -> Tanh -> Linear 8 -> 3; ``bias_first``: the second layer's weight registered after its bias
    (so in ``P`` the bias comes before the weight)."""
    net = nn.Sequential(nn.Linear(6, 8, bias=bias), nn.Tanh(), nn.Linear(8, 3, bias=bias))
    if bias_first:
        weight = net[2].weight
        del net[2].weight
        net[2].weight = weight
    return net


NETS = {  # name: (network, input width, weights factored)
    "mlp": (_mlp, 6, ("net.0.weight", "net.2.weight")),
    "mlp-no-bias": (lambda: _mlp(bias=False), 6, ("net.0.weight", "net.2.weight")),
    "mlp-bias-before-weight": (lambda: _mlp(bias_first=True), 6, ("net.0.weight", "net.2.weight")),
    "conv1d": (_Conv1dNet, 12, ("net.conv1.weight", "net.conv2.weight", "net.fc.weight")),
    "conv2d": (_Conv2dNet, 16, ("net.conv1.weight", "net.conv2.weight", "net.fc.weight")),
}


def _block(space, weights, sources: int, k: int, dense_bias: str | None = None) -> FactoredResponses:
    """A random block over ``space``: rank-2 factors for ``weights``, each of their biases folded (its rest ``U``
    summed over columns) but ``dense_bias`` (random, unlike ``U 1``: a bias that failed :func:`bias_agreement`)."""
    shapes = dict(zip(space.names, space.shapes))
    basis = torch.linalg.qr(torch.randn(space.size, k)).Q.T.contiguous()  # [k, P], orthonormal rows
    coordinates = torch.randn(sources, k)
    coordinates[3] = float("nan")  # an invalid source
    factors = {n: (torch.randn(sources, shapes[n][0], 2), torch.randn(sources, torch.Size(shapes[n][1:]).numel(), 2)) for n in weights}
    rest = {n: torch.randn(sources, *s) for n, s in shapes.items() if n not in factors}
    folded = {}
    for weight in weights:
        bias = weight.removesuffix("weight") + "bias"
        if bias in rest and bias != dense_bias:
            rest[bias], folded[bias] = factors[weight][0].sum(dim=2), weight
    return FactoredResponses(basis, torch.ones(k), 0.1, 2.0, LowRankResponses(space, factors, rest), folded, coordinates)


def _gradients(fm, theta, batch) -> torch.Tensor:
    """``Tensor[Q, P]``: each query's gradient of its measurement, by autograd (the reference)."""
    th = theta.clone().requires_grad_(True)
    return torch.stack([torch.autograd.grad(fm.measurement(th, tuple(t[q : q + 1] for t in batch))[0], th)[0] for q in range(batch[0].shape[0])])


ORDERS = ["factors", "rebuilt", "rebuilt-in-chunks"]


@pytest.mark.parametrize("queries", [1, 5])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("name", [*NETS, "mlp-bias-kept-dense"])
def test_a_folded_bias_is_read_with_its_weight_in_every_order(monkeypatch, name, order, queries):
    """factor_scores equals the responses rebuilt dense times autograd's query gradients, with each weight read by
    :func:`factor_products` (a weight read along its parameters: rebuilt), its kept rebuilt matrices, or those rebuilt a
    chunk at a time; the folded biases are not in the dense rest's rows (their numbers are read with the weights)."""
    net, width, weights = NETS[name.replace("-bias-kept-dense", "")]
    dense_bias = "net.2.bias" if name == "mlp-bias-kept-dense" else None
    monkeypatch.setattr(factored, "_factors_cheaper", lambda *a, **k: order == "factors")
    if order == "rebuilt-in-chunks":
        monkeypatch.setattr(codecs, "DEFAULT_MEMORY_BUDGET_MB", 0.0)
    torch.manual_seed(0)
    model = Classifier(net())
    batch = blobs(n=queries, d=width, classes=3, seed=4)
    with functional_view(model) as (fm, theta):
        block = _block(fm.space, weights, sources=7, k=5, dense_bias=dense_bias)
        query = query_factors(fm, theta, batch, basis_layers(fm.module, fm.space), chunk_size=64)
        assert block.reads(query)
        got = block.factor_scores(fm.space, query, theta)
        expected = _gradients(fm, theta, batch) @ block.to_dense().T
        kept = {n for n in block.gradients.rest if n not in block.folded_biases}
        assert block._source_rows[1].shape[0] == 5 + sum(block.gradients.rest[n][0].numel() for n in kept)
    assert bool(block.folded_biases) == (name != "mlp-no-bias") and (dense_bias is None or dense_bias not in block.folded_biases)
    assert bool(got[:, 3].isnan().all()) and bool(got[:, [0, 1, 2, 4, 5, 6]].isfinite().all())
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * float(expected.nan_to_num(0.0).abs().max()), equal_nan=True)


def test_self_influence_reads_the_folded_biases():
    """:meth:`FactoredResponses.paired` (self-influence: query ``i`` against source ``sources[i]``, through ``select``)
    reads the folded biases as :meth:`scores` does: the diagonal of the dense responses times the query gradients."""
    torch.manual_seed(1)
    model = Classifier(_Conv1dNet())
    batch = blobs(n=4, d=12, classes=3, seed=5)
    picked = torch.tensor([6, 0, 2, 5])
    with functional_view(model) as (fm, theta):
        block = _block(fm.space, NETS["conv1d"][2], sources=7, k=5)
        got = block.paired(fm, theta, batch, picked, "linear")
        expected = (_gradients(fm, theta, batch) * block.to_dense()[picked]).sum(dim=1)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def test_factor_products_and_rebuilt_products_with_the_ones_column():
    """``bias=True``: both orders give ``<[J^T X | J^T 1], [U V^T | U 1]>`` (the weight and its bias), of ``Q = 3``
    queries of 4 rows and 6 sources of rank 2, as the explicit products."""
    torch.manual_seed(2)
    j, x, u, v = torch.randn(3, 4, 5), torch.randn(3, 4, 7), torch.randn(6, 5, 2), torch.randn(6, 7, 2)
    weight = j.transpose(1, 2) @ x  # [Q, out, in]
    sources = u @ v.transpose(1, 2)  # [S, out, in]
    expected = torch.einsum("qoi,soi->qs", weight, sources) + j.sum(dim=1) @ u.sum(dim=2).T
    torch.testing.assert_close(factor_products(j, x, u, v, bias=True), expected, rtol=1e-5, atol=1e-5)
    flat = torch.cat([weight.flatten(1), j.sum(dim=1)], dim=1)  # [Q, out x in + out]
    torch.testing.assert_close(rebuilt_products(flat, u, v, bias=True), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(factor_products(j, x, u, v), torch.einsum("qoi,soi->qs", weight, sources), rtol=1e-5, atol=1e-5)


def test_a_block_without_folded_biases_reads_them_dense():
    """A format 3 block (every bias dense, none folded) scores as the same block with the biases folded."""
    torch.manual_seed(3)
    model = Classifier(_mlp())
    batch = blobs(n=3, d=6, classes=3, seed=6)
    with functional_view(model) as (fm, theta):
        block = _block(fm.space, NETS["mlp"][2], sources=7, k=5)
        query = query_factors(fm, theta, batch, basis_layers(fm.module, fm.space), chunk_size=64)
        folded, dense = block.factor_scores(fm.space, query, theta), replace(block, folded_biases={}).factor_scores(fm.space, query, theta)
    torch.testing.assert_close(folded, dense, rtol=1e-5, atol=1e-6, equal_nan=True)
