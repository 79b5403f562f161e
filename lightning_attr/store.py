"""ResponseStore: response checkpoints on disk (safetensors shards + a JSON manifest).

Layout of a store directory::

    manifest.json                       format, sources, parameter space, fingerprint, checkpoints
    <checkpoint>/params.safetensors     theta_e, the parameters the responses were simulated at
    <checkpoint>/sources.safetensors    per-source bookkeeping (valid, shortfall, examples)
    <checkpoint>/responses-00000.safetensors   codec "dense": {param name: Tensor[S_shard, *shape],
                                               "__source_index__": LongTensor[S_shard], the shard's sources}
    <checkpoint>/basis.safetensors             codec "eigen": {param name: Tensor[k, *shape]}, the basis V
    <checkpoint>/coordinates-00000.safetensors codec "eigen": {"coordinates": Tensor[S_shard, k]}
    <checkpoint>/factored-00000.safetensors    codec "factored" (and its basis.safetensors): {weight@U / weight@V:
                                               the gradient factors, param name: the dense rest but the folded
                                               biases; "coordinates": Tensor[S_shard, k] only where the manifest
                                               says "coordinates": "stored"; where the manifest says "encoding":
                                               "float16-scaled", float16 with key@scale beside each}; sources
                                               [start, stop) (format 3: "__source_index__")

Format version 5: a codec ``"factored"`` checkpoint of a half-precision store (``dtype`` ``"float16"`` or ``"bfloat16"``)
holds its basis in float16 and its shards as float16 with a power-of-two scale per source and factor column (manifest
field ``"encoding": "float16-scaled"``, :mod:`half_precision`); version 4 half stores held both in the dtype named and
are read as they are, with a warning. Codecs ``"dense"`` and ``"lorif"`` write their half shards the same way (the
same field); their earlier format 5 half stores, cast plainly and naming no encoding, are read as they are (plain
float16: with a warning). A reader of format 5 before that refuses a dense or lorif checkpoint with an encoding (by
name, "a newer lightning_attr wrote it"), so the version stays 5. Version 4: a codec ``"factored"`` checkpoint may leave out what its other numbers determine (manifest fields
``"coordinates": "derived"``, the eigen coordinates computed from the factors and the basis when first read, and
``"folded_biases": {bias: weight}``, each the weight's ``U`` summed over its columns; :mod:`factored`); version 3
factored checkpoints stored both and are read as they are. Version 3: a dense shard holds any sources in any order
(its ``__source_index__`` says which; the simulation writes shards as sources finish, and each process of a
distributed fit writes its own, :class:`ShardWriter`). Version 2 named each checkpoint's codec (``"dense"`` or ``"eigen"``, see
:mod:`codecs`) with contiguous shards ``[start, stop)``; version 1 stores (dense only, no codec field)
are read as dense. A checkpoint is listed in the manifest only once every shard of every source is
written (:meth:`ResponseStore.commit` checks that each source is covered exactly once).

Every file is written to a temporary name and renamed; the manifest is written last, so a crash
leaves the previous manifest (and everything it points to) intact. Loading never unpickles.
"""

from __future__ import annotations

import json
import os
import re
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from lightning_attr import half_precision
from lightning_attr._io import atomic_save_tensors, atomic_write_bytes
from lightning_attr.codecs import (
    AnyBlock, DenseResponses, EigenResponses, FactoredResponses, LowRankResponses, SplitResponses, StreamedResponses,
)
from lightning_attr.factored import COORDINATES
from lightning_attr.lowrank import FACTOR_KEYS
from lightning_attr.parameters import ParameterSpace
from lightning_attr.sources import SourceMap

FORMAT = "lightning_attr.responses"
FORMAT_VERSION = 5
# 1: dense responses only, no "codec" field; 2: contiguous shards; 3: codec "factored" keeps its coordinates and biases;
# 4: half-precision factored checkpoints in the dtype named (no "encoding" field)
READABLE_VERSIONS = (1, 2, 3, 4, 5)
SOURCE_INDEX = "__source_index__"  # a dense shard's LongTensor[S_shard] of source ids (format 3)
_STATS = ("valid", "shortfall", "missing_examples")
MANIFEST = "manifest.json"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_STEM_CODECS = {"responses": "dense", "factors": "lorif", "factored": "factored", "coordinates": "eigen"}  # shard stem -> codec


class StoreError(RuntimeError):
    """A response store is missing, damaged, or does not belong to the model."""


def complete_sources(stats: dict[str, Tensor]) -> Tensor:
    """``BoolTensor[S]``: sources whose response can be scored: finite gradients (``valid``), every member
    injected (``missing_examples == 0``) and propagated for the full horizon (``shortfall == 0``)."""
    complete = stats["valid"].bool().clone()
    for key in ("shortfall", "missing_examples"):
        if key in stats:
            complete &= stats[key] == 0
    return complete


def has_store(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def check_store_path(path: Any) -> str | os.PathLike:
    """``path`` if it can name a store directory; a clear :class:`StoreError` for ``None`` and non-paths."""
    if path is None:
        raise StoreError(
            "responses is None: there is no response store yet. AttributionCallback.dirpath is set when "
            "trainer.fit() starts and the store is written during the fit; call attribute() after fitting "
            "with the callback, or pass the directory of an existing store."
        )
    if not isinstance(path, (str, os.PathLike)):
        hint = ": pass its dirpath (responses=cb.dirpath, set when fit starts)" if hasattr(path, "dirpath") else ""
        raise StoreError(
            f"responses must be a store directory (str or os.PathLike) or a ResponseStore, got {type(path).__name__}{hint}."
        )
    return path


def manifest_stamp(path: str | os.PathLike) -> int | None:
    """Modification time (ns) of the store's manifest, or ``None`` when there is no manifest."""
    try:
        return (Path(path) / MANIFEST).stat().st_mtime_ns
    except OSError:
        return None


def _model_mismatch(path: Path, stored: ParameterSpace, model: ParameterSpace) -> str:
    """What differs between the parameter space a store was simulated for and the model's."""
    theirs = {n: (s, d) for n, s, d in zip(stored.names, stored.shapes, stored.dtypes)}
    ours = {n: (s, d) for n, s, d in zip(model.names, model.shapes, model.dtypes)}
    if theirs.keys() == ours.keys() and all(theirs[n][0] == ours[n][0] for n in ours):
        changed = sorted({(theirs[n][1], ours[n][1]) for n in ours if theirs[n][1] != ours[n][1]})
        was, now = ", ".join(sorted({a for a, _ in changed})), ", ".join(sorted({b for _, b in changed}))
        return (
            f"The model's parameters are {now} but the responses in {path} were simulated for {was} parameters: "
            f"the model's dtype changed after training (e.g. .double() or .half()). Cast it back (model.to("
            f"torch.{sorted({a for a, _ in changed})[0]})) before attributing; the readout runs in float32 anyway."
        )
    missing = [n for n in theirs if n not in ours][:4]
    extra = [n for n in ours if n not in theirs][:4]
    reshaped = [(n, list(theirs[n][0]), list(ours[n][0])) for n in ours if n in theirs and theirs[n][0] != ours[n][0]][:4]
    found = "; ".join(
        part for part in (
            f"parameters the store has and the model lacks: {missing}" if missing else "",
            f"parameters the model has and the store lacks: {extra}" if extra else "",
            f"shapes (name, store, model): {reshaped}" if reshaped else "",
            "the same parameters in another order" if not (missing or extra or reshaped) else "",
        ) if part
    )  # fmt: skip
    return (
        f"The responses in {path} were simulated for a different model (parameter fingerprint mismatch: {found}). "
        "Attribute with the model that was trained with the callback, or re-run the simulation for this one."
    )


def check_checkpoint_name(name: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_.=-]+", name):
        raise ValueError(f"checkpoint name {name!r} must match [A-Za-z0-9_.=-]+.")


def _check_dtype(dtype: str) -> None:
    if dtype not in _DTYPES:
        raise ValueError(f"store dtype must be one of {sorted(_DTYPES)}, got {dtype!r}.")


def check_coverage(covered: Tensor, what: str) -> None:
    """Raises :class:`StoreError` unless ``covered: LongTensor[S]`` (shard rows read per source) is all ones."""
    if not bool((covered == 1).all()):
        missing, repeated = (covered == 0).nonzero().squeeze(1), (covered > 1).nonzero().squeeze(1)
        raise StoreError(
            f"The shards of {what} hold {missing.numel()} sources no time (first: {missing[:5].tolist()}) and "
            f"{repeated.numel()} more than once (first: {repeated[:5].tolist()}): the store is damaged. Re-run the "
            "simulation."
        )


class ShardWriter:
    """Writes the responses of one checkpoint as they are simulated: rows of any sources, in any order.

    Rows are buffered (in the storage dtype) until ``rows_per_shard`` of them are waiting, then written as
    one shard ``<name>/responses-<prefix><count>.safetensors`` holding ``{param name: Tensor[C, *shape]}``
    and the sources ``"__source_index__": LongTensor[C]`` (format 3's layout, listed as ``{"file", "rows", "bytes"}``).
    Peak memory: ``rows_per_shard * P`` numbers of the storage dtype, whatever the number of sources. The shards are
    listed in the manifest only when the checkpoint is committed (:meth:`ResponseStore.commit` /
    :meth:`ResponseStore.add_checkpoint`).

    Args:
        path: the store directory. name: the checkpoint. space: the parameter space (``P``).
        dtype: storage dtype name (``None``: each tensor's own).
        prefix: distinguishes the shards of several processes (``"r1-"``).
        rows_per_shard: sources per shard (at least 1).
        encode: ``Tensor[C, P] -> {key: Tensor[C, ...]}``, the codec's shard tensors (default: one tensor per
            parameter, codec ``"dense"``; codec ``"lorif"``: :func:`lightning_attr.lowrank.encode_lowrank`).
        stem: shard file names' stem (``"responses"``; ``"factors"`` for codec ``"lorif"``).
        indexed: ``False``: the rows come in source order from source 0 (codecs ``"eigen"`` / ``"factored"``, a block
            of every source), and each shard is listed by its sources ``[start, stop)`` (``{"file", "start", "stop",
            "bytes"}``) and holds no source index (format 2 / 4's contiguous layout); rows out of order are refused.
        scaled: the rows are written as float16 with a power-of-two scale per source (and factor column) beside each
            tensor (:func:`lightning_attr.half_precision.encode`; manifest ``"encoding": "float16-scaled"``), whatever
            half ``dtype`` is named: a half-precision store of codecs ``"dense"``, ``"lorif"`` and ``"factored"``
            (:func:`lightning_attr.half_precision.scaled`).
    """

    def __init__(
        self, path: str | os.PathLike, name: str, space: ParameterSpace, dtype: str | None = "float32", *,
        prefix: str = "", rows_per_shard: int = 4096, encode: Callable[[Tensor], dict[str, Tensor]] | None = None,
        stem: str = "responses", indexed: bool = True, scaled: bool = False,
    ) -> None:  # fmt: skip
        check_checkpoint_name(name)
        if dtype is not None:
            _check_dtype(dtype)
        self.path, self.name, self.space, self.dtype, self.prefix = Path(path), name, space, dtype, prefix
        self.encode, self.stem, self.indexed, self.scaled = encode or space.unflatten, stem, indexed, scaled
        self._next = 0  # indexed=False: the source the next row must be
        self.rows_per_shard = max(1, int(rows_per_shard))
        self.shards: list[dict] = []
        self._sources: list[Tensor] = []
        self._rows: list[dict[str, Tensor]] = []
        self._waiting = 0
        (self.path / name).mkdir(parents=True, exist_ok=True)

    def add(self, sources: Tensor, rows: Tensor) -> None:
        """Queues ``rows: Tensor[C, P]`` (float32, the responses of ``sources: LongTensor[C]``), encoded by the
        writer's codec; writes every full shard at once."""
        if rows.shape != (sources.numel(), self.space.size):
            raise ValueError(f"rows must be [C={sources.numel()}, P={self.space.size}], got {list(rows.shape)}.")
        self.add_encoded(sources, self.encode(rows))

    def add_encoded(self, sources: Tensor, tensors: dict[str, Tensor]) -> None:
        """Queues already encoded rows: ``{key: Tensor[C, ...]}`` of ``sources: LongTensor[C]``."""
        if not self.indexed:
            expected = torch.arange(self._next, self._next + sources.numel())
            if not torch.equal(sources.cpu(), expected):
                raise ValueError(
                    f"ShardWriter(indexed=False) writes sources in order: rows of sources {expected.tolist()[:3]}... were "
                    f"due, got {sources.tolist()[:3]}.... Pass them in order, or use indexed=True (a source index per shard)."
                )
            self._next += sources.numel()
        if self.scaled:  # each row is scaled on its own: chunks encode as the whole would
            tensors = half_precision.encode(tensors)
        cast = _DTYPES[self.dtype] if self.dtype and not self.scaled else None
        start = 0
        while start < sources.numel():
            take = min(self.rows_per_shard - self._waiting, sources.numel() - start)
            self._sources.append(sources[start : start + take].cpu())
            self._rows.append({k: t[start : start + take].to("cpu", cast or t.dtype) for k, t in tensors.items()})
            self._waiting, start = self._waiting + take, start + take
            if self._waiting >= self.rows_per_shard:
                self.flush()

    def flush(self) -> None:
        """Writes the rows waiting (if any) as one shard."""
        if not self._waiting:
            return
        sources, rows = torch.cat(self._sources), self._rows
        tensors = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
        self._sources, self._rows, self._waiting = [], [], 0
        file = f"{self.name}/{self.stem}-{self.prefix}{len(self.shards):05d}.safetensors"
        if not self.indexed:
            start, stop = int(sources[0]), int(sources[-1]) + 1
            self.shards.append({"file": file, "start": start, "stop": stop, "bytes": atomic_save_tensors(self.path / file, tensors)})
            return
        tensors[SOURCE_INDEX] = sources
        self.shards.append({"file": file, "rows": int(sources.numel()), "bytes": atomic_save_tensors(self.path / file, tensors)})

    def state_dict(self) -> dict[str, Any]:
        """The shards written so far (for a resumed fit); rows still waiting are not in it (call :meth:`flush`)."""
        return {"shards": [dict(s) for s in self.shards]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.shards = [dict(s) for s in state["shards"]]
        self._next = max((s["stop"] for s in self.shards if "stop" in s), default=0)


def write_part(
    path: str | os.PathLike, name: str, rank: int, shards: list[dict], sources: Tensor, stats: dict[str, Tensor],
    costs: dict[str, float], *, info: dict[str, Any] | None = None, codec_entry: dict[str, Any] | None = None,
) -> None:
    """One process's share of a checkpoint: the shards it wrote, and the bookkeeping
    (``valid``, ``shortfall``, ``missing_examples``: ``Tensor[S_owned]``) of the ``sources: LongTensor[S_owned]``
    it simulated (none: a process that simulated no source of it, which records its costs only). ``info``: JSON
    fields of the checkpoint's manifest entry that the process knows (its step rule or eigenspace record);
    ``codec_entry``: the codec's manifest fields when the process wrote a codec's files (:meth:`ResponseStore.write_block`).
    :meth:`ResponseStore.commit` merges the parts of every process."""
    tensors = {"sources": sources.cpu(), **{k: stats[k].cpu().long() for k in _STATS}}
    metadata = {"shards": json.dumps(shards), "costs": json.dumps(costs)}
    metadata.update({key: json.dumps(value) for key, value in (("info", info), ("codec_entry", codec_entry)) if value is not None})
    atomic_save_tensors(Path(path) / name / f"part-{rank:05d}.safetensors", tensors, metadata)


class ResponseStore:
    """A directory of response checkpoints for one model and one set of ``S`` sources.

    Create with :meth:`create`, add checkpoints with :meth:`add_checkpoint`, open with :meth:`load`.
    """

    def __init__(self, path: str | os.PathLike, manifest: dict[str, Any]) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self._cache: dict[tuple, Any] = {}

    # ------------------------------------------------------------------ create / write
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        space: ParameterSpace,
        source_map: SourceMap,
        settings: dict[str, Any],
        *,
        overwrite: bool = False,
    ) -> ResponseStore:
        """A new empty store. Refuses a directory that already holds one unless ``overwrite``."""
        path = Path(path)
        if has_store(path) and not overwrite:
            raise StoreError(
                f"{path} already holds a response store; pass overwrite=True to replace it or choose another dirpath."
            )
        if SOURCE_INDEX in space.names:
            raise StoreError(f"A parameter named {SOURCE_INDEX!r} collides with the shards' source index; rename it.")
        path.mkdir(parents=True, exist_ok=True)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "fingerprint": space.fingerprint(),
            "parameters": space.to_json(),
            "n_examples": source_map.num_examples,
            "n_sources": source_map.num_sources,
            "source_ids": list(source_map.source_ids),
            "per_example": source_map.is_per_example,
            "settings": settings,
            "checkpoints": [],
        }
        store = cls(path, manifest)
        if not source_map.is_per_example:
            atomic_save_tensors(path / "example_to_source.safetensors", {"example_to_source": source_map.example_to_source})
        store._write_manifest()
        return store

    def _write_manifest(self) -> None:
        atomic_write_bytes(self.path / MANIFEST, json.dumps(self.manifest, indent=1).encode(), fsync=True)

    def add_checkpoint(
        self,
        name: str,
        theta: Tensor,
        responses: Tensor | AnyBlock,
        *,
        info: dict[str, Any],
        source_stats: dict[str, Tensor],
        dtype: str = "float32",
        shard_size: int = 4096,
    ) -> None:
        """Writes one response checkpoint held in memory, and then the manifest that lists it.

        Args:
            name: checkpoint name (``[A-Za-z0-9_.=-]+``), e.g. ``"final"`` or ``"epoch=10"``.
            theta: ``Tensor[P]`` parameters the responses were simulated at (float32).
            responses: ``Tensor[S, P]``, predicted parameter change per source (float32), or a response block
                (:class:`DenseResponses`, :class:`EigenResponses`); its codec is recorded in the manifest.
            info: JSON-able settings and costs of the simulation (step rule, horizon, seconds, ...).
            source_stats: per-source ``Tensor[S]`` bookkeeping (``valid``, ``shortfall``, ...).
            dtype: storage dtype of responses (codec ``"eigen"``: of the basis and coordinates): ``float32``,
                ``float16`` or ``bfloat16``.
        """
        codec_entry, shards = self.write_block(name, responses, dtype, shard_size)
        self._add_entry(name, theta, shards, codec_entry, info, source_stats, dtype)

    def write_block(
        self, name: str, responses: Tensor | AnyBlock, dtype: str = "float32", shard_size: int = 4096
    ) -> tuple[dict[str, Any], list[dict]]:
        """The files of checkpoint ``name`` for a block of every source (as :meth:`add_checkpoint`), without listing it:
        ``(codec entry, shards)``, for :meth:`add_checkpoint` or a process's part (:func:`write_part`, :meth:`commit`)."""
        check_checkpoint_name(name)
        _check_dtype(dtype)
        block = DenseResponses(responses) if isinstance(responses, Tensor) else responses
        (self.path / name).mkdir(parents=True, exist_ok=True)
        if isinstance(block, EigenResponses):
            return self._write_eigen(name, block, dtype, shard_size)
        if isinstance(block, FactoredResponses):
            return self._write_factored(name, block, dtype, shard_size)
        if isinstance(block, LowRankResponses):
            if block.num_sources != self.n_sources or block.space != self.space:
                raise ValueError(f"a lorif block needs S={self.n_sources} sources of this store's parameter space.")
            shards = self._write_rows(name, "factors", block.tensors(), dtype, shard_size, indexed=True)
            return {**block.entry(), **half_precision.entry("lorif", dtype)}, shards
        if block.responses.shape != (self.n_sources, self.space.size):
            raise ValueError(
                f"responses must be [S={self.n_sources}, P={self.space.size}], got {list(block.responses.shape)}."
            )
        shards = self._write_rows(name, "responses", self.space.unflatten(block.responses), dtype, shard_size, indexed=True)
        return {"codec": "dense", **half_precision.entry("dense", dtype)}, shards

    def commit(
        self, name: str, theta: Tensor, *, info: dict[str, Any], parts: int, dtype: str = "float32"
    ) -> None:  # fmt: skip
        """Lists a checkpoint whose files ``parts`` processes wrote (:class:`ShardWriter`, :meth:`write_block`,
        :func:`write_part`): merges their parts, checks that every source is covered exactly once, writes the
        per-source bookkeeping and then the manifest. The codec's manifest fields are those a part carries (the first in
        rank order; none: dense), and so are the parts' ``info`` fields (the first part that has
        them). The costs in the parts (``curvature_products``,
        ``simulation_seconds``, ``replayed_steps``) are summed (seconds and steps: the maximum) into ``info``, and each
        process's own costs (its seconds per phase included) are listed in rank order as ``info["process_costs"]``.
        A part missing (a process that crashed) is a :class:`StoreError` and the manifest is left as it was."""
        check_checkpoint_name(name)
        shards, stats, costs, per_process = [], {k: torch.zeros(self.n_sources, dtype=torch.long) for k in _STATS}, {}, []
        known: dict[str, Any] = {}  # the parts' info fields and codec entry, the first in rank order
        covered = torch.zeros(self.n_sources, dtype=torch.long)
        for rank in range(parts):
            file = self.path / name / f"part-{rank:05d}.safetensors"
            if not file.is_file():
                raise StoreError(
                    f"{file} is missing: process {rank} did not finish checkpoint {name!r} (it crashed or was "
                    "stopped). The checkpoint is not listed; re-run the fit."
                )
            with safe_open(str(file), framework="pt") as fh:
                meta = fh.metadata()
                owned = fh.get_tensor("sources")
                for key in _STATS:
                    stats[key][owned] = fh.get_tensor(key).long()
            covered[owned] += 1
            shards += json.loads(meta["shards"])
            per_process.append(json.loads(meta["costs"]))
            for key in ("info", "codec_entry"):
                if key in meta and key not in known:
                    known[key] = json.loads(meta[key])
            for key, value in per_process[-1].items():
                if isinstance(value, (int, float)):
                    costs[key] = max(costs.get(key, value), value) if key != "curvature_products" else costs.get(key, 0) + value
        check_coverage(covered, f"the parts of checkpoint {name!r} in {self.path}")
        stats["valid"] = stats["valid"].bool()
        info = {**info, **known.get("info", {}), **costs, "process_costs": per_process}
        codec_entry = known.get("codec_entry") or {"codec": "dense"}
        self._add_entry(name, theta, shards, codec_entry, info, stats, dtype)
        for rank in range(parts):
            (self.path / name / f"part-{rank:05d}.safetensors").unlink(missing_ok=True)

    def _add_entry(
        self, name: str, theta: Tensor, shards: list, codec_entry: dict, info: dict, stats: dict[str, Tensor], dtype: str
    ) -> None:
        """Writes the parameter snapshot and the bookkeeping of a checkpoint whose shards are written, then
        the manifest that lists it (last: a crash before leaves the previous manifest intact)."""
        space, folder = self.space, self.path / name
        atomic_save_tensors(folder / "params.safetensors", space.unflatten(theta.float().cpu()))
        atomic_save_tensors(folder / "sources.safetensors", stats)
        entry = {
            "name": name,
            "params_file": f"{name}/params.safetensors",
            "sources_file": f"{name}/sources.safetensors",
            "weights_digest": space.digest(theta),
            "dtype": dtype,
            "shards": shards,
            **info,
            "n_valid": int(stats["valid"].sum()),
            "n_shortfall": int((stats["shortfall"] > 0).sum()) if "shortfall" in stats else 0,
            "n_missing_examples": int(stats["missing_examples"].sum()) if "missing_examples" in stats else 0,
            **codec_entry,
        }
        self.manifest["checkpoints"] = [c for c in self.manifest["checkpoints"] if c["name"] != name] + [entry]
        # the entry is in this version's layout (a fit resumed into an older store adds it there): the manifest says so,
        # and an older reader refuses the store by its version instead of calling the new checkpoint damaged; this
        # reader reads each checkpoint by its own fields, the older ones as they are
        self.manifest["format_version"] = FORMAT_VERSION
        self._write_manifest()
        self._cache.clear()

    def _write_eigen(self, name: str, block: EigenResponses, dtype: str, shard_size: int) -> tuple[dict, list]:
        space, k = self.space, block.rank
        if block.basis.shape != (k, space.size) or block.coordinates.shape != (self.n_sources, k):
            raise ValueError(
                f"an eigen block needs basis [k, P={space.size}] and coordinates [S={self.n_sources}, k]; got "
                f"{list(block.basis.shape)} and {list(block.coordinates.shape)}."
            )
        basis_file, basis_bytes = self._write_basis(name, block.basis, dtype)
        shards = self._write_rows(name, "coordinates", {"coordinates": block.coordinates}, dtype, shard_size, indexed=False)
        entry = {
            "codec": "eigen", "rank": k, "basis_file": basis_file, "basis_bytes": basis_bytes,
            "eigenvalues": [float(v) for v in block.eigenvalues.cpu()], "damping": float(block.damping),
        }  # fmt: skip
        return entry, shards

    def _write_basis(self, name: str, basis: Tensor, dtype: str) -> tuple[str, int]:
        """``basis: Tensor[k, P]`` as ``<name>/basis.safetensors`` (one ``Tensor[k, *shape]`` per parameter): its file
        and size in bytes."""
        file = f"{name}/basis.safetensors"
        return file, atomic_save_tensors(self.path / file, self.space.unflatten(basis.to("cpu", _DTYPES[dtype])))

    def _write_factored(self, name: str, block: FactoredResponses, dtype: str, shard_size: int) -> tuple[dict, list]:
        space, k = self.space, block.rank
        basis = block.basis
        if basis.shape != (k, space.size) or block.num_sources != self.n_sources or block.gradients.space != space:
            raise ValueError(
                f"a factored block needs basis [k, P={space.size}], S={self.n_sources} sources and this store's parameter "
                f"space; got basis {list(basis.shape)} and {block.num_sources} sources."
            )
        # half precision, whichever half dtype: the basis float16 (orthonormal rows, entries in [-1, 1]) and the shards
        # scaled float16 (bfloat16's rounding is amplified by the cancellation in the derived response: half_precision)
        half = half_precision.scaled("factored", dtype)  # the rule the shards' writer applies (_write_rows)
        basis_file, basis_bytes = self._write_basis(name, basis, "float16" if half else dtype)
        shards = self._write_rows(name, "factored", block.tensors(), dtype, shard_size, indexed=False)
        return {**block.entry(), "basis_file": basis_file, "basis_bytes": basis_bytes, **half_precision.entry("factored", dtype)}, shards

    def _write_rows(
        self, name: str, stem: str, tensors: dict[str, Tensor], dtype: str | None, shard_size: int, *, indexed: bool
    ) -> list[dict]:  # fmt: skip
        """``tensors: {key: Tensor[S, ...]}`` of every source, in order, as shards ``<name>/<stem>-<i>.safetensors`` of
        ``shard_size`` sources each (:class:`ShardWriter`), in storage dtype ``dtype`` (a half dtype of codec ``stem``'s
        ``"dense"`` / ``"lorif"`` / ``"factored"``: scaled float16, :func:`half_precision.scaled`): with a per-row source
        index (``indexed``: codecs ``"dense"`` and ``"lorif"``, format 3's layout) or listed by ``[start, stop)`` (codecs
        ``"eigen"`` and ``"factored"``)."""
        scaled = half_precision.scaled(_STEM_CODECS[stem], dtype)
        writer = ShardWriter(self.path, name, self.space, dtype, rows_per_shard=shard_size, stem=stem, indexed=indexed, scaled=scaled)
        writer.add_encoded(torch.arange(self.n_sources), tensors)
        writer.flush()
        return writer.shards

    # ------------------------------------------------------------------ load / validate
    @classmethod
    def load(cls, path: str | os.PathLike) -> ResponseStore:
        """Opens a store and checks its manifest and every file it names (presence and size)."""
        path = Path(check_store_path(path))
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            if not path.is_dir():
                found = f"{path} does not exist" if not path.exists() else f"{path} is a file, not a directory"
            elif any(path.iterdir()):
                found = (
                    f"{path} holds files but no {MANIFEST} (the manifest is written last: the store is incomplete, "
                    "or the manifest was deleted); re-run the simulation"
                )
            else:
                found = f"{path} is empty ({MANIFEST} is missing)"
            raise StoreError(
                f"No response store at {path}: {found}. Point responses= at the callback's dirpath "
                "(AttributionCallback.dirpath after fit)."
            )
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as err:
            raise StoreError(f"{manifest_path} is not valid JSON ({err}); the store is damaged.") from err
        if manifest.get("format") != FORMAT:
            raise StoreError(f"{manifest_path} is not a lightning_attr response store (format={manifest.get('format')!r}).")
        version = manifest.get("format_version")
        if version not in READABLE_VERSIONS:
            raise StoreError(
                f"{path} has store format version {version}; this lightning_attr reads versions "
                f"{list(READABLE_VERSIONS)}. Re-run the simulation with this version (or install the version that wrote it)."
            )
        store = cls(path, manifest)
        for ckpt in manifest["checkpoints"]:
            store._check_files(ckpt)
        store._warn_unscaled()
        return store

    def _warn_unscaled(self) -> None:
        """One warning for the half-precision checkpoints an older version wrote without scales, which this version
        writes as scaled float16 (:func:`half_precision.scaled`): they read as they are, less accurately."""
        legacy = [c for c in self.manifest["checkpoints"] if half_precision.scaled(c.get("codec", "dense"), c.get("dtype"))
                  and "encoding" not in c and (c.get("codec") == "factored" or c.get("dtype") == "float16")]  # fmt: skip
        if not legacy:
            return
        why = {
            ("factored", "bfloat16"): "format 4's bfloat16 basis and factors: the derived response cancels their rounding "
            "into the scores, about 10x the error of scaled float16 (2.55e-2 against 2.6e-3 of the largest score on a test MLP)",
            ("factored", "float16"): "format 4's plain float16 factors: those below 6e-8 (the factors reach 1e-23) were "
            "flushed to zero",
        }  # fmt: skip
        reasons = sorted({why.get((c.get("codec"), c["dtype"]), "plain float16 responses: entries below 6e-8 were flushed "
                               "to zero, so small sources score 0 or far off") for c in legacy})  # fmt: skip
        warnings.warn(
            f"{self.path}: checkpoints {[c['name'] for c in legacy]} were written by an older lightning_attr in half "
            f"precision without scales ({'; '.join(reasons)}). They are read as they are. Re-run the simulation (fit with "
            "the callback again) to write this version's scaled float16 (manifest encoding "
            f"{half_precision.ENCODING!r}), or use store_dtype='float32'.",
            UserWarning,
            stacklevel=3,
        )

    def _check_files(self, ckpt: dict[str, Any]) -> None:
        encoding = ckpt.get("encoding")
        if encoding is not None and (encoding != half_precision.ENCODING or ckpt.get("codec", "dense") not in half_precision.SCALED_CODECS):
            raise StoreError(
                f"Checkpoint {ckpt['name']!r} of {self.path}: manifest field encoding={encoding!r} (codec "
                f"{ckpt.get('codec')!r}) is not one this version reads ({half_precision.ENCODING!r} of codecs "
                f"{list(half_precision.SCALED_CODECS)}): "
                "a newer lightning_attr wrote it (install the version that wrote it to read it), or the store is damaged "
                "(re-run the simulation)."
            )
        for shard in ckpt["shards"]:
            file = self.path / shard["file"]
            if not file.is_file():
                raise StoreError(f"Response shard {file} is missing (checkpoint {ckpt['name']!r}); the store is incomplete.")
            size = file.stat().st_size
            if size != shard["bytes"]:
                raise StoreError(
                    f"Response shard {file} has {size} bytes, the manifest says {shard['bytes']}: the file is "
                    "truncated or was replaced. Re-run the simulation."
                )
        basis = ckpt.get("basis_file")
        if basis is not None and (
            not (self.path / basis).is_file() or (self.path / basis).stat().st_size != ckpt["basis_bytes"]
        ):
            raise StoreError(
                f"{self.path / basis} is missing or not the size the manifest says (checkpoint {ckpt['name']!r}); "
                "the store is damaged. Re-run the simulation."
            )
        for key in ("params_file", "sources_file"):
            if key == "params_file" and key not in ckpt:
                continue  # no parameter snapshot: readable at the module's weights only (the reader says so)
            if not (self.path / ckpt[key]).is_file():
                raise StoreError(f"{self.path / ckpt[key]} is missing (checkpoint {ckpt['name']!r}).")

    # ------------------------------------------------------------------ properties
    @property
    def space(self) -> ParameterSpace:
        p = self.manifest["parameters"]
        return ParameterSpace(
            tuple(e["name"] for e in p), tuple(tuple(e["shape"]) for e in p), tuple(e["dtype"] for e in p)
        )

    @property
    def n_sources(self) -> int:
        return int(self.manifest["n_sources"])

    @property
    def n_examples(self) -> int:
        return int(self.manifest["n_examples"])

    @property
    def source_ids(self) -> list:
        return list(self.manifest["source_ids"])

    @property
    def checkpoints(self) -> list[str]:
        """Checkpoint names in the order they were written (the last is the end of fit)."""
        return [c["name"] for c in self.manifest["checkpoints"]]

    def checkpoint_info(self, name: str) -> dict[str, Any]:
        for c in self.manifest["checkpoints"]:
            if c["name"] == name:
                return c
        raise StoreError(f"{self.path} has no checkpoint {name!r}; it has {self.checkpoints}.")

    def batch_format(self) -> dict | None:
        """The format of the training batches (without the index) as the callback recorded it
        (:mod:`lightning_attr.batch_format`), or ``None`` for a store that has none."""
        for ckpt in reversed(self.manifest["checkpoints"]):
            if ckpt.get("batch_format") is not None:
                return ckpt["batch_format"]
        return None

    def example_to_source(self) -> Tensor:
        """``LongTensor[n]``: the source of every example index; ``-1`` for an example outside the training set
        (the fit trained on a ``Subset`` of the indexed dataset)."""
        if self.manifest["per_example"]:
            return torch.arange(self.n_examples)
        return self._read(self.path / "example_to_source.safetensors")["example_to_source"]

    # ------------------------------------------------------------------ reading
    def check_model(self, space: ParameterSpace, weights_digest: str | None = None) -> None:
        """Raises :class:`StoreError` unless the responses belong to this architecture (and weights)."""
        if space.fingerprint() != self.manifest["fingerprint"]:
            raise StoreError(_model_mismatch(self.path, self.space, space))
        if weights_digest is not None and self.checkpoints:
            last = self.checkpoint_info(self.checkpoints[-1])
            if weights_digest != last["weights_digest"]:
                step = f" (global step {last['global_step']})" if "global_step" in last else ""
                # the callback (its settings hold a mode) always writes 'final' last: its store without it lost the end of its fit
                unfinished = "mode" in self.manifest.get("settings", {}) and "final" not in self.checkpoints
                raise StoreError(
                    f"The model's weights differ from the weights the responses in {self.path} were simulated for (its "
                    f"last checkpoint, {last['name']!r}{step}). "
                    + (
                        "The store lists no 'final' checkpoint: the fit that wrote it stopped before it wrote its "
                        "end-of-fit checkpoint (interrupted or killed), so no response matches its final weights. Re-run "
                        "the fit, or load the weights of that checkpoint"
                        if unfinished
                        else "Load the final weights of the fit that wrote it"
                    )
                    + ", or pass strict=False to read out anyway (the scores then describe the stored model, not yours)."
                )

    def _read(self, file: Path) -> dict[str, Tensor]:
        try:
            with safe_open(str(file), framework="pt") as fh:
                return {k: fh.get_tensor(k) for k in fh.keys()}
        except (SafetensorError, OSError) as err:
            raise StoreError(f"Cannot read {file}: {err}. The store is damaged; re-run the simulation.") from err

    def theta(self, name: str) -> Tensor:
        """``Tensor[P]`` float32: the parameters checkpoint ``name`` was simulated at (cached)."""
        key = ("theta", name)
        if key not in self._cache:
            self._cache[key] = self.space.flatten(self._read(self.path / self.checkpoint_info(name)["params_file"]))
        return self._cache[key]

    def source_stats(self, name: str) -> dict[str, Tensor]:
        """Per-source bookkeeping of checkpoint ``name``: ``valid``, ``shortfall``, ``missing_examples`` (cached)."""
        key = ("sources", name)
        if key not in self._cache:
            self._cache[key] = self._read(self.path / self.checkpoint_info(name)["sources_file"])
        return self._cache[key]

    def scorable(self, name: str) -> Tensor:
        """``BoolTensor[S]``: sources of checkpoint ``name`` with a complete response (:func:`complete_sources`);
        the others score NaN."""
        return complete_sources(self.source_stats(name))

    def incomplete_reason(self, name: str) -> str | None:
        """Why some finite sources of checkpoint ``name`` cannot be scored, or ``None`` if all can: the fit
        stopped inside the simulation window (a partial checkpoint), or examples were never injected."""
        info, stats = self.checkpoint_info(name), self.source_stats(name)
        valid = stats["valid"].bool()
        missing = valid & (stats.get("missing_examples", torch.zeros(1)) > 0)
        short = valid & (stats.get("shortfall", torch.zeros(1)) > 0)
        unusable = int((missing | short).sum())
        partial = info.get("complete") is False
        if not (partial or unusable):
            return None
        head = (
            f"checkpoint {name!r} in {self.path} is partial: the fit stopped ({info.get('stopped_by')}) before its "
            "simulation finished"
            if partial
            else f"checkpoint {name!r} in {self.path} lacks part of its sources"
        )
        return (
            f"{head}. {int(missing.sum())} sources hold training examples that were never injected (online; in end mode, "
            "that no training batch held) and "
            f"{int(short.sum())} were propagated for fewer than horizon steps: those {unusable} of {self.n_sources} "
            "sources score NaN. "
            + (
                "The fit's batches never held their examples (a sampler over part of the dataset, drop_last): train on "
                "them to score them, or make the training dataset the Subset trained on."
                if info.get("untrained") and not partial
                else "Re-run the fit (or resume it from a checkpoint taken before the simulation window opened) to score them."
            )
        )

    def codec(self, name: str) -> str:
        """The codec of checkpoint ``name``: ``"dense"``, ``"eigen"``, ``"lorif"`` or ``"factored"`` (format 1 stores:
        always dense)."""
        return self.checkpoint_info(name).get("codec", "dense")

    def block(
        self, name: str, device: torch.device | str = "cpu", memory_budget_mb: float | None = None,
        split: Sequence[str] | None = None,
    ) -> AnyBlock:
        """The responses of checkpoint ``name`` as a block of its codec, float32 on ``device`` (cached).

        ``memory_budget_mb``: a dense checkpoint whose ``S x P`` float32 responses exceed it is not loaded: the
        block (:class:`StreamedResponses`) reads its shards one at a time at every query instead.
        ``split``: a dense checkpoint is laid out per parameter (:class:`SplitResponses`, these parameters each on their
        own, read shard by shard: ``S x P`` is held once, not cached by the store)."""  # fmt: skip
        if self.codec(name) == "factored":
            key = ("factored", name, str(device))
            if key not in self._cache:
                info = self.checkpoint_info(name)
                tensors = {k: t.to(device) for k, t in self._read_rows(name, "factored").items()}
                self._cache[key] = FactoredResponses.from_tensors(
                    self.space, self._read_basis(name).to(device), torch.tensor(info["eigenvalues"], device=device),
                    float(info["damping"]), float(info["complement_gain"]), tensors, info.get("folded_biases"),
                )  # fmt: skip
            return self._cache[key]
        if self.codec(name) == "lorif":
            key = ("lorif", name, str(device))
            if key not in self._cache:
                self._cache[key] = self._read_lowrank(name).to(device)
            return self._cache[key]
        if self.codec(name) == "dense":
            if memory_budget_mb is not None and self.n_sources * self.space.size * 4 > memory_budget_mb * 2**20:
                return StreamedResponses(partial(self.iter_responses, name), self.n_sources, torch.device(device))
            if split is not None:
                return DenseResponses(SplitResponses.from_shards(self.iter_responses(name), self.n_sources, self.space, split, device))
            return DenseResponses(self.responses(name, device))
        key = ("eigen", name, str(device))
        if key not in self._cache:
            info = self.checkpoint_info(name)
            coordinates = torch.cat([block for _, block in self._iter_shards(name, "eigen")])
            self._cache[key] = EigenResponses(
                self._read_basis(name).to(device), torch.tensor(info["eigenvalues"], device=device),
                float(info["damping"]), coordinates.to(device),
            )  # fmt: skip
        return self._cache[key]

    def _read_basis(self, name: str) -> Tensor:
        """``Tensor[k, P]`` float32: the basis of an ``"eigen"`` or ``"factored"`` checkpoint, its shapes checked."""
        info = self.checkpoint_info(name)
        basis = self._read(self.path / info["basis_file"])
        for pname, shape in zip(self.space.names, self.space.shapes):
            got = tuple(basis[pname].shape) if pname in basis else None
            if got != (info["rank"], *shape):
                raise StoreError(f"{info['basis_file']}: tensor {pname!r} is {got}, expected {(info['rank'], *shape)}.")
        return self.space.flatten(basis, batch_dims=1)

    def _read_rows(self, name: str, codec: str) -> dict[str, Tensor]:
        """Every shard of a ``"lorif"`` or ``"factored"`` checkpoint, each source's rows put in place (float32):
        ``{key: Tensor[S, ...]}``."""
        full: dict[str, Tensor] = {}
        for sources, tensors in self._iter_shards(name, codec):
            for key, t in tensors.items():
                if key not in full:
                    full[key] = torch.full((self.n_sources, *t.shape[1:]), float("nan"))
                full[key][sources] = t.float()
        return full

    def _read_lowrank(self, name: str) -> LowRankResponses:
        """Every shard of a ``"lorif"`` checkpoint (float32)."""
        return LowRankResponses.from_tensors(self.space, self._read_rows(name, "lorif"))

    def _shard_shapes(self, name: str, rows: int) -> dict[str, tuple[int, ...]]:
        """``{key: shape}`` every shard of checkpoint ``name`` with ``rows`` sources must hold (dense, lorif or factored:
        its coordinates unless derived, its folded biases left out; :meth:`_factored_fields`)."""
        info = self.checkpoint_info(name)
        factored = info.get("factored", {})
        folded, derived = self._factored_fields(name) if info.get("codec") == "factored" else ({}, True)
        shapes = {} if derived else {COORDINATES: (rows, info["rank"])}
        for pname, shape in zip(self.space.names, self.space.shapes):
            if pname in factored:
                out, inp, c = factored[pname]
                shapes[pname + FACTOR_KEYS[0]], shapes[pname + FACTOR_KEYS[1]] = (rows, out, c), (rows, inp, c)
            elif pname not in folded:
                shapes[pname] = (rows, *shape)
        if info.get("encoding") == half_precision.ENCODING:  # half precision: each tensor's scales beside it
            shapes.update({key + half_precision.SCALE: half_precision.scale_shape(key, shape) for key, shape in shapes.items()})
        return shapes

    def _encoding_hint(self, name: str) -> str:
        """What checkpoint ``name``'s manifest says of its shards' encoding, for an error about their tensors (codecs
        ``"dense"``, ``"lorif"``, ``"factored"``; ``""`` for ``"eigen"``, never encoded)."""
        if self.codec(name) not in half_precision.SCALED_CODECS:
            return ""
        if self.checkpoint_info(name).get("encoding") == half_precision.ENCODING:
            return (f"the manifest says encoding {half_precision.ENCODING!r}: every tensor has its power-of-two scales "
                    f"beside it, key{half_precision.SCALE}")  # fmt: skip
        return f"the manifest names no encoding: no key{half_precision.SCALE} scales"

    def _factored_fields(self, name: str) -> tuple[dict[str, str], bool]:
        """``(folded biases {bias: weight}, coordinates derived)`` of a ``"factored"`` checkpoint (format 3: none, stored),
        checked against the parameter space and the factored weights: a :class:`StoreError` names what is inconsistent."""
        info = self.checkpoint_info(name)
        folded, coordinates = info.get("folded_biases", {}), info.get("coordinates", "stored")
        where = f"checkpoint {name!r} of {self.path}"
        if coordinates not in ("stored", "derived") or not isinstance(folded, dict):
            raise StoreError(f"{where}: manifest fields coordinates={coordinates!r} / folded_biases are not a codec 'factored' "
                             "layout this version reads; the store is damaged. Re-run the simulation.")  # fmt: skip
        shapes = dict(zip(self.space.names, self.space.shapes))
        for bias, weight in folded.items():
            factors = info.get("factored", {}).get(weight)
            if factors is None or bias not in shapes or tuple(shapes[bias]) != (factors[0],):
                raise StoreError(
                    f"{where}: the manifest folds bias {bias!r} into weight {weight!r}, which is not a factored weight "
                    f"with {bias!r} as its [out] bias: the store is damaged. Re-run the simulation."
                )
        return folded, coordinates == "derived"

    def responses(self, name: str, device: torch.device | str = "cpu") -> Tensor:
        """``Tensor[S, P]`` float32 responses of a ``"dense"`` (or ``"factored"``, rebuilt) checkpoint ``name`` (cached per device). This holds
        ``S x P`` numbers: the readout streams the shards instead (:meth:`iter_responses`)."""
        key = (name, str(device))
        if key not in self._cache:
            out = torch.full((self.n_sources, self.space.size), float("nan"))
            for sources, rows in self.iter_responses(name):
                out[sources] = rows
            self._cache[key] = out.to(device)
        return self._cache[key]

    def iter_responses(self, name: str) -> Iterator[tuple[Tensor, Tensor]]:
        """Yields ``(sources: LongTensor[S_shard], Tensor[S_shard, P])`` float32 per shard of a ``"dense"``
        checkpoint, one shard in memory at a time; every source comes exactly once, in no set order (checked:
        a :class:`StoreError` after the last shard otherwise). A ``"factored"`` checkpoint holds the same responses
        exactly: they are rebuilt as dense rows, ``shard_size`` sources at a time."""
        if self.codec(name) == "factored":
            return self._factored_rows(name)
        return self._iter_shards(name, "dense")

    def _factored_rows(self, name: str, shard_size: int = 1024) -> Iterator[tuple[Tensor, Tensor]]:
        block = self.block(name)
        for start in range(0, self.n_sources, shard_size):
            sources = torch.arange(start, min(start + shard_size, self.n_sources))
            yield sources, block.select(sources).to_dense()

    def _iter_shards(self, name: str, codec: str) -> Iterator[tuple[Any, Tensor]]:
        """``(sources LongTensor[S_shard], Tensor[S_shard, P])`` (dense), ``(sources, {key: Tensor[S_shard, ...]})``
        (lorif factors and dense rest) or ``(start, Tensor[S_shard, k])`` (eigen coordinates, contiguous), float32."""
        if self.codec(name) != codec:
            raise StoreError(
                f"Checkpoint {name!r} of {self.path} holds codec {self.codec(name)!r} responses, not {codec!r}: read "
                "it with ResponseStore.block(name), which every codec answers."
            )
        if codec == "eigen":
            rank = self.checkpoint_info(name)["rank"]
            for shard in self.checkpoint_info(name)["shards"]:
                coordinates = self._read(self.path / shard["file"]).get("coordinates")
                expected = (shard["stop"] - shard["start"], rank)
                if coordinates is None or tuple(coordinates.shape) != expected:
                    got = None if coordinates is None else tuple(coordinates.shape)
                    raise StoreError(f"{shard['file']}: coordinates are {got}, expected {expected}.")
                yield shard["start"], coordinates.float()
            return
        space, covered = self.space, torch.zeros(self.n_sources, dtype=torch.long)
        hint = self._encoding_hint(name)  # for an error about the shards' tensors
        scaled = self.checkpoint_info(name).get("encoding") == half_precision.ENCODING
        for shard in self.checkpoint_info(name)["shards"]:
            tensors = self._read(self.path / shard["file"])
            if "rows" in shard:  # format 3: the shard names its sources
                sources, expected = tensors.pop(SOURCE_INDEX, None), shard["rows"]
                if sources is None or tuple(sources.shape) != (expected,):
                    raise StoreError(f"{shard['file']}: {SOURCE_INDEX} is missing or not [{expected}]; the store is damaged.")
            else:
                sources, expected = torch.arange(shard["start"], shard["stop"]), shard["stop"] - shard["start"]
            shapes = self._shard_shapes(name, expected)
            for key, shape in shapes.items():
                got = tuple(tensors[key].shape) if key in tensors else None
                if got != shape:
                    raise StoreError(
                        f"{shard['file']}: tensor {key!r} is {'missing' if got is None else got}, expected {shape}"
                        f"{f' ({hint})' if hint else ''}: the shard and the manifest disagree, the store is damaged. "
                        "Re-run the simulation."
                    )
            unexpected = sorted(set(tensors) - set(shapes)) if codec == "factored" else []
            if unexpected:
                raise StoreError(
                    f"{shard['file']}: tensors {unexpected[:4]} are not in checkpoint {name!r}'s layout (the manifest "
                    f"derives or folds them{'; ' + hint if hint else ''}): the shard and the manifest disagree, the store "
                    "is damaged. Re-run the simulation."
                )
            sources = sources.long()
            if sources.numel() and (int(sources.min()) < 0 or int(sources.max()) >= self.n_sources):
                raise StoreError(f"{shard['file']}: source ids outside [0, {self.n_sources}); the store is damaged.")
            covered.index_add_(0, sources, torch.ones_like(sources))
            tensors = half_precision.decode(tensors) if scaled else tensors  # float32, the scales consumed
            yield sources, space.flatten(tensors, batch_dims=1) if codec == "dense" else tensors
        check_coverage(covered, f"checkpoint {name!r} of {self.path}")
