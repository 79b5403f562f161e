"""Codec ``"factored"``: the spectral default's responses held exactly in ``k + sum_l c (out_l + in_l)`` numbers per source (stored in fewer).

``propagation="spectral"`` (:mod:`deflated`) gives each source the response

    r_s = gamma g_s + V^T diag(1/(sigma + lam) - gamma) V g_s,      g_s = grad l_s / n,   gamma = 1/(mu + lam)

(``V: Tensor[k, P]`` the top-k eigenvectors of the GGN, ``mu`` the mean eigenvalue outside them). Its score against a
query gradient ``g_q`` is ``<g_q, r_s> = (V g_q) . c_s + <g_q, gamma g_s>`` with ``c_s = diag(1/(sigma + lam) - gamma)
V g_s`` (``k`` numbers). And ``g_s`` is cheap to keep exactly: for one call of a layer on one example the weight
gradient is a sum of outer products over its output rows, ``sum_t delta_t x_t^T`` (``delta_t`` the loss's gradient at
output row ``t``, ``x_t`` that row's input): one row for a Linear layer on a vector; for a Conv1d / Conv2d
(``groups=1``, zero padding) its ``T`` output positions, ``x_t`` the unfolded input patch (``C_in x`` the kernel's size;
the weight seen as ``W.view(out, C_in k)``). So ``gamma g_s`` is stored as the factors of codec ``"lorif"``
(:class:`~lightning_attr.lowrank.LowRankResponses`, ``U = gamma delta / n``, ``V = x``; rank ``c`` = rows per example
times the largest source's examples) where ``c (out + in) < out x in``, and every other parameter dense (biases, a
convolution with many positions, Conv3d, grouped convolutions, ...). Nothing is approximated: the scores equal the
dense codec's up to float rounding (tested).

What the store keeps is less (format 4, :mod:`store`): ``c_s`` is a function of ``gamma g_s`` and ``V``
(:func:`eigen_coordinates`, ``S P (k + c)`` multiply-adds when a readout first reads them,
:attr:`FactoredResponses.eigen`; the simulation, which only writes the store, never does), and a factored layer's bias
gradient is ``sum_t delta_t``, its ``U`` summed over columns (``[W | b]`` is the factored matrix ``U [V; 1]^T``;
:func:`bias_agreement` checks it per source in the simulation, and a bias it fails stays dense). Per source and
checkpoint the shards hold ``sum_l c (out + in)`` numbers and the parameters kept dense but those biases; the basis,
``k x P``, is stored once per checkpoint. In a half-precision store (format 5) the basis is float16 and the shards are
float16 with a power-of-two scale per source and factor column (:mod:`half_precision`): ``r_s`` is the difference of
two terms each 4-24 times the score (measured), so their rounding is amplified as a dense response's is not.

At query time :func:`~lightning_attr.basis_readout.query_factors` gives, by forward mode, each layer's ``J``
(``dm/dz`` at its output rows) and their input ``X``: ``<J^T X, U V^T> = sum (J U) * (X V)`` costs
``Q x R x S x c (out + in)`` instead of ``Q x S x out x in``, or, for many queries of a convolution, the sources'
matrices rebuilt once (``S out in (c + Q)``; :func:`factor_products` takes the cheaper), and ``t_q = V g_q`` one
``[Q, P] x [P, k]`` product whatever ``S``. A folded bias is read with its weight (its query gradient ``sum_r J_r``
against ``U 1``: ``sum (J U) * (X V + 1)``, or ``U 1`` below the rebuilt ``U V^T``), not as a dense row. A model the
layer bases do not cover is read with ``k`` tangents along ``V`` and the factored layers' hooks
(:class:`LowRankResponses`), forward mode too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lightning_attr.basis_readout import QueryFactors, basis_layers, query_factors
from lightning_attr.curvature import batch_size_of
from lightning_attr.functional import FunctionalModel
from lightning_attr.layer_readout import _Layer, capture_layers, handled_layers, weight_rows
from lightning_attr.lowrank import FACTOR_KEYS, LowRankResponses, paired_diagonals
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
_DERIVE_NUMBERS = 2**22  # numbers of the sources' dense rows (16 MiB of float32) eigen_coordinates rebuilds at a time


def eigen_coordinates(basis: Tensor, eigenvalues: Tensor, damping: float, complement_gain: float, gradients: LowRankResponses) -> Tensor:
    """``Tensor[S, k]``: the eigen coordinates ``c_s = diag(1/(sigma + lam) - gamma) V g_s`` from what the store keeps,
    ``gamma g_s`` (``gradients``) and ``V`` (``basis: Tensor[k, P]``, ``eigenvalues: Tensor[k]`` ``sigma``, ``damping``
    ``lam``, ``complement_gain`` ``gamma > 0``): ``(V (gamma g_s)) (1/(sigma + lam) - gamma) / gamma``, the sources' dense
    rows rebuilt :data:`_DERIVE_NUMBERS` numbers at a time (``S P (k + c)`` multiply-adds, on the tensors' device). A
    source with NaN factors (an invalid source) gets a NaN row."""
    count, k = gradients.num_sources, basis.shape[0]
    gains = (1.0 / (eigenvalues.to(basis) + damping) - complement_gain) / complement_gain  # [k]
    step = max(1, _DERIVE_NUMBERS // max(1, basis.shape[1]))
    parts = [
        (gradients.select(torch.arange(s, min(s + step, count), device=basis.device)).to_dense() @ basis.T).mul_(gains)
        for s in range(0, count, step)
    ]  # fmt: skip
    return torch.cat(parts) if parts else basis.new_zeros(0, k)


@dataclass(frozen=True)
class FactoredResponses:
    """Codec ``"factored"``: ``r_s = eigen.basis^T eigen.coordinates[s] + gradients[s]`` (module docstring).

    Attributes:
        basis: ``Tensor[k, P]``, the top-k eigenvectors of the GGN (orthonormal rows).
        eigenvalues: ``Tensor[k]``, their eigenvalues ``sigma``.
        damping: ``lam``.
        complement_gain: ``gamma = 1 / (mu + lam)``, what the response is outside the basis.
        gradients: ``gamma g_s`` per source (:class:`LowRankResponses`: Linear / Conv weights as factors, the rest
            dense).
        folded_biases: ``{bias name: weight name}``: biases whose ``gamma g_s`` is their layer's ``U_s`` summed over its
            ``c`` columns (the bias gradient is ``sum_t delta_t`` over the output rows: ``[W | b]`` is the factored
            matrix ``U [V; 1]^T``). ``gradients.rest`` holds them (for the readout) and the store does not
            (:meth:`tensors`, :meth:`from_tensors` rebuilds them).
        coordinates: ``Tensor[S, k]`` float32, the eigen coordinates ``diag(1/(sigma + lam) - gamma) V g_s`` as given
            (NaN rows: invalid sources), which the store then keeps (format 3's layout); ``None`` (the default, format
            4's): derived from ``gradients`` (:func:`eigen_coordinates`, ``S P (k + c)`` multiply-adds) when
            :attr:`eigen` is first read, and not stored. A block only written (the simulation's) never derives them.
    """

    basis: Tensor
    eigenvalues: Tensor
    damping: float
    complement_gain: float
    gradients: LowRankResponses
    folded_biases: Mapping[str, str] = field(default_factory=dict)
    coordinates: Tensor | None = None
    codec: ClassVar[str] = "factored"

    @cached_property
    def eigen(self) -> EigenResponses:
        """The eigen term as codec ``"eigen"`` holds it: :attr:`basis`, :attr:`eigenvalues`, :attr:`damping` and the
        coordinates ``Tensor[S, k]`` (given, or derived here once: :attr:`coordinates`)."""
        coordinates = self.coordinates
        if coordinates is None:
            coordinates = eigen_coordinates(self.basis, self.eigenvalues, self.damping, self.complement_gain, self.gradients)
        return EigenResponses(self.basis, self.eigenvalues, self.damping, coordinates)

    @property
    def derived_coordinates(self) -> bool:
        """Whether the eigen coordinates are derived from :attr:`gradients` (not stored): :attr:`coordinates` is None."""
        return self.coordinates is None

    @property
    def num_sources(self) -> int:
        return self.gradients.num_sources

    @property
    def rank(self) -> int:
        return int(self.basis.shape[0])

    def _keeping(self, block: FactoredResponses, rows: Callable[[Tensor], Tensor]) -> FactoredResponses:
        """``block`` (made from this one by :meth:`to` / :meth:`select`) with this block's derived coordinates passed
        through ``rows`` where they are derived already (not derived again)."""
        if self.derived_coordinates and "eigen" in self.__dict__:  # functools.cached_property keeps its value there
            block.__dict__["eigen"] = replace(self.eigen, coordinates=rows(self.eigen.coordinates))
        return block

    def to(self, device: torch.device | str) -> FactoredResponses:
        block = replace(
            self, basis=self.basis.to(device), eigenvalues=self.eigenvalues.to(device), gradients=self.gradients.to(device),
            coordinates=None if self.coordinates is None else self.coordinates.to(device),
        )  # fmt: skip
        return self._keeping(block, lambda t: t.to(device))

    def select(self, sources: Tensor) -> FactoredResponses:
        """The responses of ``sources: LongTensor[C]`` (in that order; coordinates still to derive: only theirs are)."""
        coordinates = None if self.coordinates is None else self.coordinates[sources]
        return self._keeping(replace(self, gradients=self.gradients.select(sources), coordinates=coordinates), lambda t: t[sources])

    def to_dense(self) -> Tensor:
        """The same responses as ``Tensor[S, P]`` (``S x P`` floats: for tests and small stores)."""
        return self.eigen.to_dense() + self.gradients.to_dense()

    def entry(self) -> dict[str, Any]:
        """Its manifest fields besides the basis file: codec, rank, eigenvalues, damping, ``gamma``, the factored weights
        (``{name: [out, in, c]}``), the folded biases (``{bias: weight}``), whether the coordinates are ``"derived"`` or
        ``"stored"``, and the numbers stored per source (``numbers_per_source``, of ``P`` dense)."""
        stored = sum(t[0].numel() for t in self.tensors().values()) if self.num_sources else 0
        return {
            "codec": "factored", "rank": self.rank, "eigenvalues": [float(v) for v in self.eigenvalues.cpu()],
            "damping": float(self.damping), "complement_gain": float(self.complement_gain),
            "factored": self.gradients.entry()["factored"], "folded_biases": dict(self.folded_biases),
            "coordinates": "derived" if self.derived_coordinates else "stored", "numbers_per_source": stored,
        }  # fmt: skip

    def tensors(self) -> dict[str, Tensor]:
        """The shard tensors (``Tensor[S, ...]`` each): the factors and dense rest of ``gradients`` but the folded
        biases, and ``coordinates`` unless they are derived."""
        out = {k: t for k, t in self.gradients.tensors().items() if k not in self.folded_biases}
        if self.coordinates is not None and COORDINATES in out:
            raise ValueError(
                f"A parameter named {COORDINATES!r} shares the shard key of stored eigen coordinates: build the block "
                "without coordinates (they are derived when read), or rename the parameter."
            )
        return out if self.coordinates is None else {COORDINATES: self.coordinates, **out}

    @classmethod
    def from_tensors(
        cls, space: ParameterSpace, basis: Tensor, eigenvalues: Tensor, damping: float, complement_gain: float,
        tensors: dict[str, Tensor], folded_biases: Mapping[str, str] | None = None,
    ) -> FactoredResponses:  # fmt: skip
        """From shard tensors (:meth:`tensors`) and the basis: the folded biases rebuilt from their weight's ``U``; where
        the shards do not hold the coordinates they are derived when first read (:attr:`eigen`). A parameter named
        ``"coordinates"`` is that parameter's dense rest, never stored coordinates (a store of such a model derives them)."""
        tensors, folded = dict(tensors), dict(folded_biases or {})
        coordinates = None if COORDINATES in space.names else tensors.pop(COORDINATES, None)
        for bias, weight in folded.items():
            u = tensors[weight + FACTOR_KEYS[0]]
            tensors[bias] = u.sum(dim=2).reshape(u.shape[0], *space.shapes[space.names.index(bias)])
        return cls(basis, eigenvalues, damping, complement_gain, LowRankResponses.from_tensors(space, tensors), folded, coordinates)

    @cached_property
    def _source_rows(self) -> tuple[Tensor, Tensor]:
        """``(columns: LongTensor[r], rows: Tensor[k + r, S])``, laid out once for :meth:`factor_scores`: the positions in
        ``P`` of the parameters ``gradients`` keeps dense but the folded biases (the rest: biases of layers kept dense,
        ...; in the space's order; a folded bias is read with its weight's factors, :meth:`factor_scores`) and, one source
        per column, the eigen coordinates over the rest (``S (k + r)`` floats beside the blocks' own). One product of
        ``[V g_q, g_q[columns]]`` with it scores both terms; a source's numbers in a column rather than a row make the
        single query's matrix-vector product stream long rows: ``[1400, 256]`` coordinates of three members 0.60 ms
        as rows, 0.33 ms as columns (cache flushed, one thread)."""
        kept = [n for n in self.gradients.space.names if n in self.gradients.rest and n not in self.folded_biases]
        coordinates = self.eigen.coordinates
        spans = self.gradients.space.spans
        columns = torch.cat([torch.arange(*spans[n]) for n in kept]) if kept else torch.zeros(0, dtype=torch.long)
        rest = [self.gradients.rest[n].reshape(self.num_sources, -1) for n in kept]
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
        """Whether :meth:`factor_scores` can read ``query``: it holds the gradient of every weight factored here, as
        factors or dense."""
        return all(name in query.factors or name in query.dense for name in self.gradients.factors)

    def factor_scores(self, space: ParameterSpace, query: QueryFactors, theta: Tensor) -> Tensor:
        """``Tensor[Q, S]``: the linear readout's scores from the query's layer factors at this member's parameters
        ``theta`` (:func:`~lightning_attr.basis_readout.query_factors`, :meth:`reads` true): ``(V g_q) . c_s`` plus
        ``<g_q, gamma g_s>``: the first term and the dense rest's in one product (:attr:`_source_rows`); per factored
        weight the cheaper of :func:`factor_products` and one product with its rebuilt matrices (:meth:`_rebuilt`,
        kept; or :func:`rebuilt_products` a chunk at a time where they would not fit), by :func:`_factors_cheaper`."""
        queries = query.queries
        gradients = query.gradients(space, queries, theta)  # [Q, P]
        columns, rows = self._source_rows
        coefficients = torch.mm(gradients, self._basis_columns)  # [Q, k]: V g_q
        if columns.numel():
            coefficients = torch.cat([coefficients, gradients[:, columns]], dim=1)  # [Q, k + r]: and g_q's dense rest
        out = torch.mm(coefficients, rows)
        for name, (u, v), bias, c, outs, ins in self._factored_layers:
            positions = query.factors[name][0].shape[1] if name in query.factors else None  # None: read as parameters
            cheaper = positions is not None and _factors_cheaper(queries, positions, c, outs, ins)
            rebuilt = None if cheaper else self._rebuilt(name)
            if rebuilt is not None:  # the sources' matrices, rebuilt once: one product with the query gradients
                out += _layer_gradients(space.spans, gradients, name, bias) @ rebuilt
            elif positions is not None and _factors_cheaper(queries, positions, c, outs, ins, cached=False):
                out += factor_products(*query.factors[name], u, v, self._factor_columns[name], bias=bias is not None)
            else:
                out += rebuilt_products(_layer_gradients(space.spans, gradients, name, bias), u, v, bias=bias is not None)
        return out

    def _rebuilt(self, name: str) -> Tensor | None:
        """``Tensor[out x in (+ out), S]``: the factored weight ``name``'s per-source matrices ``U_s V_s^T`` rebuilt (and
        below them its folded bias ``U_s 1``, :attr:`folded_biases`; the rows :func:`_layer_gradients` lays out), one source
        per column (the single query's product streams long rows, as :attr:`_source_rows`), kept for later queries;
        ``None`` where they would take this block's rebuilt matrices beyond attribute()'s default memory budget (the
        dense codec's limit for a member held in memory)."""
        from lightning_attr.codecs import DEFAULT_MEMORY_BUDGET_MB  # codecs imports this module

        cache = self._rebuilt_weights
        if name not in cache:
            u, v = self.gradients.factors[name]
            bias = name in self._bias_of
            held = sum(t.numel() for t in cache.values())
            if 4 * (held + u.shape[0] * u.shape[1] * (v.shape[1] + bias)) > DEFAULT_MEMORY_BUDGET_MB * 2**20:
                return None
            cache[name] = torch.cat(list(_rebuilt_blocks(u, v, bias)), dim=1)
        return cache[name]

    @cached_property
    def _basis_columns(self) -> Tensor:
        """``Tensor[P, k]``: the eigen basis ``V`` transposed (a view, taken once), the right operand of ``V g_q``."""
        return self.basis.T

    @cached_property
    def _factored_layers(self) -> tuple[tuple[str, tuple[Tensor, Tensor], str | None, int, int, int], ...]:
        """Per factored weight, what :meth:`factor_scores` reads at every query, looked up once: ``(name, (u, v), folded
        bias name or None, c, out, in)``, ``in`` counting a folded bias's ones row of ``V``."""
        return tuple((name, (u, v), self._bias_of.get(name), u.shape[2], u.shape[1], v.shape[1] + (name in self._bias_of))
                     for name, (u, v) in self.gradients.factors.items())  # fmt: skip

    @cached_property
    def _rebuilt_weights(self) -> dict[str, Tensor]:
        """The matrices :meth:`_rebuilt` has built, by weight name."""
        return {}

    @cached_property
    def _bias_of(self) -> dict[str, str]:
        """``{weight name: bias name}`` of the folded biases (:attr:`folded_biases` inverted)."""
        return {weight: bias for bias, weight in self.folded_biases.items()}

    @cached_property
    def _factor_columns(self) -> dict[str, tuple[Tensor, Tensor]]:
        """The gradient factors laid out for :func:`factor_products` once, by weight name (:func:`factor_columns`)."""
        return {n: factor_columns(u, v) for n, (u, v) in self.gradients.factors.items()}

    def paired(self, model: FunctionalModel, theta: Tensor, batch: Any, sources: Tensor, readout: str, block: int = 32) -> Tensor:
        """``Tensor[B]``: query ``i`` against source ``sources[i]``: diagonals of :meth:`scores` on blocks of queries
        (``central`` / ``step``: the selected responses rebuilt as dense rows, read out as codec ``"dense"`` reads them)."""
        check_readout(readout)
        if readout != "linear":
            return paired_readout(model, theta, self.select(sources).to_dense(), batch, readout)
        return paired_diagonals(self, model, theta, batch, sources, readout, block)


# numbers of one intermediate [Q R, sources x c] product of factor_products (16 MiB of float32): sources in chunks beyond
_PRODUCT_NUMBERS = 2**22


def _factors_cheaper(queries: int, rows: int, c: int, outs: int, ins: int, cached: bool = True) -> bool:
    """Whether :func:`factor_products` (``Q R S c (out + in)`` multiply-adds) costs less than one product with the
    sources' rebuilt ``out x in`` matrices (``Q S out in``, plus ``S out in c`` to rebuild them unless ``cached``), for
    ``Q`` queries of ``R`` rows and sources of rank ``c``. A Linear layer (``R = 1``) of a source of
    a few examples reads its factors; a convolution's ``R`` positions against the source's ``c`` make its factors
    dearer than the matrix they hold (the MNIST-1D CNN's second convolution: ``10 x 10 x (32 + 80)`` against ``32 x 80``
    per source and query), so it is rebuilt once and read as the dense codec reads it."""
    return queries * rows * c * (outs + ins) <= outs * ins * (queries + (0 if cached else c))


def factor_columns(u: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """``(U: Tensor[out, S x c], V: Tensor[in, S x c])``: source factors ``u: Tensor[S, out, c]``, ``v: Tensor[S, in, c]``
    in source-major columns, as :func:`factor_products` reads them; contiguous: with ``c = 1`` the reshape is a
    transposed view, whose single-query product runs at half the bandwidth."""
    return u.permute(1, 0, 2).reshape(u.shape[1], -1).contiguous(), v.permute(1, 0, 2).reshape(v.shape[1], -1).contiguous()


def _rebuilt_blocks(u: Tensor, v: Tensor, bias: bool = False) -> Iterator[Tensor]:
    """The sources' matrices ``U_s V_s^T`` (``u: Tensor[S, out, c]``, ``v: Tensor[S, in, c]``) rebuilt a chunk of sources
    at a time, each chunk as ``Tensor[out x in, n]`` (one source per column, at most :data:`_PRODUCT_NUMBERS` numbers);
    ``bias``: with the folded bias ``U_s 1`` (``out`` rows) below, ``Tensor[out x in + out, n]``."""
    step = max(1, _PRODUCT_NUMBERS // (u.shape[1] * (v.shape[1] + bias)))
    for s in range(0, u.shape[0], step):
        part = u[s : s + step]
        matrices = (part @ v[s : s + step].transpose(1, 2)).flatten(1)
        yield (torch.cat([matrices, part.sum(dim=2)], dim=1) if bias else matrices).T


def _layer_gradients(spans: Mapping[str, tuple[int, int]], gradients: Tensor, weight: str, bias: str | None) -> Tensor:
    """``Tensor[Q, out x in (+ out)]``: the query gradients ``gradients: Tensor[Q, P]`` (positions ``spans``,
    :attr:`ParameterSpace.spans`) of the weight ``weight`` flattened, and of its folded bias ``bias`` after it (``None``: none), as
    :func:`_rebuilt_blocks` lays out the sources' rows: a view where the bias follows the weight in ``P``, else a copy."""
    (start, stop), after = spans[weight], spans[bias] if bias is not None else None
    if after is None or after[0] == stop:
        return gradients[:, start : stop if after is None else after[1]]
    return torch.cat([gradients[:, start:stop], gradients[:, after[0] : after[1]]], dim=1)


def factor_products(
    j: Tensor, x: Tensor, u: Tensor, v: Tensor, columns: tuple[Tensor, Tensor] | None = None, *, bias: bool = False
) -> Tensor:  # fmt: skip
    """``Tensor[Q, S]``: ``<J_q^T X_q, U_s V_s^T> = sum_{r, c} (J_r . U_c) (X_r . V_c)`` for query factors ``j: Tensor[Q,
    R, out]``, ``x: Tensor[Q, R, in]`` and source factors ``u: Tensor[S, out, c]``, ``v: Tensor[S, in, c]``
    (``columns``: the same laid out by :func:`factor_columns`, if the caller keeps them): ``Q R S c (out + in)``
    multiply-adds, each factor read once, sources in chunks of at most :data:`_PRODUCT_NUMBERS` intermediate numbers.
    ``bias``: the layer's folded bias too (:attr:`FactoredResponses.folded_biases`), ``<sum_r J_r, U_s 1>``, the ones
    column of ``[X | 1]`` against the ones row of ``[V; 1]``: ``sum_{r, c} (J_r . U_c) (X_r . V_c + 1)``."""
    queries, rows, outs = j.shape
    sources, ins, c = u.shape[0], v.shape[1], u.shape[2]
    cu, cv = columns if columns is not None else factor_columns(u, v)
    j, x = j.reshape(-1, outs), x.reshape(-1, ins)
    step = max(1, _PRODUCT_NUMBERS // (queries * rows * c))
    parts = []
    for start in range(0, sources, step):
        whole = start == 0 and step >= sources  # one chunk: the columns themselves, no slice
        cols = slice(start * c, min(start + step, sources) * c)
        inputs = torch.mm(x, cv if whole else cv[:, cols])  # [Q R, n c]
        products = torch.mm(j, cu if whole else cu[:, cols]).mul_(inputs.add_(1.0) if bias else inputs)
        parts.append(products.view(queries, -1) if rows == c == 1 else products.view(queries, rows, -1, c).sum(dim=(1, 3)))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def rebuilt_products(gradients: Tensor, u: Tensor, v: Tensor, *, bias: bool = False) -> Tensor:
    """``Tensor[Q, S]``: ``<G_q, U_s V_s^T>`` for query gradients ``gradients: Tensor[Q, out, in]`` (or flattened), the
    sources' matrices rebuilt from ``u: Tensor[S, out, c]``, ``v: Tensor[S, in, c]`` a chunk of sources at a time
    (``S out in (c + Q)`` multiply-adds, nothing kept). ``bias``: ``gradients: Tensor[Q, out x in + out]``, the folded
    bias's gradient after the weight's (:func:`_layer_gradients`), read against ``U_s 1``."""
    flat = gradients.reshape(gradients.shape[0], -1)
    parts = [flat @ block for block in _rebuilt_blocks(u, v, bias)]
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def factored_numbers(module: nn.Module, space: ParameterSpace, rank: int, rows: Mapping[str, int] | None = None) -> int | None:
    """Numbers per per-example source codec ``"factored"`` would hold in memory for ``module`` with ``rank`` eigen
    coordinates (capped at ``P``; the store keeps fewer: no coordinates, the factored layers' biases folded):
    ``c (out + in)`` for each weight of :func:`factor_layers` with ``c = rows[weight]`` rows per
    example where that is below ``out x in``, every other parameter dense. ``rows``: :func:`example_rows` of one
    example; ``None`` counts each Linear layer as run once per example on a vector (``c = 1``) and every convolution
    dense (its rows are its output positions, which only an input shows). ``None`` where the layer-bases readout does
    not cover the network (its query side would then take ``k`` tangents and a forward-mode pass per source, not the
    factors)."""
    if basis_layers(module, space) is None:
        return None
    if rows is None:
        rows = {layer.weight: 1 for layer in factor_layers(module, space) if type(layer.module) is nn.Linear}
    total = min(rank, space.size)
    for name, shape, numel in zip(space.names, space.shapes, space.numels):
        out = int(shape[0])
        total += min(rows[name] * (out + numel // out), numel) if name in rows else numel
    return total


# ---------------------------------------------------------------------------------------------------- simulation side
_FACTOR_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)  # whose per-example weight gradient is a sum of row outer products


def factor_layers(module: nn.Module, space: ParameterSpace) -> tuple[_Layer, ...]:
    """The layers whose weight gradient codec ``"factored"`` may keep as factors: modules of type exactly
    ``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d`` with a trainable weight, their class's own forward, and for a
    convolution ``groups=1`` and zero padding (:func:`~lightning_attr.layer_readout.handled_layers`). Every other
    parameter (``nn.Conv3d``, grouped or reflect-padded convolutions, subclasses, ...) is stored dense."""
    return tuple(layer for layer in handled_layers(module, space) if type(layer.module) in _FACTOR_TYPES)


def weight_matrix(space: ParameterSpace, name: str) -> tuple[int, int]:
    """``(out, in)``: the weight ``name`` seen as a matrix, ``in`` = its input features times the kernel's size
    (a convolution's ``[out, C_in, *kernel]`` as ``W.view(out, C_in * k)``, what its unfolded patches multiply)."""
    shape = space.shapes[space.names.index(name)]
    return int(shape[0]), int(torch.Size(shape[1:]).numel())


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
    for layer, calls, xs in zip(layers, probes, inputs):
        deltas = [next(grads) for _ in calls]
        least = 2 if isinstance(layer.module, nn.Linear) else layer.module.weight.dim()  # a convolution: [B, C_in, *L]
        batch_first = all(x.dim() >= least and x.shape[0] == examples and p.shape[0] == examples for x, p in zip(xs, calls))
        if not calls or not batch_first:
            out.append(None)
            continue
        deltas = [torch.zeros_like(p) if d is None else d for d, p in zip(deltas, calls)]
        found = [weight_rows(layer.module, d, x, examples) for d, x in zip(deltas, xs)]
        out.append((torch.cat([d for d, _ in found], dim=1), torch.cat([x for _, x in found], dim=1)))
    return out


def example_rows(model: FunctionalModel, theta: Tensor, probe: Any) -> dict[str, int]:
    """``{weight name: R}``: the rows per example (:func:`~lightning_attr.layer_readout.weight_rows`) of each layer of
    :func:`factor_layers` on the batch ``probe`` (e.g. one training example): 1 for a Linear layer run once on a
    vector, the output positions of a convolution. Empty where a weight is used outside its layer's call (tied weights; seen by
    :func:`~lightning_attr.layer_readout.capture_layers`): its gradient is more than the layer's factors; a layer
    whose input or output does not have the batch as first dimension, or that never ran, is left out."""
    layers = factor_layers(model.module, model.space)
    if capture_layers(model, model.space.unflatten(theta), probe, layers) is None:
        return {}
    found = example_factors(model, theta, probe, layers)
    return {layer.weight: rows[0].shape[1] for layer, rows in zip(layers, found) if rows is not None}


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
    """Which weights codec ``"factored"`` keeps as factors (Linear, Conv1d, Conv2d: :func:`factor_layers`), and their
    rank.

    Attributes:
        layers: the candidate layers (:func:`factor_layers`), in the order :func:`example_factors` reads them.
        ranks: ``{weight name: c}`` of the factored weights, ``c = R x`` the largest source's examples (``R``: rows per
            example, :func:`example_rows`; a convolution's output positions), kept only where ``c (out + in) < out x
            in`` (:func:`weight_matrix`); the other weights are stored dense.
        slot: ``LongTensor[n]``, each example's factor column within its source (:func:`example_slots`).
    """

    layers: tuple[_Layer, ...]
    ranks: dict[str, int]
    slot: Tensor

    @classmethod
    def of(cls, model: FunctionalModel, theta: Tensor, probe: Any, example_to_source: Tensor) -> FactorPlan:
        """From one batch ``probe`` (rows per example of each layer, :func:`example_rows`) and the source map. A weight
        used outside its layer's call in the forward pass (tied weights) has more in its gradient than the layer's
        factors: then no weight is factored (all stored dense)."""
        layers = factor_layers(model.module, model.space)
        slot, width = example_slots(example_to_source)
        ranks: dict[str, int] = {}
        for name, rows in example_rows(model, theta, probe).items() if width else ():
            out, inp = weight_matrix(model.space, name)
            if rows * width * (out + inp) < out * inp:
                ranks[name] = rows * width
        return cls(layers, ranks, slot)

    def biases(self, space: ParameterSpace) -> dict[str, str]:
        """``{bias name: weight name}``: the trainable biases of the factored weights' layers, which codec ``"factored"``
        folds into the weight's factors where :func:`bias_agreement` holds (``[W | b] = U [V; 1]^T``)."""
        out = {}
        for layer in self.layers:
            bias = layer.names(("bias",))[0]
            if layer.weight in self.ranks and bias in space.names and getattr(layer.module, "bias", None) is not None:
                out[bias] = layer.weight
        return out

    def zeros(self, space: ParameterSpace, count: int, like: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """``{weight name: (U: Tensor[count, out, c], V: Tensor[count, in, c])}`` of zeros, ``like``'s dtype and device."""
        out = {}
        for name, c in self.ranks.items():
            rows, columns = weight_matrix(space, name)
            out[name] = (like.new_zeros(count, rows, c), like.new_zeros(count, columns, c))
        return out

    def factors(
        self, model: FunctionalModel, theta: Tensor, batches: Iterable[tuple[Any, Tensor]], local: Tensor, count: int
    ) -> dict[str, tuple[Tensor, Tensor]]:
        """``{weight name: (U: Tensor[C, out, c], V: Tensor[C, in, c])}``: the summed loss gradient of each of ``count``
        sources (``local: LongTensor[n]``, each example's row, -1 for examples of other sources) as ``U V^T``, one factor
        column per row of each of its examples (a convolution's weight as ``W.view(out, C_in x k)``). ``batches``:
        ``(data, example index)``, finite examples only."""
        factors = self.zeros(model.space, count, theta)
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
                u, v = factors[name]
                u[rows[:, None], :, columns] = delta
                v[rows[:, None], :, columns] = x
        return factors


def _largest_error(predicted: Tensor, expected: Tensor, finite: Tensor) -> tuple[float, float]:
    """``(largest |predicted - expected|, largest |expected|)`` over the finite sources (``finite: BoolTensor[C]``, some
    true) of two ``Tensor[C, ...]`` blocks."""
    error = (predicted - expected).abs().flatten(1).amax(dim=1)[finite].max()
    return float(error), float(expected.abs().flatten(1).amax(dim=1)[finite].max())


def _reproduces(error: float, scale: float) -> bool:
    return error <= _CONSISTENCY_TOLERANCE * scale + 1e-12


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
        error, scale = _largest_error((probes @ u) @ v.transpose(1, 2), probes @ target, finite)  # [C, p, in]
        if not _reproduces(error, scale):
            raise RuntimeError(
                f"codec='factored': the factors of {name!r} do not reproduce its per-source gradient (largest error "
                f"{error:.3g} of {scale:.3g}, along {_CHECK_PROBES} random combinations of its rows): the weight is used "
                "outside its layer's own call (tied weights, a penalty in the loss). Use codec='dense' for this model."
            )


def bias_agreement(factors: dict[str, tuple[Tensor, Tensor]], dense: dict[str, Tensor], finite: Tensor, biases: Mapping[str, str]) -> Tensor:
    """``BoolTensor[len(biases)]``: for each ``{bias name: weight name}`` of ``biases`` (:meth:`FactorPlan.biases`),
    whether the weight's ``U`` summed over its ``c`` columns equals the bias's dense gradient block (``dense[bias]:
    Tensor[C, out]``) of every finite source up to float rounding, as :func:`check_factors` compares the weights: the
    bias gradient of one call is ``sum_t delta_t`` over the layer's output rows, which a bias used outside its layer's
    call (or penalized in the loss) breaks. Where it holds, the bias is folded into the factors (not stored)."""
    agree = []
    for bias, weight in biases.items():
        u = factors[weight][0]
        if bool(finite.any()):
            agree.append(_reproduces(*_largest_error(u.sum(dim=2), dense[bias].reshape(u.shape[0], -1), finite)))
        else:
            agree.append(True)
    return torch.tensor(agree, dtype=torch.bool)


__all__ = [
    "COORDINATES", "FactorPlan", "FactoredResponses", "bias_agreement", "check_factors", "eigen_coordinates", "example_factors",
    "example_rows", "example_slots", "factor_layers", "factor_products", "factored_numbers", "rebuilt_products", "weight_matrix",
]
