"""The linear readout with Linear / Conv weight tangents applied as matrix products (:mod:`layer_readout`) gives the
scores of the definition, one ``torch.func.jvp`` per source, on every kind of module: handled layers, the generic
path for every other parameter (norms, embeddings, recurrent and attention layers), and the fallbacks (a handled
layer's weight used elsewhere, a layer called twice, grouped convolutions)."""

from __future__ import annotations

import pytest
import torch
from conftest import blobs
from test_layers import SequenceClassifier, _tokens
from torch import nn
from torch.func import jvp
from torch.nn import functional as F

import lightning_attr.layer_readout as layer_readout
from lightning_attr.codecs import DenseResponses
from lightning_attr.functional import functional_view
from lightning_attr.layer_readout import SplitResponses, handled_layers, layer_parameters
from lightning_attr.models import CNN, CNN1d, Classifier, TinyTransformer
from lightning_attr.readout import score_sources, split_for


class _Tied(nn.Module):
    """A Linear whose weight is also read outside its forward (a tied output layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inner(x))
        return self.head(h @ self.inner.weight)


class _TiedInList(_Tied):
    """The same tie, the weight handed to a torch call inside a list (the capture's check looks into containers)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inner(x))
        return self.head(h @ torch.cat([self.inner.weight], dim=0))


class _Twice(nn.Module):
    """One Linear called twice per forward (weight sharing across depth), no bias on the head."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


def _hooked() -> nn.Module:
    """A Linear whose output a forward hook rescales, and one whose forward was replaced on the instance: neither is
    handled (the weight tangent would miss the change)."""
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    net[0].register_forward_hook(lambda _m, _i, out: 2.0 * out)
    layer = net[2]
    net[2].forward = lambda x: F.linear(x, layer.weight, layer.bias) ** 2
    return net


def _image_net() -> nn.Module:  # 2D conv, BatchNorm, a grouped conv (generic path), unbatched-safe flatten
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3),
    )  # fmt: skip


def _layer_norm_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 3))


def _classifier(net: nn.Module) -> Classifier:
    model = Classifier(net).eval()
    for m in model.modules():  # non-trivial running statistics and affine parameters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0), m.weight.data.uniform_(0.5, 1.5)
    return model


def _tabular(n: int):
    return blobs(n=n, d=6, classes=3, seed=4)


def _images(n: int):
    return blobs(n=n, d=64, classes=3, seed=4)


def _signals(n: int):
    return blobs(n=n, d=40, classes=3, seed=4)


def _patches(n: int):
    return blobs(n=n, d=8, classes=3, seed=4)


MODELS = {  # name: (model, query batch, names of the handled layers' modules)
    "mlp": (lambda: _classifier(nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))), _tabular, {"net.0", "net.2"}),
    "cnn": (lambda: _classifier(CNN((1, 8, 8), 3, channels=(4, 6))), _images, {"net.features.0", "net.features.2", "net.head"}),
    "cnn1d": (lambda: _classifier(CNN1d([40], 3, channels=(4, 6))), _signals, {"net.features.0", "net.features.2", "net.head"}),
    "batchnorm-grouped": (lambda: _classifier(_image_net()), _images, {"net.1", "net.7"}),
    "layernorm": (lambda: _classifier(_layer_norm_mlp()), _tabular, {"net.0", "net.3"}),
    "transformer": (lambda: _classifier(TinyTransformer([8], 3, dim=8, heads=2, depth=1, patch=2)), _patches, None),
    "stock-transformer": (lambda: SequenceClassifier("transformer").eval(), lambda n: _tokens(n, seed=4), None),
    "gru": (lambda: SequenceClassifier("gru").eval(), lambda n: _tokens(n, seed=4), {"head"}),
    "twice": (lambda: _classifier(_Twice()), _tabular, {"net.shared", "net.head"}),
    "hooked": (lambda: _classifier(_hooked()), _tabular, {"net.4"}),
    "tied": (lambda: _classifier(_Tied()), _tabular, {"net.inner", "net.head"}),
    "tied-in-list": (lambda: _classifier(_TiedInList()), _tabular, {"net.inner", "net.head"}),
}  # fmt: skip


def _definition(fm, theta, responses, batch):
    f = lambda th: fm.measurement(th, batch)  # noqa: E731
    return torch.stack([jvp(f, (theta,), (r,))[1] for r in responses]).T


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_layer_readout_gives_the_scores_of_one_jvp_per_source(name):
    make, data, handled = MODELS[name]
    torch.manual_seed(0)
    model = make()
    batch = data(5)
    with functional_view(model) as (fm, theta):
        layers = handled_layers(model, fm.space)
        assert layers, "every model here has a handled layer"
        if handled is not None:
            assert {n for n, m in model.named_modules() if any(m is layer.module for layer in layers)} == handled
        responses = 1e-2 * torch.randn(23, theta.numel(), generator=torch.Generator().manual_seed(1))
        expected = _definition(fm, theta, responses, batch)
        tol = {"rtol": 1e-4, "atol": 1e-5 * float(expected.abs().max())}
        split = split_for(responses, fm)
        one = tuple(t[:1] for t in batch)  # a single query: the case the layer readout is for
        for queries, rows in ((batch, slice(None)), (one, slice(0, 1))):
            for chunk in (23, 4):
                got = layer_readout.linear_scores(fm, theta, split, queries, layers, chunk)
                if name.startswith("tied"):  # the inner weight is read outside its layer: handed over to vmap(jvp)
                    assert got is None
                else:
                    torch.testing.assert_close(got, expected[rows], **tol)
            # whichever path score_sources takes, from flat or split responses, and vmap(jvp) itself
            for given in (responses, split):
                torch.testing.assert_close(score_sources(fm, theta, given, queries), expected[rows], **tol)
            torch.testing.assert_close(score_sources(fm, theta, responses, queries, layers=False), expected[rows], **tol)
        # the other readouts and the gradient readout read the split responses too
        torch.testing.assert_close(score_sources(fm, theta, split, batch, "gradient"), expected, **tol)
        torch.testing.assert_close(
            score_sources(fm, theta, split, batch, "step"), score_sources(fm, theta, responses, batch, "step"), rtol=1e-4, atol=1e-6
        )


def test_the_layer_readout_serves_few_queries_and_vmap_many(monkeypatch):
    """The layer readout is taken while one source's handled weight tangents outnumber its activation tangents for
    the batch (the MLP 6-16-3: 16 * 6 + 3 * 16 = 144 weights; 16 + 16 + 3 leaf outputs and 3 outputs = 38 activation
    floats per query): 1 to 3 queries, not 4."""
    model = MODELS["mlp"][0]()
    taken = []
    original = layer_readout.linear_scores
    monkeypatch.setattr("lightning_attr.readout.linear_scores", lambda *a, **k: taken.append(a[3]) or original(*a, **k))
    with functional_view(model) as (fm, theta):
        responses = torch.randn(9, theta.numel())
        for n in (1, 3, 4, 40):
            score_sources(fm, theta, responses, _tabular(n))
    assert [batch[0].shape[0] for batch in taken] == [1, 3]


def test_split_responses_hold_every_number_once_and_give_the_flat_rows_back():
    model = MODELS["batchnorm-grouped"][0]()
    with functional_view(model) as (fm, theta):
        responses = torch.randn(11, theta.numel())
        split = split_for(responses, fm)
        names = layer_parameters(handled_layers(model, fm.space))
        assert set(split.blocks) == set(names) and all(b.is_contiguous() for b in split.blocks.values())
        assert split.rest.shape == (11, theta.numel() - sum(b[0].numel() for b in split.blocks.values()))
        torch.testing.assert_close(split.flat(), responses, rtol=0, atol=0)
        torch.testing.assert_close(split.flat(torch.tensor([3, 0])), responses[[3, 0]], rtol=0, atol=0)
        torch.testing.assert_close(split.rows(slice(2, 5)).flat(), responses[2:5], rtol=0, atol=0)
        g = torch.randn(4, theta.numel())
        torch.testing.assert_close(split.times(g), g @ responses.T)
        # shards in any order; a source never given stays NaN (not a plain 0)
        shards = [(torch.tensor([4, 1]), responses[[4, 1]]), (torch.tensor([0]), responses[[0]])]
        partial = SplitResponses.from_shards(shards, 11, fm.space, names)
        torch.testing.assert_close(partial.flat(torch.tensor([0, 1, 4])), responses[[0, 1, 4]], rtol=0, atol=0)
        assert partial.flat(torch.tensor([2])).isnan().all()
        # self-influence (paired) reads the split rows
        x, y = _images(3)
        block = DenseResponses(split)
        sources = torch.tensor([5, 2, 7])
        torch.testing.assert_close(block.paired(fm, theta, (x, y), sources, "linear"), DenseResponses(responses).paired(fm, theta, (x, y), sources, "linear"))


def test_split_responses_laid_out_for_other_layers_are_laid_out_again():
    model = MODELS["mlp"][0]()
    with functional_view(model) as (fm, theta):
        responses = torch.randn(7, theta.numel())
        other = SplitResponses.from_flat(responses, fm.space, ["net.0.weight", "net.0.bias"])
        again = split_for(other, fm)
        assert set(again.blocks) == {"net.0.weight", "net.2.weight"}
        torch.testing.assert_close(again.flat(), responses, rtol=0, atol=0)
        with pytest.raises(ValueError, match="split at other parameters"):
            layer_readout.linear_scores(fm, theta, other, _tabular(2), handled_layers(model, fm.space), 7)


def test_the_weight_tangent_of_a_convolution_is_the_convolution_with_each_weight():
    torch.manual_seed(0)
    cases = [  # batched (one convolution with n * out channels) and single inputs (patches times the weights)
        (nn.Conv1d(3, 5, 3, stride=2, padding=1), torch.randn(2, 3, 9)), (nn.Conv1d(3, 5, 3, stride=2, padding=1), torch.randn(1, 3, 9)),
        (nn.Conv1d(3, 5, 4, dilation=2, padding=3), torch.randn(3, 10)), (nn.Conv2d(3, 5, 3, dilation=2), torch.randn(3, 7, 7)),
        (nn.Conv2d(3, 5, (3, 2), stride=(2, 1), padding=(1, 0)), torch.randn(1, 3, 7, 6)), (nn.Conv3d(2, 3, 2), torch.randn(1, 2, 3, 3, 3)),
        (nn.Conv2d(3, 5, 3, padding="same"), torch.randn(1, 3, 5, 5)),
    ]  # fmt: skip
    for conv, x in cases:
        layer = layer_readout._Layer(conv, "weight")
        dw = torch.randn(4, *conv.weight.shape)
        got, dim = layer.weight_tangent(x, dw)
        got = got.movedim(dim, 0)
        fn = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}[type(conv)]
        expected = torch.stack([fn(x, dw[s], None, conv.stride, conv.padding, conv.dilation) for s in range(4)])
        torch.testing.assert_close(got, expected)
