"""Codec "factored": the spectral default's responses kept as eigen coordinates plus per-example gradient factors. Its
scores must equal codec "dense"'s (same fit, same eigenspace) to float32 rounding, and both the explicit damped-GGN
target where the eigenspace is the whole space."""

from __future__ import annotations

import pytest
import torch
from conftest import SkipsNonFiniteInputs, blobs, exact_influence, fit, small_mlp
from torch import nn

from lightning_attr import AttributionCallback, ResponseStore
from lightning_attr.factored import FactoredResponses, check_factors, example_slots
from lightning_attr.models import Classifier
from lightning_attr.store import StoreError


def _close(ours: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> bool:
    return bool(torch.allclose(ours, expected, rtol=rel, atol=rel * float(expected.abs().max())))


def _fit_codecs(tmp_path, make_model, x, y, epochs=4, **options):
    """The same fit (same initial weights and data order) with codec "dense" and "factored": ``(model, dense store,
    factored store)``."""
    paths = []
    for codec in ("dense", "factored"):
        torch.manual_seed(0)
        model = make_model()
        cb = AttributionCallback(tmp_path / codec, codec=codec, **options)
        fit(model, x, y, [cb], epochs=epochs)
        paths.append(cb.dirpath)
    return model, *paths


def test_factored_mlp_equals_dense_and_the_exact_target(tmp_path):
    x, y = blobs(n=120, d=6, classes=3, seed=4)
    xq, yq = blobs(n=12, d=6, classes=3, seed=5)
    # rank above P (6*24 + 24 + 24*3 + 3 = 243): the eigenspace is the whole space, so the target is exact too; a
    # small memory budget makes several blocks of sources
    model, dense, factored = _fit_codecs(tmp_path, lambda: small_mlp(6, 3, hidden=24), x, y, rank=1000, checkpoint_epochs=None, memory_budget_mb=0.02)
    store = ResponseStore.load(factored)
    entry = store.checkpoint_info("final")
    # one example per source: rank 1 per weight, 24 + 6 < 144 and 3 + 24 < 72 numbers: both factored
    assert entry["codec"] == "factored" and entry["factored"] == {"net.1.weight": [24, 6, 1], "net.3.weight": [3, 24, 1]}
    # the coordinates are derived from the factors and the basis, and each bias is its weight's U summed: not stored
    assert entry["coordinates"] == "derived" and entry["folded_biases"] == {"net.1.bias": "net.1.weight", "net.3.bias": "net.3.weight"}
    assert entry["numbers_per_source"] == (24 + 6) + (3 + 24)
    block = store.block("final")
    assert isinstance(block, FactoredResponses)
    assert torch.allclose(block.to_dense(), ResponseStore.load(dense).responses("final"), atol=1e-6)
    ours, expected = (model.attribute((xq, yq), responses=path) for path in (factored, dense))
    assert _close(ours, expected)
    exact = exact_influence(model, x, y, xq, yq, entry["damping"])
    assert _close(ours, exact, rel=1e-3)
    train = (x[:20], y[:20], torch.arange(20))
    paired = model.self_influence(train, responses=factored)
    assert _close(paired, model.attribute((x[:20], y[:20]), responses=factored)[:, :20].diagonal())
    assert _close(paired, model.self_influence(train, responses=dense))
    for readout in ("central", "step"):  # rebuilt as dense rows: the dense codec's readout
        ours, expected = (model.attribute((xq, yq), responses=path, readout=readout) for path in (factored, dense))
        assert _close(ours, expected, rel=1e-3), readout
        ours, expected = (model.self_influence(train, responses=path, readout=readout) for path in (factored, dense))
        assert _close(ours, expected, rel=1e-3), readout


def test_factored_ensemble_at_reduced_rank_equals_dense(tmp_path):
    """The default trajectory ensemble and rank='auto' (the eigenspace stops short of P): still the dense scores."""
    x, y = blobs(n=160, d=8, classes=3, seed=6)
    xq, yq = blobs(n=9, d=8, classes=3, seed=7)
    model, dense, factored = _fit_codecs(tmp_path, lambda: small_mlp(8, 3, hidden=32), x, y, epochs=10)
    store = ResponseStore.load(factored)
    assert len(store.checkpoints) == 3 and all(store.codec(c) == "factored" for c in store.checkpoints)
    assert store.checkpoint_info("final")["rank"] < sum(p.numel() for p in model.parameters())
    ours, expected = (model.attribute((xq, yq), responses=path) for path in (factored, dense))
    assert _close(ours, expected)
    one = model.attribute((xq[:1], yq[:1]), responses=factored)  # Q = 1
    assert _close(one, expected[:1])
    # the collapsed ensemble folds the responses rebuilt as dense rows: the dense store's fold
    ours, expected = (model.attribute((xq, yq), responses=path, ensemble="collapsed") for path in (factored, dense))
    assert _close(ours, expected)


class _Tiny2dCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x.view(-1, 1, 4, 4))).flatten(1))


def test_factored_cnn_keeps_convolutions_dense_and_equals_dense(tmp_path):
    x, y = blobs(n=96, d=16, classes=3, seed=8)
    xq, yq = blobs(n=6, d=16, classes=3, seed=9)
    make = lambda: Classifier(_Tiny2dCNN(), lr=0.05, momentum=0.9, weight_decay=1e-3)  # noqa: E731
    model, dense, factored = _fit_codecs(tmp_path, make, x, y, rank=1000, checkpoint_epochs=None)
    entry = ResponseStore.load(factored).checkpoint_info("final")
    # the convolution's 16 positions x (4 + 9) > 36 weights: stored dense (tests/test_factored_conv.py: where it is not)
    assert entry["factored"] == {"net.fc.weight": [3, 64, 1]}
    ours, expected = (model.attribute((xq, yq), responses=path) for path in (factored, dense))
    assert _close(ours, expected)
    exact = exact_influence(model, x, y, xq, yq, entry["damping"])
    assert _close(ours, exact, rel=1e-3)


def test_factored_source_groups_factor_each_member_and_equal_dense(tmp_path):
    """A source of 4 examples: rank 4 per factored weight where that is cheaper than the matrix, dense elsewhere."""
    x, y = blobs(n=120, d=6, classes=3, seed=10)
    xq, yq = blobs(n=6, d=6, classes=3, seed=11)
    groups = (torch.arange(120) // 4).tolist()
    model, dense, factored = _fit_codecs(tmp_path, lambda: small_mlp(6, 3, hidden=24), x, y, rank=64, checkpoint_epochs=None, sources=groups)
    entry = ResponseStore.load(factored).checkpoint_info("final")
    # first layer 24 x 6: 4 x (24 + 6) = 120 < 144, factored; last 3 x 24: 4 x 27 = 108 >= 72, dense
    assert entry["factored"] == {"net.1.weight": [24, 6, 4]}
    ours, expected = (model.attribute((xq, yq), responses=path) for path in (factored, dense))
    assert ours.shape == (6, 30) and _close(ours, expected)
    # a shard whose factors lost a column is refused by name, not read as zeros
    from safetensors.torch import load_file, save_file

    store = ResponseStore.load(factored)
    shard = store.path / store.checkpoint_info("final")["shards"][0]["file"]
    tensors = load_file(str(shard))
    tensors["net.1.weight@V"] = tensors["net.1.weight@V"][:, :, :-1].contiguous()
    save_file(tensors, str(shard))
    store._check_files = lambda ckpt: None  # the size check would refuse it first; the shape check must too
    with pytest.raises(StoreError, match=r"'net.1.weight@V' is \(30, 6, 3\), expected \(30, 6, 4\)"):
        store.block("final")


class _LayerNormNet(nn.Module):
    """A LayerNorm between the Linear layers: the layer bases do not cover it, so the readout takes the tangents."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(6, 16), nn.LayerNorm(16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))


def test_factored_without_layer_bases_reads_out_by_tangents_and_equals_dense(tmp_path):
    x, y = blobs(n=80, d=6, classes=3, seed=12)
    xq, yq = blobs(n=5, d=6, classes=3, seed=13)
    make = lambda: Classifier(_LayerNormNet(), lr=0.05, momentum=0.9, weight_decay=1e-3)  # noqa: E731
    model, dense, factored = _fit_codecs(tmp_path, make, x, y, rank=48, checkpoint_epochs=None)
    assert set(ResponseStore.load(factored).checkpoint_info("final")["factored"]) == {"net.fc1.weight", "net.fc2.weight"}
    ours, expected = (model.attribute((xq, yq), responses=path) for path in (factored, dense))
    assert _close(ours, expected)
    train = (x[:6], y[:6], torch.arange(6))
    assert _close(model.self_influence(train, responses=factored), model.self_influence(train, responses=dense))


def test_factored_non_finite_source_scores_nan_not_zero(tmp_path):
    x, y = blobs(n=48)
    x[5] = float("nan")
    model = SkipsNonFiniteInputs(small_mlp(6, 3).net)
    cb = AttributionCallback(tmp_path / "r", codec="factored", rank=32, checkpoint_epochs=None, curvature_batch_size=16)
    with pytest.warns(UserWarning, match="non-finite"):
        fit(model, x, y, [cb], epochs=2, batch_size=16)
    store = ResponseStore.load(cb.dirpath)
    assert store.checkpoint_info("final")["n_valid"] == 47
    scores = model.attribute((x[:3].nan_to_num(), y[:3]), responses=cb.dirpath)
    assert scores[:, 5].isnan().all() and scores[:, torch.arange(48) != 5].isfinite().all()


@pytest.mark.parametrize(
    "options", [{"mode": "online"}, {"curvature": "hessian"}, {"propagation": "neumann"}, {"propagation": "heavy_ball"}]
)
def test_factored_needs_the_spectral_end_mode_pipeline(options):
    with pytest.raises(Exception, match="codec='factored' stores the responses of propagation='spectral'.*codec='dense'"):
        AttributionCallback(codec="factored", **options)


def test_example_slots_number_each_sources_examples():
    slot, width = example_slots(torch.tensor([2, 0, 2, -1, 1, 2, 0]))
    assert slot.tolist() == [0, 0, 1, -1, 0, 2, 1] and width == 3


class _TiedNet(nn.Module):
    """``fc1``'s weight is used again outside its layer's call: its gradient is not the layer's factors."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc1(x))
        return self.fc2(torch.tanh(nn.functional.linear(h, self.fc1.weight)))


def test_factored_tied_weights_stay_dense_and_factors_missing_a_use_are_refused(tmp_path):
    x, y = blobs(n=60, d=6, classes=3, seed=14)
    make = lambda: Classifier(_TiedNet(), lr=0.05, momentum=0.9, weight_decay=1e-3)  # noqa: E731
    model, dense, factored = _fit_codecs(tmp_path, make, x, y, rank=32, checkpoint_epochs=None)
    assert ResponseStore.load(factored).checkpoint_info("final")["factored"] == {}  # the capture saw the second use
    ours, expected = (model.attribute((x[:5], y[:5]), responses=path) for path in (factored, dense))
    assert _close(ours, expected)
    # a use the forward pass does not show (the check after every block): factors that miss part of the gradient
    u, v = torch.randn(4, 3, 1), torch.randn(4, 6, 1)
    dense = {"w": u @ v.transpose(1, 2)}
    check_factors({"w": (u, v)}, dense, torch.ones(4, dtype=torch.bool))
    dense["w"][2] += 0.01 * dense["w"].abs().max()
    check_factors({"w": (u, v)}, dense, torch.tensor([True, True, False, True]))  # a non-finite source is not compared
    with pytest.raises(RuntimeError, match="'w' do not reproduce its per-source gradient.*codec='dense'"):
        check_factors({"w": (u, v)}, dense, torch.ones(4, dtype=torch.bool))
    # the check reads combinations of the rows: one entry of one source of many, 1% off, is still refused
    u, v = torch.randn(50, 8, 2), torch.randn(50, 5, 2)
    dense = {"w": u @ v.transpose(1, 2)}
    check_factors({"w": (u, v)}, dense, torch.ones(50, dtype=torch.bool))
    for source, row, column in ((37, 5, 3), (0, 0, 0), (49, 7, 4)):
        wrong = {"w": dense["w"].clone()}
        wrong["w"][source, row, column] += 0.01 * dense["w"].abs().max()
        with pytest.raises(RuntimeError, match="'w' do not reproduce"):
            check_factors({"w": (u, v)}, wrong, torch.ones(50, dtype=torch.bool))


def test_single_queries_reuse_the_members_parameters_and_read_changed_weights(tmp_path):
    """A single query of the factored ensemble lays the members' parameters out once (the attributor's stacked snapshots,
    the same tensor at every query) and reads the module's weights again once they change in place (strict=False: the
    last checkpoint is read at the live weights): the same scores as a cold copy of the module, not the earlier ones."""
    import copy

    from lightning_attr.attributor import cached_attributor

    x, y = blobs(n=160, d=8, classes=3, seed=6)
    xq, yq = blobs(n=3, d=8, classes=3, seed=7)
    torch.manual_seed(0)
    model = small_mlp(8, 3, hidden=32)
    cb = AttributionCallback(tmp_path / "factored", codec="factored")
    fit(model, x, y, [cb], epochs=10)
    assert len(ResponseStore.load(cb.dirpath).checkpoints) == 3
    first = model.attribute((xq[:1], yq[:1]), responses=cb.dirpath)
    stacked = cached_attributor(model, cb.dirpath)._last_stack[2]
    again = model.attribute((xq[:1], yq[:1]), responses=cb.dirpath)
    assert torch.equal(first, again)
    assert cached_attributor(model, cb.dirpath)._last_stack[2] is stacked  # the snapshots, stacked once
    assert model.__dict__["_basis_member_parameters"]["last"][0] is stacked  # and laid out per parameter once
    cold = copy.deepcopy(model)  # a copy starts with empty caches
    assert _close(cold.attribute((xq[:1], yq[:1]), responses=cb.dirpath), first)
    with torch.no_grad():
        model.net[1].weight.mul_(1.5)
        cold.net[1].weight.mul_(1.5)
    with pytest.raises(StoreError):  # strict: the module's weights are not the last checkpoint's any more
        model.attribute((xq[:1], yq[:1]), responses=cb.dirpath)
    changed = model.attribute((xq[:1], yq[:1]), responses=cb.dirpath, strict=False)
    assert not _close(changed, first)
    assert _close(changed, cold.attribute((xq[:1], yq[:1]), responses=cb.dirpath, strict=False))
