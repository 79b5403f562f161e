"""The linear readout along layer-output bases (:mod:`lightning_attr.basis_readout`) gives the scores of the definition
(one ``torch.func.jvp`` per source) and of the explicit target (each query's gradient, by autograd here, times the
responses) on Linear, Conv1d and Conv2d networks, for one query and a batch; and it hands the query back to the other
paths where it does not apply (an unhandled parameter, a weight used outside its layer, more basis tangents than
sources, a layout whose batch is not the first dimension)."""

from __future__ import annotations

import pytest
import torch
from conftest import blobs
from test_attributor import _by_hand, runs  # noqa: F401  (runs: the fixture of two fitted runs)
from test_readout_layers import _Tied
from torch import nn
from torch.func import jvp

import lightning_attr.basis_readout as basis_readout
from lightning_attr import ResponseStore
from lightning_attr.codecs import StreamedResponses
from lightning_attr.functional import functional_view
from lightning_attr.models import CNN, CNN1d, Classifier
from lightning_attr.readout import score_sources, split_for


class _Twice(nn.Module):
    """One Linear called twice per forward, a head without bias and a Linear whose bias is frozen."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(6, 6)
        self.shared = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3, bias=False)
        self.first.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(torch.tanh(self.first(x)))))))


class _Convolutions(nn.Module):
    """Conv2d with padding 'same' and an even kernel (padded more on the right), dilation, no bias; Conv1d 'valid'
    with stride; a Linear on a sequence of positions ([B, L, C] rows)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(1, 3, (2, 4), padding="same", dilation=(1, 2), bias=False)
        self.conv1d = nn.Conv1d(3, 4, 3, stride=2, padding="valid")
        self.rows = nn.Linear(4, 2)
        self.head = nn.Linear(2 * 15, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv2d(x.view(-1, 1, 4, 8)))  # [B, 3, 4, 8]
        h = torch.relu(self.conv1d(h.flatten(2)))  # [B, 4, 15]
        return self.head(torch.tanh(self.rows(h.transpose(1, 2))).flatten(1))


class _SequenceFirst(nn.Module):
    """A Linear applied to [L, B, C]: its output's first dimension is not the batch (read along its output's basis:
    more weights than output numbers)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(3, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.view(x.shape[0], 2, 3).transpose(0, 1)  # [L = 2, B, 3]
        return self.head(torch.tanh(self.inner(seq)).mean(0))


def _data(d: int):
    return lambda n: blobs(n=n, d=d, classes=3, seed=4)


MODELS = {  # name: (network, features); "in-place": an activation overwrites a layer's output
    "linear": (lambda: nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)), 6),
    "in-place": (lambda: nn.Sequential(nn.Linear(6, 16), nn.LeakyReLU(0.1, inplace=True), nn.Linear(16, 3)), 6),
    "conv2d": (lambda: CNN((1, 8, 8), 3, channels=(4, 6)), 64),
    "conv1d": (lambda: CNN1d([40], 3, channels=(4, 6)), 40),
    "twice": (_Twice, 6),
    "convolutions": (_Convolutions, 32),
}


def _tangents(model: Classifier, x: torch.Tensor) -> tuple[int, int]:
    """Per query, the tangents of the basis path: per layer the fewer of its trainable parameters and its output
    numbers (all its calls); and how many layers take their parameters' basis."""
    numbers: dict[nn.Module, int] = {}
    hooks = [m.register_forward_hook(lambda m, _i, out: numbers.update({m: numbers.get(m, 0) + out[0].numel()}))
             for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]  # fmt: skip
    model(x[:1])
    for hook in hooks:
        hook.remove()
    weights = {m: sum(p.numel() for p in m.parameters() if p.requires_grad) for m in numbers}
    return sum(min(weights[m], numbers[m]) for m in numbers), sum(weights[m] <= numbers[m] for m in numbers)


def _model(name: str) -> Classifier:
    torch.manual_seed(0)
    return Classifier(MODELS[name][0]()).eval()


def _definition(fm, theta, responses, batch):
    f = lambda th: fm.measurement(th, batch)  # noqa: E731
    return torch.stack([jvp(f, (theta,), (r,))[1] for r in responses]).T


def _explicit(fm, theta, responses, batch):
    """The explicit target: each query's gradient (autograd) times the responses."""
    rows = []
    for q in range(batch[0].shape[0]):
        th = theta.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(fm.measurement(th, (batch[0][q : q + 1], batch[1][q : q + 1]))[0], th)
        rows.append(g)
    return torch.stack(rows) @ responses.T


def _served(monkeypatch) -> list:
    """The batch sizes the basis path serves from now on (a ``None``: it handed the batch to the other paths); for
    several members read in the same passes, ``(members, batch size)``."""
    served = []
    original = basis_readout.member_gradients

    def spy(model, thetas, batch, *args, **kwargs):
        out = original(model, thetas, batch, *args, **kwargs)
        size = batch[0].shape[0]
        served.append(None if out is None else size if thetas.shape[0] == 1 else (thetas.shape[0], size))
        return out

    monkeypatch.setattr(basis_readout, "member_gradients", spy)
    monkeypatch.setattr("lightning_attr.readout.member_gradients", spy)
    return served


@pytest.fixture
def taken(monkeypatch):
    """:func:`_served`, with a pass costing nothing beyond its tangents (``PASS_FLOATS = 0``): the path serves while
    its tangents are fewer than ``S``."""
    monkeypatch.setattr(basis_readout, "PASS_FLOATS", 0.0)
    return _served(monkeypatch)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_basis_readout_gives_the_definition_and_the_explicit_target(name, taken):
    model = _model(name)
    batch = _data(MODELS[name][1])(5)
    tangents, by_parameters = _tangents(model, batch[0])
    assert (by_parameters == 0) == (name in ("linear", "in-place", "twice"))  # both bases are exercised
    with functional_view(model) as (fm, theta):
        sources = tangents + 4  # the basis path serves while its tangents per query are fewer than S
        responses = 1e-2 * torch.randn(sources, theta.numel(), generator=torch.Generator().manual_seed(1))
        expected = _definition(fm, theta, responses, batch)
        torch.testing.assert_close(_explicit(fm, theta, responses, batch), expected, rtol=1e-4, atol=1e-6)
        tol = {"rtol": 1e-4, "atol": 1e-5 * float(expected.abs().max())}
        for queries, rows in ((batch, slice(None)), (tuple(t[:1] for t in batch), slice(0, 1))):
            for given in (responses, split_for(responses, fm)):
                for chunk in (None, 7):
                    torch.testing.assert_close(score_sources(fm, theta, given, queries, chunk_size=chunk), expected[rows], **tol)
            # the same as the layer readout, the gradient readout and vmap(jvp), which it replaces
            basis = score_sources(fm, theta, responses, queries)
            for other in ({"basis": False}, {"layers": False}, {"kind": "gradient"}):
                torch.testing.assert_close(score_sources(fm, theta, responses, queries, **other), basis, **tol)
    # in-place too: the tangents are added to a layer's output (a new tensor), so the activation overwrites that sum and
    # neither the captured output nor a tangent shared with another query
    assert 1 in taken and 5 in taken and None not in taken


def test_more_tangents_than_sources_take_the_other_paths(taken):
    model = _model("conv1d")
    batch = _data(40)(3)
    with functional_view(model) as (fm, theta):
        sources = _tangents(model, batch[0])[0]
        responses = 1e-2 * torch.randn(sources, theta.numel(), generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(score_sources(fm, theta, responses, batch), _definition(fm, theta, responses, batch))
    assert taken == [None]


class _BiasElsewhere(nn.Module):
    """A Linear whose bias is also read outside its forward."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * self.inner.bias.sum()


@pytest.mark.parametrize(
    "net, served",
    [
        (lambda: _BiasElsewhere(), [None, None]),  # the capture pass sees the bias outside its layer
        (lambda: _SequenceFirst(), [None, 1]),  # batched: not the first dimension; one query: any layout
        (lambda: nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3)), []),  # LayerNorm: not covered
    ],
    ids=["bias-elsewhere", "sequence-first", "layernorm"],
)
def test_the_basis_path_hands_back_what_it_does_not_cover(net, served, taken):
    torch.manual_seed(0)
    model = Classifier(net()).eval()
    x, y = _data(6)(3)
    with functional_view(model) as (fm, theta):
        responses = 1e-2 * torch.randn(80, theta.numel(), generator=torch.Generator().manual_seed(1))
        for batch in ((x, y), (x[:1], y[:1])):
            expected = _definition(fm, theta, responses, batch)
            torch.testing.assert_close(score_sources(fm, theta, responses, batch), expected, rtol=1e-4, atol=1e-7)
    assert taken == served


@pytest.mark.parametrize("pass_macs, served", [(0.0, [None, 8]), (basis_readout.PASS_MACS, [1, 8])])
def test_a_pass_costs_as_many_activation_numbers_as_PASS_FLOATS(monkeypatch, pass_macs, served):
    """The 6-16-3 MLP reads 16 + 3 tangents per query, 6 + 16 + 16 + 3 = 41 activation numbers per query (the handled
    layers' inputs and outputs). With passes that cost nothing (``PASS_MACS = 0``) the plan reads them in 2 passes
    (the 16 output tangents of the first layer cost 3 x 17 multiply-adds and outputs each from there, the head's 3
    nothing): against 2,000 sources the second pass (1e5 / 41 = 2,439 numbers' worth) does not pay for one query, and
    does for 8 (19 + 1e5 / 328 = 324 < 2,000). At the default ``PASS_MACS`` one pass carries all 19 (3 x 51 more
    multiply-adds per query than 2 passes), and one query takes the bases too."""
    monkeypatch.setattr(basis_readout, "PASS_MACS", pass_macs)
    taken = _served(monkeypatch)
    model = _model("linear")
    with functional_view(model) as (fm, theta):
        responses = 1e-2 * torch.randn(2000, theta.numel(), generator=torch.Generator().manual_seed(1))
        for n in (1, 8):
            batch = _data(6)(n)
            torch.testing.assert_close(score_sources(fm, theta, responses, batch), score_sources(fm, theta, responses, batch, layers=False))
    assert basis_readout.PASS_FLOATS == 1e5 and taken == served


def test_attribute_reads_a_trajectory_ensemble_along_the_bases(runs, taken):
    """``attribute()`` (two checkpoints: a paired ensemble) takes the basis path, both members in the same passes, and
    gives the hand-computed ensemble of ``vmap(jvp)`` scores, for a batch and for one query."""
    (model, path), _ = runs[0]
    xq, yq = runs[1]
    store = ResponseStore.load(path)
    for x, y in ((xq, yq), (xq[:1], yq[:1])):
        expected = _by_hand(model, [(store, "final", (x, y)), (store, "epoch=2", (x, y))])
        torch.testing.assert_close(model.attribute((x, y), responses=path), expected, rtol=1e-4, atol=1e-7)
    assert taken == [(2, 6), (2, 1)]


def test_a_streamed_member_reads_the_bases_once_for_all_its_shards(taken):
    model = _model("conv1d")
    x, y = _data(40)(4)
    with functional_view(model) as (fm, theta):
        responses = 1e-2 * torch.randn(200, theta.numel(), generator=torch.Generator().manual_seed(1))
        shards = [(torch.arange(s, min(s + 70, 200)), responses[s : s + 70]) for s in range(0, 200, 70)]
        streamed = StreamedResponses(lambda: iter(shards[::-1]), 200, theta.device)
        for batch in ((x, y), (x[:1], y[:1])):
            expected = _definition(fm, theta, responses, batch)
            torch.testing.assert_close(streamed.scores(fm, theta, batch, "linear", 50), expected, rtol=1e-4, atol=1e-7)
    assert taken == [4, 1]  # once per query batch, not per shard


class _ReadsActivations(nn.Module):
    """A forward whose Python reads an activation's value (``float(...)``): ``vmap`` over members refuses it."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inner(x))
        return self.head(h * 2 if float(h.abs().max()) > 0.5 else h)


def _autograd_gradients(fm, thetas, batch) -> torch.Tensor:
    """``Tensor[E, Q, P]``: each query's gradient at each member's parameters, by autograd (the reference)."""
    out = []
    for theta in thetas:
        th = theta.clone().requires_grad_(True)
        out.append(torch.stack([torch.autograd.grad(fm.measurement(th, tuple(t[q : q + 1] for t in batch))[0], th)[0]
                                for q in range(batch[0].shape[0])]))  # fmt: skip
    return torch.stack(out)


@pytest.mark.parametrize("pass_macs", [0.0, float("inf")], ids=["a-pass-per-group", "one-pass"])
@pytest.mark.parametrize("name", ["conv1d", "conv2d", "twice", "convolutions", "reads-activations"])
def test_members_read_together_give_each_members_gradients(monkeypatch, name, pass_macs):
    """Three members (one architecture, other weights) read in the same passes, whatever the plan cuts them into (each
    group its own pass, or one pass for all), give each member's query gradients, for one query, four (members and
    queries vmapped together) and five (more than ``TOGETHER_MAX_QUERIES``: one member at a time): those of autograd and
    of each member read alone. A forward that reads an activation's value in Python cannot be vmapped over members: one
    query is read one member at a time; a batch (vmapped over its queries) takes the other paths."""
    monkeypatch.setattr(basis_readout, "PASS_MACS", pass_macs)
    together = []
    original = basis_readout._factors
    monkeypatch.setattr(basis_readout, "_factors", lambda model, thetas, *a: together.append(len(thetas)) or original(model, thetas, *a))
    torch.manual_seed(0)
    reads = name == "reads-activations"
    model = Classifier(_ReadsActivations()).eval() if reads else _model(name)
    batch = _data(6 if reads else MODELS[name][1])(5)
    assert basis_readout.TOGETHER_MAX_QUERIES == 4
    calls = {1: [3, 1, 1, 1] if reads else [3], 4: [3, 1] if reads else [3], 5: [1] if reads else [1, 1, 1]}
    with functional_view(model) as (fm, theta):
        layers = basis_readout.basis_layers(fm.module, fm.space)
        thetas = theta * (1 + 0.3 * torch.randn(3, theta.numel(), generator=torch.Generator().manual_seed(2)))
        for n, expected_calls in calls.items():
            queries = tuple(t[:n] for t in batch)
            together.clear()
            both = basis_readout.member_gradients(fm, thetas, queries, layers, num_sources=10**6, chunk_size=64)
            assert together == expected_calls
            if reads and n > 1:
                assert both is None
                continue
            expected = _autograd_gradients(fm, thetas, queries)
            tol = {"rtol": 1e-4, "atol": 1e-5 * float(expected.abs().max())}
            torch.testing.assert_close(both, expected, **tol)
            alone = [basis_readout.basis_gradients(fm, t, queries, layers, num_sources=10**6, chunk_size=64) for t in thetas]
            torch.testing.assert_close(both, torch.stack(alone), **tol)


@pytest.mark.parametrize("queries", [1, 4])
@pytest.mark.parametrize("name", ["conv1d", "twice"])
def test_members_query_factors_laid_out_at_once_hold_each_members_gradients(name, queries):
    """``member_query_factors(laid_out=True)`` lays out the query gradients of every member at once (one product per
    layer for all of them) and hands each member its rows (``QueryFactors.flat``): they equal that member's autograd
    gradients and what ``gradients()`` builds from the member's own factors."""
    model = _model(name)
    batch = tuple(t[:queries] for t in _data(MODELS[name][1])(queries))
    with functional_view(model) as (fm, theta):
        layers = basis_readout.basis_layers(fm.module, fm.space)
        thetas = theta * (1 + 0.3 * torch.randn(3, theta.numel(), generator=torch.Generator().manual_seed(2)))
        laid = basis_readout.member_query_factors(fm, thetas, batch, layers, chunk_size=64, laid_out=True)
        own = basis_readout.member_query_factors(fm, thetas, batch, layers, chunk_size=64)
        expected = _autograd_gradients(fm, thetas, batch)
    assert all(f.flat is not None for f in laid) and all(f.flat is None for f in own)
    tol = {"rtol": 1e-4, "atol": 1e-5 * float(expected.abs().max())}
    for e, (f, g) in enumerate(zip(laid, own)):
        torch.testing.assert_close(f.gradients(fm.space, queries, theta), expected[e], **tol)
        torch.testing.assert_close(f.gradients(fm.space, queries, theta), g.gradients(fm.space, queries, theta), **tol)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_planned_query_skips_the_capture_pass_and_gives_the_same_gradients(monkeypatch, name):
    """Single queries of one layout are planned once per number of members (one capture pass); the later ones record
    the layers' inputs in their first pass (spread over several vmapped calls here: 64 tangents per call) and give
    autograd's gradients, also at other weights of the same shapes."""
    captures = []
    original = basis_readout._captured
    monkeypatch.setattr(basis_readout, "_captured", lambda *args: captures.append(len(args[1])) or original(*args))
    model = _model(name)
    batch = _data(MODELS[name][1])(3)
    with functional_view(model) as (fm, theta):
        layers = basis_readout.basis_layers(fm.module, fm.space)
        thetas = theta * (1 + 0.3 * torch.randn(3, theta.numel(), generator=torch.Generator().manual_seed(2)))
        for members in (thetas, thetas[:1], 1.1 * thetas, 0.9 * thetas[1:2]):
            for q in range(3):
                query = tuple(t[q : q + 1] for t in batch)
                got = basis_readout.member_gradients(fm, members, query, layers, num_sources=10**6, chunk_size=64)
                expected = _autograd_gradients(fm, members, query)
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    assert len(captures) == 2  # one per number of members


class _Branches(_Tied):
    """A forward that branches on its input: ``inner`` runs again where the first feature is positive, and its weight
    is read outside its layer (tied) where the second is below -1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inner(x))
        if bool((x[..., 0] > 0).all()):
            h = torch.tanh(self.inner(h))
        if bool((x[..., 1] < -1).all()):
            h = h @ self.inner.weight
        return self.head(h)


def test_a_query_whose_forward_leaves_the_plan_is_read_as_if_unplanned(monkeypatch):
    """A planned query whose layers run otherwise than the plan's (a forward that branches on its data) is planned
    again from a capture pass; one that reads a covered weight outside its layer hands the query to the other paths."""
    captures = []
    original = basis_readout._captured
    monkeypatch.setattr(basis_readout, "_captured", lambda *args: captures.append(1) or original(*args))
    torch.manual_seed(0)
    model = Classifier(_Branches()).eval()
    plain, twice, foreign = torch.zeros(1, 6), torch.zeros(1, 6), torch.zeros(1, 6)
    plain[0, :2], twice[0, :2], foreign[0, :2] = torch.tensor([-0.5, 0.2]), torch.tensor([0.5, 0.2]), torch.tensor([-0.5, -2.0])
    label = torch.zeros(1, dtype=torch.long)
    with functional_view(model) as (fm, theta):
        layers = basis_readout.basis_layers(fm.module, fm.space)
        thetas = theta * (1 + 0.3 * torch.randn(3, theta.numel(), generator=torch.Generator().manual_seed(2)))
        for x, capture in ((plain, True), (plain, False), (twice, True), (twice, False), (foreign, None), (plain, True)):
            captures.clear()
            got = basis_readout.member_gradients(fm, thetas, (x, label), layers, num_sources=10**6, chunk_size=64)
            if capture is None:  # seen in the planned first pass: no capture pass needed to decline
                assert got is None and captures == []
                continue
            assert captures == ([1] if capture else [])
            expected = _autograd_gradients(fm, thetas, (x, label))
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("queries", [1, 5])
@pytest.mark.parametrize("bias", [True, False], ids=["biases", "no-bias"])
def test_factor_scores_equal_the_dense_responses_times_the_query_gradients(bias, queries):
    """Codec "factored"'s readout (eigen coordinates and the dense rest in one product, factored weights as ``(J U) (X
    V)``) equals its responses rebuilt dense times each query's autograd gradient: random orthonormal basis and
    coordinates (one source NaN), one weight factored with rank 2 and one kept dense; with biases (in the dense rest) or
    none."""
    from lightning_attr.factored import FactoredResponses
    from lightning_attr.lowrank import LowRankResponses

    torch.manual_seed(0)
    model = Classifier(nn.Sequential(nn.Linear(6, 8, bias=bias), nn.Tanh(), nn.Linear(8, 3, bias=bias)))
    x, y = blobs(n=queries, d=6, classes=3, seed=3)
    sources, k = 7, 5
    with functional_view(model) as (fm, theta):
        space = fm.space
        basis = torch.linalg.qr(torch.randn(space.size, k)).Q.T.contiguous()  # [k, P], orthonormal rows
        coordinates = torch.randn(sources, k)
        coordinates[4] = float("nan")
        factors = {"net.0.weight": (torch.randn(sources, 8, 2), torch.randn(sources, 6, 2))}
        rest = {n: torch.randn(sources, *s) for n, s in zip(space.names, space.shapes) if n not in factors}
        block = FactoredResponses(basis, torch.ones(k), 0.1, 2.0, LowRankResponses(space, factors, rest), coordinates=coordinates)
        layers = basis_readout.basis_layers(fm.module, space)
        query = basis_readout.query_factors(fm, theta, (x, y), layers, chunk_size=64)
        assert block.reads(query)
        got = block.factor_scores(space, query, theta)
        expected = _autograd_gradients(fm, theta[None], (x, y))[0] @ block.to_dense().T
    assert got.shape == (queries, sources) and bool(got[:, 4].isnan().all()) and bool(got[:, [0, 1, 2, 3, 5, 6]].isfinite().all())
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * float(expected.nan_to_num(0.0).abs().max()), equal_nan=True)


@pytest.mark.parametrize("name", ["twice", "in-place", "conv1d", "convolutions"])
def test_spread_output_passes_leave_the_biases_without_tangents_and_give_the_same_gradients(monkeypatch, name):
    """Passes of output tangents whose tangents are many numbers per call (``SPREAD_NUMBERS`` set to 0: every one with
    several queries; a pass per layer group) carry no zero tangent on the biases; the members' query gradients still
    equal autograd's, read together (4 queries) and one by one (5). "in-place" (an activation that overwrites a layer's
    output) is refused by vmap without them: its passes run again with them."""
    monkeypatch.setattr(basis_readout, "SPREAD_NUMBERS", 0.0)
    monkeypatch.setattr(basis_readout, "PASS_MACS", 0.0)
    spread = []
    original = basis_readout._tangents_spread
    monkeypatch.setattr(basis_readout, "_tangents_spread", lambda *a: spread.append(original(*a)) or spread[-1])
    torch.manual_seed(0)
    model = _model(name)
    batch = _data(MODELS[name][1])(5)
    with functional_view(model) as (fm, theta):
        layers = basis_readout.basis_layers(fm.module, fm.space)
        thetas = theta * (1 + 0.3 * torch.randn(3, theta.numel(), generator=torch.Generator().manual_seed(2)))
        for n in (4, 5):
            queries = tuple(t[:n] for t in batch)
            spread.clear()
            got = basis_readout.member_gradients(fm, thetas, queries, layers, num_sources=10**6, chunk_size=64)
            assert True in spread or (name == "in-place" and n == 5)  # in-place: refused at 4, not tried again
            expected = _autograd_gradients(fm, thetas, queries)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def test_a_spread_pass_that_vmap_refuses_is_not_tried_again(monkeypatch):
    """The "in-place" network's spread pass (no bias tangents) is refused by vmap and run again with them; the refusal is
    kept on the module: the next batch runs the pass with bias tangents at once (one failed attempt per pass in all, none
    on the second batch), with autograd's gradients both times; another network of the same layout tries again."""
    monkeypatch.setattr(basis_readout, "SPREAD_NUMBERS", 0.0)
    attempts = []
    original = basis_readout._pass_jacobian

    def counting(*args, **kwargs):
        attempts.append(kwargs.get("bias_tangents"))
        return original(*args, **kwargs)

    monkeypatch.setattr(basis_readout, "_pass_jacobian", counting)
    batch = _data(MODELS["in-place"][1])(8)
    tried = []
    for model in (_model("in-place"), _model("in-place")):
        with functional_view(model) as (fm, theta):
            layers = basis_readout.basis_layers(fm.module, fm.space)
            for rows in (slice(0, 4), slice(4, 8)):
                queries = tuple(t[rows] for t in batch)
                attempts.clear()
                got = basis_readout.member_gradients(fm, theta[None], queries, layers, num_sources=10**6, chunk_size=64)
                tried.append(attempts.count(False))
                expected = _autograd_gradients(fm, theta[None], queries)
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    assert tried[0] >= 1 and tried[1] == 0 and tried[2] == tried[0] and tried[3] == 0
