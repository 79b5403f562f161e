"""Response blocks: how the responses of ``S`` sources are held, and how each kind is read out.

A **codec** names the representation of one response checkpoint:

- ``"dense"``: ``responses: Tensor[S, P]``, one predicted parameter change per source. Read out with
  ``S`` forward(-mode) passes per query batch (``linear`` / ``central`` / ``step``, :mod:`readout`).
- ``"eigen"``: the responses restricted to the top-k eigenspace of the curvature (:mod:`spectral`):
  a shared orthonormal basis ``V: Tensor[k, P]`` and ``k`` coordinates per source,
  ``c_b = diag(p(sigma)) V^T grad l_b / n`` (``p``: the damped inverse or the dense simulation's
  ``K``-step series, applied exactly per eigen-direction), so that ``r_b = V^T c_b``. Read out with ``k``
  forward-mode tangents per query batch and one ``[B, k] x [k, S]`` product: the cost does not grow
  with ``S``. Only the ``linear`` readout exists for it (``central`` / ``step`` need ``r_b`` itself).
- ``"lorif"``: per source, rank-``c`` factors ``U: [out, c]``, ``V: [in, c]`` of every Linear / Conv weight's
  response and the other parameters dense (:mod:`lowrank`). Read out like ``"dense"`` (every readout), with the
  factored term added as ``U (V^T x)`` to each layer's output: ``c (out + in)`` per layer and source, not
  ``out * in``.
- ``"factored"``: the spectral default's responses exactly, as the eigen coordinates ``diag(1/(sigma + lam) - gamma) V g_b``
  (``k`` numbers) plus ``gamma g_b`` with each Linear / Conv weight's gradient as its per-example factors
  (``sum_t delta_t x_t^T`` over its output rows: a convolution's positions and patches) where smaller, and the rest
  dense (:mod:`factored`): ``k + sum_l c (out + in)`` numbers per source in memory; stored, ``sum_l c (out + in)`` and
  the rest but the factored layers' biases (each its ``U`` summed over columns), the coordinates derived from the
  factors and the basis when read. Read out (``linear``) from the
  query's layer factors by forward mode; the same scores as ``"dense"`` up to float rounding (``central`` / ``step``:
  the responses rebuilt as dense rows, a block at a time, at the dense codec's cost).

A dense checkpoint too large for memory is read as :class:`StreamedResponses`: its shards one at a
time at every query, so ``S x P`` is never held (the cost: reading the shards again per query).

Every block answers ``scores`` (``Tensor[B, S]``) and ``paired`` (each query against one source).
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Protocol, Union

import torch
from torch import Tensor

from lightning_attr.curvature import batch_size_of
from lightning_attr.factored import FactoredResponses
from lightning_attr.functional import FunctionalModel
from lightning_attr.layer_readout import SplitResponses, source_count, source_rows
from lightning_attr.lowrank import LowRankResponses
from lightning_attr.readout import linear_query_gradients, paired_readout, score_sources
from lightning_attr.simulation import select_examples
from lightning_attr.spectral import EigenResponses

CODECS = ("dense", "eigen", "lorif", "factored")
# attribute() holds a dense member of up to this many MB of responses in memory and streams a larger one from disk at
# every query; codec "auto" keeps responses dense up to it (:func:`auto_codec`).
DEFAULT_MEMORY_BUDGET_MB = 1024.0


def auto_codec(
    num_sources: int, num_parameters: int, mode: str, curvature: str, limit_mb: float | None = None, *,
    propagation: str = "auto", factored_numbers: int | None = None,
) -> str:  # fmt: skip
    """The codec that ``codec="auto"`` picks for ``num_sources`` sources of ``num_parameters`` parameters.

    - ``"factored"`` where it holds the dense default's responses exactly in fewer than half the numbers: end mode,
      ``curvature="ggn"``, ``propagation`` ``"auto"`` / ``"spectral"`` (the responses it stores), and
      ``factored_numbers`` (its numbers per source, :func:`lightning_attr.factored.factored_numbers`: given for
      per-example sources of a network the layer-bases readout covers, else ``None``) below ``num_parameters / 2``;
    - else ``"dense"`` while one checkpoint's dense responses (``4 S P`` bytes) fit ``limit_mb`` (attribute()'s default
      memory budget: the member is held in memory and read once per query batch); beyond it ``"eigen"`` (``rank``
      numbers per source; a query costs ``rank`` tangents whatever ``S``), which simulates at fixed weights on the
      GGN, so it is picked only in end mode with ``curvature="ggn"`` (``"dense"`` otherwise).
    """
    spectral = mode == "end" and curvature == "ggn" and propagation in ("auto", "spectral")
    if spectral and factored_numbers is not None and 2 * factored_numbers < num_parameters:
        return "factored"
    limit_mb = DEFAULT_MEMORY_BUDGET_MB if limit_mb is None else limit_mb
    fits = 4 * num_sources * num_parameters <= limit_mb * 2**20
    return "dense" if fits or mode != "end" or curvature != "ggn" else "eigen"


class ResponseBlock(Protocol):
    """The responses of ``num_sources`` sources in one codec."""

    codec: ClassVar[str]

    @property
    def num_sources(self) -> int: ...

    def to(self, device: torch.device | str) -> ResponseBlock: ...

    def scores(self, model: FunctionalModel, theta: Tensor, batch: Any, readout: str, chunk_size: int) -> Tensor:
        """``Tensor[B, S]``: predicted rise of each query's measurement if the source were removed."""

    def paired(self, model: FunctionalModel, theta: Tensor, batch: Any, sources: Tensor, readout: str) -> Tensor:
        """``Tensor[B]``: query ``i`` against source ``sources[i]`` only (self-influence)."""


@dataclass(frozen=True)
class DenseResponses:
    """Codec ``"dense"``: ``responses: Tensor[S, P]`` float32, the predicted parameter change per source, or the same
    numbers split per parameter (:class:`~lightning_attr.layer_readout.SplitResponses`: how a member is held for the
    linear readout, which reads each Linear / Conv layer's weight tangents as one contiguous block)."""

    responses: Tensor | SplitResponses
    codec: ClassVar[str] = "dense"

    @property
    def num_sources(self) -> int:
        return source_count(self.responses)

    def to(self, device: torch.device | str) -> DenseResponses:
        return DenseResponses(self.responses.to(device))

    def scores(self, model: FunctionalModel, theta: Tensor, batch: Any, readout: str, chunk_size: int) -> Tensor:
        return score_sources(model, theta, self.responses, batch, readout, chunk_size=chunk_size)

    def paired(self, model: FunctionalModel, theta: Tensor, batch: Any, sources: Tensor, readout: str) -> Tensor:
        return paired_readout(model, theta, source_rows(self.responses, sources), batch, readout)

    def gradient_scores(self, gradients: Tensor) -> Tensor:
        """``Tensor[Q, S]``: the linear readout's scores from the query gradients ``Tensor[Q, P]`` at this member's
        parameters (:func:`~lightning_attr.readout.linear_query_gradients`): one matrix product with the responses."""
        responses = self.responses
        return responses.times(gradients) if isinstance(responses, SplitResponses) else gradients @ responses.T


@dataclass(frozen=True)
class StreamedResponses:
    """Codec ``"dense"`` read shard by shard at every query: at most one shard (``Tensor[S_shard, P]``) in memory.
    Where the linear readout runs along layer bases (:func:`~lightning_attr.readout.linear_query_gradients`), the query
    gradients are computed once per query batch and multiplied with each shard.

    Args:
        shards: returns a fresh iterator of ``(sources: LongTensor[S_shard], responses: Tensor[S_shard, P])`` that
            covers every source once (:meth:`ResponseStore.iter_responses`).
        num_sources: ``S``. device: where each shard is read out.
    """

    shards: Callable[[], Iterable[tuple[Tensor, Tensor]]]
    num_sources: int
    device: torch.device
    codec: ClassVar[str] = "dense"

    def to(self, device: torch.device | str) -> StreamedResponses:
        return StreamedResponses(self.shards, self.num_sources, torch.device(device))

    def scores(self, model: FunctionalModel, theta: Tensor, batch: Any, readout: str, chunk_size: int) -> Tensor:
        gradients = linear_query_gradients(model, theta, batch, self.num_sources, chunk_size) if readout == "linear" else None
        if gradients is not None:
            return self.gradient_scores(gradients)
        out = torch.full((batch_size_of(batch), self.num_sources), float("nan"), device=theta.device)
        for sources, responses in self.shards():
            out[:, sources.to(theta.device)] = score_sources(model, theta, responses.to(self.device), batch, readout, chunk_size=chunk_size)
        return out

    def gradient_scores(self, gradients: Tensor) -> Tensor:
        """``Tensor[Q, S]``: the linear readout's scores from the query gradients ``Tensor[Q, P]`` at this member's
        parameters, multiplied with each shard as it is read."""
        out = torch.full((gradients.shape[0], self.num_sources), float("nan"), device=gradients.device)
        for sources, responses in self.shards():
            out[:, sources.to(gradients.device)] = gradients @ responses.to(self.device).T
        return out

    def paired(self, model: FunctionalModel, theta: Tensor, batch: Any, sources: Tensor, readout: str) -> Tensor:
        out = torch.full((sources.numel(),), float("nan"), device=theta.device)
        sources = sources.cpu()
        for shard_sources, responses in self.shards():
            row_of = torch.full((self.num_sources,), -1, dtype=torch.long)
            row_of[shard_sources] = torch.arange(shard_sources.numel())
            hit = (row_of[sources] >= 0).nonzero().squeeze(1)
            if hit.numel():
                rows = responses[row_of[sources[hit]]].to(self.device)
                out[hit.to(theta.device)] = paired_readout(model, theta, rows, select_examples(batch, hit), readout)
        return out


AnyBlock = Union[DenseResponses, EigenResponses, FactoredResponses, LowRankResponses, StreamedResponses]

__all__ = [
    "CODECS", "DEFAULT_MEMORY_BUDGET_MB", "auto_codec", "AnyBlock", "DenseResponses", "EigenResponses", "FactoredResponses",
    "LowRankResponses", "ResponseBlock", "SplitResponses",
    "StreamedResponses",
]
