"""Codec "factored"'s storage (format 4): the eigen coordinates are derived from the stored factors and the basis when
the store is read, and each factored layer's bias is its weight's ``U`` summed over columns (``[W | b] = U [V; 1]^T``),
so neither is stored. The scores must stay codec "dense"'s and the explicit damped-GGN target's; a format 3 store (both
stored) reads as before; a store whose manifest and shards disagree is refused."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
from conftest import blobs, exact_influence, fit
from safetensors.torch import load_file, save_file
from test_factored import _close, _fit_codecs
from torch import nn

from lightning_attr import AttributionCallback, ResponseStore
from lightning_attr import factored as factored_module
from lightning_attr.factored import COORDINATES, bias_agreement, eigen_coordinates
from lightning_attr.lowrank import LowRankResponses
from lightning_attr.models import Classifier
from lightning_attr.parameters import ParameterSpace
from lightning_attr.store import ShardWriter, StoreError


def _mlp(bias_last: bool = False, reuse_bias: bool = False):
    """6 -> Linear 24 (bias) -> tanh -> Linear 3 (bias only if ``bias_last``; ``reuse_bias``: its bias also added once
    more outside its call, so its gradient is not ``sum_t delta_t``). P = 240 (+3)."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(6, 24), nn.Linear(24, 3, bias=bias_last)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.fc2(torch.tanh(self.fc1(x)))
            return out + 0.5 * self.fc2.bias if reuse_bias else out

    return lambda: Classifier(Net(), lr=0.1, momentum=0.9, weight_decay=1e-3)


def _shard(store: ResponseStore, name: str = "final"):
    return store.path / store.checkpoint_info(name)["shards"][0]["file"]


def test_linear_with_and_without_bias_sources_of_two_fold_and_derive_exactly(tmp_path):
    """fc1 has a bias (folded), fc2 none; sources of 2 examples (rank 2 per weight): equal to dense and the exact target."""
    x, y = blobs(n=80, d=6, classes=3, seed=30)
    xq, yq = blobs(n=6, d=6, classes=3, seed=31)
    groups = (torch.arange(80) // 2).tolist()
    model, dense, factored = _fit_codecs(tmp_path, _mlp(), x, y, rank=1000, checkpoint_epochs=None, sources=groups, memory_budget_mb=0.02)
    store = ResponseStore.load(factored)
    entry = store.checkpoint_info("final")
    assert entry["factored"] == {"net.fc1.weight": [24, 6, 2], "net.fc2.weight": [3, 24, 2]}
    assert entry["folded_biases"] == {"net.fc1.bias": "net.fc1.weight"} and entry["coordinates"] == "derived"
    assert set(load_file(str(_shard(store)))) == {"net.fc1.weight@U", "net.fc1.weight@V", "net.fc2.weight@U", "net.fc2.weight@V"}
    assert entry["numbers_per_source"] == 2 * (24 + 6) + 2 * (3 + 24)
    assert torch.allclose(store.block("final").to_dense(), ResponseStore.load(dense).responses("final"), atol=1e-6)
    ours, expected = (model.attribute((xq, yq), responses=path) for path in (factored, dense))
    assert ours.shape == (6, 40) and _close(ours, expected)
    exact = exact_influence(model, x, y, xq, yq, entry["damping"]).view(6, 40, 2).sum(dim=2)
    assert _close(ours, exact, rel=1e-3)


def test_a_bias_used_outside_its_layer_stays_dense_and_equals_dense(tmp_path):
    """fc2's bias is added once more after the layer: its gradient is 1.5 x its U summed, so it is not folded."""
    x, y = blobs(n=60, d=6, classes=3, seed=32)
    xq, yq = blobs(n=5, d=6, classes=3, seed=33)
    model, dense, factored = _fit_codecs(tmp_path, _mlp(bias_last=True, reuse_bias=True), x, y, rank=1000, checkpoint_epochs=None)
    store = ResponseStore.load(factored)
    assert store.checkpoint_info("final")["folded_biases"] == {"net.fc1.bias": "net.fc1.weight"}
    assert "net.fc2.bias" in load_file(str(_shard(store)))
    ours, expected = (model.attribute((xq, yq), responses=path) for path in (factored, dense))
    assert _close(ours, expected)


class _OffsetClassifier(Classifier):
    """A 6-24-3 MLP plus a learned logit offset that is a parameter of the module itself, named like the shards' key of
    stored eigen coordinates: ``coordinates: Tensor[3]``, kept dense by codec "factored"."""

    def __init__(self) -> None:
        super().__init__(_mlp(bias_last=True)().net, lr=0.1, momentum=0.9, weight_decay=1e-3)
        self.coordinates = nn.Parameter(torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + self.coordinates


def test_a_parameter_named_coordinates_is_a_dense_rest_not_the_stored_eigen_coordinates(tmp_path):
    """Before: the end of the fit failed with a bare KeyError 'coordinates' (the block was read back as if its shards
    held eigen coordinates, and lost the parameter's gradients), with the default codec. Now its scores are codec
    "dense"'s, in float32 and in a half-precision store."""
    x, y = blobs(n=60, d=6, classes=3, seed=34)
    xq, yq = blobs(n=5, d=6, classes=3, seed=35)
    model, dense, factored = _fit_codecs(tmp_path, _OffsetClassifier, x, y, rank=1000, checkpoint_epochs=None)
    store = ResponseStore.load(factored)
    assert store.checkpoint_info("final")["coordinates"] == "derived" and COORDINATES in load_file(str(_shard(store)))
    expected = model.attribute((xq, yq), responses=dense)
    assert _close(model.attribute((xq, yq), responses=factored), expected)
    torch.manual_seed(0)
    half = _OffsetClassifier()
    cb = AttributionCallback(tmp_path / "half", codec="factored", rank=1000, checkpoint_epochs=None, store_dtype="float16")
    fit(half, x, y, [cb], epochs=4)
    assert _close(half.attribute((xq, yq), responses=cb.dirpath), expected, rel=5e-3)


def test_a_format_3_store_with_stored_coordinates_and_biases_reads_as_before(tmp_path):
    """The layout before format 4 (coordinates and every bias in the shards, no manifest fields for them), written by
    this code from the same block: its coordinates are read, not derived, and the scores are the format 4 store's."""
    x, y = blobs(n=60, d=6, classes=3, seed=34)
    xq, yq = blobs(n=5, d=6, classes=3, seed=35)
    model, _, factored = _fit_codecs(tmp_path, _mlp(bias_last=True), x, y, rank=64, checkpoint_epochs=None)
    new = ResponseStore.load(factored)
    assert new.checkpoint_info("final")["folded_biases"] == {"net.fc1.bias": "net.fc1.weight", "net.fc2.bias": "net.fc2.weight"}
    old_path = tmp_path / "format3"
    shutil.copytree(factored, old_path)
    block = new.block("final")

    def write_format3(coordinates: torch.Tensor) -> ResponseStore:
        """As format 3 wrote it: the shards of every tensor with a source index (ShardWriter), the basis as it is."""
        layout3 = replace(block, coordinates=coordinates, folded_biases={})
        writer = ShardWriter(old_path, "final", new.space, stem="factored")
        writer.add_encoded(torch.arange(new.n_sources), layout3.tensors())
        writer.flush()
        manifest = json.loads((old_path / "manifest.json").read_text())
        manifest["format_version"] = 3
        checkpoint = manifest["checkpoints"][0]
        checkpoint.update({**layout3.entry(), "shards": writer.shards})
        for key in ("folded_biases", "coordinates"):
            del checkpoint[key]
        (old_path / "manifest.json").write_text(json.dumps(manifest))
        return ResponseStore.load(old_path)

    marked = block.eigen.coordinates.clone()
    marked[0] += 1.0  # stored coordinates that are not the derived ones: the reader must take them as stored
    old = write_format3(marked)
    assert {COORDINATES, "net.fc1.bias", "net.fc2.bias", "__source_index__"} <= set(load_file(str(_shard(old))))
    read = old.block("final")
    assert torch.equal(read.eigen.coordinates, marked) and not read.derived_coordinates and not read.folded_biases
    assert torch.equal(read.gradients.rest["net.fc2.bias"], block.gradients.rest["net.fc2.bias"])
    write_format3(block.eigen.coordinates)
    ours, expected = (model.attribute((xq, yq), responses=path) for path in (old_path, factored))
    assert _close(ours, expected, rel=1e-5)


def test_a_factored_store_whose_manifest_and_shards_disagree_is_refused(tmp_path):
    x, y = blobs(n=40, d=6, classes=3, seed=36)
    _, _, factored = _fit_codecs(tmp_path, _mlp(bias_last=True), x, y, epochs=2, rank=64, checkpoint_epochs=None)
    store = ResponseStore.load(factored)
    manifest_file = store.path / "manifest.json"
    original = manifest_file.read_text()

    def edited(change) -> ResponseStore:
        manifest = json.loads(original)
        change(manifest["checkpoints"][0])
        manifest_file.write_text(json.dumps(manifest))
        return ResponseStore.load(store.path)

    # a bias folded into a weight that is not factored (or into one whose out does not match)
    broken = edited(lambda c: c["folded_biases"].update({"net.fc2.bias": "net.fc1.weight"}))
    with pytest.raises(StoreError, match=r"folds bias 'net.fc2.bias' into weight 'net.fc1.weight'.*damaged"):
        broken.block("final")
    broken = edited(lambda c: c.update(coordinates="approximate"))
    with pytest.raises(StoreError, match=r"coordinates='approximate'.*damaged"):
        broken.block("final")
    # the manifest says stored coordinates, the shard has none: refused by name, not derived or read as zeros
    broken = edited(lambda c: c.update(coordinates="stored"))
    with pytest.raises(StoreError, match=r"'coordinates' is missing, expected \(40, \d+\)"):
        broken.block("final")
    # a shard that still holds a folded bias: the shard and the manifest disagree
    manifest_file.write_text(original)
    shard = _shard(store)
    tensors = load_file(str(shard))
    tensors["net.fc2.bias"] = torch.zeros(40, 3)
    save_file(tensors, str(shard))
    store._check_files = lambda ckpt: None  # the size check would refuse it first; the layout check must too
    with pytest.raises(StoreError, match=r"\['net.fc2.bias'\] are not in checkpoint 'final''s layout"):
        store.block("final")


def test_eigen_coordinates_are_the_damped_filter_of_the_stored_gradients(monkeypatch):
    """Against ``diag(1/(sigma + lam) - gamma) V g_s`` with ``g_s`` the dense gradients over ``gamma``, in several chunks;
    an invalid source's NaN factors give a NaN row."""
    g = torch.Generator().manual_seed(0)
    space = ParameterSpace(("w", "b", "d"), ((5, 4), (5,), (3,)), ("float32",) * 3)
    u, v = torch.randn(7, 5, 2, generator=g), torch.randn(7, 4, 2, generator=g)
    u[3] = float("nan")
    rest = {"b": u.sum(dim=2), "d": torch.randn(7, 3, generator=g)}
    gradients = LowRankResponses(space, {"w": (u, v)}, rest)
    basis = torch.linalg.qr(torch.randn(space.size, 6, generator=g))[0].T  # [6, P], orthonormal rows
    sigma, lam, gamma = torch.linspace(3.0, 0.5, 6), 0.1, 0.4
    monkeypatch.setattr(factored_module, "_DERIVE_NUMBERS", 2 * space.size)  # two sources per chunk
    ours = eigen_coordinates(basis, sigma, lam, gamma, gradients)
    dense = gradients.to_dense() / gamma
    expected = (dense @ basis.T) * (1 / (sigma + lam) - gamma)
    valid = torch.arange(7) != 3
    assert torch.allclose(ours[valid], expected[valid], atol=1e-5) and bool(ours[3].isnan().all())
    assert bias_agreement({"w": (u, v)}, {"b": rest["b"]}, valid, {"b": "w"}).tolist() == [True]
    wrong = rest["b"].clone()
    wrong[5, 2] += 0.5  # one source's bias entry no longer its U summed
    assert bias_agreement({"w": (u, v)}, {"b": wrong}, valid, {"b": "w"}).tolist() == [False]


def test_the_simulation_writes_a_block_without_deriving_its_coordinates_and_a_reader_derives_them_once(tmp_path, monkeypatch):
    """The store does not keep the eigen coordinates (format 4), so the simulation, which only writes its block, never
    derives them; a block read from the store derives them when first read, once, and a selection of it derives only
    its sources' rows (or reuses the rows already derived): every way equal to deriving them all."""
    calls = []
    derive = factored_module.eigen_coordinates

    def counted(*args, **kwargs):
        calls.append(args[-1].num_sources)
        return derive(*args, **kwargs)

    monkeypatch.setattr(factored_module, "eigen_coordinates", counted)
    x, y = blobs(n=50, d=6, classes=3, seed=37)
    xq, yq = blobs(n=4, d=6, classes=3, seed=38)
    model, dense, factored = _fit_codecs(tmp_path, _mlp(bias_last=True), x, y, epochs=2, rank=64, checkpoint_epochs=[1])
    assert calls == []  # two checkpoints simulated and written: nothing derived
    store = ResponseStore.load(factored)
    block = store.block("final")
    assert block.derived_coordinates and calls == []  # read, not yet used
    full = block.eigen.coordinates
    assert calls == [50] and block.eigen.coordinates is full  # derived once
    assert torch.allclose(full, derive(block.basis, block.eigenvalues, block.damping, block.complement_gain, block.gradients))
    picked = torch.tensor([7, 0, 31])
    assert torch.equal(block.select(picked).eigen.coordinates, full[picked]) and calls == [50]  # reused, not derived
    fresh = ResponseStore.load(factored).block("final").select(picked)
    assert torch.allclose(fresh.eigen.coordinates, full[picked], atol=1e-6) and calls == [50, 3]  # only its 3 sources
    assert torch.allclose(fresh.to_dense(), ResponseStore.load(dense).responses("final")[picked], atol=1e-6)
    ours, expected = (model.attribute((xq, yq), responses=path) for path in (factored, dense))
    assert _close(ours, expected)
