"""ResponseStore: round trip, and refusal of anything that is not what it claims to be."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import blobs, fit, logistic, small_mlp

from lightning_attr import AttributionCallback, ResponseStore, StoreError


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    x, y = blobs(n=96, d=6, classes=3)
    model = small_mlp(6, 3)
    cb = AttributionCallback(root / "r", mode="end", horizon=20, curvature_batch_size=32, checkpoint_epochs=[2])
    fit(model, x, y, [cb], epochs=4)
    return model, cb.dirpath, blobs(n=8, d=6, classes=3, seed=9)


def test_round_trip_gives_identical_scores(trained, tmp_path):
    model, path, (xq, yq) = trained
    first = model.attribute((xq, yq), responses=path)
    reopened = ResponseStore.load(path)
    assert reopened.checkpoints == ["epoch=2", "final"]
    assert torch.equal(first, model.attribute((xq, yq), responses=reopened))
    m = reopened.manifest
    assert m["format_version"] == 5 and m["checkpoints"][0]["codec"] == "dense" and m["n_sources"] == 96 and len(m["parameters"]) == 4
    assert m["settings"]["horizon"] == 20 and m["checkpoints"][-1]["step_rule"]["damping"] > 0
    # the parameter snapshot of the final checkpoint is the model's weights
    assert reopened.space.digest(reopened.theta("final")) == m["checkpoints"][-1]["weights_digest"]


def test_ensemble_over_response_checkpoints(trained):
    model, path, (xq, yq) = trained
    last = model.attribute((xq, yq), responses=path, checkpoints="last")
    early = model.attribute((xq, yq), responses=path, checkpoints="epoch=2")
    both = model.attribute((xq, yq), responses=path)  # the default: every checkpoint of the store
    assert both.shape == last.shape and not torch.equal(both, last) and not torch.equal(early, last)
    # units of the last checkpoint: per query the same spread over sources
    torch.testing.assert_close(both.std(dim=1), last.std(dim=1), rtol=1e-4, atol=0)
    with pytest.raises(StoreError, match="no checkpoint 'epoch=99'"):
        model.attribute((xq, yq), responses=path, checkpoints="epoch=99")


def test_half_precision_store_reads_back(tmp_path):
    x, y = blobs(n=64, d=6, classes=3)
    model = small_mlp(6, 3)
    cb = AttributionCallback(tmp_path / "r", mode="end", horizon=10, curvature_batch_size=32, store_dtype="bfloat16")
    fit(model, x, y, [cb], epochs=2)
    scores = model.attribute((x[:4], y[:4]), responses=cb.dirpath)
    assert scores.dtype == torch.float32 and scores.isfinite().all()
    shard = next((tmp_path / "r" / "final").glob("responses-*.safetensors"))
    assert shard.stat().st_size < 64 * model.net[1].weight.numel() * 4  # smaller than fp32 would be


def test_mismatched_model_is_refused(trained):
    _, path, (xq, yq) = trained
    other = logistic(6, 3)
    with pytest.raises(StoreError, match="different model"):
        other.attribute((xq, yq), responses=path)


def test_changed_weights_are_refused_unless_not_strict(trained):
    model, path, (xq, yq) = trained
    import copy

    tweaked = copy.deepcopy(model)
    with torch.no_grad():
        tweaked.net[1].weight.add_(1e-3)
    with pytest.raises(StoreError, match="weights differ"):
        tweaked.attribute((xq, yq), responses=path)
    assert tweaked.attribute((xq, yq), responses=path, strict=False).shape == (8, 96)


def _copy_store(path, tmp_path):
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(path, target)
    return target


def test_truncated_shard_is_refused(trained, tmp_path):
    model, path, (xq, yq) = trained
    target = _copy_store(path, tmp_path)
    shard = next((target / "final").glob("responses-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(StoreError, match="truncated"):
        model.attribute((xq, yq), responses=target)


def test_missing_shard_is_refused(trained, tmp_path):
    model, path, (xq, yq) = trained
    target = _copy_store(path, tmp_path)
    next((target / "final").glob("responses-*.safetensors")).unlink()
    with pytest.raises(StoreError, match="missing"):
        ResponseStore.load(target)


def test_wrong_version_manifest_is_refused(trained, tmp_path):
    _, path, _ = trained
    target = _copy_store(path, tmp_path)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["format_version"] = 99
    (target / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="format version 99"):
        ResponseStore.load(target)


def test_not_a_store_is_refused(tmp_path):
    with pytest.raises(StoreError, match="manifest.json is missing"):
        ResponseStore.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="not valid JSON"):
        ResponseStore.load(tmp_path)


def test_store_without_manifest_is_refused(trained, tmp_path):
    model, path, (xq, yq) = trained
    target = _copy_store(path, tmp_path)
    (target / "manifest.json").unlink()
    with pytest.raises(StoreError, match="holds files but no manifest.json"):
        model.attribute((xq, yq), responses=target)
    with pytest.raises(StoreError, match="does not exist"):
        model.attribute((xq, yq), responses=tmp_path / "nowhere")


def test_attribute_before_any_fit_is_refused(trained):
    model, _, (xq, yq) = trained
    cb = AttributionCallback(mode="online")  # dirpath is resolved when fit starts
    with pytest.raises(StoreError, match="responses is None.*after fitting"):
        model.attribute((xq, yq), responses=cb.dirpath)
    with pytest.raises(StoreError, match="responses is None"):
        model.self_influence((xq, yq, torch.arange(8)), responses=None)
    # the callback itself instead of its dirpath (a new user's first guess): the error says which attribute to pass
    with pytest.raises(StoreError, match=r"got AttributionCallback: pass its dirpath \(responses=cb.dirpath, set when fit starts\)"):
        model.attribute((xq, yq), responses=cb)


def test_existing_store_is_not_overwritten(trained, tmp_path):
    model, path, _ = trained
    target = _copy_store(path, tmp_path)
    before = (target / "manifest.json").read_bytes()
    x, y = blobs(n=96, d=6, classes=3)
    with pytest.raises(Exception, match="already holds a response store"):
        fit(small_mlp(6, 3), x, y, [AttributionCallback(target, mode="end", horizon=2)], epochs=1)
    assert (target / "manifest.json").read_bytes() == before


def test_online_checkpoint_windows(tmp_path):
    """Online mode with checkpoint_epochs: one simulation window per entry, each complete, final last."""
    x, y = blobs(n=64, d=6, classes=3)
    model = small_mlp(6, 3)
    cb = AttributionCallback(tmp_path / "r", mode="online", horizon=5, checkpoint_epochs=[2, 4], curvature_batch_size=16)
    fit(model, x, y, [cb], epochs=8, batch_size=16)  # 4 steps per epoch
    store = ResponseStore.load(cb.dirpath)
    assert store.checkpoints == ["epoch=2", "epoch=4", "final"]
    for name in store.checkpoints:
        info = store.checkpoint_info(name)
        assert info["n_shortfall"] == 0 and info["n_missing_examples"] == 0 and info["mode"] == "online"
    # window epoch=2 injects during epoch 2 (steps 4..7) and ends 5 steps after: written at step 12 or 13
    assert 11 <= store.checkpoint_info("epoch=2")["global_step"] <= 13
    averaging = sum(store.checkpoint_info(name)["step_rule"]["averaging_products"] for name in store.checkpoints)
    assert cb._products == 3 * 64 * 5 + averaging  # each window its own curvature averaging (averaged_rank)
    scores = model.attribute((x[:4], y[:4]), responses=cb.dirpath, checkpoints="all")
    assert scores.shape == (4, 64) and scores.isfinite().all()


def test_a_checkpoint_added_to_an_older_store_stamps_this_format_version(tmp_path):
    """A fit resumed into a store an older version wrote adds its checkpoint in this version's layout (format 5: a
    factored checkpoint's coordinates and folded biases left out, contiguous shards, half precision as scaled float16):
    the manifest must then say version 5, or an older reader takes the store for one it reads and calls the new checkpoint damaged. The checkpoint the
    older version wrote (tests/data/store_v1, format 1) still reads as it did."""
    from pathlib import Path

    target = _copy_store(Path(__file__).parent / "data" / "store_v1", tmp_path)
    old = ResponseStore.load(target)
    assert old.manifest["format_version"] == 1
    responses = old.responses("final")
    old.add_checkpoint("resumed", old.theta("final"), responses, info={}, source_stats=old.source_stats("final"))
    again = ResponseStore.load(target)
    assert json.loads((target / "manifest.json").read_text())["format_version"] == again.manifest["format_version"] == 5
    assert again.checkpoints == ["final", "resumed"]
    assert torch.equal(again.responses("final"), responses) and torch.equal(again.responses("resumed"), responses)


def test_every_codec_writes_its_own_shard_layout_through_one_writer(tmp_path):
    """ResponseStore.write_block writes every codec's shards through ShardWriter: codecs "dense" and "lorif" with a
    source index per shard (listed by their rows), "eigen" and "factored" listed by ``[start, stop)`` with no index (the
    layouts stores already hold); 5 sources in shards of 2 read back as written. ShardWriter(indexed=False) refuses
    rows out of source order."""
    from safetensors.torch import load_file

    from lightning_attr.codecs import EigenResponses, FactoredResponses, LowRankResponses
    from lightning_attr.parameters import ParameterSpace
    from lightning_attr.sources import SourceMap
    from lightning_attr.store import SOURCE_INDEX, ShardWriter

    g = torch.Generator().manual_seed(0)
    space = ParameterSpace(("w", "b"), ((4, 3), (4,)), ("float32",) * 2)
    store = ResponseStore.create(tmp_path / "r", space, SourceMap.build(None, 5), {})
    factors = {"w": (torch.randn(5, 4, 1, generator=g), torch.randn(5, 3, 1, generator=g))}
    gradients = LowRankResponses(space, factors, {"b": torch.randn(5, 4, generator=g)})
    basis = torch.linalg.qr(torch.randn(space.size, 2, generator=g))[0].T.contiguous()
    blocks = {
        "dense": torch.randn(5, space.size, generator=g), "lorif": gradients,
        "eigen": EigenResponses(basis, torch.tensor([2.0, 1.0]), 0.1, torch.randn(5, 2, generator=g)),
        "factored": FactoredResponses(basis, torch.tensor([2.0, 1.0]), 0.1, 0.5, gradients),
    }  # fmt: skip
    stats = {k: torch.zeros(5, dtype=torch.long) for k in ("valid", "shortfall", "missing_examples")}
    stats["valid"] += 1
    for name, block in blocks.items():
        store.add_checkpoint(name, torch.zeros(space.size), block, info={}, source_stats=stats, shard_size=2)
    store = ResponseStore.load(store.path)
    for name, block in blocks.items():
        shards = store.checkpoint_info(name)["shards"]
        indexed = name in ("dense", "lorif")
        assert [set(s) for s in shards] == [{"file", "rows", "bytes"} if indexed else {"file", "start", "stop", "bytes"}] * 3
        if indexed:
            assert [load_file(str(store.path / s["file"]))[SOURCE_INDEX].tolist() for s in shards] == [[0, 1], [2, 3], [4]]
        else:
            assert [(s["start"], s["stop"]) for s in shards] == [(0, 2), (2, 4), (4, 5)]
            assert all(SOURCE_INDEX not in load_file(str(store.path / s["file"])) for s in shards)
        expected = block if isinstance(block, torch.Tensor) else block.to_dense()
        assert torch.allclose(store.block(name).to_dense() if name != "dense" else store.responses(name), expected, atol=1e-6)
    writer = ShardWriter(tmp_path / "r", "more", space, indexed=False)
    writer.add_encoded(torch.arange(2), space.unflatten(torch.zeros(2, space.size)))
    with pytest.raises(ValueError, match=r"writes sources in order.*indexed=True"):
        writer.add_encoded(torch.tensor([3, 4]), space.unflatten(torch.zeros(2, space.size)))


def test_a_store_without_its_end_of_fit_checkpoint_says_so_when_the_weights_differ(trained, tmp_path):
    """A fit killed while it wrote its 'final' checkpoint leaves a store that lists the earlier ones only. The final
    weights then differ from the last checkpoint's: the error names that checkpoint and the missing 'final' (before:
    "Load the final weights of that fit", which the user had loaded)."""
    model, path, (xq, yq) = trained
    target = _copy_store(path, tmp_path)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["checkpoints"] = [c for c in manifest["checkpoints"] if c["name"] != "final"]
    (target / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=r"'epoch=2' \(global step \d+\).*no 'final' checkpoint.*Re-run the fit"):
        model.attribute((xq, yq), responses=target)
    # a store the callback did not write (ResponseStore.create / add_checkpoint: no settings) names its own checkpoints
    manifest["settings"] = {}
    (target / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=r"'epoch=2' \(global step \d+\)\)\. Load the final weights of the fit"):
        model.attribute((xq, yq), responses=target)
