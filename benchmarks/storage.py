"""Storage of codec "factored" stores, per checkpoint (ensemble member): the bytes fixed per member and the bytes per
source, in the layout before store format 4 (eigen coordinates and every bias stored) and in format 4's (coordinates
derived from the factors and the basis when read, each factored layer's bias folded into its weight's factors), in
float32 and bfloat16 (``store_dtype``; store format 5 writes a half-precision factored checkpoint as a float16 basis and
float16 shards with power-of-two scales, :mod:`lightning_attr.half_precision`), against TRAK-1's 512 float32
(2,048 bytes) per source; and the load cost the derived coordinates add.

    OMP_NUM_THREADS=1 python benchmarks/storage.py \\
        --stores digits-mlp=/tmp/compact/stores/digits-mlp/responses-factored ... \\
        --readout-stores /tmp/compact/stores --out benchmarks/results/storage-compact.json

Per store (``NAME=PATH``, a codec ``"factored"`` store of either format, e.g. ``benchmarks/readout.py --factored``'s)
and checkpoint: its block is read (:meth:`ResponseStore.block`) and written again by :meth:`ResponseStore.write_block`
into a scratch directory in each layout and dtype, and the files' bytes are counted:

- ``fixed``: the basis (``k x P``) and the parameter snapshot (``P``), once per member;
- ``per source``: the shard bytes over ``S`` (the stored numbers, ``numbers_per_source``, and each shard's header) plus the per-source bookkeeping file (``valid``, ``shortfall``, ``missing_examples``) over ``S``.

Layouts: ``"stored"``, format 3's content (the coordinates and every bias in the shards; written by this version's
writer, in contiguous shards: format 3's shards also held an 8-byte source index per source, which the input store's
own bytes, ``store_bytes``, include where it is a format 3 store) and ``"derived"``, format 4's, which folds the biases
that equal their weight's ``U`` summed over columns (largest difference at most 1e-3 of the largest entry,
:func:`~lightning_attr.factored.bias_agreement`, as the simulation checks), and records the largest difference between
the stored and the derived coordinates (relative to the largest stored one; 0 on a format 4 store, which stores
none). The ensemble's bytes are the members' summed: ``fixed + S x per_source`` against TRAK-1's ``2048 S``; ``break_even_sources``: the least ``S`` at which ours is at most TRAK-1's (``None`` where our bytes per
source exceed 2,048). Load cost, medians of ``--rounds`` alternating rounds: ``block()`` of a fresh store object on
each layout's float32 copy (the derived coordinates' share: the difference), :func:`~lightning_attr.factored.eigen_coordinates`
alone, and with ``--readout-stores`` (``benchmarks/readout.py``'s ``--store-dir``, whose fitted model of the setting
NAME is read) ``attribute()``'s first call on one test query against each layout's store (every member read).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import CODE_COMMIT  # noqa: E402
from convergence import HERE as SETTINGS  # noqa: E402
from readout import fitted  # noqa: E402

from lightning_attr import ResponseStore  # noqa: E402
from lightning_attr._io import atomic_write_json  # noqa: E402
from lightning_attr.factored import FactoredResponses, bias_agreement, eigen_coordinates  # noqa: E402
from lightning_attr.store import FORMAT_VERSION  # noqa: E402

TRAK1_BYTES_PER_SOURCE = 512 * 4  # dattri / traker TRAK-1: one 512-dimensional float32 projection per source
LAYOUTS = ("stored", "derived")  # format 3's content (coordinates, every bias) / format 4's (derived, folded)
DTYPES = ("float32", "bfloat16")


def _layouts(block: FactoredResponses) -> tuple[dict[str, FactoredResponses], float]:
    """``({layout: block}, largest relative difference of stored to derived coordinates)``: the block with its
    coordinates and biases stored (``"stored"``, format 3's content) and with them derived and folded where they
    reproduce (``"derived"``, format 4's)."""
    gradients, eigen = block.gradients, block.eigen
    derived = eigen_coordinates(eigen.basis, eigen.eigenvalues, eigen.damping, block.complement_gain, gradients)
    finite = torch.isfinite(eigen.coordinates).all(dim=1)
    difference = float((derived - eigen.coordinates)[finite].abs().max() / eigen.coordinates[finite].abs().max()) if bool(finite.any()) else 0.0
    candidates = {}
    for weight, (u, _) in gradients.factors.items():
        bias = weight.removesuffix("weight") + "bias"
        if bias in gradients.rest and gradients.rest[bias][0].numel() == u.shape[1]:
            candidates[bias] = weight
    agree = bias_agreement(gradients.factors, gradients.rest, finite, candidates).tolist()
    folded = {b: w for (b, w), ok in zip(candidates.items(), agree) if ok}
    old = replace(block, folded_biases={}, coordinates=eigen.coordinates)
    new = FactoredResponses(eigen.basis, eigen.eigenvalues, eigen.damping, block.complement_gain, gradients, folded)
    return {"stored": old, "derived": new}, difference


def _scratch(store: ResponseStore, path: Path) -> ResponseStore:
    """An empty store at ``path`` for ``store``'s model and sources, to write its checkpoints into again."""
    path.mkdir(parents=True)
    return ResponseStore(path, {**store.manifest, "format_version": FORMAT_VERSION, "checkpoints": []})


def _written(copy: ResponseStore, store: ResponseStore, name: str, block: FactoredResponses, dtype: str) -> dict:
    """``block`` written as checkpoint ``name`` of ``copy`` (with ``store``'s parameter snapshot and per-source
    bookkeeping; listed in its manifest, so readable) in ``dtype``: its files' bytes."""
    entry, shards = copy.write_block(name, block, dtype)
    info = store.checkpoint_info(name)
    for key in ("params_file", "sources_file"):
        shutil.copy(store.path / info[key], copy.path / info[key])
    copy.manifest["checkpoints"].append({**info, **entry, "shards": shards, "dtype": dtype})
    copy._write_manifest()
    return {
        "numbers_per_source": entry["numbers_per_source"], "folded_biases": entry["folded_biases"],
        "coordinates": entry["coordinates"], "basis_bytes": entry["basis_bytes"],
        "params_bytes": (copy.path / info["params_file"]).stat().st_size, "shard_bytes": sum(s["bytes"] for s in shards),
        "sources_file_bytes": (copy.path / info["sources_file"]).stat().st_size,
    }  # fmt: skip


def _alternating(calls: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """``{name: median seconds}`` of each call, the calls alternating within each of ``rounds`` rounds."""
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in seconds.items()}


def _first_query(model, copies: dict[str, Path], x: torch.Tensor, y: torch.Tensor, rounds: int) -> dict[str, float]:
    """``{layout: median seconds}`` of ``model.attribute()``'s first call on one query against each layout's store
    (the module's cached attributors dropped before each: every member's block read and laid out again)."""

    def first(path: Path):
        model.__dict__.pop("_attributors", None)
        return model.attribute((x, y), responses=path)

    return _alternating({layout: partial(first, path) for layout, path in copies.items()}, rounds)


def measure(label: str, path: Path, rounds: int, tmp: Path, readout_stores: Path | None) -> dict:
    store = ResponseStore.load(path)
    members, sources = [], store.n_sources
    copies = {(layout, dtype): _scratch(store, tmp / label / f"{layout.replace(' ', '')}-{dtype}") for layout in LAYOUTS for dtype in DTYPES}
    for name in store.checkpoints:
        if store.codec(name) != "factored":
            raise SystemExit(f"{path}: checkpoint {name!r} is codec {store.codec(name)!r}; this script measures 'factored' stores.")
        blocks, difference = _layouts(store.block(name))
        new = blocks["derived"]
        derive = _alternating({"derive": lambda: eigen_coordinates(new.basis, new.eigenvalues, new.damping, new.complement_gain, new.gradients)}, rounds)
        member = {"checkpoint": name, "rank": new.rank, "coordinates_difference": difference, "derive_seconds": derive["derive"]}
        for (layout, dtype), copy in copies.items():
            files = _written(copy, store, name, blocks[layout], dtype)
            files["bytes_per_source"] = (files["shard_bytes"] + files["sources_file_bytes"]) / sources
            files["fixed_bytes"] = files["basis_bytes"] + files["params_bytes"]
            member[f"{layout}, {dtype}"] = files
        reads = {layout: partial(lambda p: ResponseStore.load(p).block(name), copies[layout, "float32"].path) for layout in LAYOUTS}
        member["block_seconds"] = _alternating(reads, rounds)
        members.append(member)
        print(json.dumps({"store": label, **{k: v for k, v in member.items() if k.split(",")[0] not in LAYOUTS}}), flush=True)
    on_disk = sum(f.stat().st_size for f in store.path.rglob("*") if f.is_file())
    out = {
        "store": label, "path": str(path), "format_version": store.manifest["format_version"], "store_bytes": on_disk,
        "sources": sources, "members": members, "ensemble": _ensemble(members, sources),
    }  # fmt: skip
    if readout_stores is not None:  # benchmarks/readout.py's fitted model of this setting: attribute()'s first call
        data = SETTINGS[label].load()
        model, _, _ = fitted(label, data, readout_stores, factored=True)
        floats = {layout: copies[layout, "float32"].path for layout in LAYOUTS}
        out["first_query_seconds"] = _first_query(model, floats, data.x_test[:1], data.y_test[:1], rounds)
        print(json.dumps({"store": label, "first_query_seconds": out["first_query_seconds"]}), flush=True)
    return out


def _ensemble(members: list[dict], sources: int) -> dict:
    """Per layout and dtype: the members' fixed bytes and bytes per source summed, the store's bytes at ``S`` sources,
    TRAK-1's, and the break-even ``S``."""
    out = {}
    for layout in LAYOUTS:
        for dtype in DTYPES:
            key = f"{layout}, {dtype}"
            fixed = sum(m[key]["fixed_bytes"] for m in members)
            per_source = sum(m[key]["bytes_per_source"] for m in members)
            margin = TRAK1_BYTES_PER_SOURCE - per_source
            out[key] = {
                "fixed_bytes": fixed, "bytes_per_source": per_source, "total_bytes": fixed + per_source * sources,
                "trak1_bytes": TRAK1_BYTES_PER_SOURCE * sources, "per_source_vs_trak1": per_source / TRAK1_BYTES_PER_SOURCE,
                "break_even_sources": math.ceil(fixed / margin) if margin > 0 else None,
            }  # fmt: skip
    return out


def table(results: list[dict]) -> str:
    lines = [
        "| store | layout, dtype | per member: fixed bytes (basis + params) | per member: numbers / bytes per source | ensemble: MB at S | "
        "ensemble bytes per source (TRAK-1: 2,048) | S where ours <= TRAK-1 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        for layout in LAYOUTS:
            for dtype in DTYPES:
                key = f"{layout}, {dtype}"
                m, e = [m[key] for m in r["members"]], r["ensemble"][key]
                fixed = " / ".join(f"{x['basis_bytes'] / 1e6:.2f} + {x['params_bytes'] / 1e6:.2f} MB" for x in m)
                per = " / ".join(f"{x['numbers_per_source']} / {x['bytes_per_source']:.0f}" for x in m)
                even = "never" if e["break_even_sources"] is None else f"{e['break_even_sources']:,}"
                lines.append(
                    f"| {r['store']} (S = {r['sources']:,}; format {r['format_version']}, {r['store_bytes'] / 1e6:.1f} MB) | {key} | {fixed} | {per} | {e['total_bytes'] / 1e6:.1f} "
                    f"(TRAK-1 {e['trak1_bytes'] / 1e6:.2f}) | {e['bytes_per_source']:.0f} ({e['per_source_vs_trak1']:.2f}x) | {even} |"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stores", nargs="+", required=True, help="NAME=PATH of codec 'factored' stores (format 3 or 4)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds of the load timing")
    p.add_argument("--readout-stores", help="benchmarks/readout.py's --store-dir: time attribute()'s first call with its "
                   "fitted model of each store whose NAME is a setting")  # fmt: skip
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "storage.json"))
    args = p.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="storage-") as tmp:
        for item in args.stores:
            label, _, path = item.partition("=")
            readout_stores = Path(args.readout_stores) if args.readout_stores and label in SETTINGS else None
            results.append(measure(label, Path(path), args.rounds, Path(tmp), readout_stores))
    print(table(results))
    atomic_write_json(Path(args.out), {"code_commit": CODE_COMMIT, "torch_threads": torch.get_num_threads(), "stores": results})


if __name__ == "__main__":
    main()
