"""Codec "lorif": rank-c factors per Linear / Conv weight. At full rank it equals dense (every readout, Linear
and Conv layers, end and online stores); at reduced rank it stays close to dense; the store validates it."""

from __future__ import annotations

import pytest
import torch
from conftest import blobs, fit, pearson, small_mlp

from lightning_attr import AttributionCallback, ResponseStore
from lightning_attr.codecs import LowRankResponses
from lightning_attr.functional import functional_view
from lightning_attr.lowrank import encode_lowrank, factored_layers
from lightning_attr.models import Classifier
from lightning_attr.models.nets import CNN
from lightning_attr.readout import score_sources
from lightning_attr.store import StoreError


def _encode(model, responses, rank):
    with functional_view(model) as (fmodel, _):
        layers = factored_layers(model, fmodel.space)
        return LowRankResponses.from_tensors(fmodel.space, encode_lowrank(responses, fmodel.space, layers, rank)), layers


def test_full_rank_factors_read_out_as_dense_on_linear_and_conv_layers():
    """Random responses on a CNN (Conv2d weights [4, 1, 3, 3] and [6, 4, 3, 3], a Linear head): the factored
    readout equals the dense one for every readout kind; a non-finite response scores NaN, never 0."""
    torch.manual_seed(0)
    model = Classifier(CNN((1, 8, 8), 3, channels=(4, 6)))
    x, y = torch.randn(5, 1, 8, 8), torch.randint(0, 3, (5,))
    dim = sum(p.numel() for p in model.parameters())
    responses = torch.randn(7, dim) * 0.01
    responses[3] = float("nan")
    block, layers = _encode(model, responses, rank=10**3)
    assert set(layers) == {"net.features.0.weight", "net.features.2.weight", "net.head.weight"}, layers  # both convs and the head
    assert torch.allclose(block.to_dense()[[0, 1, 2, 4, 5, 6]], responses[[0, 1, 2, 4, 5, 6]], atol=1e-6)
    with functional_view(model) as (fmodel, theta):
        for kind in ("linear", "central", "step"):
            dense = score_sources(fmodel, theta, responses, (x, y), kind)
            ours = block.scores(fmodel, theta, (x, y), kind, chunk_size=3)
            finite = torch.arange(7) != 3
            assert bool(ours[:, 3].isnan().all()), kind
            assert torch.allclose(ours[:, finite], dense[:, finite], rtol=1e-4, atol=1e-6), kind
        paired = block.paired(fmodel, theta, (x, y), torch.tensor([0, 2, 4, 5, 6]), "linear")
        expected = score_sources(fmodel, theta, responses[[0, 2, 4, 5, 6]], (x, y)).diagonal()
        assert torch.allclose(paired, expected, rtol=1e-4, atol=1e-6)


def _two_stores(tmp_path, rank, **options):
    x, y = blobs(n=120, d=6, classes=3, seed=4)
    xq, yq = blobs(n=20, d=6, classes=3, seed=5)
    out = {}
    for codec in ("dense", "lorif"):
        torch.manual_seed(0)  # the same initial weights and data order: the same fit
        model = small_mlp(6, 3, hidden=12)
        cb = AttributionCallback(tmp_path / codec, codec=codec, rank=rank, horizon=8, **options)
        fit(model, x, y, [cb], epochs=4)
        out[codec] = (model, cb.dirpath)
    return out, (xq, yq)


@pytest.mark.parametrize("mode", ["end", "online"])
def test_full_rank_lorif_store_equals_the_dense_store(tmp_path, mode):
    stores, query = _two_stores(tmp_path, rank=12, mode=mode, memory_budget_mb=0.05)
    (model, dense), (_, lorif) = stores["dense"], stores["lorif"]
    store = ResponseStore.load(lorif)
    entry = store.checkpoint_info("final")
    assert entry["codec"] == "lorif" and entry["factored"] == {"net.1.weight": [12, 6, 6], "net.3.weight": [3, 12, 3]}
    assert all(s["file"].split("/")[-1].startswith("factors-") for s in entry["shards"])
    assert len(entry["shards"]) > 1  # the memory budget set blocks of sources: several shards
    block = store.block("final")
    assert torch.allclose(block.to_dense(), ResponseStore.load(dense).responses("final"), atol=1e-6)
    for readout in ("linear", "step"):
        ours, expected = (model.attribute(query, responses=path, readout=readout) for path in (lorif, dense))
        # "step" differences two forward passes in float32: rounding of the measurement itself (~1e-7 of ~1)
        assert torch.allclose(ours, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max())), readout


def test_reduced_rank_stays_close_to_dense(tmp_path):
    """c = 2 of min(out, in) = 6 and 3 for the two weights: c (out + in) numbers per weight, biases dense."""
    stores, query = _two_stores(tmp_path, rank=2, mode="end")
    (model, dense), (_, lorif) = stores["dense"], stores["lorif"]
    block = ResponseStore.load(lorif).block("final")
    assert block.ranks == {"net.1.weight": 2, "net.3.weight": 2}
    assert block.numel() == block.num_sources * (2 * (12 + 6) + 2 * (3 + 12) + 12 + 3)  # of P = 123
    r = pearson(model.attribute(query, responses=lorif), model.attribute(query, responses=dense))
    assert 0.95 < r < 0.99999, r  # measured 0.995


def test_damaged_factor_shard_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    x, y = blobs(n=40, d=4, classes=3)
    cb = AttributionCallback(tmp_path / "r", codec="lorif", rank=2, mode="end", horizon=4)
    model = small_mlp(4, 3, hidden=5)
    fit(model, x, y, [cb], epochs=2)
    store = ResponseStore.load(cb.dirpath)
    shard = store.path / store.checkpoint_info("final")["shards"][0]["file"]
    tensors = load_file(str(shard))
    tensors["net.1.weight@U"] = tensors["net.1.weight@U"][:, :, :1].contiguous()
    save_file(tensors, str(shard))
    store._check_files = lambda ckpt: None  # the size check would refuse it first; the shape check must too
    with pytest.raises(StoreError, match=r"'net.1.weight@U' is \(40, 5, 1\), expected \(40, 5, 2\)"):
        store.block("final")
