"""Half-precision stores of codec "factored": which rounding moves the scores, and what each layout costs on disk.

    OMP_NUM_THREADS=1 python benchmarks/half_precision.py --settings blobs-mlp digits-mlp mnist1d-mlp \\
        --out benchmarks/results/half-precision.json

Per setting, ONE Lightning fit with the callback's defaults and a float32 store (``digits-mlp`` / ``mnist1d-mlp``: the
bench's recipe and example order, ``bench.fit``; ``blobs-mlp``: ``tests/test_half_precision.py``'s 6-24-3 MLP,
``rank=64``, one checkpoint), and the first ``--queries`` test points. A factored response is
``r_s = gamma g_s + V^T c_s``, ``c_s = diag(1/(sigma + lam) - gamma) V (gamma g_s) / gamma`` derived from the stored
factors of ``gamma g_s`` and the basis ``V`` when the store is read (:mod:`lightning_attr.factored`).

``parts``, per checkpoint: the block rebuilt with one part rounded at a time (the dense codec's rows for reference),
scored by the linear readout ``<g_q, r_s>`` with the exact query gradients (autograd at the checkpoint's weights):
``max |diff| / max |score|`` and Pearson against the float32 block. ``cancellation``: the largest score of each term,
``<g_q, V^T c_s>`` and ``<g_q, gamma g_s>``, over the largest score: how much the derived response cancels.

``stores``: the checkpoints written as stores, each read by ``attribute()``'s defaults (the trajectory ensemble):
``float32`` (the fit's), ``format 4 bfloat16`` (the fit's files cast to bfloat16, format 4's half layout),
``half`` (this version's ``store_dtype="bfloat16"``: the basis float16, the shards float16 with power-of-two scales,
:mod:`lightning_attr.half_precision`), ``dense bfloat16`` / ``dense float16`` (the same responses as dense rows, this
version's half store of codec "dense": scaled float16 in either dtype) and ``dense ... plain (before)`` (the dense rows
cast plainly, as a dense half store was written before it was scaled): megabytes on disk and the ensemble's scores
against the float32 store's, per source too (the sources a plain float16 cast flushes to zero score 0). ``half + float32 basis`` counts what keeping the basis in
float32 would add (its bytes twice the float16 basis's).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench import CODE_COMMIT, SETTINGS, dir_bytes, fit, load_average  # noqa: E402
from conftest import written_plain  # noqa: E402

from lightning_attr import AttributionCallback, ResponseStore  # noqa: E402
from lightning_attr._io import atomic_write_json, atomic_write_text  # noqa: E402
from lightning_attr.factored import FactoredResponses  # noqa: E402
from lightning_attr.half_precision import decode, encode  # noqa: E402

HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}
SCALED = "scaled float16"
# (label, basis as, factors as, stored coordinates as): None keeps float32
PARTS = [
    ("format 4 bfloat16: basis and factors", "bfloat16", "bfloat16", None),
    ("basis bfloat16 only", "bfloat16", None, None),
    ("factors bfloat16 only", None, "bfloat16", None),
    ("factors and stored coordinates bfloat16 (format 3's layout)", None, "bfloat16", "bfloat16"),
    ("basis float16 only", "float16", None, None),
    ("this version's half: basis float16, factors scaled float16", "float16", SCALED, None),
    ("basis float32, factors scaled float16", None, SCALED, None),
]  # fmt: skip


def fit_blobs(workdir: Path) -> tuple[nn.Module, Path, Tensor, Tensor]:
    """``tests/test_half_precision.py``'s fit: ``(model, store, xq, yq)``, 50 queries."""
    from conftest import blobs, small_mlp
    from conftest import fit as fit_tensors

    x, y = blobs(n=120, d=6, classes=3, seed=15)
    xq, yq = blobs(n=50, d=6, classes=3, seed=16)
    torch.manual_seed(0)
    model = small_mlp(6, 3, hidden=24)
    cb = AttributionCallback(workdir / "float32", codec="factored", rank=64, checkpoint_epochs=None)
    fit_tensors(model, x, y, [cb], epochs=4)
    return model, Path(cb.dirpath), xq, yq


def fit_bench(name: str, workdir: Path, queries: int) -> tuple[nn.Module, Path, Tensor, Tensor]:
    """The bench's fit of ``name`` with the callback's defaults (float32): ``(model, store, xq, yq)``."""
    data = SETTINGS[name].load()
    cb = AttributionCallback(dirpath=str(workdir / "float32"))
    model, _ = fit(SETTINGS[name], data, [cb])
    return model, Path(cb.dirpath), data.x_test[:queries], data.y_test[:queries]


def query_gradients(model: nn.Module, store: ResponseStore, theta: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
    """``Tensor[Q, P]``: each query's loss gradient at ``theta`` (autograd, the store's parameter layout)."""
    from torch.func import functional_call, grad, vmap

    def loss(params, x, y):
        return nn.functional.cross_entropy(functional_call(model, params, (x[None],)), y[None])

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(store.space.unflatten(theta), xq, yq)
    return store.space.flatten(grads, batch_dims=1)


def _as(t: Tensor, how: str | None) -> Tensor:
    return t if how is None else t.to(HALF[how]).float()


def rounded(store: ResponseStore, block: FactoredResponses, basis: str | None, factors: str | None, coordinates: str | None) -> FactoredResponses:
    """``block`` with its basis, its stored tensors (factors and dense rest) and, if ``coordinates``, its eigen
    coordinates (derived from the float32 factors, then stored) rounded as named (``"scaled float16"``:
    :func:`~lightning_attr.half_precision.encode`); the coordinates derived from what is rounded otherwise."""
    tensors = block.tensors()
    tensors = decode(encode(tensors)) if factors == SCALED else {k: _as(t, factors) for k, t in tensors.items()}
    eigen = block.eigen
    if coordinates is not None:
        tensors["coordinates"] = _as(eigen.coordinates, coordinates)
    return FactoredResponses.from_tensors(
        store.space, _as(eigen.basis, basis), eigen.eigenvalues, eigen.damping, block.complement_gain, tensors, block.folded_biases
    )  # fmt: skip


def agreement(ours: Tensor, expected: Tensor) -> dict[str, float]:
    """Scores ``[Q, S]``: ``max |ours - expected| / max |expected|``, the Pearson correlation of all entries, per source
    ``max_q |ours - expected| / max_q |expected|`` (its largest and its 99th percentile), and the sources that score 0
    on every query where ``expected`` does not."""
    pair = torch.stack([ours.flatten().double(), expected.flatten().double()])
    per_source = (ours - expected).abs().amax(0) / expected.abs().amax(0)
    return {
        "max_rel_diff": float((ours - expected).abs().max() / expected.abs().max()), "pearson": float(torch.corrcoef(pair)[0, 1]),
        "worst_source": float(per_source.max()), "worst_1pct_sources": float(per_source.quantile(0.99)),
        "zero_sources": int(((ours == 0).all(0) & (expected != 0).any(0)).sum()),
    }  # fmt: skip


def parts(model: nn.Module, store: ResponseStore, xq: Tensor, yq: Tensor) -> dict[str, dict]:
    """Per checkpoint: each rounding of :data:`PARTS` and of the dense rows, and the cancellation."""
    out = {}
    for name in store.checkpoints:
        block, theta = store.block(name), store.theta(name)
        grads = query_gradients(model, store, theta, xq, yq)
        dense = block.to_dense()
        expected = grads @ dense.T
        row = {f"dense {d}": agreement(grads @ _as(dense, d).T, expected) for d in HALF}
        for label, basis, factors, coordinates in PARTS:
            row[label] = agreement(grads @ rounded(store, block, basis, factors, coordinates).to_dense().T, expected)
        top = float(expected.abs().max())
        row["cancellation"] = {
            "eigen_term_over_score": float((grads @ block.eigen.to_dense().T).abs().max()) / top,
            "gradient_term_over_score": float((grads @ block.gradients.to_dense().T).abs().max()) / top,
        }
        row["rank"], row["numbers_per_source"] = block.rank, store.checkpoint_info(name)["numbers_per_source"]
        out[name] = row
    return out


def _entry_info(entry: dict, drop: set[str]) -> dict:
    """A manifest entry's fields to pass as ``info`` when the checkpoint is written again (its files' fields dropped)."""
    return {k: v for k, v in entry.items() if k not in {"shards", "dtype", "encoding", "basis_file", "basis_bytes", *drop}}


def write_layouts(full: Path, workdir: Path) -> dict[str, Path]:
    """The float32 store ``full`` as the layouts of ``stores`` (module docstring): ``{layout: store path}``."""
    source = ResponseStore.load(full)
    paths = {"float32": full}
    for layout in ("format 4 bfloat16", "half", "dense bfloat16", "dense float16"):
        paths[layout] = path = workdir / layout.replace(" ", "-")
        shutil.copytree(full, path)
        store = ResponseStore.load(path)
        for name in source.checkpoints:
            entry, block = source.checkpoint_info(name), source.block(name)
            if layout == "half":
                store.add_checkpoint(name, source.theta(name), block, info=_entry_info(entry, set()),
                                     source_stats=source.source_stats(name), dtype="bfloat16")  # fmt: skip
            elif layout.startswith("dense"):
                for file in [entry["basis_file"], *(shard["file"] for shard in entry["shards"])]:
                    (path / file).unlink()
                store.add_checkpoint(name, source.theta(name), block.to_dense(), info=_entry_info(entry, set(block.entry())),
                                     source_stats=source.source_stats(name), dtype=layout.split()[1])  # fmt: skip
        if layout == "format 4 bfloat16":  # format 4 cast every stored number to the dtype named
            manifest = json.loads((path / "manifest.json").read_text())
            for entry in manifest["checkpoints"]:
                for item in [{"file": entry["basis_file"]}, *entry["shards"]]:
                    file = path / item["file"]
                    save_file({k: t.bfloat16() for k, t in load_file(str(file)).items()}, str(file))
                    item["bytes"] = file.stat().st_size
                entry.update(dtype="bfloat16", basis_bytes=(path / entry["basis_file"]).stat().st_size)
            manifest["format_version"] = 4
            (path / "manifest.json").write_text(json.dumps(manifest))
    for dtype in HALF:  # the dense rows cast plainly, as this version's dense half stores were written before scaling
        paths[f"dense {dtype} plain (before)"] = written_plain(paths["dense float16"], workdir / f"dense-{dtype}-plain", dtype)
    return paths


def stores(model: nn.Module, full: Path, workdir: Path, xq: Tensor, yq: Tensor) -> dict[str, dict]:
    """Per layout: megabytes on disk and ``attribute()``'s scores (the ensemble) against the float32 store's."""
    paths = write_layouts(full, workdir)
    expected = model.attribute((xq, yq), responses=full)
    out = {}
    for layout, path in paths.items():
        scores = model.attribute((xq, yq), responses=path)
        out[layout] = {"mb": dir_bytes(path) / 1e6, **agreement(scores, expected)}
    half = ResponseStore.load(paths["half"])
    basis = sum(half.checkpoint_info(name)["basis_bytes"] for name in half.checkpoints)
    out["half + float32 basis"] = {"mb": (dir_bytes(paths["half"]) + basis) / 1e6}
    return out


def markdown(results: dict) -> str:
    lines = ["<!-- generated by benchmarks/half_precision.py; do not edit -->", ""]
    for name, r in results["settings"].items():
        lines += [f"### {name}", "", "| layout | store MB | ensemble max abs diff / max abs score | Pearson | per source: worst / "
                  "worst 1% | sources scoring 0 |", "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for layout, s in r["stores"].items():
            diff = (f"{s['max_rel_diff']:.2e} | {s['pearson']:.7f} | {s['worst_source']:.2e} / {s['worst_1pct_sources']:.2e} | "
                    f"{s['zero_sources']}" if "pearson" in s else "– | – | – | –")  # fmt: skip
            lines.append(f"| {layout} | {s['mb']:.2f} | {diff} |")
        checkpoints = list(r["parts"])
        lines += ["", "| rounded (linear readout, exact query gradients) | " + " | ".join(checkpoints) + " |",
                  "| --- |" + " --- |" * len(checkpoints)]  # fmt: skip
        for label in [k for k, v in r["parts"][checkpoints[0]].items() if isinstance(v, dict) and "pearson" in v]:
            cells = [f"{r['parts'][c][label]['max_rel_diff']:.2e} ({r['parts'][c][label]['pearson']:.6f})" for c in checkpoints]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        cells = [f"{r['parts'][c]['cancellation']['eigen_term_over_score']:.1f} / {r['parts'][c]['cancellation']['gradient_term_over_score']:.1f}"
                 for c in checkpoints]  # fmt: skip
        lines += ["| cancellation: max score of the eigen term / of the gradient term, over the max score | " + " | ".join(cells) + " |", ""]
    lines += [f"Commit {results['commit']}, measured {results['measured_at']} UTC, load {results['load_average']}. Cells: max |diff| / "
              "max |score| against float32 (Pearson).", ""]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=["blobs-mlp", "digits-mlp", "mnist1d-mlp"], choices=["blobs-mlp", *SETTINGS])
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--out", default="benchmarks/results/half-precision.json")
    args = p.parse_args(argv)
    results = {"commit": CODE_COMMIT, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "settings": {}}
    for name in args.settings:
        workdir = Path(tempfile.mkdtemp(prefix=f"half-{name}-"))
        try:
            model, full, xq, yq = fit_blobs(workdir) if name == "blobs-mlp" else fit_bench(name, workdir, args.queries)
            model.eval()
            results["settings"][name] = {"parts": parts(model, ResponseStore.load(full), xq, yq), "stores": stores(model, full, workdir, xq, yq)}
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        print(json.dumps(results["settings"][name]["stores"], indent=1), flush=True)
    results["load_average"] = load_average()
    out = Path(args.out)
    atomic_write_json(out, results)
    atomic_write_text(out.with_suffix(".md"), markdown(results))
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
