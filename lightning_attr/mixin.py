"""AttributionMixin: the user's side of the contract, and forward-only ``attribute()``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_attr.attributor import DEFAULT_MEMORY_BUDGET_MB, Checkpoints, Responses, cached_attributor


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
        checkpoints: Checkpoints = "all",
        chunk_size: int | None = None,
        strict: bool = True,
        memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
        ensemble: str = "paired",
    ) -> Tensor | TopKAttribution:
        """Scores a query batch against every source, with forward passes only.

        Works inside ``predict_step`` (leaves ``inference_mode`` for the readout).

        Args:
            batch: queries as ``attribution_outputs`` expects them (no source index), ``B`` of them; checked
                against the format of the training batches the store recorded (a clear ``ValueError``).
            responses: the callback's ``dirpath`` or an open :class:`ResponseStore`; or a list of them
                (runs of the same architecture and training set, e.g. a multirun over seeds), ensembled.
            top_k: if set, return the ``k`` strongest proponents and opponents instead of all scores.
            readout: ``"linear"`` (jvp), ``"central"`` (two forward passes), ``"step"``, or ``"gradient"``: the linear
                readout's scores from the query gradients (one backward pass per query, then one matrix product
                with the dense responses; faster when ``S x P`` is large, but not forward-only).
            checkpoints: per store, ``"all"`` (every response checkpoint; the default: a store written with
                ``checkpoint_epochs`` is read as the trajectory ensemble), ``"last"`` (the end of fit), a
                name or a list of names. Several members (checkpoints, stores) are an ensemble: each is
                read out at its own parameters, normalized per query by its std over sources, averaged,
                and put back on the scale of the member read at the module's weights (see
                :class:`~lightning_attr.attributor.Attributor`). Each member is read from disk once.
            chunk_size: sources (or basis tangents, :mod:`~lightning_attr.basis_readout`) per vmapped forward pass;
                bounds peak memory. ``None`` (default): as many as keep
                one chunk's activations near 32 MB (:func:`~lightning_attr.readout.auto_chunk_size`): every source
                at once for a single query on small networks, a few hundred for hundreds of queries.
            strict: one store: refuse responses simulated for other weights than the module's current
                ones. Several stores: check each member's parameter snapshot against its manifest.
            memory_budget_mb: a checkpoint's dense responses larger than this are streamed from disk shard by
                shard at every query (``S x P`` is never held) instead of being kept in memory.
            ensemble: ``"paired"`` (above) or ``"collapsed"``: the selected checkpoints of each store folded into
                one response per source, read out at the latest one's parameters, so that a query costs one
                checkpoint's readout (:func:`~lightning_attr.attributor.collapse_responses`; dense checkpoints
                within ``memory_budget_mb``). It gives up reading each checkpoint at its own parameters.

        Returns:
            ``Tensor[B, S]`` (float32): predicted rise of each query's measurement (default: its loss)
            if the source were removed from training. Positive = proponent. Sources without a complete
            response (non-finite gradients, never injected, propagated short) score NaN, with a warning
            for the last two. Or a :class:`TopKAttribution` if ``top_k``.
        """
        attributor = cached_attributor(self, responses, memory_budget_mb)
        scores = attributor.scores(
            batch, readout=readout, checkpoints=checkpoints, chunk_size=chunk_size, strict=strict, ensemble=ensemble
        )
        return scores if top_k is None else select_top_k(scores, top_k, attributor.source_ids)

    def self_influence(
        self, batch: Any, responses: Responses, *, readout: str = "linear", strict: bool = True
    ) -> Tensor:
        """Score of each training example against its own source, ``Tensor[B]``.

        High self-influence flags examples the model could not have fit without memorizing them
        (mislabelled or atypical). ``batch`` is a training batch *with* its example index, as the training
        dataloader yields it: ``(*data, index)``, or a dict with the callback's ``index_key``.
        """
        return cached_attributor(self, responses).self_influence(batch, readout=readout, strict=strict)
