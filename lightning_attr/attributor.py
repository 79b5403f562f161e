"""Attributor: the read path. Scores query batches against the responses of one or several stores.

One :class:`Attributor` serves one module (the architecture, and the weights of the member that was
simulated at them) and one or several :class:`ResponseStore` (the runs of, e.g., a multirun over
seeds). Every response checkpoint it reads is a **member**: its responses (a block of its codec, :mod:`codecs`), its
parameter snapshot ``theta_e: Tensor[P]`` and its per-source validity are read from disk once and
kept in memory; a later query reads nothing from disk unless a store's manifest changed, or unless the
member's dense responses exceed ``memory_budget_mb``: then its shards are read one at a time at every query
and ``S x P`` is never held. A query
against ``E`` members costs the sum of their readouts (``E * S`` forward(-mode) passes).

Several members are an **ensemble** (METHOD.md): each member is read out at its own parameters
(paired), normalized per query by its std over sources, and the normalized scores are averaged.
The mean is put back on the per-query scale of one reference member (the first read out at the module's
live weights, else the first store's last), so scores keep the units of the measurement.

``ensemble="collapsed"`` folds the selected checkpoints of each store into ONE response per source before any
query (:func:`collapse_responses`): ``sum_e R_e / c_e`` (``c_e``: the Frobenius norm of member ``e``'s responses
centred over sources), rescaled to the centred norm of the latest one and read out at that member's parameters.
A query then costs one member's readout whatever the number of checkpoints; the members are no longer read at
their own parameters (measured in ``benchmarks/ensembles.py``). Several stores are still paired: each store's
collapsed member is read at its own parameters and the stores are averaged as above.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from functools import cached_property, partial
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from lightning_attr.batch_format import check_batch
from lightning_attr.curvature import batch_size_of
from lightning_attr.functional import FunctionalModel, functional_view, to_float32
from lightning_attr.parameters import ParameterSpace
from lightning_attr.codecs import DEFAULT_MEMORY_BUDGET_MB, AnyBlock, DenseResponses, SplitResponses
from lightning_attr.basis_readout import QueryFactors, basis_layers, member_query_factors
from lightning_attr.layer_readout import handled_layers, layer_parameters
from lightning_attr.module_cache import module_cache
from lightning_attr.readout import auto_chunk_size, check_readout, linear_query_gradients, query_chunk_rows
from lightning_attr.sources import split_batch
from lightning_attr.store import ResponseStore, StoreError, check_store_path, manifest_stamp

Store = Union[str, os.PathLike, ResponseStore]
Responses = Union[Store, Sequence[Store]]
Checkpoints = Union[str, Sequence[str]]
_KEPT_ATTRIBUTORS = 4  # per module: stores held in memory for the last few `responses` arguments
_KEPT_CHUNK_SIZES = 16  # per attributor: auto chunk sizes of the last few query-batch shapes
ENSEMBLES = ("paired", "collapsed")  # how the checkpoints of one store are combined (module docstring)


@dataclass
class _Member:
    """One response checkpoint held in memory: what one readout of an ensemble needs."""

    entry: dict  # the checkpoint's manifest entry when it was read (a change means: read again)
    theta: Tensor | None  # [P] float32, the parameters the responses were simulated at (None: not stored)
    responses: AnyBlock  # dense [S, P] or eigen (basis [k, P], coordinates [S, k]), float32
    valid: Tensor  # [S] bool: the source has a complete response (ResponseStore.scorable); else NaN
    incomplete: str | None  # why some finite sources score NaN (ResponseStore.incomplete_reason), warned per query

    def __post_init__(self) -> None:
        self.all_valid = bool(self.valid.all())  # no NaN to write into its scores (a [B, S] pass saved per query)

    def masked(self, scores: Tensor) -> Tensor:
        """``scores: Tensor[B, S]`` with NaN for the sources this member cannot score."""
        return scores if self.all_valid else scores.masked_fill(~self.valid, float("nan"))


class _OpenStore:
    """A store and the manifest stamp it was opened at (``None`` for a store passed as an object)."""

    def __init__(self, spec: Store) -> None:
        self.spec = spec
        self.store: ResponseStore | None = spec if isinstance(spec, ResponseStore) else None
        self.stamp: int | None = None
        self._passed: tuple | None = None  # what the last successful check_model was given, and the store's state

    def check_model(self, space: ParameterSpace, weights_digest: str | None) -> None:
        """``store.check_model``, skipped when it already passed for this space, digest and store state (a query
        should not pay for fingerprinting the architecture)."""
        store = self.store
        last = store.checkpoint_info(store.checkpoints[-1])["weights_digest"] if store.checkpoints else None
        state = (store, space, weights_digest, store.manifest["fingerprint"], last)  # objects held: no id reuse
        if self._passed is None or any(a is not b and a != b for a, b in zip(self._passed, state)):
            store.check_model(space, weights_digest)
            self._passed = state

    def refresh(self) -> ResponseStore:
        """The store, opened again if its manifest changed on disk since it was opened."""
        if isinstance(self.spec, ResponseStore):
            return self.spec
        stamp = manifest_stamp(self.spec)
        if self.store is None or stamp is None or stamp != self.stamp:
            self.store = ResponseStore.load(self.spec)  # a clear StoreError when there is no store
            self.stamp = stamp
        return self.store


class Attributor:
    """Forward-only attribution of query batches against one or several response stores.

    Args:
        module: an :class:`AttributionMixin` module; it gives the architecture, and its live weights are
            the ones the last checkpoint of a single store is read out at.
        responses: a store (the callback's ``dirpath`` or an open :class:`ResponseStore`) or a non-empty
            sequence of stores of the same architecture and sources (e.g. the runs of a multirun).
        memory_budget_mb: a dense member whose ``S x P`` float32 responses exceed this is not held in memory:
            it is read shard by shard at every query (:class:`~lightning_attr.codecs.StreamedResponses`).
    """

    def __init__(self, module: nn.Module, responses: Responses, memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB) -> None:
        specs = _store_specs(responses)
        self.module, self.memory_budget_mb = module, memory_budget_mb
        self._stores = [_OpenStore(spec) for spec in specs]
        self._members: dict[tuple[int, str, str], _Member] = {}
        self._verified: set[tuple[int, str]] = set()
        self._chunk_sizes: dict[tuple, int] = {}  # auto chunk size per query-batch shape
        self._last_stack: tuple[tuple[Tensor, ...], tuple[int, ...], Tensor] | None = None  # _stacked's last answer

    def stores(self) -> list[ResponseStore]:
        """The stores, each re-opened if its manifest changed; checked to hold the same sources."""
        stores = [s.refresh() for s in self._stores]
        first = stores[0]
        for store in stores[1:]:
            if store.source_ids != first.source_ids or store.n_examples != first.n_examples:
                raise StoreError(
                    f"{store.path} holds other sources than {first.path} ({store.n_sources} sources over "
                    f"{store.n_examples} examples vs {first.n_sources} over {first.n_examples}): an ensemble of "
                    "runs needs the same training set and source map in every run."
                )
            if not first.manifest["per_example"] and not torch.equal(store.example_to_source(), first.example_to_source()):
                raise StoreError(f"{store.path} maps examples to sources differently from {first.path}.")
        return stores

    @property
    def source_ids(self) -> list:
        return self.stores()[0].source_ids

    # ------------------------------------------------------------------ queries
    def scores(
        self,
        batch: Any,
        *,
        readout: str = "linear",
        checkpoints: Checkpoints = "all",
        chunk_size: int | None = None,
        strict: bool = True,
        ensemble: str = "paired",
    ) -> Tensor:
        """``Tensor[B, S]`` float32: predicted rise of each query's measurement if the source were removed.

        Args:
            batch: queries as ``attribution_outputs`` expects them (no source index).
            readout: ``"linear"``, ``"central"``, ``"step"`` or ``"gradient"`` (see :mod:`readout`).
            checkpoints: per store, ``"all"`` (every response checkpoint: an ensemble where the store holds
                several), ``"last"``, a checkpoint name or a list of names.
            chunk_size: sources per vmapped forward pass; ``None``: as many as keep the chunk's activations near
                :data:`~lightning_attr.readout.CHUNK_ACTIVATION_MB` (found once per query-batch shape).
            strict: one store: refuse a module whose weights are not the ones its last checkpoint was
                simulated at. Several stores: check every member's parameter snapshot against the digest its
                manifest recorded (the module's weights are then used only for a member simulated at them).
            ensemble: ``"paired"``: every selected checkpoint is a member read out at its own parameters;
                ``"collapsed"``: the selected checkpoints of each store are folded into one response per source
                (:func:`collapse_responses`, dense checkpoints held in memory only), read out at the latest one's
                parameters: one readout per store and query.

        Sources invalid or incomplete (never injected, propagated short) in any member score NaN, with a warning.
        """
        check_readout(readout)
        if ensemble not in ENSEMBLES:
            raise ValueError(f"ensemble must be one of {ENSEMBLES}, got {ensemble!r}.")
        stores = self.stores()
        check_batch(batch, stores[0].batch_format())
        with functional_view(self.module, _cached_space(self.module), current=False) as (model, _):
            weights = _LiveWeights(self.module, model.space)
            live_digest = self._check(stores, model.space, weights, strict)
            batch = _query_batch(batch, weights.device)
            names = [_checkpoint_names(store, checkpoints) for store in stores]
            several = sum(map(len, names)) > 1
            if chunk_size is None and readout != "gradient":  # "gradient" vmaps nothing over sources
                chunk_size = self._auto_chunk_size(model, weights, batch, stores[0].n_sources)
            read: list[tuple[_Member, Tensor]] = []  # every member and the parameters it is read out at
            live: list[bool] = []  # whether it is read at the module's weights
            for i, store in enumerate(stores):
                if ensemble == "collapsed" and len(names[i]) > 1:
                    latest = max(names[i], key=store.checkpoints.index)
                    members = [(latest, self._collapsed(i, store, names[i], weights.device, strict))]
                else:
                    members = [(name, self._member(i, store, name, weights.device, strict, several)) for name in names[i]]
                for name, member in members:
                    _warn_incomplete(member)
                    at, at_live = self._read_at(store, name, member, weights, live_digest, strict)
                    read.append((member, at))
                    live.append(at_live)
                if i == 0:
                    first_store_last = len(read) - 1
            gradients = _shared_query_gradients(model, read, batch, readout, chunk_size, stores[0].n_sources, self._stacked)
            factors = _shared_query_factors(model, read, batch, readout, chunk_size, self._stacked)
            per_member = []
            for (member, at), g, f in zip(read, gradients, factors):
                if g is not None:
                    scores = member.responses.gradient_scores(g)
                elif f is not None and member.responses.reads(f):
                    scores = member.responses.factor_scores(model.space, f, at)
                else:
                    scores = member.responses.scores(model, at, batch, readout, chunk_size)
                per_member.append(member.masked(scores))
        if len(per_member) == 1:
            return per_member[0]
        return ensemble_mean(per_member, live.index(True) if any(live) else first_store_last)

    def self_influence(self, batch: Any, *, readout: str = "linear", strict: bool = True) -> Tensor:
        """``Tensor[B]``: each training example's score against its own source, from the last checkpoint of the
        (first) store. ``batch`` is a training batch *with* its trailing example index."""
        check_readout(readout)
        store = self.stores()[0]
        data, sources = _training_batch_sources(batch, store)
        with functional_view(self.module, _cached_space(self.module), current=False) as (model, _):
            weights = _LiveWeights(self.module, model.space)
            live_digest = self._check([store], model.space, weights, strict)
            name = _checkpoint_names(store, "last")[0]
            member = self._member(0, store, name, weights.device, strict, ensemble=False)
            at, _ = self._read_at(store, name, member, weights, live_digest, strict)
            _warn_incomplete(member)
            sources = sources.to(weights.device)
            scores = member.responses.paired(model, at, _query_batch(data, weights.device), sources, readout)
            return scores.masked_fill(~member.valid[sources], float("nan"))

    # ------------------------------------------------------------------ internals
    def _auto_chunk_size(self, model: FunctionalModel, weights: _LiveWeights, batch: Any, num_sources: int) -> int:
        """:func:`~lightning_attr.readout.auto_chunk_size` at the module's weights, measured once per shape of the query
        batch."""
        leaves = tree_flatten(batch)[0]
        key = (num_sources, *((tuple(t.shape), t.dtype) if isinstance(t, Tensor) else repr(t) for t in leaves))
        if key not in self._chunk_sizes:
            if len(self._chunk_sizes) >= _KEPT_CHUNK_SIZES:
                self._chunk_sizes.pop(next(iter(self._chunk_sizes)))
            self._chunk_sizes[key] = auto_chunk_size(model, weights.theta, batch, num_sources)
        return self._chunk_sizes[key]

    def _stacked(self, thetas: list[Tensor]) -> Tensor:
        """``torch.stack(thetas)``: ``Tensor[E, P]``, the parameters of the members read together, kept for the next
        query while it reads the same tensors (the members' snapshots, held by this attributor: the same objects at
        every query of a store that did not change), so that its per-member parameters
        (:func:`~lightning_attr.basis_readout.member_query_factors`) are laid out once, not at every query."""
        last = self._last_stack
        if last is not None and len(last[0]) == len(thetas) and all(a is b and a._version == v for a, b, v in zip(thetas, *last[:2])):
            return last[2]
        stacked = torch.stack(thetas)
        self._last_stack = (tuple(thetas), tuple(t._version for t in thetas), stacked)
        return stacked

    def _split(self, space: ParameterSpace) -> tuple[str, ...] | None:
        """The parameters a dense member holds on their own: those of the module's Linear / Conv layers, whose weight
        tangents the layer readout reads as contiguous blocks (:mod:`~lightning_attr.layer_readout`). ``None`` (held
        flat, ``Tensor[S, P]``) when the layer bases cover every parameter (:func:`~lightning_attr.basis_readout.
        basis_layers`): the readout is then one matrix product with the query gradients, which reads flat responses
        faster (one ``[S, P]`` matrix-vector product per query: 0.71x / 0.84x the time of the per-block products over
        the MNIST-1D / digits CNN's three members, measured ad hoc in paired rounds on ``benchmarks/readout.py``'s
        stores); a batch the bases decline is split for the layer readout at that call."""
        if basis_layers(self.module, space) is not None:
            return None
        return layer_parameters(handled_layers(self.module, space))

    def _check(self, stores: list[ResponseStore], space: ParameterSpace, weights: _LiveWeights, strict: bool) -> str | None:
        """Fingerprint of every store; for a single store under ``strict``, the module's weights. Returns the
        live weights' digest (``None`` when nothing needs it)."""
        single = len(self._stores) == 1
        live_digest = _weights_digest(self.module, space, weights) if strict or not single else None
        for opened, store in zip(self._stores, stores):
            opened.check_model(space, live_digest if (strict and single) else None)
        return live_digest

    def _read_at(
        self, store: ResponseStore, name: str, member: _Member, weights: _LiveWeights, live_digest: str | None, strict: bool
    ) -> tuple[Tensor, bool]:
        """``(theta: Tensor[P], live)``: the parameters a member is read out at, and whether they are the module's: the
        live ones for the member simulated at them (its snapshot where it has one: the same float32 numbers, their
        digest says so, and the same tensor at every query) and, with a single store and ``strict=False``, for its last
        checkpoint whatever they are; else its snapshot."""
        if live_digest is not None and member.entry["weights_digest"] == live_digest:
            return (member.theta if member.theta is not None else weights.theta), True
        if len(self._stores) == 1 and not strict and name == store.checkpoints[-1]:
            return weights.theta, True
        if member.theta is None:
            raise StoreError(
                f"Checkpoint {name!r} of {store.path} has no parameter snapshot and the module's weights are not "
                "the ones it was simulated at: load that fit's final weights (or re-run the simulation)."
            )
        return member.theta, False

    def _member(
        self, i: int, store: ResponseStore, name: str, device: torch.device, strict: bool, ensemble: bool
    ) -> _Member:
        """Checkpoint ``name`` of store ``i`` on ``device``, read from disk only the first time (or after the
        checkpoint was rewritten). ``ensemble``: it is one of several members (needs its parameter snapshot)."""
        entry = store.checkpoint_info(name)
        key = (i, name, str(device))
        member = self._members.get(key)
        if member is None or member.entry != entry:
            has_snapshot = "params_file" in entry
            member = _Member(
                entry=entry,
                theta=store.theta(name).to(device) if has_snapshot else None,
                responses=store.block(name, device, self.memory_budget_mb, split=self._split(store.space)),
                valid=store.scorable(name).to(device),
                incomplete=store.incomplete_reason(name),
            )
            self._members[key] = member
            self._verified.discard((i, name))
        if ensemble and member.theta is None:
            raise StoreError(
                f"Checkpoint {name!r} of {store.path} has no parameter snapshot (params.safetensors), so it cannot "
                "be read out at the weights it was simulated at, which an ensemble needs. Re-run its simulation "
                "with this version of lightning_attr (it writes one per checkpoint), or attribute with that "
                "store alone at the model's own weights."
            )
        if strict and len(self._stores) > 1:
            self._verify_snapshot(i, store, name, member)
        return member

    def _verify_snapshot(self, i: int, store: ResponseStore, name: str, member: _Member) -> None:
        """Checks (once) that the parameter snapshot of checkpoint ``name`` of store ``i`` (``member.theta``) hashes
        to the weights digest its manifest recorded."""
        if (i, name) not in self._verified:
            if store.space.digest(member.theta) != member.entry["weights_digest"]:
                raise StoreError(
                    f"The parameter snapshot of checkpoint {name!r} in {store.path} does not match the weights "
                    "digest its manifest recorded: the file was replaced or damaged. Re-run that simulation, or "
                    "pass strict=False to read it out anyway."
                )
            self._verified.add((i, name))


    def _collapsed(self, i: int, store: ResponseStore, names: list[str], device: torch.device, strict: bool) -> _Member:
        """Checkpoints ``names`` of store ``i`` folded into one member (:func:`collapse_responses`) at the parameters
        of the latest of them; built once (again only when one of them was rewritten) from the members' shards, one
        shard in memory at a time: only the folded ``S x P`` is held."""
        latest = max(names, key=store.checkpoints.index)
        entries = {name: store.checkpoint_info(name) for name in names}
        entry = {**entries[latest], "collapsed": entries}
        key = (i, tuple(names), "collapsed", str(device))
        member = self._members.get(key)
        if member is None or member.entry != entry:
            for name in names:
                if store.codec(name) not in ("dense", "factored"):  # "factored": the same responses, rebuilt as rows
                    raise StoreError(
                        f"ensemble='collapsed' folds dense responses (codec 'dense', or 'factored' rebuilt as rows); "
                        f"checkpoint {name!r} of {store.path} holds codec {store.codec(name)!r}. Use ensemble='paired'."
                    )
            if store.n_sources * store.space.size * 4 > self.memory_budget_mb * 2**20:
                raise StoreError(
                    f"ensemble='collapsed' holds one S x P response block ({store.n_sources} x {store.space.size} "
                    f"float32), more than memory_budget_mb={self.memory_budget_mb:g}. Raise memory_budget_mb or use "
                    "ensemble='paired' (streams each checkpoint from disk)."
                )
            valid = torch.stack([store.scorable(name) for name in names]).all(dim=0).to(device)
            ordered = [n for n in names if n != latest] + [latest]
            shards = [partial(_shards_on, store.iter_responses, name, device) for name in ordered]
            member = _Member(
                entry=entry,
                theta=store.theta(latest).to(device) if "params_file" in entries[latest] else None,
                responses=DenseResponses(_laid_out(collapse_responses(shards, valid, store.space.size), store.space, self._split(store.space))),
                valid=valid,
                incomplete=next((r for r in map(store.incomplete_reason, names) if r is not None), None),
            )
            self._members[key] = member
            self._verified.discard((i, latest))
        if strict and len(self._stores) > 1 and member.theta is not None:  # no snapshot: _read_at says what to do
            self._verify_snapshot(i, store, latest, member)
        return member


Shards = Callable[[], Iterable[tuple[Tensor, Tensor]]]


def collapse_responses(members: Sequence[Shards], valid: Tensor, dim: int) -> Tensor:
    """The collapsed ensemble of ``E`` checkpoints of one run: ``Tensor[S, P]`` float32, ``sum_e R_e / c_e`` rescaled
    so that its norm centred over sources equals the last member's ``c_E`` (units: parameters per source removed).

    Args:
        members: per checkpoint, a function returning its shards ``(sources: LongTensor[S_shard], rows:
            Tensor[S_shard, P])`` (every source once, :meth:`ResponseStore.iter_responses`); the last one is the
            checkpoint whose parameters the result is read out at. Each is read twice, one shard at a time.
        valid: ``Tensor[S]`` bool, the sources scorable in every member; the others are NaN rows and count in no norm.
        dim: ``P``.

    ``c_e``: the Frobenius norm of ``R_e``'s valid rows minus their mean over sources, a query-free stand-in for the
    per-query std over sources that the paired ensemble divides each member's scores by.
    """
    norms = [_centred_norm(shards(), valid) for shards in members]
    out = torch.zeros(valid.numel(), dim, device=valid.device)
    for shards, norm in zip(members, norms):
        for sources, rows in shards():
            out[sources] += rows.nan_to_num(0.0) / norm
    out.mul_(norms[-1] / _centred_norm([(torch.arange(valid.numel(), device=valid.device), out)], valid))
    out[~valid] = float("nan")
    return out


def _centred_norm(shards: Iterable[tuple[Tensor, Tensor]], valid: Tensor) -> float:
    """Frobenius norm of the valid rows of ``shards`` minus their mean row (float64 sums), at least 1e-30."""
    total, squares = 0.0, 0.0
    for sources, rows in shards:
        kept = rows[valid[sources]].double()
        total, squares = total + kept.sum(dim=0), squares + float(kept.square().sum())
    count = max(1, int(valid.sum()))
    return max(1e-30, max(0.0, squares - float(torch.as_tensor(total).square().sum()) / count) ** 0.5)


def _shards_on(shards: Callable[[str], Iterable[tuple[Tensor, Tensor]]], name: str, device: torch.device):
    """The shards of checkpoint ``name`` with sources and rows on ``device``."""
    return ((sources.to(device), rows.to(device)) for sources, rows in shards(name))


def _warn_incomplete(member: _Member) -> None:
    """Warns (at every query) when finite sources of a checkpoint score NaN because their simulation did not
    finish: a partial checkpoint written after a crash, or examples that were never injected."""
    if member.incomplete is not None:
        warnings.warn(member.incomplete, UserWarning, stacklevel=4)


def _laid_out(responses: Tensor, space: ParameterSpace, split: Sequence[str] | None) -> Tensor | SplitResponses:
    """Flat ``Tensor[S, P]`` responses as a member holds them: flat (``split=None``) or split per parameter."""
    return responses if split is None else SplitResponses.from_flat(responses, space, split)


def _shared_query_gradients(
    model: FunctionalModel, read: list[tuple[_Member, Tensor]], batch: Any, readout: str, chunk_size: int | None, num_sources: int,
    stack: Callable[[list[Tensor]], Tensor] = torch.stack,
) -> list[Tensor | None]:  # fmt: skip
    """Per member, the query gradients ``Tensor[Q, P]`` its linear readout multiplies its responses with, for every
    member of the dense codec at once (:func:`~lightning_attr.readout.linear_query_gradients`: one capture per member,
    then the same vmapped jvp passes for all of them); ``None`` for a member that reads its queries another way (another
    codec or readout, or a network the layer bases do not cover)."""
    dense = [k for k, (member, _) in enumerate(read) if hasattr(member.responses, "gradient_scores")]
    out: list[Tensor | None] = [None] * len(read)
    if readout != "linear" or not dense:
        return out
    gradients = linear_query_gradients(model, stack([read[k][1] for k in dense]), batch, num_sources, chunk_size)
    for k, g in zip(dense, gradients if gradients is not None else ()):
        out[k] = g
    return out


def _shared_query_factors(
    model: FunctionalModel, read: list[tuple[_Member, Tensor]], batch: Any, readout: str, chunk_size: int | None,
    stack: Callable[[list[Tensor]], Tensor] = torch.stack,
) -> list[QueryFactors | None]:  # fmt: skip
    """Per member of codec ``"factored"``, the query's layer factors at its parameters, every such member in the same
    vmapped passes (:func:`~lightning_attr.basis_readout.member_query_factors`), when the layer bases cover the network
    and each member's ``Q x P`` query gradients fit one query chunk; ``None`` elsewhere (the member reads its own)."""
    factored = [k for k, (member, _) in enumerate(read) if hasattr(member.responses, "factor_scores")]
    out: list[QueryFactors | None] = [None] * len(read)
    layers = basis_layers(model.module, model.space) if readout == "linear" and len(factored) > 1 else None
    rows = query_chunk_rows(read[0][1])
    if layers is None or batch_size_of(batch) > rows:
        return out
    thetas = stack([read[k][1] for k in factored])
    # chunk_size: Attributor.scores resolved it (the linear readout), shared by the members read together; the members'
    # query gradients are laid out at once where they fit one query chunk together
    laid_out = len(factored) * batch_size_of(batch) <= rows
    for k, f in zip(factored, member_query_factors(model, thetas, batch, layers, chunk_size=chunk_size, laid_out=laid_out) or ()):
        out[k] = f
    return out


def ensemble_mean(per_member: list[Tensor], reference: int = -1) -> Tensor:
    """Ensemble of ``E`` members' scores, ``Tensor[B, S]`` each: the mean of the per-query std-normalized
    scores (std over each member's scorable sources: a NaN source is left out of its mean and std), put back on the
    per-query std of ``per_member[reference]``. A source NaN in any member is NaN. So the scores of a store whose
    unscorable sources are NaN (never injected, never trained on) equal those of the same store without them.

    Computed as ``sum_e s_e / d_e`` rescaled by ``d_ref / d_sum`` (``d``: :func:`_deviation_std`; the mean's ``1 / E``
    cancels in the rescaling), accumulated in one ``[B, S]`` buffer: on the MNIST-1D MLP's batch (three members,
    ``[300, 4000]`` each, one thread) 46 ms -> 7 ms."""
    stds = [_deviation_std(s) for s in per_member]  # [B, 1] each; the reference's is used unclamped at the end
    total = per_member[0] / stds[0].clamp_min(1e-30)
    for scores, std in zip(per_member[1:], stds[1:]):
        total.addcdiv_(scores, std.clamp_min(1e-30))
    return total.mul_(stds[reference] / _deviation_std(total).clamp_min_(1e-30))


def _deviation_std(scores: Tensor) -> Tensor:
    """``Tensor[B, 1]``: the std over sources (dimension 1) of ``scores: Tensor[B, S]``, NaN sources left out (a row
    with fewer than two scorable sources: its deviation norm), in two passes (the mean, then the deviations).
    ``Tensor.std``'s kernel took 6.6 ms on one ``[300, 4000]`` block against 0.5-0.8 ms for this (one thread)."""
    missing = scores.isnan()
    deviations = scores.nan_to_num(0.0)
    if not bool(missing.any()):  # the common case, two passes fewer: [300, 4000] 2.1 ms against 3.6-4.4 (one thread)
        norm = torch.linalg.vector_norm(deviations.sub_(deviations.mean(dim=1, keepdim=True)), dim=1, keepdim=True)
        return norm / max(scores.shape[1] - 1, 1) ** 0.5
    count = (~missing).sum(dim=1, keepdim=True)
    mean = deviations.sum(dim=1, keepdim=True) / count.clamp_min(1)
    norm = torch.linalg.vector_norm(deviations.sub_(mean).masked_fill_(missing, 0.0), dim=1, keepdim=True)
    return norm / (count - 1).clamp_min(1).to(norm.dtype).sqrt()


def cached_attributor(
    module: nn.Module, responses: Responses, memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB
) -> Attributor:
    """The module's :class:`Attributor` for ``responses`` (kept in a :class:`~lightning_attr.module_cache.ModuleCache`, the last few), so that
    repeated queries against the same stores read nothing from disk (unless a member is streamed)."""
    specs = _store_specs(responses)
    key = (*(s if isinstance(s, ResponseStore) else os.path.abspath(os.fspath(s)) for s in specs), memory_budget_mb)
    cache = module_cache(module, "_attributors")
    if key not in cache:
        while len(cache) >= _KEPT_ATTRIBUTORS:
            cache.pop(next(iter(cache)))
        cache[key] = Attributor(module, responses, memory_budget_mb)
    return cache[key]


def _store_specs(responses: Responses) -> list[Store]:
    if isinstance(responses, ResponseStore) or responses is None or isinstance(responses, (str, os.PathLike)):
        return [responses if isinstance(responses, ResponseStore) else check_store_path(responses)]
    if not isinstance(responses, Sequence):
        check_store_path(responses)  # raises: names what was passed
    specs = list(responses)
    if not specs:
        raise ValueError(
            "responses is an empty list: pass one store directory, or several (one per run of the same model) "
            "to ensemble them."
        )
    return [s if isinstance(s, ResponseStore) else check_store_path(s) for s in specs]


def _training_batch_sources(batch: Any, store: ResponseStore) -> tuple[Any, Tensor]:
    """``(data, sources: LongTensor[B])`` of a training batch passed to ``self_influence``: the data checked
    against the training format, and the source of each example."""
    index_key = store.manifest["settings"].get("index_key", "index")
    hint = (
        "self_influence takes training batches with their example index, as IndexedDataset yields them: "
        f"(*data, index), or a dict with the key {index_key!r}."
    )
    try:
        data, index = split_batch(batch, index_key)
    except ValueError as err:
        raise ValueError(f"{hint} {err}") from None
    check_batch(data, store.batch_format(), what="The batch passed to self_influence, without its index", hint=hint)
    if int(index.max()) >= store.n_examples or int(index.min()) < 0:
        raise IndexError(f"example index out of range [0, {store.n_examples}) of the store's training set.")
    sources = store.example_to_source()[index.cpu()]
    if bool((sources < 0).any()):
        raise IndexError(
            f"example {int(index.cpu()[sources < 0][0])} was not in the training set (the fit trained on a subset "
            "of the dataset): it has no source and no self-influence."
        )
    return data, sources


class _LiveWeights:
    """The module's weights at a query: their device, and (read only where something needs them) the flat
    ``theta: Tensor[P]`` float32 of :meth:`ParameterSpace.current` (a query whose members are all read at their
    snapshots does not lay the module's weights out)."""

    def __init__(self, module: nn.Module, space: ParameterSpace) -> None:
        self.module, self.space = module, space
        self.device = module.get_parameter(space.names[0]).device

    @cached_property
    def theta(self) -> Tensor:
        return self.space.current(self.module)


def _weights_digest(module: Any, space: ParameterSpace, weights: _LiveWeights) -> str:
    """``space.digest(weights.theta)``, hashed again only when a parameter changed (in-place updates bump
    ``_version``): a query should not pay for hashing P floats."""
    key = tuple((p.data_ptr(), p._version) for p in module.parameters())
    cache = module_cache(module, "_attribution_digest")
    if key not in cache:
        cache.clear()
        cache[key] = space.digest(weights.theta)
    return cache[key]


def _cached_space(module: Any) -> ParameterSpace:
    cache = module_cache(module, "_attribution_space")
    shapes = tuple((n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in module.named_parameters())
    if shapes not in cache:
        cache.clear()
        cache[shapes] = ParameterSpace.of(module)
    return cache[shapes]


def _query_batch(batch: Any, device: torch.device) -> Any:
    # clone: tensors made under inference_mode cannot enter autograd / forward-mode AD
    return to_float32(tree_map(lambda t: t.to(device).clone() if isinstance(t, Tensor) else t, batch))


def _checkpoint_names(store: ResponseStore, checkpoints: Checkpoints) -> list[str]:
    if not store.checkpoints:
        raise ValueError(f"{store.path} holds no response checkpoint yet (did the fit finish?).")
    if checkpoints == "last":
        return [store.checkpoints[-1]]
    if checkpoints == "all":
        return list(store.checkpoints)
    names = [checkpoints] if isinstance(checkpoints, str) else list(checkpoints)
    for name in names:
        store.checkpoint_info(name)
    return names
