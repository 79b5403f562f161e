"""The read path: ensembles over checkpoints and runs equal the hand-computed paired, normalized mean;
stores are read from disk once; ensembles of runs refuse what does not belong together."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import blobs, fit, small_mlp

from safetensors.torch import load_file

from lightning_attr import AttributionCallback, ResponseStore, StoreError
from lightning_attr.attributor import ensemble_mean
from lightning_attr.functional import functional_view
from lightning_attr.parameters import ParameterSpace
from lightning_attr.readout import score_sources


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs (seeds 0, 1) of the same model on the same data, each with a mid-training checkpoint."""
    root = tmp_path_factory.mktemp("runs")
    x, y = blobs(n=64, d=6, classes=3)
    out = []
    for seed in (0, 1):
        model = small_mlp(6, 3)
        cb = AttributionCallback(root / f"run{seed}", mode="end", horizon=10, curvature_batch_size=32, checkpoint_epochs=[2])
        fit(model, x, y, [cb], epochs=3, seed=seed)
        out.append((model.eval(), cb.dirpath))
    return out, blobs(n=6, d=6, classes=3, seed=9)


def _by_hand(module, members):
    """Each ``(store, name)`` read out at its stored parameters, unit std per query over sources, averaged,
    put back on the first member's std."""
    raw = []
    with functional_view(module, ParameterSpace.of(module)) as (model, _):
        for store, name, batch in members:
            theta = store.space.flatten(load_file(str(store.path / name / "params.safetensors")))
            raw.append(score_sources(model, theta, store.responses(name), batch, layers=False))  # vmap(jvp): the definition
    unit = [s / s.std(dim=1, keepdim=True) for s in raw]
    mean = torch.stack(unit).mean(0)
    return mean / mean.std(dim=1, keepdim=True) * raw[0].std(dim=1, keepdim=True)


def test_trajectory_ensemble_is_the_paired_normalized_mean(runs):
    (model, path), _ = runs[0]
    xq, yq = runs[1]
    store = ResponseStore.load(path)
    expected = _by_hand(model, [(store, "final", (xq, yq)), (store, "epoch=2", (xq, yq))])
    got = model.attribute((xq, yq), responses=path, checkpoints="all")
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)


def test_ensemble_of_runs_is_the_paired_normalized_mean(runs):
    (model0, path0), (model1, path1) = runs[0]
    xq, yq = runs[1]
    s0, s1 = ResponseStore.load(path0), ResponseStore.load(path1)
    expected = _by_hand(model0, [(s0, "final", (xq, yq)), (s1, "final", (xq, yq))])
    got = model0.attribute((xq, yq), responses=[path0, path1], checkpoints="last")
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)
    # the module gives the architecture; its weights only serve the member simulated at them: read from run 1's
    # module (whose weights are not run 0's), the ensemble is on run 1's scale and otherwise the same ranking
    other = model1.attribute((xq, yq), responses=[path0, path1], checkpoints="last")
    torch.testing.assert_close(other / other.std(dim=1, keepdim=True), got / got.std(dim=1, keepdim=True), rtol=1e-4, atol=1e-6)
    # two runs x two checkpoints
    four = model0.attribute((xq, yq), responses=[path0, path1])  # the default: every checkpoint of every store
    members = [(s, n, (xq, yq)) for s in (s0, s1) for n in ("epoch=2", "final")]
    expected4 = _by_hand(model0, [members[1], members[0], members[2], members[3]])
    torch.testing.assert_close(four, expected4, rtol=1e-4, atol=1e-7)


def _nan_std(s: torch.Tensor) -> torch.Tensor:
    """The std over sources of ``s: Tensor[B, S]`` with its NaN entries left out, written from its definition."""
    mean = s.nanmean(dim=1, keepdim=True)
    count = (~s.isnan()).sum(dim=1, keepdim=True)
    return ((s - mean).nan_to_num(0.0).square().sum(dim=1, keepdim=True) / (count - 1)).sqrt()


def test_ensemble_mean_is_the_normalized_mean_of_its_definition():
    """ensemble_mean (one buffer, norms of the deviations) equals the definition written with Tensor.std: members
    on other scales and offsets, a row with a large mean, a NaN in one member (NaN out, left out of that member's std)."""
    torch.manual_seed(0)
    members = [torch.randn(5, 300) * scale + offset for scale, offset in ((1.0, 0.0), (30.0, 2.0), (0.01, -1.0))]
    members[1][2] += 1e3  # a query whose scores sit far from zero: the deviations, not the raw squares
    members[2][1, 7] = float("nan")
    unit = lambda s: s / _nan_std(s)  # noqa: E731
    for reference in (0, 2):
        expected = unit(torch.stack([unit(s) for s in members]).mean(0)) * _nan_std(members[reference])
        got = ensemble_mean(members, reference)
        assert torch.isnan(got[1, 7]) and int(torch.isnan(got).sum()) == 1
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_ensemble_mean_of_a_store_with_nan_sources_equals_the_store_without_them():
    """Sources NaN in every member (never injected, never trained on) change nothing for the others: the ensemble of
    the members with those columns equals, on the other columns, the ensemble of the members without them (counted
    as 0, they moved each member's mean and std: 8.7% on a 64-of-96 subset fit, the 'seen' measurement)."""
    torch.manual_seed(1)
    members = [torch.randn(4, 96) * scale + offset for scale, offset in ((1.0, 0.5), (5.0, -2.0), (0.1, 3.0))]
    kept = torch.ones(96, dtype=torch.bool)
    kept[torch.randperm(96)[:32]] = False
    with_nan = [m.masked_fill(~kept, float("nan")) for m in members]
    got = ensemble_mean(with_nan)
    assert bool(got[:, ~kept].isnan().all())
    torch.testing.assert_close(got[:, kept], ensemble_mean([m[:, kept] for m in members]), rtol=1e-5, atol=1e-6)


def test_a_second_ensemble_query_reads_nothing_from_disk(runs, monkeypatch):
    (model, path0), (_, path1) = runs[0]
    xq, yq = runs[1]
    reads = []
    original = ResponseStore._read
    monkeypatch.setattr(ResponseStore, "_read", lambda self, file: reads.append(file) or original(self, file))
    loads = []
    original_load = ResponseStore.load.__func__
    monkeypatch.setattr(ResponseStore, "load", classmethod(lambda cls, p: loads.append(p) or original_load(cls, p)))
    digests = []
    original_digest = ParameterSpace.digest
    monkeypatch.setattr(ParameterSpace, "digest", lambda self, theta: digests.append(1) or original_digest(self, theta))
    original_fingerprint = ParameterSpace.fingerprint
    monkeypatch.setattr(ParameterSpace, "fingerprint", lambda self: digests.append(2) or original_fingerprint(self))
    for responses in ([path0, path1], path0):  # runs x checkpoints; one run's trajectory ensemble
        model.__dict__.pop("_attributors", None)
        first = model.attribute((xq, yq), responses=responses, checkpoints="all")
        assert len(loads) == (len(responses) if isinstance(responses, list) else 1)
        assert len(reads) >= 2 * 3  # per member: responses, parameters, per-source stats
        loads.clear(), reads.clear(), digests.clear()
        second = model.attribute((xq[:2], yq[:2]), responses=responses, checkpoints="all")
        assert loads == [] and reads == [] and digests == []  # nothing read, no weights or architecture hashed again
        torch.testing.assert_close(second, model.attribute((xq[:2], yq[:2]), responses=responses, checkpoints="all"))
        assert first.shape == (6, 64)
        loads.clear(), reads.clear(), digests.clear()


def test_a_rewritten_store_is_read_again(runs, tmp_path):
    (model, path), _ = runs[0]
    xq, yq = runs[1]
    target = tmp_path / "copy"
    shutil.copytree(path, target)
    before = model.attribute((xq, yq), responses=target, checkpoints="last")
    store = ResponseStore.load(target)
    # replace the final checkpoint's responses with their double: the manifest changes, the scores follow
    store.add_checkpoint(
        "final", store.theta("final"), 2 * store.responses("final"),
        info={}, source_stats=store.source_stats("final"),
    )  # fmt: skip
    torch.testing.assert_close(model.attribute((xq, yq), responses=target, checkpoints="last"), 2 * before)


def test_an_empty_list_is_refused(runs):
    (model, _), _ = runs[0]
    xq, yq = runs[1]
    with pytest.raises(ValueError, match="empty list.*one store directory"):
        model.attribute((xq, yq), responses=[])


def test_stores_of_other_architectures_are_refused(runs, tmp_path):
    (model, path), _ = runs[0]
    xq, yq = runs[1]
    x, y = blobs(n=64, d=6, classes=3)
    cb = AttributionCallback(tmp_path / "wide", mode="end", horizon=2, curvature_batch_size=32)
    fit(small_mlp(6, 3, hidden=8), x, y, [cb], epochs=1)
    with pytest.raises(StoreError, match="different model.*fingerprint"):
        model.attribute((xq, yq), responses=[path, cb.dirpath])


def test_stores_of_other_training_sets_are_refused(runs, tmp_path):
    (model, path), _ = runs[0]
    xq, yq = runs[1]
    x, y = blobs(n=48, d=6, classes=3)
    cb = AttributionCallback(tmp_path / "fewer", mode="end", horizon=2, curvature_batch_size=32)
    fit(small_mlp(6, 3), x, y, [cb], epochs=1)
    with pytest.raises(StoreError, match="other sources.*same training set"):
        model.attribute((xq, yq), responses=[path, cb.dirpath])


def test_a_checkpoint_without_its_parameter_snapshot_is_refused(runs, tmp_path):
    (model, path0), (model1, path1) = runs[0]
    xq, yq = runs[1]
    target = tmp_path / "no-snapshot"
    shutil.copytree(path1, target)
    manifest = json.loads((target / "manifest.json").read_text())
    for entry in manifest["checkpoints"]:
        del entry["params_file"]
    (target / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="no parameter snapshot.*an ensemble needs.*Re-run its simulation"):
        model.attribute((xq, yq), responses=[path0, target])
    # alone, at the weights it was simulated at, the store needs no snapshot
    alone = model1.attribute((xq, yq), responses=target, checkpoints="last")
    torch.testing.assert_close(alone, model1.attribute((xq, yq), responses=path1, checkpoints="last"))


def test_a_replaced_snapshot_is_refused_when_strict(runs, tmp_path):
    (model, path0), (_, path1) = runs[0]
    xq, yq = runs[1]
    target = tmp_path / "swapped"
    shutil.copytree(path1, target)
    shutil.copy(f"{path0}/final/params.safetensors", target / "final" / "params.safetensors")
    with pytest.raises(StoreError, match="does not match the weights digest"):
        model.attribute((xq, yq), responses=[path0, target])
    assert model.attribute((xq, yq), responses=[path0, target], strict=False).isfinite().all()


def _collapsed_by_hand(module, store, names, batch):
    """``sum_e R_e / ||R_e - mean||_F``, rescaled to the last member's centred norm, read out at its parameters."""
    centred = lambda r: (r - r.mean(dim=0)).norm()  # noqa: E731
    folded = sum(store.responses(n) / centred(store.responses(n)) for n in names)
    folded = folded * centred(store.responses(names[-1])) / centred(folded)
    with functional_view(module, ParameterSpace.of(module)) as (model, _):
        return score_sources(model, store.theta(names[-1]), folded, batch)


def test_the_collapsed_ensemble_is_one_folded_response_read_at_the_latest_weights(runs):
    (model, path), _ = runs[0]
    xq, yq = runs[1]
    store = ResponseStore.load(path)
    expected = _collapsed_by_hand(model, store, ["epoch=2", "final"], (xq, yq))
    got = model.attribute((xq, yq), responses=path, ensemble="collapsed")
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(got, model.attribute((xq, yq), responses=path, checkpoints="last"), rtol=1e-2)
    # one checkpoint: nothing to fold
    torch.testing.assert_close(
        model.attribute((xq, yq), responses=path, checkpoints="last", ensemble="collapsed"),
        model.attribute((xq, yq), responses=path, checkpoints="last"),
    )


def test_collapsed_runs_are_paired_with_each_other(runs):
    (model0, path0), (model1, path1) = runs[0]
    xq, yq = runs[1]
    per_run = [_collapsed_by_hand(model0, ResponseStore.load(p), ["epoch=2", "final"], (xq, yq)) for p in (path0, path1)]
    unit = [s / s.std(dim=1, keepdim=True) for s in per_run]
    mean = torch.stack(unit).mean(0)
    expected = mean / mean.std(dim=1, keepdim=True) * per_run[0].std(dim=1, keepdim=True)
    got = model0.attribute((xq, yq), responses=[path0, path1], ensemble="collapsed")
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)


def test_a_collapsed_ensemble_refuses_what_it_cannot_fold(runs, tmp_path):
    (model, path), _ = runs[0]
    xq, yq = runs[1]
    with pytest.raises(ValueError, match="ensemble must be one of"):
        model.attribute((xq, yq), responses=path, ensemble="mean")
    with pytest.raises(StoreError, match="more than memory_budget_mb.*ensemble='paired'"):
        model.attribute((xq, yq), responses=path, ensemble="collapsed", memory_budget_mb=1e-4)
    x, y = blobs(n=64, d=6, classes=3)
    cb = AttributionCallback(tmp_path / "eigen", codec="eigen", rank=8, curvature_batch_size=32, checkpoint_epochs=[1])
    eigen = small_mlp(6, 3)
    fit(eigen, x, y, [cb], epochs=2)
    with pytest.raises(StoreError, match="codec 'eigen'.*ensemble='paired'"):
        eigen.attribute((xq, yq), responses=cb.dirpath, ensemble="collapsed")


def test_a_second_collapsed_query_reads_nothing_and_holds_one_block(runs, monkeypatch):
    (model, path0), (_, path1) = runs[0]
    xq, yq = runs[1]
    model.__dict__.pop("_attributors", None)
    first = model.attribute((xq, yq), responses=[path0, path1], ensemble="collapsed")
    attributor = next(iter(model.__dict__["_attributors"].values()))
    held = [m.responses for m in attributor._members.values()]
    size = ResponseStore.load(path0).space.size  # each member holds S x P numbers once (flat: the layer bases cover the MLP)
    assert len(held) == 2 and all(r.responses.shape == (64, size) for r in held)
    reads = []
    original = ResponseStore._read
    monkeypatch.setattr(ResponseStore, "_read", lambda self, file: reads.append(file) or original(self, file))
    torch.testing.assert_close(model.attribute((xq, yq), responses=[path0, path1], ensemble="collapsed"), first)
    assert reads == []


def test_a_copy_or_pickle_of_the_module_carries_no_cached_attributor(runs):
    """attribute() keeps its attributors (the stores' blocks), weights digests, parameter spaces and readout plans in
    the module's ``__dict__``: a deep copy or a pickle of the module (``torch.save(model)``, Lightning's WeightAveraging,
    a spawned process) starts with those caches empty, not megabytes of blocks and keys tied to this process's
    parameters, and scores the same once it reads the store again."""
    import copy
    import io
    import pickle

    (model, path0), _ = runs[0]
    xq, yq = runs[1]
    model.__dict__.pop("_attributors", None)
    scores = model.attribute((xq, yq), responses=path0)
    caches = ("_attributors", "_attribution_digest", "_attribution_space")
    assert all(model.__dict__[name] for name in caches)
    cold = copy.deepcopy(model)
    for name in caches:
        cold.__dict__.pop(name)
    pickled, reference = pickle.dumps(model), pickle.dumps(cold)
    assert len(pickled) < len(reference) + 4096  # the block alone is 64 x P float32 (about 25 KB here)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    for twin in (copy.deepcopy(model), pickle.loads(pickled), torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)):
        assert not any(twin.__dict__.get(name) for name in caches)
        torch.testing.assert_close(twin.attribute((xq, yq), responses=path0), scores)
    assert model.__dict__["_attributors"]  # the module's own cache is kept
