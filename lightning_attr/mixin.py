"""AttributionMixin: the user's side of the contract, and forward-only ``attribute()``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from lightning_attr.functional import functional_view, to_float32
from lightning_attr.parameters import ParameterSpace
from lightning_attr.readout import check_readout, paired_readout, score_sources
from lightning_attr.sources import split_batch
from lightning_attr.store import ResponseStore, check_store_path, manifest_stamp

Responses = Union[str, os.PathLike, ResponseStore]
Checkpoints = Union[str, Sequence[str]]


@dataclass
class TopKAttribution:
    """The ``k`` strongest proponents and opponents of each query.

    A plain (mutable) dataclass, so Lightning can move it between devices and collect it from
    ``predict_step`` (``Trainer.predict`` returns one per batch).

    Attributes:
        proponent_scores: ``Tensor[B, k]``, largest scores first (positive: removing the source would
            raise the query's loss).
        proponent_indices: ``LongTensor[B, k]``, source positions in ``[0, S)``.
        opponent_scores: ``Tensor[B, k]``, most negative first.
        opponent_indices: ``LongTensor[B, k]``.
        source_ids: the store's source ids; ``source_ids[j]`` names position ``j``.
    """

    proponent_scores: Tensor
    proponent_indices: Tensor
    opponent_scores: Tensor
    opponent_indices: Tensor
    source_ids: list


def select_top_k(scores: Tensor, k: int, source_ids: list) -> TopKAttribution:
    """Top-``k`` proponents and opponents of ``scores: Tensor[B, S]`` (NaN scores never rank)."""
    if not 0 < k <= scores.shape[1]:
        raise ValueError(f"top_k must be in [1, S={scores.shape[1]}], got {k}.")
    neg_inf = torch.tensor(float("-inf"), device=scores.device)
    pro = torch.where(scores.isnan(), neg_inf, scores).topk(k, dim=1)
    opp = torch.where(scores.isnan(), neg_inf, -scores).topk(k, dim=1)
    return TopKAttribution(pro.values, pro.indices, -opp.values, opp.indices, source_ids)


class AttributionMixin:
    """Mix into a ``LightningModule`` to train with :class:`AttributionCallback` and attribute queries.

    Implement either

    - ``attribution_outputs(batch) -> Tensor[B, ...]`` and ``attribution_output_loss(outputs, batch)
      -> Tensor[B]`` (enables the GGN curvature, the default), or
    - ``attribution_loss(batch) -> Tensor[B]`` only (then use ``curvature="hessian"``).

    ``batch`` is the batch as your dataloader yields it *without* the trailing source index. The loss
    must be the per-example training loss (no reduction) whose mean you optimize. Override
    ``attribution_measurement(outputs, batch)`` to attribute something other than the query loss
    (e.g. the margin of the predicted class).
    """

    def attribution_outputs(self, batch: Any) -> Tensor:
        """Model outputs for the batch, ``Tensor[B, ...]``."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement attribution_outputs(batch) and attribution_output_loss("
            "outputs, batch), or attribution_loss(batch) with curvature='hessian'."
        )

    def attribution_output_loss(self, outputs: Tensor, batch: Any) -> Tensor:
        """Per-example training loss ``Tensor[B]`` computed from ``outputs``."""
        raise NotImplementedError(f"{type(self).__name__} must implement attribution_output_loss(outputs, batch).")

    def attribution_loss(self, batch: Any) -> Tensor:
        """Per-example training loss ``Tensor[B]``; by default from the two methods above."""
        return self.attribution_output_loss(self.attribution_outputs(batch), batch)

    def attribution_measurement(self, outputs: Tensor, batch: Any) -> Tensor:
        """What a score measures for each query, ``Tensor[B]``; by default the query's loss."""
        return self.attribution_output_loss(outputs, batch)

    # ------------------------------------------------------------------ attribution
    def attribute(
        self,
        batch: Any,
        responses: Responses,
        *,
        top_k: int | None = None,
        readout: str = "linear",
        checkpoints: Checkpoints = "last",
        chunk_size: int = 256,
        strict: bool = True,
    ) -> Tensor | TopKAttribution:
        """Scores a query batch against every source, with forward passes only.

        Works inside ``predict_step`` (leaves ``inference_mode`` for the readout).

        Args:
            batch: queries as ``attribution_outputs`` expects them (no source index), ``B`` of them.
            responses: the callback's ``dirpath`` or an open :class:`ResponseStore`.
            top_k: if set, return the ``k`` strongest proponents and opponents instead of all scores.
            readout: ``"linear"`` (jvp), ``"central"`` (two forward passes) or ``"step"``.
            checkpoints: ``"last"`` (the end of fit), ``"all"`` (ensemble over the run's response
                checkpoints, each read out at its own parameters, normalized per query by its std over
                sources; the mean is rescaled to the last checkpoint's std), a name or a list of names.
            chunk_size: sources per vmapped forward pass; bounds peak memory.
            strict: refuse responses simulated for other weights than the module's current ones.

        Returns:
            ``Tensor[B, S]`` (float32): predicted rise of each query's measurement (default: its loss)
            if the source were removed from training. Positive = proponent. Sources whose simulation
            failed (non-finite gradients) score NaN. Or a :class:`TopKAttribution` if ``top_k``.
        """
        check_readout(readout)
        store = self._attribution_store(responses)
        with functional_view(self, _cached_space(self)) as (model, theta):
            store.check_model(model.space, _weights_digest(self, model.space, theta) if strict else None)
            batch = _query_batch(batch, theta.device)
            names = _checkpoint_names(store, checkpoints)
            per_ckpt = []
            for name in names:
                at = theta if name == store.checkpoints[-1] else store.theta(name).to(theta.device)
                scores = score_sources(
                    model, at, store.responses(name, theta.device), batch, readout, chunk_size=chunk_size
                )
                valid = store.source_stats(name)["valid"].to(scores.device)
                per_ckpt.append(scores.masked_fill(~valid, float("nan")))
            scores = per_ckpt[0] if len(per_ckpt) == 1 else _ensemble(per_ckpt)
        return scores if top_k is None else select_top_k(scores, top_k, store.source_ids)

    def self_influence(
        self, batch: Any, responses: Responses, *, readout: str = "linear", strict: bool = True
    ) -> Tensor:
        """Score of each training example against its own source, ``Tensor[B]``.

        High self-influence flags examples the model could not have fit without memorizing them
        (mislabelled or atypical). ``batch`` is a training batch *with* its trailing example index.
        """
        check_readout(readout)
        store = self._attribution_store(responses)
        data, index = split_batch(batch)
        with functional_view(self, _cached_space(self)) as (model, theta):
            store.check_model(model.space, _weights_digest(self, model.space, theta) if strict else None)
            if int(index.max()) >= store.n_examples or int(index.min()) < 0:
                raise IndexError(f"example index out of range [0, {store.n_examples}) of the store's training set.")
            sources = store.example_to_source()[index.cpu()].to(theta.device)
            name = store.checkpoints[-1]
            picked = store.responses(name, theta.device)[sources]
            data = _query_batch(data, theta.device)
            return paired_readout(model, theta, picked, data, readout)

    def _attribution_store(self, responses: Responses) -> ResponseStore:
        if isinstance(responses, ResponseStore):
            return responses
        cache = self.__dict__.setdefault("_attribution_store_cache", {})
        path = os.fspath(check_store_path(responses))
        stamp = manifest_stamp(path)
        if stamp is None:  # no manifest: load() raises the StoreError that says why
            return ResponseStore.load(path)
        if cache.get(path, (None,))[0] != stamp:
            cache[path] = (stamp, ResponseStore.load(path))
        return cache[path][1]


def _weights_digest(module: Any, space: ParameterSpace, theta: Tensor) -> str:
    """``space.digest(theta)``, hashed again only when a parameter changed (in-place updates bump
    ``_version``): a query should not pay for hashing P floats."""
    key = tuple((p.data_ptr(), p._version) for p in module.parameters())
    cache = module.__dict__.setdefault("_attribution_digest", {})
    if key not in cache:
        cache.clear()
        cache[key] = space.digest(theta)
    return cache[key]


def _cached_space(module: Any) -> ParameterSpace:
    cache = module.__dict__.setdefault("_attribution_space", {})
    shapes = tuple((n, tuple(p.shape)) for n, p in module.named_parameters())
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


def _ensemble(per_ckpt: list[Tensor]) -> Tensor:
    """Mean of per-query std-normalized scores, rescaled to the last checkpoint's per-query std."""
    unit = lambda s: s / s.nan_to_num(0.0).std(dim=1, keepdim=True).clamp_min(1e-30)  # noqa: E731
    mean = torch.stack([unit(s) for s in per_ckpt]).mean(dim=0)
    return unit(mean) * per_ckpt[-1].nan_to_num(0.0).std(dim=1, keepdim=True)
