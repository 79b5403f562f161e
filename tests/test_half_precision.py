"""Half-precision stores of codec "factored" (``store_dtype="bfloat16"`` / ``"float16"``): the response is derived from
the stored factors and basis as two terms that nearly cancel, so their rounding moves the scores more than a dense
store's. Written as a float16 basis and float16 factors with a power-of-two scale per source and column
(``lightning_attr.half_precision``), the scores must stay within 5e-3 of the float32 store's (bfloat16 as written by
format 4: 2.6e-2) and as close as a bfloat16 dense store's (within 2x); a format 4 half store reads as before."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from conftest import blobs, fit, pearson, small_mlp, written_plain
from safetensors.torch import load_file, save_file

from lightning_attr import AttributionCallback, ResponseStore
from lightning_attr.factored import FactoredResponses
from lightning_attr.half_precision import ENCODING, SCALE, decode, encode
from lightning_attr.store import StoreError


def _relative_error(ours: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest ``|ours - expected|`` over the largest ``|expected|``."""
    return float((ours - expected).abs().max() / expected.abs().max())


def _fit(path, codec: str, dtype: str):
    """The same fit (seeded) of a 6-24-3 MLP, rank 64 of P = 243: ``(model, store path)``. Where format 4's bfloat16
    factored store moved the scores by 2.6e-2 of the largest (float16: 2.9e-3; a bfloat16 dense store: 2.2e-3)."""
    x, y = blobs(n=120, d=6, classes=3, seed=15)
    torch.manual_seed(0)
    model = small_mlp(6, 3, hidden=24)
    cb = AttributionCallback(path / f"{codec}-{dtype}", codec=codec, rank=64, checkpoint_epochs=None, store_dtype=dtype)
    fit(model, x, y, [cb], epochs=4)
    return model, cb.dirpath


def _bytes(path) -> int:
    return sum(f.stat().st_size for f in ResponseStore.load(path).path.rglob("*.safetensors"))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_half_precision_factored_store_scores_as_closely_as_a_dense_one(tmp_path, dtype):
    xq, yq = blobs(n=6, d=6, classes=3, seed=16)
    model, full = _fit(tmp_path, "factored", "float32")
    expected = model.attribute((xq, yq), responses=full)
    _, half = _fit(tmp_path, "factored", dtype)
    ours = model.attribute((xq, yq), responses=half)
    store = ResponseStore.load(half)
    entry = store.checkpoint_info("final")
    assert entry["dtype"] == dtype and entry["encoding"] == ENCODING
    # measured 2.9e-3 and Pearson 0.999998 (format 4's bfloat16 layout: 2.6e-2, 0.99974)
    assert _relative_error(ours, expected) < 5e-3 and pearson(ours, expected) > 0.99999
    assert _bytes(half) < 0.6 * _bytes(full)
    if dtype == "bfloat16":  # as close as the dense codec's responses of the same fit rounded to bfloat16 (2.2e-3)
        dense_model, dense = _fit(tmp_path, "dense", "float32")
        plain = written_plain(dense, tmp_path / "dense-plain-bfloat16", "bfloat16")
        dense_error = _relative_error(dense_model.attribute((xq, yq), responses=plain), expected)
        assert _relative_error(ours, expected) < 2 * dense_error
    # on disk: a float16 basis, float16 factors and their bfloat16 power-of-two scales, one per source and column
    basis = load_file(str(store.path / entry["basis_file"]))
    assert {t.dtype for t in basis.values()} == {torch.float16}
    shard = load_file(str(store.path / entry["shards"][0]["file"]))
    assert set(shard) == {f"net.{i}.weight@{f}{s}" for i in (1, 3) for f in "UV" for s in ("", SCALE)}
    for key, t in shard.items():
        assert t.dtype == (torch.bfloat16 if key.endswith(SCALE) else torch.float16), key
        if key.endswith(SCALE):
            assert t.shape == shard[key[: -len(SCALE)]].shape[::2] and torch.equal(t.float().log2().round().exp2(), t.float())
    # a shard without its scales is refused, not read as unscaled numbers
    del shard["net.1.weight@U" + SCALE]
    file = store.path / entry["shards"][0]["file"]
    save_file(shard, str(file))
    manifest = json.loads((store.path / "manifest.json").read_text())
    manifest["checkpoints"][0]["shards"][0]["bytes"] = file.stat().st_size
    (store.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="net.1.weight@U@scale"):
        ResponseStore.load(half).block("final")


def test_scaled_float16_keeps_every_column_to_float16_precision_whatever_its_magnitude():
    """Factor columns from 1e-12 (plain float16 flushes them to zero) to 1e4, a zero column, a NaN source (invalid)."""
    g = torch.Generator().manual_seed(0)
    magnitudes = torch.tensor([1e-12, 1e-3, 1e4])
    u = (1 + torch.rand(4, 5, 3, generator=g)) * magnitudes  # [S, out, c], entries within 2x of their column's largest
    u[1, :, 2] = 0.0
    u[3] = float("nan")
    rest = torch.randn(4, 2, 3, generator=g) * torch.tensor([1e-9, 1.0, 1e3, 1.0])[:, None, None]  # a dense [S, 2, 3]
    tensors = {"w@U": u, "b": rest}
    stored = encode(tensors)
    assert stored["w@U" + SCALE].shape == (4, 3) and stored["b" + SCALE].shape == (4,)
    back = decode(stored)
    assert set(back) == {"w@U", "b"}
    for key, t in tensors.items():
        finite = t.isfinite()
        assert torch.equal(back[key].isnan(), t.isnan())
        assert bool(((back[key] - t).abs() <= 2**-11 * t.abs())[finite].all()), key  # float16's unit roundoff
    assert torch.equal(back["w@U"][1, :, 2], torch.zeros(5))
    assert bool((u[:3, :, 0].half() == 0).all())  # what an unscaled float16 store keeps of the 1e-12 column


def test_a_format_4_half_precision_factored_store_reads_as_before(tmp_path):
    """Format 4 wrote a half store's basis and factors in the dtype named (no "encoding" field): read as they are, with
    one warning that names the loss (about 10x the error of format 5's scaled float16) and the fix (before: silent)."""
    xq, yq = blobs(n=6, d=6, classes=3, seed=16)
    model, full = _fit(tmp_path, "factored", "float32")
    old = written_plain(full, tmp_path / "format4", "bfloat16", version=4)
    with pytest.warns(UserWarning, match=r"checkpoints \['final'\].*format 4's bfloat16.*Re-run the simulation") as caught:
        store = ResponseStore.load(old)
    assert len(caught) == 1  # one warning per load, naming every such checkpoint
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reference = ResponseStore.load(full)  # a float32 store: no warning
    assert "encoding" not in store.checkpoint_info("final")
    block, f32 = store.block("final"), reference.block("final")
    rounded = {k: t.bfloat16().float() for k, t in f32.tensors().items()}
    expected = FactoredResponses.from_tensors(
        reference.space, f32.eigen.basis.bfloat16().float(), f32.eigen.eigenvalues, f32.eigen.damping, f32.complement_gain,
        rounded, f32.folded_biases,
    )  # fmt: skip
    assert torch.equal(block.to_dense(), expected.to_dense())
    ours = model.attribute((xq, yq), responses=old)
    assert _relative_error(ours, model.attribute((xq, yq), responses=full)) < 5e-2  # format 4's bfloat16 accuracy


def test_a_scaled_shard_and_its_manifest_that_disagree_are_refused_naming_the_encoding(tmp_path):
    """A format 5 manifest whose shards lack every scale (float16 numbers as format 4 wrote them), and a manifest whose
    encoding this version does not know, are each a StoreError that names the encoding and the fix: never numbers read
    without their scales (before: "tensor 'net.1.weight@U@scale' is None", and an unknown encoding was taken for none)."""
    _, half = _fit(tmp_path, "factored", "float16")
    store = ResponseStore.load(half)
    entry = store.checkpoint_info("final")
    file = store.path / entry["shards"][0]["file"]
    save_file({k: t for k, t in load_file(str(file)).items() if not k.endswith(SCALE)}, str(file))
    manifest = json.loads((store.path / "manifest.json").read_text())
    manifest["checkpoints"][0]["shards"][0]["bytes"] = file.stat().st_size
    (store.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=rf"net.1.weight@U@scale' is missing.*{ENCODING}.*Re-run the simulation"):
        ResponseStore.load(half).block("final")
    manifest["checkpoints"][0]["encoding"] = "float8-scaled"
    (store.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=rf"encoding='float8-scaled'.*{ENCODING}.*install the version that wrote it"):
        ResponseStore.load(half)


def _per_source_error(ours: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """``Tensor[S]``: per source, the largest ``|ours - expected|`` over the queries over its largest ``|expected|``."""
    return (ours - expected).abs().amax(0) / expected.abs().amax(0)


@pytest.mark.parametrize(("codec", "dtype"), [("dense", "float16"), ("lorif", "float16"), ("dense", "bfloat16")])
def test_a_half_precision_dense_or_lorif_store_keeps_every_source_small_responses_included(tmp_path, codec, dtype):
    """2,000 examples: the responses ``r_b ~ G^-1 g_b / n`` of the well-fit ones hold entries below float16's 6e-8, which
    a plain float16 cast flushes to zero. Written as scaled float16 (as codec "factored"'s half stores), every source
    keeps its scores: measured per-source error (largest over the queries, over the source's largest score) at most
    4.9e-3 dense / 6.7e-3 lorif, in either half dtype (plain float16, the layout before: 4.8 / 5.5, the worst 1% of sources
    1.1 / 2.0 off; plain bfloat16 dense: 3.5e-2), for 1.6% / 6.7% more bytes than the plain cast (the scales; lorif's
    3-row output factors carry one per column)."""
    x, y = blobs(n=2000, d=6, classes=3, seed=15)
    xq, yq = blobs(n=6, d=6, classes=3, seed=16)
    scores, paths = {}, {}
    for stored in ("float32", dtype):
        torch.manual_seed(0)
        model = small_mlp(6, 3, hidden=24)
        cb = AttributionCallback(tmp_path / stored, codec=codec, rank=8, checkpoint_epochs=None, store_dtype=stored)
        fit(model, x, y, [cb], epochs=3, batch_size=64)
        scores[stored], paths[stored] = model.attribute((xq, yq), responses=cb.dirpath), cb.dirpath
    expected, ours = scores["float32"], scores[dtype]
    assert ResponseStore.load(paths[dtype]).checkpoint_info("final")["encoding"] == ENCODING
    per_source = _per_source_error(ours, expected)
    assert float(per_source.max()) < 1e-2, float(per_source.max())
    assert _relative_error(ours, expected) < 1e-3 and pearson(ours, expected) > 0.999999
    assert _bytes(paths[dtype]) < 0.56 * _bytes(paths["float32"])
    with pytest.warns(UserWarning, match="plain float16 responses: entries below 6e-8 were flushed"):  # the layout before
        plain = written_plain(paths["float32"], tmp_path / "plain", "float16")
        ResponseStore.load(plain)
    if codec == "dense" and dtype == "float16":  # what the plain cast lost: far off, and a tiny source scores 0
        assert float(_per_source_error(model.attribute((xq, yq), responses=plain), expected).max()) > 1.0


def test_a_tiny_source_keeps_its_response_in_a_float16_dense_store(tmp_path):
    """A source whose response lies entirely below float16's smallest number (1e-10 here: many examples, or a small
    loss) is kept to float16's precision, not stored as 0 (a plain float16 cast: every entry 0, so it scored 0)."""
    x, y = blobs(n=120, d=6, classes=3, seed=15)
    torch.manual_seed(0)
    model = small_mlp(6, 3, hidden=24)
    cb = AttributionCallback(tmp_path / "float32", codec="dense", checkpoint_epochs=None)
    fit(model, x, y, [cb], epochs=2)
    source = ResponseStore.load(cb.dirpath)
    responses = source.responses("final").clone()
    responses[:10] *= 1e-10 / responses[:10].abs().amax(1, keepdim=True)  # largest entry 1e-10
    shutil.copytree(cb.dirpath, tmp_path / "half")
    half = ResponseStore.load(tmp_path / "half")
    info = {k: v for k, v in source.checkpoint_info("final").items() if k not in {"shards", "dtype", "encoding"}}
    half.add_checkpoint("final", source.theta("final"), responses, info=info, source_stats=source.source_stats("final"), dtype="float16")
    back = ResponseStore.load(tmp_path / "half").responses("final")
    assert bool((back[:10] != 0).any(1).all())
    assert bool(((back - responses).abs() <= 2**-11 * responses.abs().amax(1, keepdim=True)).all())
    assert bool((responses[:10].half() == 0).all())  # what a plain float16 store keeps of them
