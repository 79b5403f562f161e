"""Storage of codec "factored" stores, per checkpoint (ensemble member): the bytes fixed per member and the bytes per
source, in the layout before store format 4 (eigen coordinates and every bias stored) and in format 4's (coordinates
derived from the factors and the basis when read, each factored layer's bias folded into its weight's factors), in
float32 and bfloat16 (``store_dtype``: the basis, the factors and the dense rest alike), against TRAK-1's 512 float32
(2,048 bytes) per source; and the load cost the derived coordinates add.

    OMP_NUM_THREADS=1 python benchmarks/storage.py \\
        --stores digits-mlp=/tmp/compact/stores/digits-mlp/responses-factored ... \\
        --out benchmarks/results/storage-compact.json

Per store (``NAME=PATH``, a codec ``"factored"`` store of either format, e.g. ``benchmarks/readout.py --factored``'s)
and checkpoint: its block is read (:meth:`ResponseStore.block`) and written again by :meth:`ResponseStore.write_block`
into a scratch directory in each layout and dtype, and the files' bytes are counted:

- ``fixed``: the basis (``k x P``) and the parameter snapshot (``P``), once per member;
- ``per source``: the shard bytes over ``S`` (the stored numbers, ``numbers_per_source``, and the 8-byte source index
  of each row) plus the per-source bookkeeping file (``valid``, ``shortfall``, ``missing_examples``) over ``S``.

The format 4 layout folds the biases that equal their weight's ``U`` summed over columns (largest difference at most
1e-3 of the largest entry, :func:`~lightning_attr.factored.bias_agreement`, as the simulation checks), and records the
largest difference between the stored and the derived coordinates (relative to the largest stored one; 0 on a format 4
store, which stores none). The ensemble's bytes are the members' summed: ``fixed + S x per_source`` against TRAK-1's
``2048 S``; ``break_even_sources``: the least ``S`` at which ours is at most TRAK-1's (``None`` where our bytes per
source exceed 2,048). Load cost: ``block()`` of a fresh store object on each layout's float32 copy, median of
``--rounds`` alternating rounds (the derived coordinates' share: the difference), and
:func:`~lightning_attr.factored.eigen_coordinates` alone.
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
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import CODE_COMMIT  # noqa: E402

from lightning_attr import ResponseStore  # noqa: E402
from lightning_attr._io import atomic_write_json  # noqa: E402
from lightning_attr.factored import FactoredResponses, bias_agreement, eigen_coordinates  # noqa: E402
from lightning_attr.store import FORMAT_VERSION  # noqa: E402

TRAK1_BYTES_PER_SOURCE = 512 * 4  # dattri / traker TRAK-1: one 512-dimensional float32 projection per source
LAYOUTS = ("format 3", "format 4")
DTYPES = ("float32", "bfloat16")


def _layouts(block: FactoredResponses) -> tuple[dict[str, FactoredResponses], float]:
    """``({layout: block}, largest relative difference of stored to derived coordinates)``: the block with its
    coordinates and biases stored (format 3) and with them derived and folded where they reproduce (format 4)."""
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
    old = replace(block, folded_biases={}, derived_coordinates=False)
    new = FactoredResponses.derived(eigen.basis, eigen.eigenvalues, eigen.damping, block.complement_gain, gradients, folded)
    return {"format 3": old, "format 4": new}, difference


def _written(store: ResponseStore, scratch: Path, name: str, block: FactoredResponses, dtype: str) -> dict:
    """``block`` written as checkpoint ``name`` of a scratch store (``store``'s manifest, parameter snapshot and per-source
    bookkeeping; readable) in ``dtype``: its files' bytes."""
    copy = ResponseStore(scratch, {**store.manifest, "format_version": FORMAT_VERSION, "checkpoints": []})
    entry, shards = copy.write_block(name, block, dtype)
    info = store.checkpoint_info(name)
    for key in ("params_file", "sources_file"):
        shutil.copy(store.path / info[key], scratch / info[key])
    copy.manifest["checkpoints"] = [{**info, **entry, "shards": shards, "dtype": dtype}]
    copy._write_manifest()
    return {
        "numbers_per_source": entry["numbers_per_source"], "folded_biases": entry["folded_biases"],
        "coordinates": entry["coordinates"], "basis_bytes": entry["basis_bytes"],
        "params_bytes": (scratch / info["params_file"]).stat().st_size, "shard_bytes": sum(s["bytes"] for s in shards),
        "sources_file_bytes": (scratch / info["sources_file"]).stat().st_size,
    }  # fmt: skip


def _median_load(paths: dict[str, Path], name: str, rounds: int) -> dict[str, float]:
    """``{layout: median seconds}`` of ``ResponseStore.load(path).block(name)`` (a fresh store: nothing cached),
    the layouts alternating within each round."""
    seconds: dict[str, list[float]] = {layout: [] for layout in paths}
    for _ in range(rounds):
        for layout, path in paths.items():
            start = time.perf_counter()
            ResponseStore.load(path).block(name)
            seconds[layout].append(time.perf_counter() - start)
    return {layout: statistics.median(s) for layout, s in seconds.items()}


def measure(label: str, path: Path, rounds: int) -> dict:
    store = ResponseStore.load(path)
    members, sources = [], store.n_sources
    with tempfile.TemporaryDirectory(prefix="storage-") as tmp:
        for name in store.checkpoints:
            if store.codec(name) != "factored":
                raise SystemExit(f"{path}: checkpoint {name!r} is codec {store.codec(name)!r}; this script measures 'factored' stores.")
            blocks, difference = _layouts(store.block(name))
            eigen = blocks["format 4"].eigen
            start = time.perf_counter()
            eigen_coordinates(eigen.basis, eigen.eigenvalues, eigen.damping, blocks["format 4"].complement_gain, blocks["format 4"].gradients)
            derive_seconds = time.perf_counter() - start
            member = {"checkpoint": name, "rank": eigen.rank, "coordinates_difference": difference, "derive_seconds": derive_seconds}
            copies = {}
            for layout in LAYOUTS:
                for dtype in DTYPES:
                    scratch = Path(tmp) / f"{layout.replace(' ', '')}-{dtype}"
                    files = _written(store, scratch, name, blocks[layout], dtype)
                    files["bytes_per_source"] = (files["shard_bytes"] + files["sources_file_bytes"]) / sources
                    files["fixed_bytes"] = files["basis_bytes"] + files["params_bytes"]
                    member[f"{layout}, {dtype}"] = files
                    if dtype == "float32":
                        copies[layout] = scratch
            member["load_seconds"] = _median_load(copies, name, rounds)
            members.append(member)
            print(json.dumps({"store": label, **{k: v for k, v in member.items() if not k.startswith("format")}}), flush=True)
    return {"store": label, "path": str(path), "sources": sources, "members": members, "ensemble": _ensemble(members, sources)}


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
                    f"| {r['store']} (S = {r['sources']:,}) | {key} | {fixed} | {per} | {e['total_bytes'] / 1e6:.1f} "
                    f"(TRAK-1 {e['trak1_bytes'] / 1e6:.2f}) | {e['bytes_per_source']:.0f} ({e['per_source_vs_trak1']:.2f}x) | {even} |"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stores", nargs="+", required=True, help="NAME=PATH of codec 'factored' stores (format 3 or 4)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds of the load timing")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "storage.json"))
    args = p.parse_args(argv)
    results = []
    for item in args.stores:
        label, _, path = item.partition("=")
        results.append(measure(label, Path(path), args.rounds))
    print(table(results))
    atomic_write_json(Path(args.out), {"code_commit": CODE_COMMIT, "torch_threads": torch.get_num_threads(), "stores": results})


if __name__ == "__main__":
    main()
