"""ResponseStore: response checkpoints on disk (safetensors shards + a JSON manifest).

Layout of a store directory::

    manifest.json                       format, sources, parameter space, fingerprint, checkpoints
    <checkpoint>/params.safetensors     theta_e, the parameters the responses were simulated at
    <checkpoint>/sources.safetensors    per-source bookkeeping (valid, shortfall, examples)
    <checkpoint>/responses-00000.safetensors   codec "dense": {param name: Tensor[S_shard, *shape]}
    <checkpoint>/basis.safetensors             codec "eigen": {param name: Tensor[k, *shape]}, the basis V
    <checkpoint>/coordinates-00000.safetensors codec "eigen": {"coordinates": Tensor[S_shard, k]}

Format version 2 names each checkpoint's codec (``"dense"`` or ``"eigen"``, see :mod:`codecs`);
version 1 stores (dense only, no codec field) are read as dense.

Every file is written to a temporary name and renamed; the manifest is written last, so a crash
leaves the previous manifest (and everything it points to) intact. Loading never unpickles.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from lightning_attr.codecs import AnyBlock, DenseResponses, EigenResponses
from lightning_attr.parameters import ParameterSpace
from lightning_attr.sources import SourceMap

FORMAT = "lightning_attr.responses"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: dense responses only, no "codec" field
MANIFEST = "manifest.json"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class StoreError(RuntimeError):
    """A response store is missing, damaged, or does not belong to the model."""


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> int:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path.stat().st_size


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
        raise StoreError(
            f"responses must be a store directory (str or os.PathLike) or a ResponseStore, got {type(path).__name__}."
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
            _atomic_save_tensors(path / "example_to_source.safetensors", {"example_to_source": source_map.example_to_source})
        store._write_manifest()
        return store

    def _write_manifest(self) -> None:
        _atomic_write_bytes(self.path / MANIFEST, json.dumps(self.manifest, indent=1).encode())

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
        """Writes one response checkpoint and then the manifest that lists it.

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
        if not re.fullmatch(r"[A-Za-z0-9_.=-]+", name):
            raise ValueError(f"checkpoint name {name!r} must match [A-Za-z0-9_.=-]+.")
        if dtype not in _DTYPES:
            raise ValueError(f"store dtype must be one of {sorted(_DTYPES)}, got {dtype!r}.")
        space = self.space
        block = DenseResponses(responses) if isinstance(responses, Tensor) else responses
        folder = self.path / name
        folder.mkdir(parents=True, exist_ok=True)
        if isinstance(block, EigenResponses):
            codec_entry, shards = self._write_eigen(name, block, dtype, shard_size)
        else:
            codec_entry, shards = self._write_dense(name, block, dtype, shard_size)
        params = space.unflatten(theta.float().cpu())
        _atomic_save_tensors(folder / "params.safetensors", params)
        _atomic_save_tensors(folder / "sources.safetensors", source_stats)
        entry = {
            "name": name,
            "params_file": f"{name}/params.safetensors",
            "sources_file": f"{name}/sources.safetensors",
            "weights_digest": space.digest(theta),
            "dtype": dtype,
            "shards": shards,
            **info,
            **codec_entry,
        }
        self.manifest["checkpoints"] = [c for c in self.manifest["checkpoints"] if c["name"] != name] + [entry]
        self._write_manifest()
        self._cache.clear()

    def _write_dense(self, name: str, block: DenseResponses, dtype: str, shard_size: int) -> tuple[dict, list]:
        space = self.space
        if block.responses.shape != (self.n_sources, space.size):
            raise ValueError(f"responses must be [S={self.n_sources}, P={space.size}], got {list(block.responses.shape)}.")
        shards = []
        for i, start in enumerate(range(0, self.n_sources, shard_size)):
            stop = min(start + shard_size, self.n_sources)
            tensors = space.unflatten(block.responses[start:stop].to("cpu", _DTYPES[dtype]))
            shards.append(self._write_shard(f"{name}/responses-{i:05d}.safetensors", tensors, start, stop))
        return {"codec": "dense"}, shards

    def _write_eigen(self, name: str, block: EigenResponses, dtype: str, shard_size: int) -> tuple[dict, list]:
        space, k = self.space, block.rank
        if block.basis.shape != (k, space.size) or block.coordinates.shape != (self.n_sources, k):
            raise ValueError(
                f"an eigen block needs basis [k, P={space.size}] and coordinates [S={self.n_sources}, k]; got "
                f"{list(block.basis.shape)} and {list(block.coordinates.shape)}."
            )
        basis_file = f"{name}/basis.safetensors"
        basis_bytes = _atomic_save_tensors(self.path / basis_file, space.unflatten(block.basis.to("cpu", _DTYPES[dtype])))
        shards = []
        for i, start in enumerate(range(0, self.n_sources, shard_size)):
            stop = min(start + shard_size, self.n_sources)
            tensors = {"coordinates": block.coordinates[start:stop].to("cpu", _DTYPES[dtype])}
            shards.append(self._write_shard(f"{name}/coordinates-{i:05d}.safetensors", tensors, start, stop))
        entry = {
            "codec": "eigen", "rank": k, "basis_file": basis_file, "basis_bytes": basis_bytes,
            "eigenvalues": [float(v) for v in block.eigenvalues.cpu()], "damping": float(block.damping),
        }  # fmt: skip
        return entry, shards

    def _write_shard(self, file: str, tensors: dict[str, Tensor], start: int, stop: int) -> dict:
        return {"file": file, "start": start, "stop": stop, "bytes": _atomic_save_tensors(self.path / file, tensors)}

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
        return store

    def _check_files(self, ckpt: dict[str, Any]) -> None:
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
            expected = self.checkpoint_info(self.checkpoints[-1])["weights_digest"]
            if weights_digest != expected:
                raise StoreError(
                    f"The model's weights differ from the weights the responses in {self.path} were simulated "
                    "for (end of the fit that wrote them). Load the final weights of that fit, or pass "
                    "strict=False to read out anyway (the scores then describe the stored model, not yours)."
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
            f"{head}. {int(missing.sum())} sources hold training examples that were never injected and "
            f"{int(short.sum())} were propagated for fewer than horizon steps: those {unusable} of {self.n_sources} "
            "sources score NaN. Re-run the fit (or resume it from a checkpoint taken before the simulation "
            "window opened) to score them."
        )

    def codec(self, name: str) -> str:
        """The codec of checkpoint ``name``: ``"dense"`` or ``"eigen"`` (format 1 stores: always dense)."""
        return self.checkpoint_info(name).get("codec", "dense")

    def block(self, name: str, device: torch.device | str = "cpu") -> AnyBlock:
        """The responses of checkpoint ``name`` as a block of its codec, float32 on ``device`` (cached)."""
        if self.codec(name) == "dense":
            return DenseResponses(self.responses(name, device))
        key = ("eigen", name, str(device))
        if key not in self._cache:
            info = self.checkpoint_info(name)
            basis = self._read(self.path / info["basis_file"])
            space = self.space
            for pname, shape in zip(space.names, space.shapes):
                got = tuple(basis[pname].shape) if pname in basis else None
                if got != (info["rank"], *shape):
                    raise StoreError(f"{info['basis_file']}: tensor {pname!r} is {got}, expected {(info['rank'], *shape)}.")
            coordinates = torch.cat([block for _, block in self._iter_shards(name, "eigen")])
            self._cache[key] = EigenResponses(
                space.flatten(basis, batch_dims=1).to(device), torch.tensor(info["eigenvalues"], device=device),
                float(info["damping"]), coordinates.to(device),
            )  # fmt: skip
        return self._cache[key]

    def responses(self, name: str, device: torch.device | str = "cpu") -> Tensor:
        """``Tensor[S, P]`` float32 responses of a ``"dense"`` checkpoint ``name`` (cached per device)."""
        key = (name, str(device))
        if key not in self._cache:
            blocks = [block for _, block in self.iter_responses(name)]
            self._cache[key] = torch.cat(blocks).to(device)
        return self._cache[key]

    def iter_responses(self, name: str) -> Iterator[tuple[int, Tensor]]:
        """Yields ``(start, Tensor[S_shard, P])`` float32 per shard of a ``"dense"`` checkpoint, in source order."""
        return self._iter_shards(name, "dense")

    def _iter_shards(self, name: str, codec: str) -> Iterator[tuple[int, Tensor]]:
        """``(start, Tensor[S_shard, P])`` (dense) or ``(start, Tensor[S_shard, k])`` (eigen coordinates), float32."""
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
        space = self.space
        for shard in self.checkpoint_info(name)["shards"]:
            tensors = self._read(self.path / shard["file"])
            expected = shard["stop"] - shard["start"]
            for pname, shape in zip(space.names, space.shapes):
                got = tuple(tensors[pname].shape) if pname in tensors else None
                if got != (expected, *shape):
                    raise StoreError(f"{shard['file']}: tensor {pname!r} is {got}, expected {(expected, *shape)}.")
            yield shard["start"], space.flatten(tensors, batch_dims=1)
