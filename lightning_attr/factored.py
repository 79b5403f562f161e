"""Codec ``"factored"``: the spectral default's responses kept exactly in ``k + sum_l c (out_l + in_l)`` numbers per source.

``propagation="spectral"`` (:mod:`deflated`) gives each source the response

    r_s = gamma g_s + V^T diag(1/(sigma + lam) - gamma) V g_s,      g_s = grad l_s / n,   gamma = 1/(mu + lam)

(``V: Tensor[k, P]`` the top-k eigenvectors of the GGN, ``mu`` the mean eigenvalue outside them). Its score against a
query gradient ``g_q`` is ``<g_q, r_s> = (V g_q) . c_s + <g_q, gamma g_s>`` with ``c_s = diag(1/(sigma + lam) - gamma)
V g_s`` (``k`` numbers). And ``g_s`` is cheap to keep exactly: for one call of a Linear layer on one example the weight
gradient is rank one, ``delta_s x_s^T`` (``delta`` the loss's gradient at the layer's output, ``x`` its input), so
``gamma g_s`` is stored as the factors of codec ``"lorif"`` (:class:`~lightning_attr.lowrank.LowRankResponses`,
``U = gamma delta / n``, ``V = x``; rank ``c`` = rows per example times the largest source's examples) and every other
parameter dense (biases, convolutions, a Linear layer where ``c (out + in) >= out x in``). Nothing is approximated:
the scores equal the dense codec's up to float rounding (tested).

At query time :func:`~lightning_attr.basis_readout.query_factors` gives, by forward mode, each Linear layer's ``J``
(``dm/dz``) and input ``X``: ``<J^T X, U V^T> = sum (J U) * (X V)`` costs ``Q x S x c (out + in)`` instead of
``Q x S x out x in``, and ``t_q = V g_q`` one ``[Q, P] x [P, k]`` product whatever ``S``. A model the layer bases do
not cover is read with ``k`` tangents along ``V`` and the factored layers' hooks (:class:`LowRankResponses`), forward
mode too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lightning_attr.basis_readout import QueryFactors, basis_layers, query_factors
from lightning_attr.curvature import batch_size_of
from lightning_attr.functional import FunctionalModel
from lightning_attr.layer_readout import _Layer, capture_layers, handled_layers
from lightning_attr.lowrank import LowRankResponses, paired_diagonals
from lightning_attr.parameters import ParameterSpace
from lightning_attr.readout import query_chunks, check_readout, paired_readout, score_sources
from lightning_attr.simulation import select_examples
from lightning_attr.spectral import EigenResponses

COORDINATES = "coordinates"  # shard key of the eigen coordinates, Tensor[C, k]
# A factored weight's reconstruction U V^T may differ from the dense per-source gradient by this much (relative to the
# largest entry of that gradient block) before the simulation refuses it: float32 rounding of two autodiff paths.
_CONSISTENCY_TOLERANCE = 1e-3
_CHECK_PROBES = 4  # random combinations of a weight's rows that check_factors compares


_DENSE_ROWS = 1024  # sources rebuilt as dense rows at a time for the central / step readouts


@dataclass(frozen=True)
class FactoredResponses:
    """Codec ``"factored"``: ``r_s = eigen.basis^T eigen.coordinates[s] + gradients[s]`` (module docstring).

    Attributes:
        eigen: the top-k eigenvectors of the GGN (``basis: Tensor[k, P]``, orthonormal rows), their eigenvalues, the
            damping ``lam`` and per source the coordinates ``diag(1/(sigma + lam) - gamma) V g_s`` (``Tensor[S, k]``
            float32; NaN rows: invalid sources), as codec ``"eigen"`` holds them.
        complement_gain: ``gamma = 1 / (mu + lam)``, what the response is outside the basis.
        gradients: ``gamma g_s`` per source (:class:`LowRankResponses`: Linear weights as factors, the rest dense).
    """

    eigen: EigenResponses
    complement_gain: float
    gradients: LowRankResponses
    codec: ClassVar[str] = "factored"

    @property
    def num_sources(self) -> int:
        return self.eigen.num_sources

    @property
    def rank(self) -> int:
        return self.eigen.rank

    def to(self, device: torch.device | str) -> FactoredResponses:
        return FactoredResponses(self.eigen.to(device), self.complement_gain, self.gradients.to(device))

    def select(self, sources: Tensor) -> FactoredResponses:
        """The responses of ``sources: LongTensor[C]`` (in that order)."""
        return FactoredResponses(replace(self.eigen, coordinates=self.eigen.coordinates[sources]), self.complement_gain, self.gradients.select(sources))

    def to_dense(self) -> Tensor:
        """The same responses as ``Tensor[S, P]`` (``S x P`` floats: for tests and small stores)."""
        return self.eigen.to_dense() + self.gradients.to_dense()

    def entry(self) -> dict[str, Any]:
        """Its manifest fields besides the basis file: codec, rank, eigenvalues, damping, ``gamma``, the factored weights
        (``{name: [out, in, c]}``) and the numbers stored per source (``numbers_per_source``, of ``P`` dense)."""
        return {
            "codec": "factored", "rank": self.rank, "eigenvalues": [float(v) for v in self.eigen.eigenvalues.cpu()],
            "damping": float(self.eigen.damping), "complement_gain": float(self.complement_gain),
            "factored": self.gradients.entry()["factored"], "numbers_per_source": self.rank + self.gradients.numel() // max(1, self.num_sources),
        }  # fmt: skip

    def tensors(self) -> dict[str, Tensor]:
        """The shard tensors: ``coordinates`` and the factors / dense rest of ``gradients`` (``Tensor[S, ...]`` each)."""
        return {COORDINATES: self.eigen.coordinates, **self.gradients.tensors()}

    @classmethod
    def from_tensors(
        cls, space: ParameterSpace, basis: Tensor, eigenvalues: Tensor, damping: float, complement_gain: float, tensors: dict[str, Tensor]
    ) -> FactoredResponses:
        """From shard tensors (:meth:`tensors`) and the basis."""
        tensors = dict(tensors)
        eigen = EigenResponses(basis, eigenvalues, damping, tensors.pop(COORDINATES))
        return cls(eigen, complement_gain, LowRankResponses.from_tensors(space, tensors))

    @cached_property
    def _source_rows(self) -> tuple[Tensor, Tensor]:
        """``(columns: LongTensor[r], rows: Tensor[k + r, S])``, laid out once for :meth:`factor_scores`: the positions in
        ``P`` of the parameters ``gradients`` keeps dense (the rest: biases, ...; in the space's order) and, one source
        per column, the eigen coordinates over the rest (``S (k + r)`` floats beside the blocks' own). One product of
        ``[V g_q, g_q[columns]]`` with it scores both terms; a source's numbers in a column rather than a row make the
        single query's matrix-vector product stream long rows: ``[1400, 256]`` coordinates of three members 0.60 ms
        as rows, 0.33 ms as columns (cache flushed, one thread)."""
        space = self.gradients.space
        starts = torch.tensor([0, *space.numels]).cumsum(0).tolist()
        kept = [i for i, n in enumerate(space.names) if n in self.gradients.rest]
        coordinates = self.eigen.coordinates
        columns = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in kept]) if kept else torch.zeros(0, dtype=torch.long)
        rest = [self.gradients.rest[space.names[i]].reshape(self.num_sources, -1) for i in kept]
        return columns.to(coordinates.device), torch.cat([coordinates, *rest], dim=1).T.contiguous()

    def scores(self, model: FunctionalModel, theta: Tensor, batch: Any, readout: str, chunk_size: int) -> Tensor:
        """``Tensor[B, S]``: predicted rise of each query's measurement if the source were removed (equal to the dense
        codec's up to float rounding). ``central`` / ``step`` move the parameters along ``r_s`` itself: the responses are
        rebuilt as dense rows, :data:`_DENSE_ROWS` sources at a time, and read out as codec ``"dense"`` reads them."""
        check_readout(readout)
        if readout != "linear":
            rows = range(0, self.num_sources, _DENSE_ROWS)
            return torch.cat([
                score_sources(model, theta, self.select(torch.arange(s, min(s + _DENSE_ROWS, self.num_sources))).to_dense(), batch,
                              readout, chunk_size=chunk_size) for s in rows
            ], dim=1)  # fmt: skip
        layers = basis_layers(model.module, model.space)
        parts = []
        for rows in query_chunks(batch, theta) if layers is not None else ():
            queries = select_examples(batch, rows)
            factors = query_factors(model, theta, queries, layers, chunk_size=chunk_size)
            if factors is None or not self.reads(factors):
                parts = []
                break
            parts.append(self.factor_scores(model.space, factors, theta))
        if parts:
            return torch.cat(parts) if len(parts) > 1 else parts[0]
        # not covered by the layer bases: k tangents along the basis, and the gradients' forward hooks (lorif's readout)
        return self.eigen.scores(model, theta, batch, readout, chunk_size) + self.gradients.scores(model, theta, batch, readout, chunk_size)

    def reads(self, query: QueryFactors) -> bool:
        """Whether :meth:`factor_scores` can read ``query``: it holds the factors of every weight factored here (a layer
        the query side read along its parameters would not)."""
        return set(self.gradients.factors) <= set(query.factors)

    def factor_scores(self, space: ParameterSpace, query: QueryFactors, theta: Tensor) -> Tensor:
        """``Tensor[Q, S]``: the linear readout's scores from the query's layer factors at this member's parameters
        ``theta`` (:func:`~lightning_attr.basis_readout.query_factors`, :meth:`reads` true): ``(V g_q) . c_s`` plus
        ``<g_q, gamma g_s>`` as ``sum (J U) * (X V)`` per factored weight; the first term and the dense rest's in one product
        (:attr:`_source_rows`)."""
        queries = query.queries
        gradients = query.gradients(space, queries, theta)  # [Q, P]
        columns, rows = self._source_rows
        coefficients = gradients @ self.eigen.basis.T  # [Q, k]: V g_q
        if columns.numel():
            coefficients = torch.cat([coefficients, gradients[:, columns]], dim=1)  # [Q, k + r]: and g_q's dense rest
        out = coefficients @ rows
        for name, (u, v) in self._factor_columns.items():  # u: [out, S x c], v: [in, S x c]
            c = u.shape[1] // self.num_sources
            j, x = query.factors[name]  # sum_{r, c} (J_r . u_c) (x_r . v_c): Q x S x c (out + in)
            rows = j.shape[1]
            products = (j.reshape(-1, j.shape[2]) @ u).mul_(x.reshape(-1, x.shape[2]) @ v)  # [Q R, S c]
            out += products.view(queries, -1) if rows == c == 1 else products.view(queries, rows, -1, c).sum(dim=(1, 3))
        return out

    @cached_property
    def _factor_columns(self) -> dict[str, tuple[Tensor, Tensor]]:
        """The gradient factors laid out for the readout's products, once: ``{name: (U: Tensor[out, S x c], V: Tensor[in,
        S x c])}`` (source-major columns)."""
        return {n: (u.permute(1, 0, 2).reshape(u.shape[1], -1), v.permute(1, 0, 2).reshape(v.shape[1], -1))
                for n, (u, v) in self.gradients.factors.items()}  # fmt: skip

    def paired(self, model: FunctionalModel, theta: Tensor, batch: Any, sources: Tensor, readout: str, block: int = 32) -> Tensor:
        """``Tensor[B]``: query ``i`` against source ``sources[i]``: diagonals of :meth:`scores` on blocks of queries
        (``central`` / ``step``: the selected responses rebuilt as dense rows, read out as codec ``"dense"`` reads them)."""
        check_readout(readout)
        if readout != "linear":
            return paired_readout(model, theta, self.select(sources).to_dense(), batch, readout)
        return paired_diagonals(self, model, theta, batch, sources, readout, block)


def factored_numbers(module: nn.Module, space: ParameterSpace, rank: int) -> int | None:
    """Numbers per per-example source codec ``"factored"`` would store for ``module`` with ``rank`` eigen coordinates
    (capped at ``P``), if each Linear layer runs once per example on a vector (``out + in`` numbers where that is below
    ``out x in``; every other parameter dense); ``None`` where the layer-bases readout does not cover the network (its
    query side would then take ``k`` tangents and a forward-mode pass per source, not the factors)."""
    if basis_layers(module, space) is None:
        return None
    shapes = dict(zip(space.names, space.shapes))
    factored = {layer.weight for layer in linear_layers(module, space)}
    total = min(rank, space.size)
    for name, numel in zip(space.names, space.numels):
        out, inp = (int(shapes[name][0]), numel // int(shapes[name][0])) if name in factored else (0, 0)
        total += min(out + inp, numel) if name in factored else numel
    return total


# ---------------------------------------------------------------------------------------------------- simulation side
def linear_layers(module: nn.Module, space: ParameterSpace) -> tuple[_Layer, ...]:
    """The layers whose weight gradient codec ``"factored"`` may keep as factors: modules of type exactly ``nn.Linear``
    with a trainable weight and their class's own forward (:func:`~lightning_attr.layer_readout.handled_layers`)."""
    return tuple(layer for layer in handled_layers(module, space) if type(layer.module) is nn.Linear)


@contextlib.contextmanager
def _probed(layers: Iterable[_Layer]) -> Iterator[tuple[list[list[Tensor]], list[list[Tensor]]]]:
    """Forward hooks that record each call's input of ``layers`` and add a zero tensor that requires grad (a probe) to
    its output: the gradient of the summed per-example losses with respect to a probe is each example's ``delta``."""
    layers = tuple(layers)
    inputs: list[list[Tensor]] = [[] for _ in layers]
    probes: list[list[Tensor]] = [[] for _ in layers]

    def hook(i: int):
        def record(_module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            inputs[i].append(args[0].detach())
            probe = torch.zeros_like(output, requires_grad=True)
            probes[i].append(probe)
            return output + probe

        return record

    handles = [layer.module.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        yield inputs, probes
    finally:
        for handle in handles:
            handle.remove()


def example_factors(model: FunctionalModel, theta: Tensor, data: Any, layers: tuple[_Layer, ...]) -> list[tuple[Tensor, Tensor] | None]:
    """Per layer, each example's loss gradient at ``theta`` with respect to the layer's weight, as its factors
    ``(delta: Tensor[B, R, out], x: Tensor[B, R, in])`` (``R`` rows per example: its calls' rows concatenated), so that
    example ``i``'s weight gradient is ``delta_i^T x_i``. One forward and one backward pass (reverse mode: this is the
    simulation side). ``None`` for a layer whose input or output does not have the batch as first dimension, or that
    never ran."""
    examples = batch_size_of(data)
    with _probed(layers) as (inputs, probes), torch.enable_grad():
        losses = model.losses(theta, data)
        flat = [p for calls in probes for p in calls]
        grads = iter(torch.autograd.grad(losses.sum(), flat, allow_unused=True) if flat else ())
    out: list[tuple[Tensor, Tensor] | None] = []
    for calls, xs in zip(probes, inputs):
        deltas = [next(grads) for _ in calls]
        batch_first = all(x.dim() >= 2 and x.shape[0] == examples and p.shape[0] == examples for x, p in zip(xs, calls))
        if not calls or not batch_first:
            out.append(None)
            continue
        deltas = [torch.zeros_like(p) if d is None else d for d, p in zip(deltas, calls)]
        out.append((
            torch.cat([d.reshape(examples, -1, d.shape[-1]) for d in deltas], dim=1),
            torch.cat([x.reshape(examples, -1, x.shape[-1]) for x in xs], dim=1),
        ))  # fmt: skip
    return out


def example_slots(example_to_source: Tensor) -> tuple[Tensor, int]:
    """``(slot: LongTensor[n], width)``: each example's position among its source's examples (0-based, in index order;
    -1 outside the training set), and the most examples any source holds."""
    valid = example_to_source >= 0
    slot = torch.full_like(example_to_source, -1)
    if not bool(valid.any()):
        return slot, 0
    sources = example_to_source[valid]
    order = torch.argsort(sources, stable=True)
    counts = torch.bincount(sources)
    starts = counts.cumsum(0) - counts
    within = torch.empty_like(order)
    within[order] = torch.arange(order.numel()) - starts[sources[order]]
    slot[valid] = within
    return slot, int(counts.max())


@dataclass(frozen=True)
class FactorPlan:
    """Which Linear weights codec ``"factored"`` keeps as factors, and their rank.

    Attributes:
        layers: the candidate layers (:func:`linear_layers`), in the order :func:`example_factors` reads them.
        ranks: ``{weight name: c}`` of the factored weights, ``c = R x`` the largest source's examples, kept only where
            ``c (out + in) < out x in``; the other weights are stored dense.
        slot: ``LongTensor[n]``, each example's factor column within its source (:func:`example_slots`).
    """

    layers: tuple[_Layer, ...]
    ranks: dict[str, int]
    slot: Tensor

    @classmethod
    def of(cls, model: FunctionalModel, theta: Tensor, probe: Any, example_to_source: Tensor) -> FactorPlan:
        """From one batch ``probe`` (rows per example of each layer) and the source map. A weight used outside its
        layer's call in the forward pass (tied weights; seen by :func:`~lightning_attr.layer_readout.capture_layers`)
        has more in its gradient than the layer's factors: then no weight is factored (all stored dense)."""
        layers = linear_layers(model.module, model.space)
        slot, width = example_slots(example_to_source)
        ranks: dict[str, int] = {}
        if capture_layers(model, model.space.unflatten(theta), probe, layers) is None:
            return cls(layers, ranks, slot)
        for layer, found in zip(layers, example_factors(model, theta, probe, layers)):
            if found is None or width == 0:
                continue
            out, inp = (int(d) for d in model.space.shapes[model.space.names.index(layer.weight)])
            c = found[0].shape[1] * width
            if c * (out + inp) < out * inp:
                ranks[layer.weight] = c
        return cls(layers, ranks, slot)

    def factors(
        self, model: FunctionalModel, theta: Tensor, batches: Iterable[tuple[Any, Tensor]], local: Tensor, count: int
    ) -> dict[str, tuple[Tensor, Tensor]]:
        """``{weight name: (U: Tensor[C, out, c], V: Tensor[C, in, c])}``: the summed loss gradient of each of ``count``
        sources (``local: LongTensor[n]``, each example's row, -1 for examples of other sources) as ``U V^T``, one factor
        column per row of each of its examples. ``batches``: ``(data, example index)``, finite examples only."""
        space = model.space
        shapes = {name: space.shapes[space.names.index(name)] for name in self.ranks}
        u = {n: theta.new_zeros(count, int(s[0]), c) for (n, c), s in zip(self.ranks.items(), shapes.values())}
        v = {n: theta.new_zeros(count, int(s[1]), c) for (n, c), s in zip(self.ranks.items(), shapes.values())}
        layers = tuple(layer for layer in self.layers if layer.weight in self.ranks)
        for data, index in batches:
            index = index.to(theta.device)
            rows, slots = local.to(theta.device)[index], self.slot.to(theta.device)[index]
            keep = (rows >= 0).nonzero().squeeze(1)
            if keep.numel() == 0:
                continue
            if keep.numel() < rows.numel():
                data, rows, slots = select_examples(data, keep), rows[keep], slots[keep]
            for layer, found in zip(layers, example_factors(model, theta, data, layers)):
                name = layer.weight
                if found is None:
                    raise RuntimeError(
                        f"codec='factored': layer {name!r} changed its layout between batches (its input or output no "
                        "longer has the batch as first dimension). Use codec='dense' for this model."
                    )
                delta, x = found  # [B, R, out], [B, R, in]
                per = delta.shape[1]
                if per * (int(self.slot.max()) + 1) > self.ranks[name]:
                    raise RuntimeError(
                        f"codec='factored': layer {name!r} has {per} rows per example here, more than the first batch "
                        "showed. Use codec='dense' for this model (its rows per example vary)."
                    )
                columns = slots[:, None] * per + torch.arange(per, device=theta.device)  # [B, R]
                u[name][rows[:, None], :, columns] = delta
                v[name][rows[:, None], :, columns] = x
        return {n: (u[n], v[n]) for n in self.ranks}


def check_factors(factors: dict[str, tuple[Tensor, Tensor]], dense: dict[str, Tensor], finite: Tensor) -> None:
    """Raises unless ``U V^T`` equals the dense gradient block (``dense[name]: Tensor[C, out, in]``) of every finite
    source up to float rounding: a weight that enters the loss outside its layer's call (tied weights, a penalty) has
    a gradient the factors do not hold.

    Compared along :data:`_CHECK_PROBES` fixed Gaussian combinations ``A: [out, p]`` of the rows, ``(A^T U) V^T``
    against ``A^T dense`` (largest difference against the largest entry of ``A^T dense``, over the block): one read of the
    dense block, where rebuilding ``U V^T`` for every source cost as much as its gradients (0.9 s of the 64-128-128
    digits MLP's 17 s of simulation). An error column is orthogonal to a Gaussian combination with probability 0, and a
    row in error weighs ``|a| ~ N(0, 1)`` in each of the ``p`` (below 0.1 in all four: probability 4e-5)."""
    for name, (u, v) in factors.items():
        target = dense[name].reshape(u.shape[0], u.shape[1], v.shape[1])
        if not bool(finite.any()):
            continue
        probes = torch.randn(_CHECK_PROBES, u.shape[1], generator=torch.Generator().manual_seed(0)).to(u)
        expected = probes @ target  # [C, p, in]
        error = ((probes @ u) @ v.transpose(1, 2) - expected).abs().amax(dim=(1, 2))[finite].max()
        scale = expected.abs().amax(dim=(1, 2))[finite].max()
        error, scale = float(error), float(scale)
        if not error <= _CONSISTENCY_TOLERANCE * scale + 1e-12:
            raise RuntimeError(
                f"codec='factored': the factors of {name!r} do not reproduce its per-source gradient (largest error "
                f"{error:.3g} of {scale:.3g}, along {_CHECK_PROBES} random combinations of its rows): the weight is used "
                "outside its layer's own call (tied weights, a penalty in the loss). Use codec='dense' for this model."
            )


__all__ = [
    "COORDINATES", "FactorPlan", "FactoredResponses", "check_factors", "example_factors", "example_slots", "factored_numbers",
    "linear_layers",
]
