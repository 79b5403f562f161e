"""Codec "factored" with convolutions: a Conv1d / Conv2d weight's per-example gradient ``sum_t delta_t patch_t^T`` (its
output positions ``t``) kept as factors where that is smaller than the weight. Scores equal codec "dense"'s (same fit)
to float32 rounding and the explicit damped-GGN target where the eigenspace is the whole space; the layer bases' query
factors, the forward hooks without them, and the rebuilt order agree; a corrupted conv factor is refused."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import blobs, exact_influence, fit
from test_factored import _close, _fit_codecs
from torch import nn

from lightning_attr import AttributionCallback, ResponseStore, codecs
from lightning_attr.basis_readout import basis_layers, query_factors
from lightning_attr.factored import FactoredResponses, check_factors, factor_products, factored_numbers, rebuilt_products
from lightning_attr.functional import functional_view
from lightning_attr.layer_readout import weight_rows
from lightning_attr.models import Classifier
from lightning_attr.parameters import ParameterSpace


class _Conv1dNet(nn.Module):
    """16 samples -> Conv1d 1->3 k3 s2 p1 (8 positions: dense) -> Conv1d 3->w k5 s2 p2 (4 positions: 4 x (w + 15) <
    15 w, factored) -> Linear 4 w -> 3 (factored). w = 12: P = 351; w = 32: P = 911."""

    def __init__(self, width: int = 12) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv1d(1, 3, 3, stride=2, padding=1), nn.Conv1d(3, width, 5, stride=2, padding=2)
        self.fc = nn.Linear(4 * width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.tanh(self.conv1(x.unsqueeze(1)))))
        return self.fc(h.flatten(1))


class _Conv2dNet(nn.Module):
    """4x4 images -> Conv2d 1->3 3x3 p1 (16 positions: dense) -> Conv2d 3->16 3x3, stride 2, padding 2, dilation 2 (2x2
    positions: per source of 2 examples 8 x (16 + 27) = 344 < 432, factored) -> Linear 64 -> 3; P = 673."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 16, 3, stride=2, padding=2, dilation=2)
        self.fc = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.tanh(self.conv1(x.view(-1, 1, 4, 4)))))
        return self.fc(h.flatten(1))


def _classifier(net: type[nn.Module], **options):
    return lambda: Classifier(net(**options), lr=0.05, momentum=0.9, weight_decay=1e-3)


def test_factored_conv1d_equals_dense_and_the_exact_target(tmp_path, monkeypatch):
    x, y = blobs(n=96, d=16, classes=3, seed=20)
    xq, yq = blobs(n=6, d=16, classes=3, seed=21)
    # rank above P: the eigenspace is the whole space, so the scores are the exact target too
    model, dense, factored = _fit_codecs(tmp_path, _classifier(_Conv1dNet), x, y, epochs=2, rank=1000, checkpoint_epochs=None)
    store = ResponseStore.load(factored)
    entry = store.checkpoint_info("final")
    # conv2: its 4 output positions per example; conv1 (8 x (3 + 3) = 48 > 9) stays dense
    assert entry["factored"] == {"net.conv2.weight": [12, 15, 4], "net.fc.weight": [3, 48, 1]}
    # the coordinates derived, the factored layers' biases folded (U summed over positions); conv1's weight and bias dense
    assert entry["coordinates"] == "derived" and entry["folded_biases"] == {"net.conv2.bias": "net.conv2.weight", "net.fc.bias": "net.fc.weight"}
    assert entry["numbers_per_source"] == 4 * (12 + 15) + (3 + 48) + 9 + 3
    block = store.block("final")
    assert isinstance(block, FactoredResponses)
    assert torch.allclose(block.to_dense(), ResponseStore.load(dense).responses("final"), atol=1e-6)
    ours, expected = (model.attribute((xq, yq), responses=path) for path in (factored, dense))
    assert _close(ours, expected)
    assert _close(model.attribute((xq[:1], yq[:1]), responses=factored), expected[:1])  # Q = 1
    assert _close(ours, exact_influence(model, x, y, xq, yq, entry["damping"]), rel=1e-3)
    train = (x[:8], y[:8], torch.arange(8))
    assert _close(model.self_influence(train, responses=factored), model.self_influence(train, responses=dense))
    # the store round trip: a selection of sources holds the same factors and rebuilds the same rows
    picked = torch.tensor([5, 0, 77])
    assert torch.allclose(block.select(picked).to_dense(), block.to_dense()[picked], atol=1e-7)
    # the forward hooks (the path for networks the layer bases do not cover) read the same conv factors
    with functional_view(model) as (fm, theta):
        query = query_factors(fm, theta, (xq, yq), basis_layers(fm.module, fm.space), chunk_size=64)
        assert set(query.factors) == {"net.conv2.weight", "net.fc.weight"} and block.reads(query)  # conv1: its parameters
        # conv2's 4 x 4 x (12 + 15) numbers per query and source exceed its 180: rebuilt once and kept; without the
        # memory for that, rebuilt a chunk at a time (or its factors read, for one query)
        assert _close(block.scores(fm, theta, (xq, yq), "linear", 64), expected) and set(block._rebuilt_weights) == {"net.conv2.weight"}
        monkeypatch.setattr(codecs, "DEFAULT_MEMORY_BUDGET_MB", 0.0)
        for rows in (slice(0, 1), slice(None)):
            fresh = dataclasses.replace(block)  # nothing rebuilt yet
            assert _close(fresh.scores(fm, theta, (xq[rows], yq[rows]), "linear", 64), expected[rows]) and not fresh._rebuilt_weights
        hooked = block.eigen.scores(fm, theta, (xq, yq), "linear", 64) + block.gradients.scores(fm, theta, (xq, yq), "linear", 64)
    assert _close(hooked, expected)


def test_factored_conv2d_sources_of_two_examples_equal_dense_and_the_exact_target(tmp_path):
    x, y = blobs(n=80, d=16, classes=3, seed=22)
    xq, yq = blobs(n=5, d=16, classes=3, seed=23)
    groups = (torch.arange(80) // 2).tolist()
    model, dense, factored = _fit_codecs(tmp_path, _classifier(_Conv2dNet), x, y, epochs=2, rank=1000, checkpoint_epochs=None, sources=groups)
    entry = ResponseStore.load(factored).checkpoint_info("final")
    # 2 examples x 4 positions = rank 8 for conv2 (stride, padding and dilation as the readout unfolds them)
    assert entry["factored"] == {"net.conv2.weight": [16, 27, 8], "net.fc.weight": [3, 64, 2]}
    # each bias folded: U summed over the 2 examples' 4 positions (conv2) and the 2 examples (fc); conv1 stays dense
    assert entry["folded_biases"] == {"net.conv2.bias": "net.conv2.weight", "net.fc.bias": "net.fc.weight"}
    assert entry["numbers_per_source"] == 8 * (16 + 27) + 2 * (3 + 64) + 27 + 3
    ours, expected = (model.attribute((xq, yq), responses=path) for path in (factored, dense))
    assert ours.shape == (5, 40) and _close(ours, expected)
    exact = exact_influence(model, x, y, xq, yq, entry["damping"]).view(5, 40, 2).sum(dim=2)  # a source: its two examples
    assert _close(ours, exact, rel=1e-3)


def test_factor_products_orders_agree():
    """Both contraction orders of <J^T X, U V^T>: the factors' and the rebuilt matrices'."""
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(7, 12, 6, generator=g), torch.randn(7, 20, 6, generator=g)
    truth = lambda j, x: torch.einsum("qro,qri,soc,sic->qs", j, x, u, v)  # noqa: E731
    for queries in (1, 40):
        j, x = torch.randn(queries, 4, 12, generator=g), torch.randn(queries, 4, 20, generator=g)
        assert torch.allclose(factor_products(j, x, u, v), truth(j, x), rtol=1e-4, atol=1e-4)
        assert torch.allclose(rebuilt_products(j.transpose(1, 2) @ x, u, v), truth(j, x), rtol=1e-4, atol=1e-4)


def test_conv_weight_rows_rebuild_the_per_example_gradient():
    """weight_rows: sum_t delta_t patch_t^T is each example's conv weight gradient (autograd), Conv1d and Conv2d."""
    torch.manual_seed(0)
    for conv, x in ((nn.Conv1d(3, 5, 4, stride=3, padding=2, dilation=2), torch.randn(4, 3, 17)),
                    (nn.Conv2d(2, 4, (3, 2), stride=(2, 1), padding=(1, 0)), torch.randn(4, 2, 6, 5))):  # fmt: skip
        out = conv(x)
        delta = torch.randn_like(out)
        expected = torch.stack([torch.autograd.grad((conv(x[i : i + 1]) * delta[i : i + 1]).sum(), conv.weight)[0] for i in range(4)])
        d, patches = weight_rows(conv, delta, x, 4)
        assert d.shape[1] == out[0, 0].numel() == patches.shape[1]
        assert torch.allclose((d.transpose(1, 2) @ patches).view_as(expected), expected, atol=1e-5)


def test_check_factors_refuses_a_corrupted_conv_factor():
    torch.manual_seed(0)
    conv, x = nn.Conv1d(3, 12, 5, stride=2, padding=2), torch.randn(6, 3, 8)
    out = conv(x)
    delta = torch.randn_like(out)
    d, patches = weight_rows(conv, delta, x, 6)
    u, v = d.transpose(1, 2).contiguous(), patches.transpose(1, 2).contiguous()  # [6, 12, 4], [6, 15, 4]
    dense = {"w": torch.stack([torch.autograd.grad((conv(x[i : i + 1]) * delta[i : i + 1]).sum(), conv.weight)[0] for i in range(6)])}
    check_factors({"w": (u, v)}, dense, torch.ones(6, dtype=torch.bool))
    wrong = v.clone()
    wrong[3, 7, 2] += 0.05 * float(v.abs().max())  # one patch entry of one position of one source
    with pytest.raises(RuntimeError, match="'w' do not reproduce its per-source gradient"):
        check_factors({"w": (u, wrong)}, dense, torch.ones(6, dtype=torch.bool))


def test_factored_numbers_count_conv_positions():
    model = Classifier(_Conv1dNet(width=32))
    space = ParameterSpace.of(model)
    assert space.size == 911
    rows = {"net.conv1.weight": 8, "net.conv2.weight": 4, "net.fc.weight": 1}
    # conv1 dense (48 > 9), conv2 4 x 47 = 188 < 480, fc 131 < 384, biases 38
    assert factored_numbers(model, space, 64, rows) == 64 + 9 + 188 + 131 + 38
    # without the rows (no input seen): Linear layers once per example, convolutions dense
    assert factored_numbers(model, space, 64) == 64 + 9 + 480 + 131 + 38


def test_auto_picks_factored_on_a_cnn(tmp_path):
    """codec="auto" counts the convolution's positions from the training set's first example: the small CNN's
    factored numbers (rank 16: 16 + 366 = 382) are below P / 2 = 455.5 only with conv2 factored (674 dense)."""
    x, y = blobs(n=64, d=16, classes=3, seed=24)
    torch.manual_seed(0)
    model = _classifier(_Conv1dNet, width=32)()
    cb = AttributionCallback(tmp_path / "auto", rank=16, checkpoint_epochs=None, curvature_batch_size=64)
    fit(model, x, y, [cb], epochs=2)
    store = ResponseStore.load(cb.dirpath)
    assert cb.codec == "factored" and store.checkpoint_info("final")["factored"]["net.conv2.weight"] == [32, 15, 4]


class _UnsupportedConvNet(nn.Module):
    """A grouped convolution and a reflect-padded one (their weights stay dense), then a Linear head (factored)."""

    def __init__(self) -> None:
        super().__init__()
        self.grouped = nn.Conv1d(2, 4, 3, stride=2, padding=1, groups=2)
        self.reflect = nn.Conv1d(4, 8, 3, stride=2, padding=1, padding_mode="reflect")
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.reflect(torch.tanh(self.grouped(x.view(-1, 2, 8)))))
        return self.fc(h.flatten(1))


def test_grouped_and_reflect_padded_convolutions_stay_dense_and_equal_dense(tmp_path):
    x, y = blobs(n=64, d=16, classes=3, seed=25)
    xq, yq = blobs(n=4, d=16, classes=3, seed=26)
    model, dense, factored = _fit_codecs(tmp_path, _classifier(_UnsupportedConvNet), x, y, epochs=2, rank=32, checkpoint_epochs=None)
    assert ResponseStore.load(factored).checkpoint_info("final")["factored"] == {"net.fc.weight": [3, 16, 1]}
    ours, expected = (model.attribute((xq, yq), responses=path) for path in (factored, dense))
    assert _close(ours, expected)
