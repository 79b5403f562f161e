"""Codec "eigen" (its eigenspace finder: test_spectral_finder.py): responses against the exact
damped target at full rank, the store format (v2 writes, v1 still reads) and the readout's limits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import blobs, exact_influence, fit, logistic, pearson, small_mlp
from safetensors.torch import load_file

from lightning_attr import AttributionCallback, ResponseStore
from lightning_attr.codecs import EigenResponses
from lightning_attr.sources import SourceMap
from lightning_attr.store import StoreError

DATA = Path(__file__).parent / "data"


def test_eigen_codec_at_full_rank_equals_the_exact_damped_target(tmp_path):
    x, y = blobs(n=160, d=6, classes=3)
    xq, yq = blobs(n=24, d=6, classes=3, seed=1)
    model = small_mlp(6, 3)
    # rank above P (163) is capped at P: the eigenspace is the whole space and nothing is dropped; the default
    # filter (propagation "auto", as "spectral") is the damped inverse
    cb = AttributionCallback(tmp_path / "r", codec="eigen", rank=1000, curvature_batch_size=64, checkpoint_epochs=None)
    fit(model, x, y, [cb], epochs=8)
    store = ResponseStore.load(cb.dirpath)
    entry = store.checkpoint_info("final")
    assert store.manifest["format_version"] == 5 and entry["codec"] == "eigen" and entry["rank"] == 163
    assert entry["spectral"]["propagation"] == "spectral" and entry["spectral"]["horizon"] is None
    exact = exact_influence(model, x, y, xq, yq, entry["damping"])
    ours = model.attribute((xq, yq), responses=cb.dirpath)
    assert ours.shape == exact.shape == (24, 160)
    assert torch.allclose(ours, exact, rtol=1e-3, atol=1e-4 * float(exact.abs().max()))
    # self-influence reads each example against its own source, the diagonal of the train-vs-train target
    train = (x[:20], y[:20], torch.arange(20))
    diagonal = exact_influence(model, x, y, x[:20], y[:20], entry["damping"]).diagonal()
    assert torch.allclose(model.self_influence(train, responses=cb.dirpath), diagonal, rtol=1e-3, atol=1e-4 * float(diagonal.abs().max()))
    with pytest.raises(ValueError, match="not available for responses stored with codec 'eigen'"):
        model.attribute((xq, yq), responses=cb.dirpath, readout="central")
    with pytest.raises(StoreError, match="codec 'eigen'"):
        store.responses("final")


def test_eigen_codec_at_full_rank_equals_dense_end_mode_responses(tmp_path):
    """Same horizon, full-batch curvature: the dense simulation's K-step series and the eigen codec's filter are
    the same operator (up to the dense rule's power-iteration estimate of lambda_max in its step size)."""
    x, y = blobs(n=120, d=5, classes=3, seed=2)
    xq, yq = blobs(n=16, d=5, classes=3, seed=3)
    scores = {}
    for codec in ("dense", "eigen"):
        torch.manual_seed(0)  # the same initial weights: the two fits are the same model
        model = small_mlp(5, 3, hidden=8)
        cb = AttributionCallback(
            tmp_path / codec, codec=codec, mode="end", rank=10**4, horizon=40, curvature_batch_size=512, propagation="neumann"
        )
        fit(model, x, y, [cb], epochs=6)
        scores[codec] = model.attribute((xq, yq), responses=cb.dirpath)
    assert pearson(scores["dense"], scores["eigen"]) > 0.999
    slope = float((scores["dense"] * scores["eigen"]).sum() / (scores["eigen"] ** 2).sum())
    assert abs(slope - 1) < 0.02, slope


def test_truncated_eigen_codec_keeps_most_of_the_target(tmp_path):
    """k = 24 of P = 163: the top of the spectrum carries most of the damped target (METHOD.md: k=256 of 4,810
    gave Pearson 0.98 on digits); the basis and coordinates are stored in k floats per source."""
    x, y = blobs(n=160, d=6, classes=3)
    xq, yq = blobs(n=24, d=6, classes=3, seed=1)
    model = small_mlp(6, 3)
    cb = AttributionCallback(tmp_path / "r", codec="eigen", rank=24, horizon=10**5, store_dtype="bfloat16", checkpoint_epochs=[4])
    fit(model, x, y, [cb], epochs=8)
    store = ResponseStore.load(cb.dirpath)
    assert store.checkpoints == ["epoch=4", "final"]
    block = store.block("final")
    assert isinstance(block, EigenResponses) and block.coordinates.shape == (160, 24) and block.basis.shape == (24, 163)
    # the finder's record: block Krylov, whose default budget max(2k, k + 256) stops at P = 163 (the whole space)
    finder = store.checkpoint_info("final")["spectral"]
    assert finder["eigen_method"] == "krylov" and finder["eigen_products"] == 163
    assert finder["reach"] == pytest.approx(float(block.eigenvalues[-1]) / block.damping, rel=1e-2)  # bfloat16 store
    exact = exact_influence(model, x, y, xq, yq, block.damping)
    assert pearson(model.attribute((xq, yq), responses=cb.dirpath), exact) > 0.85  # measured 0.898 (bf16 store)
    ensemble = model.attribute((xq, yq), responses=cb.dirpath, checkpoints="all")
    assert ensemble.shape == (24, 160) and bool(torch.isfinite(ensemble).all())


def test_complement_sketch_restores_what_the_truncated_codec_drops(tmp_path):
    """k = 16 of P = 163 drops the complement term of the spectral response (1/(mu + lam) outside the space);
    ``sketch`` keeps it as k' Gaussian sketch coordinates: with k' large the scores approach the dense
    ``propagation="spectral"`` responses at the same rank (same model, damping and eigenspace: same seed)."""
    x, y = blobs(n=160, d=6, classes=3)
    xq, yq = blobs(n=24, d=6, classes=3, seed=1)
    scores, blocks = {}, {}
    for name, options in {
        "dense": {"codec": "dense"}, "eigen": {"codec": "eigen"}, "sketched": {"codec": "eigen", "sketch": 4096}
    }.items():
        torch.manual_seed(0)  # the same initial weights: the three fits are the same model
        model = small_mlp(6, 3)
        cb = AttributionCallback(tmp_path / name, rank=16, curvature_batch_size=512, **options)
        fit(model, x, y, [cb], epochs=6)
        scores[name] = model.attribute((xq, yq), responses=cb.dirpath)
        blocks[name] = ResponseStore.load(cb.dirpath)
    block = blocks["sketched"].block("final")
    assert block.basis.shape == (16 + 4096, 163) and block.coordinates.shape == (160, 16 + 4096)
    info = blocks["sketched"].checkpoint_info("final")["spectral"]
    assert info["sketch"] == 4096 and info["complement_mean"] > 0
    assert blocks["dense"].checkpoint_info("final")["step_rule"]["damping"] == pytest.approx(info["damping"], rel=1e-5)
    # the sketch rows are orthogonal to the eigenvectors: the in-space coordinates are the plain codec's
    torch.testing.assert_close(block.coordinates[:, :16], blocks["eigen"].block("final").coordinates, rtol=1e-4, atol=1e-9)
    without, with_sketch = pearson(scores["eigen"], scores["dense"]), pearson(scores["sketched"], scores["dense"])
    print(f"Pearson to the dense spectral responses: eigen {without:.3f}, eigen + sketch 4096 {with_sketch:.3f}")
    assert with_sketch > 0.99 and with_sketch > without + 0.02


def test_sketch_needs_the_eigen_codec():
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    with pytest.raises(MisconfigurationException, match="sketch=8 keeps the part .* Set codec='eigen'"):
        AttributionCallback(sketch=8)
    for bad in (-1, True, 2.5):
        with pytest.raises(MisconfigurationException, match="sketch must be an int >= 0"):
            AttributionCallback(codec="eigen", sketch=bad)


def test_damaged_basis_is_refused(tmp_path):
    x, y = blobs(n=40, d=4, classes=3)
    cb = AttributionCallback(tmp_path / "r", codec="eigen", rank=4, mode="online")
    fit(logistic(4, 3), x, y, [cb], epochs=2)
    basis = Path(cb.dirpath) / json.loads((Path(cb.dirpath) / "manifest.json").read_text())["checkpoints"][0]["basis_file"]
    basis.write_bytes(basis.read_bytes()[:-8])
    with pytest.raises(StoreError, match="basis.safetensors is missing or not the size"):
        ResponseStore.load(cb.dirpath)


def test_a_format_1_store_is_still_read():
    """tests/data/store_v1 was written by lightning_attr at main dd440bd (format 1, no codec field), with the
    scores that version gave (``store_v1_expected.safetensors``)."""
    store = ResponseStore.load(DATA / "store_v1")
    assert store.manifest["format_version"] == 1 and store.codec("final") == "dense"
    expected = load_file(str(DATA / "store_v1_expected.safetensors"))
    model = logistic(4, 3)
    model.load_state_dict({name: t for name, t in store.space.unflatten(store.theta("final")).items()})
    scores = model.attribute((expected["x_query"], expected["y_query"]), responses=store)
    assert torch.allclose(scores, expected["scores"], rtol=1e-5, atol=1e-8)


def test_bad_codec_options_are_refused():
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    with pytest.raises(MisconfigurationException, match="codec must be .auto. or one of"):
        AttributionCallback(codec="lowrank", mode="online")
    with pytest.raises(MisconfigurationException, match="needs curvature='ggn'"):
        AttributionCallback(codec="eigen", curvature="hessian", mode="online")
    with pytest.raises(MisconfigurationException, match="rank must be 'auto' or a positive int"):
        AttributionCallback(codec="eigen", rank=0, mode="online")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_basis_keeps_the_scores(tmp_path, dtype):
    """The basis ``[k, P]`` dominates an eigen store while ``S`` is small; stored in half precision it halves the
    bytes. Its rounding (relative 2^-11 float16, 2^-8 bfloat16 per entry) moves the scores by a bounded amount."""
    x, y = blobs(n=160, d=6, classes=3)
    xq, yq = blobs(n=24, d=6, classes=3, seed=1)
    model = small_mlp(6, 3)
    cb = AttributionCallback(tmp_path / "r", codec="eigen", rank=32, horizon=100, mode="online", checkpoint_epochs=None)
    fit(model, x, y, [cb], epochs=4)
    full = ResponseStore.load(cb.dirpath)
    half = ResponseStore.create(tmp_path / dtype, full.space, SourceMap.build(None, 160), {}, overwrite=True)
    half.add_checkpoint(
        "final", full.theta("final"), full.block("final"), info={}, source_stats=full.source_stats("final"), dtype=dtype
    )
    bytes_of = {s: sum(f.stat().st_size for f in Path(s.path, "final").glob("*.safetensors")) for s in (full, half)}
    assert bytes_of[half] < 0.6 * bytes_of[full]
    expected = model.attribute((xq, yq), responses=full)
    ours = model.attribute((xq, yq), responses=ResponseStore.load(half.path))
    error = float((ours - expected).abs().max() / expected.abs().max())
    assert error < (2e-3 if dtype == "float16" else 1e-2), error  # measured 5.1e-4 and 2.3e-3
    assert pearson(ours, expected) > (0.99999 if dtype == "float16" else 0.9995)
