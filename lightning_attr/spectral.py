"""The top-k eigenspace of the curvature, and responses coded in it (codec ``"eigen"``).

With ``G = V diag(sigma) V^T`` restricted to its top-k eigenpairs, the response of a source is kept
as ``k`` numbers (METHOD.md, "Storage"):

    c_b = diag(p(sigma)) V^T grad l_b / n        ->   r_b ~ V^T c_b   (V: Tensor[k, P], rows)

and a query needs only ``k`` forward-mode tangents along the rows of ``V`` (``grad f_q . v_j``), then
one ``[Q, k] x [k, S]`` product: its cost does not grow with ``S``. The complement of the top-k space
is dropped (its directions score 0).

``p`` is the spectral filter (:func:`spectral_filter`): ``1/(sigma + lam)``, the damped inverse (at
``k = P`` the exact damped target), or the truncated Neumann series of ``K`` steps that the dense
simulation runs, applied exactly per eigen-direction (what dense end-mode responses converge to with
full-batch curvature, restricted to the top-k space).

The eigenspace comes from randomized block Krylov (:func:`top_eigenspace`, Musco & Musco 2015): block
Lanczos from a Gaussian block, re-orthonormalized in float64, with Rayleigh-Ritz over the whole Krylov
space; ``k + 256`` curvature products (``k = 128, 256``) reached the responses' Pearson of exact eigenpairs on
the bench's GGNs, where the randomized range finder with power iterations (Halko, Martinsson & Tropp 2011;
``method="subspace"``, the previous default, ``10k`` products) needed about ``6k`` (docs/propagation.md,
"Finding the top-k eigenspace"). It can start from a previous basis (``initial=``). Curvature products are over the whole training set (or a large subsample), not
minibatches: minibatch subspace iteration converged poorly (METHOD.md).

Pure ``torch`` / ``torch.func``: no Lightning here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.func import jvp, vmap

from lightning_attr.column_split import ColumnSplit
from lightning_attr.curvature import CurvatureOperator, batch_size_of, curvature_operator, estimate_spectrum
from lightning_attr.functional import FunctionalModel
from lightning_attr.readout import check_readout
from lightning_attr.damping import eigenspace_damping, resolve_damping
from lightning_attr.simulation import DEFAULT_MOMENTUM, STEP_SAFETY, Damping, StepRule, initial_perturbations, propagate


@dataclass(frozen=True)
class Eigenspace:
    """Top eigenpairs of a PSD curvature ``G`` (units of ``sigma``: loss per squared parameter unit).

    Attributes:
        eigenvalues: ``Tensor[k]`` float32, descending, clamped at 0 (Ritz values: each is at most the
            true eigenvalue of the same rank).
        vectors: ``Tensor[k, P]`` float32, orthonormal rows (``vectors[j]`` goes with ``eigenvalues[j]``).
        products: curvature-vector products spent finding them.
        residuals: ``Tensor[k]`` float32, ``||G v_j - sigma_j v_j||`` for each pair (same units as
            ``sigma``), from the last Krylov block at no extra product; NaN for ``method="subspace"``.
        method: ``"krylov"`` or ``"subspace"``.
        block: vectors per block of products (width of the range finder's block for ``"subspace"``).
        stop: why the finder stopped: ``"budget"`` (a fixed rank's products were spent), and for
            :func:`adaptive_eigenspace` ``"reached"`` (``sigma_k`` fell to the threshold: by the products per pair, or by
            converged residuals), ``"cap"`` (the product
            cap came first) or ``"whole space"`` (the space is all of ``R^P``: exact).
        seeded: rows of a previous basis the space started from (``initial=``; 0: a cold, Gaussian start).
        trace: an unbiased estimate of ``trace(G)`` from the first block of a cold Krylov start at no extra product
            (:func:`_first_block_trace`), exact when that block is all of ``R^P``; NaN after a warm start or for
            ``method="subspace"``.
        probes: the rows of the first block ``trace`` was read from (0 when NaN).
    """

    eigenvalues: Tensor
    vectors: Tensor
    products: int
    residuals: Tensor | None = None
    method: str = "subspace"
    block: int = 0
    stop: str = "budget"
    seeded: int = 0
    trace: float = float("nan")
    probes: int = 0

    @property
    def rank(self) -> int:
        return int(self.eigenvalues.numel())

    def reach(self, damping: float) -> float:
        """``sigma_k / lam``: the smallest kept eigenvalue in units of the damping.

        Directions outside the space are treated as if their eigenvalue were 0, so the deflated damped
        inverse is exact up to directions with ``sigma < sigma_k``; below about 1 (``sigma_k < lam``) the
        dropped curvature changes ``1 / (sigma + lam)`` by less than a factor 2, above it the space does not
        reach the damping and a larger ``rank`` is needed for the exact target.
        """
        if not damping > 0:
            raise ValueError(f"damping must be > 0 to compare the eigenvalues with it, got {damping}.")
        return float(self.eigenvalues[-1]) / damping

    def complement_mean(self, trace: float, dim: int) -> float:
        """``mu = (trace - sum sigma) / (P - k)``: the mean eigenvalue outside the space, clamped to ``[0, sigma_k]``
        (0 when ``k = P``).

        No eigenvalue outside the top-k exceeds ``sigma_k``, so neither does their mean; a Hutchinson ``trace`` (32
        probes: about 18% error) can put ``trace - sum sigma`` far above it when the top-k hold most of the trace
        (measured on a small MLP at damping_scale 0.005: ``mu`` = 21 ``sigma_k`` from the estimate)."""
        rest = dim - self.rank
        mu = max(0.0, (trace - float(self.eigenvalues.sum())) / rest) if rest > 0 else 0.0
        return min(mu, float(self.eigenvalues[-1]))


METHODS = ("krylov", "subspace")
TRACE_PROBES = 32  # Hutchinson probes of trace(G), for damping="auto" (and the spectral inverse's complement)
# measured on the bench's GGNs (docs/propagation.md, "Finding the top-k eigenspace"): in blocks of 32, k + 256
# products matched the Pearson of exact eigenpairs at k = 128 and 256 on all four settings (k + 128 fell short)
DEFAULT_KRYLOV_BLOCK = 32
DEFAULT_PRODUCTS_PER_PAIR = 2
DEFAULT_EXTRA_PRODUCTS = 256
# adaptive_eigenspace: a Ritz pair has converged when ||G v - theta v|| <= 0.1 (theta + threshold); 0.3 lost Pearson
# (0.95 on two bench GGNs), 0.03 saved no products (benchmarks/deflation.py auto --tolerances)
DEFAULT_RESIDUAL_TOLERANCE = 0.1
AUTO_BLOCK_GROWTH = 0.125  # adaptive_eigenspace's blocks: m / 8 vectors past the first 256 pairs (3.9x faster, same accuracy)
DEFAULT_RANK = 256  # rank=256 (and the least rank="auto" keeps): Pearson >= 0.98 to the exact target on 4 of the bench's 5 models
_FINDER_PEAK_BYTES = 20  # per vector of the Krylov space and parameter: Q and G Q (float64), then the Ritz vectors (float32)


def top_eigenspace(
    operator: CurvatureOperator,
    dim: int,
    rank: int,
    *,
    block: int | None = None,
    power_iterations: int | None = None,
    method: str = "krylov",
    products: int | None = None,
    initial: Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    split: ColumnSplit | None = None,
) -> Eigenspace:
    """The ``rank`` largest eigenpairs of the PSD operator ``G`` (``operator: Tensor[C, P] -> G V: Tensor[C, P]``).

    ``method="krylov"`` (default): block Lanczos with full re-orthonormalization (in float64) and Rayleigh-Ritz
    over the whole Krylov space ``span(Omega, G Omega, ..., G^(m-1) Omega)`` (the randomized block Krylov
    method of Musco & Musco 2015). Each block of ``block`` products (default ``min(DEFAULT_KRYLOV_BLOCK,
    rank)``) adds one block to the space, until ``products`` have been spent (default: what ``"subspace"``
    spends with the same arguments, ``(block or 2 rank) (power_iterations + 2)``, when ``power_iterations`` is
    given, else ``max(DEFAULT_PRODUCTS_PER_PAIR * rank, rank + DEFAULT_EXTRA_PRODUCTS)``: ``k + 256`` up to
    ``k = 256``, ``2k`` above)
    or the space is all of ``R^P`` (then exact up to float32 rounding of the products).

    ``method="subspace"``: the randomized range finder of Halko, Martinsson & Tropp (2011, Alg. 4.4 and 5.3),
    ``Y = G^(q+1) Omega`` for a Gaussian ``Omega`` of ``block`` columns (default ``min(2 rank, P)``),
    orthonormalized after every product, then Rayleigh-Ritz on the last block only. Costs ``block * (q + 2)``
    products, ``q = power_iterations`` (default 3). At the same ``block`` and ``q`` the Krylov space contains
    this block, so ``"krylov"`` is at least as accurate for the same products.

    Args:
        initial: ``Tensor[r, P]``, a warm start (``"krylov"`` only): the first block is spanned by these rows
            (e.g. the ``vectors`` of the previous checkpoint's eigenspace), padded with Gaussian rows up to
            ``block``; the following blocks keep the ``block`` dominant directions of the residual.
        products: the budget of curvature-vector products (``"krylov"`` only; at least ``rank`` and the first
            block). All of it is spent (the last block may be narrower), unless the space reaches ``R^P`` first.
        split: ``"krylov"`` on several processes (:class:`ColumnSplit`): each holds and works on its columns of the
            Krylov space, and ``operator`` is the same collective on every process (e.g. the curvature of each one's
            share of the data, summed); the eigenpairs returned are whole, the same on every process.

    Draws only from ``generator`` (never from the global RNG).
    """
    if not 1 <= rank <= dim:
        raise ValueError(f"rank must be in [1, P={dim}], got {rank}.")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    if power_iterations is not None and power_iterations < 0:
        raise ValueError(f"power_iterations must be >= 0, got {power_iterations}.")
    if block is not None and block < 1:
        raise ValueError(f"block must be a positive number of vectors, got {block}.")
    if method == "subspace":
        if split is not None and split.shared:
            raise ValueError("method='subspace' runs on one process; split= (several processes) needs method='krylov'.")
        if initial is not None or products is not None:
            raise ValueError(
                "initial= and products= are options of method='krylov'; method='subspace' is set by block= and "
                "power_iterations= alone. Use method='krylov' for a warm start or a product budget."
            )
        return _subspace_iteration(operator, dim, rank, block, 3 if power_iterations is None else power_iterations, generator, device)
    width = min(dim, block if block is not None else min(DEFAULT_KRYLOV_BLOCK, rank))
    if products is not None and power_iterations is not None:
        raise ValueError("Give either products= (a budget) or power_iterations= ((block or 2 rank) (q + 2) products), not both.")
    products = _krylov_budget(rank, block, power_iterations, products)
    if initial is not None:
        initial = _check_initial(initial, dim)
    first = width if initial is None else min(dim, max(width, initial.shape[0]))
    if products < max(first, rank):
        raise ValueError(
            f"products={products} cannot find {rank} eigenpairs (each vector of the space costs one product, and the "
            f"first block holds {first}); give products >= {max(first, rank)}, or a smaller rank / block / initial basis."
        )
    return _block_krylov(operator, dim, rank, width, products, initial, generator, device, split=split)


def eigenspace_products(
    dim: int, rank: int, *, block: int | None = None, power_iterations: int | None = None, method: str = "krylov", products: int | None = None
) -> int:
    """Curvature-vector products :func:`top_eigenspace` spends with these arguments (for progress bars)."""
    if method == "subspace":
        return min(dim, block if block is not None else 2 * rank) * (5 if power_iterations is None else power_iterations + 2)  # q = 3 by default
    return min(dim, _krylov_budget(rank, block, power_iterations, products))


def _krylov_budget(rank: int, block: int | None, power_iterations: int | None, products: int | None) -> int:
    if products is not None:
        return products
    if power_iterations is not None:  # the budget method="subspace" spends with the same arguments
        return (block or 2 * rank) * (power_iterations + 2)
    return max(DEFAULT_PRODUCTS_PER_PAIR * rank, rank + DEFAULT_EXTRA_PRODUCTS)


def supported_rank(products: int) -> int:
    """The largest rank whose default budget (:func:`eigenspace_products`: ``max(2k, k + 256)``) is at most
    ``products``: ``min(m // 2, m - 256)``, 0 below 257 products."""
    return max(0, min(products // DEFAULT_PRODUCTS_PER_PAIR, products - DEFAULT_EXTRA_PRODUCTS))


def product_cap(dim: int, memory_mb: float) -> int:
    """The most products :func:`adaptive_eigenspace` may spend within ``memory_mb`` MiB: the finder holds up to
    ``20 m P`` bytes for a space of ``m`` vectors (see :func:`_block_krylov`), so
    ``m_max = floor(memory_mb 2^20 / (20 P))``, but never below the default rank's budget (``rank=256``
    spends it whatever the memory) nor above ``P``."""
    floor = min(dim, _krylov_budget(DEFAULT_RANK, None, None, None))
    return min(dim, max(floor, int(memory_mb * 2**20) // (_FINDER_PEAK_BYTES * dim)))


def adaptive_eigenspace(
    operator: CurvatureOperator,
    dim: int,
    threshold: float | Callable[[Tensor, float], float | None],
    *,
    max_products: int,
    min_rank: int = DEFAULT_RANK,
    block: int = DEFAULT_KRYLOV_BLOCK,
    growth: float = AUTO_BLOCK_GROWTH,
    initial: Tensor | None = None,
    tolerance: float | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    split: ColumnSplit | None = None,
) -> Eigenspace:
    """The top eigenpairs of ``G`` down to ``threshold``: the Krylov space of :func:`top_eigenspace` grown one
    block at a time (every basis vector and product kept, nothing restarted) until ``sigma_k <= threshold``.

    After a block the space holds ``m`` vectors and supports the rank ``k(m) = min(m // 2, m - 256)``
    (:func:`supported_rank`, the default budget of a fixed rank read backwards, so a stop at ``m`` products
    equals ``top_eigenspace(rank=k(m))`` up to rounding); it stops once ``k(m) >= min_rank`` and the ``k(m)``-th
    Ritz value is at most ``threshold`` (``stop="reached"``), at ``max_products`` (``"cap"``, keeping ``k(m)``
    pairs, with ``sigma_k`` above ``threshold``) or when the space is all of ``R^P`` (``"whole space"``, all ``P``
    pairs, exact). Units of ``threshold``: those of the eigenvalues (loss per squared parameter unit). ``threshold`` may
    also be a function of the Ritz values the budget rule counts as converged (``Tensor[k(m)]``, descending) and of the
    mean eigenvalue ``trace(G) / P`` (the returned space's ``trace / P``, read from the first block; NaN after a warm
    start) that returns the threshold, or None while it cannot tell (the callback's eigenspace damping rule reads ``sigma_64``,
    :mod:`lightning_attr.damping`): it is asked again after every block (Ritz values only grow as the space does), and
    the space cannot stop at the threshold before it answers.
    Memory: up to ``20 max_products P`` bytes (:func:`product_cap`).

    ``tolerance`` (the callback passes :data:`DEFAULT_RESIDUAL_TOLERANCE`): it also stops, keeping ``k`` pairs, once the
    Ritz pairs down to the first Ritz value at or below ``threshold`` (``k`` of them, at least ``min_rank``) have
    converged, ``||G v_j - theta_j v_j|| <= tolerance (theta_j + threshold)``, and the first block's Gaussian probes show
    no curvature above ``(1 + tolerance) threshold`` outside them (:class:`_ThresholdStop`): the same ``sigma_k <=
    threshold``, read from Ritz values of this ``G`` that have converged, usually before ``2k`` products. Measured
    (``benchmarks/deflation.py auto --tolerances``, explicit GGNs, ``sigma_k <= 0.5 lam``): digits MLP 448 products
    against 576, Pearson to the exact target 0.996 against 0.997; MNIST-1D CNN 512 / 640, 0.991 / 0.993; digits CNN 352 /
    512, 0.999 / 1.000; MNIST-1D MLP 2,048 / 2,304, 0.993 / 0.995 (tolerance 0.3: 0.95 on two; 0.03: no fewer products).

    ``initial``: ``Tensor[r, P]``, a warm start (e.g. the previous checkpoint's eigenvectors; needs ``tolerance``): the
    first block is these rows and ``block`` Gaussian ones, and only the residual rule stops it (the budget rule
    presumes a Krylov space). A stale basis is not taken as converged: its Ritz pairs at this ``G`` must converge, and
    the probes catch curvature it misses above the threshold. The callback does not use it: from the previous
    checkpoint of the trajectory ensemble it cost more products than a cold start (``benchmarks/eigenspace.py members``).

    ``growth``: blocks of ``growth m`` vectors (whole blocks of ``block``), :func:`_block_krylov`; with 0 the space is
    the block Krylov space of ``top_eigenspace(rank=k(m))``. Measured on the MNIST-1D MLP's explicit GGN (P = 15,210,
    ``benchmarks/deflation.py auto``, one process): at ``sigma_k <= 0.5 lam``, 1/8 reached rank 1,152 in 2,304 products
    and 75 s with Pearson 0.995 to the exact target, blocks of 32 rank 1,136 in 2,272 products and 294 s with 0.995.

    ``split``: as in :func:`top_eigenspace`, the space's columns split among processes (the same pairs, up to rounding).
    """
    if not (callable(threshold) or threshold >= 0):
        raise ValueError(f"threshold must be an eigenvalue >= 0 or a function of the Ritz values, got {threshold}.")
    min_rank = min(min_rank, dim)
    need = min(dim, _krylov_budget(min_rank, None, None, None))
    if max_products < need:
        raise ValueError(
            f"max_products={max_products} cannot reach the least rank {min_rank} (its budget is {need} products); give "
            f"max_products >= {need}, or a smaller min_rank."
        )

    if initial is not None:
        initial = _check_initial(initial, dim)
    if initial is not None and tolerance is None:
        raise ValueError(
            "initial= needs tolerance=: a warm start's vectors are not a Krylov space, so only the Ritz residuals of the "
            f"new operator can tell when they have converged (e.g. tolerance={DEFAULT_RESIDUAL_TOLERANCE})."
        )
    if tolerance is not None and not tolerance > 0:
        raise ValueError(f"tolerance must be > 0 (a relative residual), got {tolerance}.")
    width = min(dim, block)
    rule = _ThresholdStop(dim, threshold, min_rank, max_products, tolerance, krylov=initial is None)
    if initial is not None:  # the previous basis, then a Gaussian block (pad): directions it lacks can still enter the space
        initial = initial[: max(0, max_products - width)]
    return _block_krylov(operator, dim, min_rank, width, max_products, initial, generator, device, rule, growth, width, split)


@dataclass
class _ThresholdStop:
    """When :func:`adaptive_eigenspace` stops (``_block_krylov``'s ``enough``), and which Ritz pairs steer its growth.

    ``krylov``: the space is a block Krylov space from a Gaussian start, so after ``m`` products its top
    ``supported_rank(m)`` Ritz pairs are taken as converged (the budget rule of a fixed rank). ``tolerance``: a pair
    also counts as converged when its residual ``||G v_j - theta_j v_j|| <= tolerance (theta_j + threshold)``; the
    space stops once the pairs down to the first Ritz value at or below ``threshold`` (at least ``min_rank`` of them)
    have all converged and no Gaussian probe of the first block shows curvature above ``(1 + tolerance) threshold``
    outside them (``outside(k)``: ``||(I - V V^T) G w|| / ||w||`` for each probe's part ``w`` outside the top-k Ritz
    vectors ``V``; at most the largest eigenvalue of ``G`` there, so a larger value proves a direction above the
    threshold is missing, e.g. from a stale warm start that spans an invariant space of the new ``G`` without its top).
    A warm start (``krylov=False``) stops by this test alone.

    What no test at no extra product can rule out: a few directions just above the threshold that the probes barely
    touch and the space never reached (their weight in a random probe is about their count over ``P``); a cold Krylov
    space shares this with any stopping rule.
    """

    dim: int
    threshold: float | Callable[[Tensor, float], float | None]
    min_rank: int
    max_products: int
    tolerance: float | None
    krylov: bool
    level: float | None = field(default=None, init=False)  # the threshold in force (None: a rule that cannot tell yet)
    mean_eigenvalue: float = field(default=float("nan"), init=False)  # trace(G) / P from the first block (NaN: warm)

    def _wanted(self, values: Tensor) -> int:
        """The pairs down to the first Ritz value at or below the threshold, at least ``min_rank``."""
        return self.min_rank if self.level is None else max(self.min_rank, int((values > self.level).sum()) + 1)

    def pairs(self, values: Tensor, size: int, step: int) -> int:
        """How many of the top Ritz pairs (``values``: all of them, descending) are examined and steer the next block;
        a threshold rule is asked here, with the pairs the budget rule counts as converged."""
        if callable(self.threshold):
            self.level = self.threshold(values[: supported_rank(size) if self.krylov else values.numel()], self.mean_eigenvalue)
        else:
            self.level = self.threshold
        examined = supported_rank(size + step) if self.krylov else self.min_rank
        if self.tolerance is not None:
            examined = max(examined, self._wanted(values))
        return min(size, examined)

    def __call__(self, values: Tensor, residuals: Tensor, size: int, outside: Callable[[int], Tensor]) -> tuple[int, str] | None:
        if size >= self.dim:
            return self.dim, "whole space"
        supported, level = supported_rank(size), self.level
        if level is not None and self.krylov and supported >= self.min_rank and float(values[supported - 1]) <= level:
            return supported, "reached"
        if level is not None and self.tolerance is not None:
            wanted = self._wanted(values)
            if wanted <= values.numel() and float(values[wanted - 1]) <= level:
                converged = bool((residuals[:wanted] <= self.tolerance * (values[:wanted] + level)).all())
                if converged and float(outside(wanted).max()) <= (1 + self.tolerance) * level:
                    return wanted, "reached"
        if size >= self.max_products:
            return min(size, max(self.min_rank, supported)), "cap"
        return None


def _check_initial(initial: Tensor, dim: int) -> Tensor:
    if initial.dim() != 2 or initial.shape[1] != dim or initial.shape[0] < 1:
        raise ValueError(
            f"initial must be a basis Tensor[r, P={dim}] (rows: e.g. the vectors of a previous Eigenspace of the "
            f"same model), got shape {tuple(initial.shape)}."
        )
    if not bool(torch.isfinite(initial).all()):
        raise ValueError("initial holds NaN or infinite values; pass the vectors of a finished Eigenspace, or None.")
    return initial


def _subspace_iteration(
    operator: CurvatureOperator, dim: int, rank: int, block: int | None, power_iterations: int, generator, device
) -> Eigenspace:
    width = min(dim, block if block is not None else 2 * rank)
    if width < rank:
        raise ValueError(f"block ({width}) must be at least rank ({rank}).")
    omega = torch.randn(width, dim, generator=generator).to(device)
    basis = _orthonormal_rows(operator(omega)).float()
    for _ in range(power_iterations):
        basis = _orthonormal_rows(operator(basis)).float()
    projected = operator(basis)  # G Q, rows
    small = (projected.double() @ basis.double().T)  # Q^T G Q, [width, width]
    values, vectors = _top_ritz_pairs((small + small.T) / 2, rank)
    ritz = (vectors.T @ basis.double()).float()  # [rank, P], orthonormal: Q times an orthogonal matrix
    nan = torch.full((rank,), float("nan"))
    return Eigenspace(values.clamp_min(0).float(), ritz.contiguous(), width * (power_iterations + 2), nan, "subspace", width)


def _block_krylov(
    operator: CurvatureOperator,
    dim: int,
    rank: int,
    width: int,
    budget: int,
    initial: Tensor | None,
    generator,
    device,
    enough: _ThresholdStop | None = None,
    growth: float = 0.0,
    pad: int = 0,
    split: ColumnSplit | None = None,
) -> Eigenspace:
    """Block Lanczos, full re-orthonormalization, Rayleigh-Ritz over the space; see :func:`top_eigenspace`.

    The space ``Q: [m, P]`` (float64) grows block by block; its products ``I = G Q: [m, P]`` are kept (the operator's
    float32 values, held in float64), with ``T = Q I^T`` and ``M = I I^T`` (``[m, m]``, float64). The next block
    is the ``block`` dominant directions of the residuals ``R = S^T I - Theta S^T Q`` of the top
    ``max(rank, block)`` Ritz pairs ``(Theta, S)`` of ``T``, found from their Gram matrix
    ``R R^T = S^T M S - Theta^2`` (so a step costs ``O(block m P)``, as plain block Lanczos), then
    projected off ``Q`` once more and factored: ``R`` is orthogonal to ``Q`` by the Rayleigh-Ritz (Galerkin) condition,
    up to the float32 asymmetry of the products, so that projection is the second pass of CGS2 (a third one, as
    before, changed no product count, Ritz value beyond 1.3e-6 relative or Ritz subspace on the 64-128-128 digits MLP,
    and cost a quarter of the algebra). From a Gaussian start this is the block Krylov space (in
    exact arithmetic every Ritz residual lies in the span of the last block's residual); from a warm start of
    more than ``block`` rows it keeps the corrections that matter most, and comes back to the ones it left.
    Memory: ``Q`` and ``I`` live in buffers of ``min(P, budget)`` rows, written block by block (no copy of the space per
    block; on the CPU pages never written are never touched; on other devices the buffers double as the space grows,
    :func:`_space_rows`): ``16 m P`` bytes for a space of ``m <= products`` vectors (on a device, at most the same
    ``16 products P``, but 1.5 times a buffer while it is copied),
    then the ``4 k P`` of the float32 Ritz vectors; flops ``O(m^2 P)`` over the run besides the products (with
    ``split``: ``P`` is this process's columns, and the ``O(m^3)`` Rayleigh-Ritz steps run on every process).

    ``enough`` (:func:`adaptive_eigenspace`'s :class:`_ThresholdStop`): ``enough.pairs(all Ritz values, m, block)`` top
    pairs are examined; ``enough(their values, their residual norms, m, outside)``, asked after each block, returns
    ``(rank, stop)`` to stop there keeping ``rank`` pairs, or None to go on with the residual directions of those pairs
    (``outside(k)``: :class:`_ThresholdStop`'s probe test).
    ``pad``: Gaussian rows appended to ``initial`` (at least; the first block holds ``block`` rows or more).
    ``growth``: each block holds ``growth m`` vectors rounded down to whole ``width`` blocks (at least one; 0: always
    ``width``), so a space of ``m`` vectors costs ``O(log m)`` Rayleigh-Ritz steps (each an ``O(m^3)``
    eigendecomposition) instead of ``m / width``.
    ``split``: ``Q`` and ``I`` are held as this process's columns only (:class:`ColumnSplit`: the ``O(m^2 P)`` work and
    the memory split among the processes, whose ``operator`` must then be the same collective on every process); the
    eigenvectors returned are whole.
    """
    split = split or ColumnSplit(dim)
    start = torch.randn(width, dim, generator=generator, dtype=torch.float64)
    seeded = 0
    if initial is not None:
        seed = initial.detach().to("cpu", torch.float64)
        start = torch.cat([seed, start[: max(pad, width - seed.shape[0])]])[:dim]
        seeded = min(dim, initial.shape[0])
    scale = float(torch.linalg.vector_norm(start, dim=1).max())
    current = _orthonormalize_against(split.local(start).to(device), None, generator, scale, split)
    probes = torch.arange(seeded, current.shape[0], device=device)  # the first block's Gaussian rows (after the seed)
    trace = float("nan")
    # Q and I = G Q (float64: the products are read in float64 once, as they come) in buffers filled block by block:
    # no copy of the space per block (:func:`_space_rows`)
    capacity = min(dim, max(budget, current.shape[0]))
    bases = torch.empty(_space_rows(capacity, current.shape[0], current.device), current.shape[1], dtype=torch.float64, device=device)
    products = torch.empty_like(bases)
    size = 0
    small = torch.zeros(0, 0, dtype=torch.float64, device=device)  # T = Q I^T
    gram = small.clone()  # M = I I^T
    while True:
        image = split.local(operator(split.gather(current.float())))
        old, size = size, size + current.shape[0]
        if size > bases.shape[0]:
            bases, products = _grown(bases, size, capacity), _grown(products, size, capacity)
        bases[old:size], products[old:size] = current, image
        space, wide, new = bases[:size], products[:size], products[old:size]
        grown = split.total(torch.cat([space @ new.T, wide @ new.T]))  # [Q; I] I_new^T: one collective
        small, gram = _grow_symmetric(small, grown[:size]), _grow_symmetric(gram, grown[size:])
        if size == current.shape[0] and not seeded:  # the first block, from a cold start
            trace = _first_block_trace(small, dim)
            if enough is not None:
                enough.mean_eigenvalue = trace / dim
        step = width * max(1, int(growth * size) // width)  # whole blocks of `width`
        all_values, all_vectors = _top_ritz_pairs(small, size)
        pairs = rank if enough is None else max(rank, enough.pairs(all_values, size, step))
        values, vectors = all_values[: min(size, max(pairs, step))], all_vectors[:, : min(size, max(pairs, step))]
        # R R^T = S^T M S - Theta^2 for the Ritz residuals R (rows); its diagonal: ||G v_j - theta_j v_j||^2
        residual_gram = vectors.T @ gram @ vectors - torch.diag(values**2)
        residual_gram = (residual_gram + residual_gram.T) / 2
        stop = "budget" if enough is None else None
        outside = partial(_probe_curvature, all_vectors, probes, small, gram)
        if enough is not None and (found := enough(values, torch.diagonal(residual_gram).clamp_min(0).sqrt(), size, outside)) is not None:
            rank, stop = found
            if rank > values.numel():  # the whole space: every pair
                values, vectors = all_values[:rank], all_vectors[:, :rank]
            break
        room = min(step, dim - size, budget - size)  # the last block may be narrower
        if room < 1:
            break
        # the `room` dominant directions of the Ritz residuals R, from the eigenvectors of R R^T
        directions = torch.linalg.eigh(residual_gram)[1][:, -room:].T  # [room, pairs]
        mix = directions @ vectors.T  # [room, m]
        # R is orthogonal to Q (Rayleigh-Ritz's Galerkin condition: the first pass of CGS2, done by the small matrices up to
        # the float32 asymmetry of the products), so one more projection makes the rows orthogonal to rounding
        rows = mix @ wide - (directions * values) @ vectors.T @ space
        current = _orthonormalize_against(rows, space, generator, float(values[0].abs()), split, projected=True)
    ritz, norms = _ritz_vectors(vectors[:, :rank], values[:rank], space, wide, split)
    first = 0 if seeded else int(probes.numel())
    return Eigenspace(values[:rank].clamp_min(0).float(), ritz, size, norms.float().cpu(), "krylov", width, stop or "budget", seeded, trace, first)


# Rows a non-CPU buffer of the space starts with. CUDA allocates every row of an empty tensor at once, so a buffer of
# the whole budget held 470-1,072 MiB on an H100 where the space used a fraction (benchmarks/results/gpu-h100.json)
_DEVICE_FIRST_ROWS = 256


def _space_rows(capacity: int, first: int, device: torch.device) -> int:
    """Rows to allocate for a Krylov space that may grow to ``capacity`` vectors, its first block ``first``: all of them
    on the CPU (pages never written are never touched), else at least ``first`` and :data:`_DEVICE_FIRST_ROWS`, the
    buffer doubled as the space grows (:func:`_grown`)."""
    return capacity if device.type == "cpu" else min(capacity, max(first, _DEVICE_FIRST_ROWS))


def _grown(buffer: Tensor, rows: int, capacity: int) -> Tensor:
    """``buffer: Tensor[m, P]`` copied into a buffer of at least ``rows`` rows: twice ``m``, at most ``capacity``."""
    grown = buffer.new_empty(min(capacity, max(rows, 2 * buffer.shape[0])), buffer.shape[1])
    grown[: buffer.shape[0]] = buffer
    return grown


_RITZ_ROWS = 256  # Ritz vectors formed in float64 at a time (their float64 rows and residuals: 16 x this x P bytes)


def _ritz_vectors(vectors: Tensor, values: Tensor, space: Tensor, images: Tensor, split: ColumnSplit) -> tuple[Tensor, Tensor]:
    """The Ritz vectors ``S_k^T Q: Tensor[k, P]`` (float32, whole rows) and their residual norms ``||S_k^T I - Theta S_k^T Q||``
    (``Tensor[k]`` float64) from the Ritz pairs ``(values: Tensor[k], vectors = S_k: Tensor[m, k])``, the space ``Q`` and its
    products ``I`` (``Tensor[m, P_r]`` float64, this process's columns), :data:`_RITZ_ROWS` rows at a time in float64."""
    ritz = space.new_empty(vectors.shape[1], space.shape[1], dtype=torch.float32)
    squares = space.new_zeros(vectors.shape[1])
    for start in range(0, vectors.shape[1], _RITZ_ROWS):
        chunk = vectors[:, start : start + _RITZ_ROWS].T  # [c, m]
        rows = chunk @ space  # orthonormal: the rows of Q rotated
        squares[start : start + chunk.shape[0]] = (chunk @ images - values[start : start + chunk.shape[0], None] * rows).square().sum(dim=1)
        ritz[start : start + chunk.shape[0]] = rows
    return split.gather(ritz).contiguous(), split.total(squares).sqrt()


def _first_block_trace(small: Tensor, dim: int) -> float:
    """``trace(G) ~ (P / b) trace(Q_1 G Q_1^T)`` from ``small = Q_1 G Q_1^T: Tensor[b, b]``, the first block's orthonormalized
    Gaussian rows ``Q_1``: a Haar-random orthonormal frame, so each row's ``q^T G q`` has mean ``trace(G) / P`` (unbiased),
    and the ``b`` rows being orthogonal, the variance is at most that of ``b`` Gaussian probes (Hutchinson without
    replacement); exact at ``b = P``. Replaces the callback's 32 Rademacher probes (32 products) under ``rank="auto"``."""
    return dim * float(torch.diagonal(small).sum()) / small.shape[0]


def _probe_curvature(ritz_vectors: Tensor, probes: Tensor, small: Tensor, gram: Tensor, k: int) -> Tensor:
    """``||(I - V V^T) G w_i|| / ||w_i||`` for ``w_i = (I - V V^T) q_i``, the rows ``probes`` of the space ``Q`` outside
    its top-k Ritz vectors ``V = S_k^T Q`` (``ritz_vectors = S: Tensor[m, m]``, descending): ``Tensor[len(probes)]``, in
    eigenvalue units. From ``small = T = Q I^T`` and ``gram = M = I I^T`` alone (``G w = I^T c`` for ``w = Q^T c``): no
    product."""
    top = ritz_vectors[:, :k]  # [m, k]
    c = -top @ top[probes].T  # [m, p]: the probes' coordinates on Q minus their top-k part
    c[probes, torch.arange(probes.numel(), device=c.device)] += 1
    image_sq = ((gram @ c) * c).sum(0) - (top.T @ small @ c).square().sum(0)  # ||G w||^2 - ||V G w||^2
    return image_sq.clamp_min(0).sqrt() / c.square().sum(0).sqrt().clamp_min(1e-300)


def _grow_symmetric(matrix: Tensor, columns: Tensor) -> Tensor:
    """``[[A, B^T], [B, D]]`` from ``matrix = A: [m, m]`` and ``columns = [B^T; D]: [m + b, b]`` (``D`` symmetrized)."""
    old, size = matrix.shape[0], columns.shape[0]
    grown = torch.zeros(size, size, dtype=matrix.dtype, device=matrix.device)
    grown[:old, :old], grown[:, old:], grown[old:, :old] = matrix, columns, columns[:old].T
    grown[old:, old:] = (columns[old:] + columns[old:].T) / 2
    return grown


def _orthonormalize_against(
    rows: Tensor, basis: Tensor | None, generator: torch.Generator | None, scale: float, split: ColumnSplit, projected: bool = False
) -> Tensor:
    """Orthonormal rows spanning ``rows: Tensor[C, P]`` (float64) minus their part in ``basis`` (orthonormal rows); with
    ``split``, both hold this process's columns ``[., P_r]`` and so does the result.

    Directions that vanish in the projection (below ``_NEGLIGIBLE * scale``, ``scale`` being the size of a
    meaningful row: an invariant space was reached, e.g. the null space of a GGN of rank below ``P``) are
    replaced by Gaussian rows, so the space keeps growing; the other rows are kept whole, not their parts orthogonal to
    the vanished ones (a vanished row's direction is rounding that may hold much of a meaningful row after it: a small
    CNN's rank-46 GGN kept its top Ritz pair at a residual of 7% of ``sigma_1`` through 320 products that way, and
    rank="auto" stopped with it, 1 / lam instead of 1 / sigma_1 on the part it missed). The projection runs twice (CGS2:
    rows that were nearly in ``basis`` still come out orthogonal to it), then one QR, whose ``q`` is the result; a row
    left shorter than ``_REORTHONORMALIZE * scale`` is projected and factored once more (the QR divides by its length,
    which amplifies its rounding along ``basis``). Two projections of ``[C, P]`` against ``basis`` per block, three at most
    (four and three QRs before: on the 64-128-128-10 digits MLP, P = 26,122, the finder's algebra outweighed its products;
    one projection where a row kept most of its length, the DGKS criterion, measured no faster there).
    """
    rows = _project_out(rows, basis, split) if projected else _orthogonal_part(rows, basis, split)
    q, r = split.qr(rows)
    weak = torch.diagonal(r).abs() <= _NEGLIGIBLE * scale  # vanished, or dependent on the rows before them
    if bool(weak.any()):
        fresh = split.local(torch.randn(int(weak.sum()), split.dim, generator=generator, dtype=rows.dtype)).to(rows.device)
        rows = torch.cat([rows[~weak], _orthogonal_part(fresh, basis, split)])
        q, r = split.qr(rows)
    if float(torch.diagonal(r).abs().min()) < _REORTHONORMALIZE * scale:  # QR amplified the rounding of a short row
        q, again = split.qr(_project_out(q, basis, split))
        r = again @ r  # rows = (again r)^T q
    return _signed_rows(q, r)


_NEGLIGIBLE = 1e-6  # relative size of a direction below which it is float32 rounding of the products
# a row this short relative to a meaningful one comes out of the QR with its rounding along the basis amplified up to
# 1 / this (1e-13 in float64 at most below it): projected out and factored once more
_REORTHONORMALIZE = 1e-3


def _orthogonal_part(rows: Tensor, basis: Tensor | None, split: ColumnSplit) -> Tensor:
    """``rows: Tensor[C, P]`` minus their part in ``basis`` (orthonormal rows), to rounding: projected twice (CGS2)."""
    return _project_out(_project_out(rows, basis, split), basis, split)


def _project_out(rows: Tensor, basis: Tensor | None, split: ColumnSplit) -> Tensor:
    """``rows - (rows basis^T) basis``: the part of ``rows: Tensor[C, P]`` orthogonal to ``basis: Tensor[m, P]`` (both, and
    the result, on this process's columns of ``split``)."""
    if basis is None or not basis.shape[0]:
        return rows
    return rows - split.dot(rows, basis) @ basis


def _top_ritz_pairs(small: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The ``rank`` largest eigenpairs of the symmetric ``small: Tensor[m, m]``: values ``[rank]``, vectors ``[m, rank]``."""
    values, vectors = torch.linalg.eigh(small)
    top = values.argsort(descending=True)[:rank]
    return values[top], vectors[:, top]


def _orthonormal_rows(rows: Tensor, split: ColumnSplit | None = None) -> Tensor:
    """An orthonormal basis (rows, float64) of the row space of ``rows: Tensor[C, P]``, ``C <= P``, same order (with
    ``split``: on this process's columns)."""
    return _signed_rows(*(split or ColumnSplit(rows.shape[1])).qr(rows.double()))


def _signed_rows(q: Tensor, r: Tensor) -> Tensor:
    """The rows of ``q`` (of a QR factorization ``rows = r^T q``) with the signs that make ``r``'s diagonal >= 0: a Gaussian
    block comes out Haar-distributed."""
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1
    return (q * signs[:, None]).contiguous()


def spectral_filter(
    eigenvalues: Tensor,
    damping: float,
    horizon: int | None = None,
    propagation: str = "neumann",
    momentum: float = DEFAULT_MOMENTUM,
) -> Tensor:
    """``p(sigma): Tensor[k]``, what the response does along each eigen-direction (units: 1 / curvature).

    ``horizon=None``: ``1 / (sigma + lam)``, the damped inverse. ``horizon=K``: what ``K`` products of the dense
    simulation's rule (``propagation``, :func:`lightning_attr.simulation.propagate`) make of each direction with
    exact curvature, step ``eta = 1 / (STEP_SAFETY * sigma_max + lam)``. For ``"neumann"`` that is
    ``(1 - (1 - eta z)^(K+1)) / z`` with ``z = sigma + lam``: directions with ``eta K z << 1`` are damped to
    ``eta (K + 1)`` instead of inverted (a short horizon acts as extra damping).
    """
    z = eigenvalues.double() + damping
    if horizon is None:
        return (1 / z).float()
    eta = 1.0 / (STEP_SAFETY * float(eigenvalues.max()) + damping)
    rule = StepRule(damping, eta, float(eigenvalues.max()), float("nan"), propagation, momentum if propagation == "heavy_ball" else 0.0)
    sigma = eigenvalues.double().unsqueeze(0)
    return propagate(torch.ones_like(sigma), [lambda v: v * sigma] * horizon, rule)[0].float()


def query_tangents(model: FunctionalModel, theta: Tensor, basis: Tensor, batch: Any, chunk_size: int = 256) -> Tensor:
    """``grad f_q(theta) . v_j`` for every query ``q`` and basis row ``v_j``: ``Tensor[B, k]``.

    Forward-mode only: one ``torch.func.jvp`` per basis row, ``chunk_size`` rows per vmapped call.
    """
    measurement = lambda th: model.measurement(th, batch)  # noqa: E731
    tangent = vmap(lambda v: jvp(measurement, (theta,), (v,))[1])
    parts = [tangent(basis[start : start + chunk_size]) for start in range(0, basis.shape[0], chunk_size)]
    return torch.cat(parts).T


def eigen_responses(
    model: FunctionalModel,
    theta: Tensor,
    gradient_batches: Iterable[tuple[Any, Tensor]],
    curvature_batches: Sequence[Any],
    example_to_source: Tensor,
    num_sources: int,
    num_examples: int,
    *,
    rank: int,
    damping: Damping = "auto",
    damping_scale: float = 1.0,
    horizon: int | None = None,
    propagation: str = "neumann",
    momentum: float = DEFAULT_MOMENTUM,
    block: int | None = None,
    power_iterations: int | None = None,
    method: str = "krylov",
    products: int | None = None,
    chunk_size: int = 2048,
    sketch: int = 0,
    generator: torch.Generator | None = None,
    operator: CurvatureOperator | None = None,
    split: ColumnSplit | None = None,
) -> tuple[EigenResponses, Tensor, dict]:
    """Responses of every source in codec ``"eigen"``, at ``theta``, with the GGN of ``curvature_batches``.

    Args:
        gradient_batches: ``(data, example index LongTensor[B])`` covering the training set once.
        curvature_batches: batches (no index) whose pooled GGN is ``G``: the whole training set, or a
            large subsample (each batch weighs by its size).
        num_examples: ``n`` of the ``1/n`` (the training set's size).
        rank: ``k``, eigenpairs kept (at most ``P``).
        damping: ``"auto"``: :mod:`lightning_attr.damping`'s eigenspace rule with ``horizon=None`` (``damping_scale x
            max(0.27 sigma_64, trace(G)/P)``), its mean rule with a step rule's horizon (``damping_scale x 3 trace(G)/P``,
            as the dense step rules); ``trace(G)/P`` from 32 Hutchinson probes of ``G``. Or a float.
        horizon, propagation, momentum: the spectral filter (:func:`spectral_filter`): ``horizon=None`` = the
            damped inverse, ``K`` = what ``K`` steps of the dense simulation's rule make of each direction.
        block, power_iterations, method, products: of :func:`top_eigenspace`.
        sketch: ``k'``, rows of a random sketch of the complement of the eigenspace appended to the basis
            (:func:`complement_sketch`): the response's part outside the space, ``p(mu) (I - V^T V) grad l_b / n``
            with ``mu`` the mean eigenvalue there, kept in ``k'`` more numbers per source instead of dropped.
        operator: ``G``'s products when the caller built them (default: the GGN of ``curvature_batches``, in chunks of
            ``chunk_size`` vectors). Several processes pass the same collective (each its share of the training set, the
            products summed) with ``split`` (:func:`top_eigenspace`'s, ``method="krylov"``): they find the same basis, and
            each gets the coordinates of the sources in its ``gradient_batches`` (zero rows for the others: sum them).

    Returns:
        ``(block, finite: BoolTensor[S], info)``; ``info`` is JSON-able (damping, products, rank, ...).
        ``S x P`` is never held: each batch's source gradients are projected on the basis at once.
    """
    dim = theta.numel()
    operator = operator or curvature_operator("ggn", model, theta, curvature_batches, chunk_size)
    probes = TRACE_PROBES if damping == "auto" or sketch else 0
    mean_eigenvalue = float("nan")
    if probes:
        mean_eigenvalue = estimate_spectrum(operator, dim, probes=probes, power_iterations=0, generator=generator, device=theta.device).mean_eigenvalue
    space = top_eigenspace(
        operator, dim, min(rank, dim), block=block, power_iterations=power_iterations, method=method, products=products,
        generator=generator, device=theta.device, split=split,
    )  # fmt: skip
    if horizon is None:  # the damped inverse: the eigenspace rule, as propagation="spectral"
        lam, rule = eigenspace_damping(damping, damping_scale, space.eigenvalues, mean_eigenvalue)
    else:  # what a step rule's horizon makes of each direction: the step rules' damping, as the dense simulation's
        lam, rule = resolve_damping(damping, damping_scale, mean_eigenvalue), {"damping_rule": "step rules' (3 x trace(G)/P)"}
    basis, gains = space.vectors, spectral_filter(space.eigenvalues, lam, horizon, propagation, momentum)
    complement = float("nan")
    if sketch:
        complement = space.complement_mean(mean_eigenvalue * dim, dim)
        basis = torch.cat([basis, complement_sketch(space.vectors, sketch, generator)])
        outside = spectral_filter(torch.tensor([complement], device=gains.device), lam, horizon, propagation, momentum)
        gains = torch.cat([gains, outside.expand(sketch)])
    projected, finite = initial_perturbations(model, theta, gradient_batches, example_to_source, num_sources, basis=basis)
    coordinates = projected * (gains / num_examples)
    coordinates[~finite] = 0.0
    info = {
        "codec": "eigen", "rank": space.rank, "block": space.block, "eigen_method": space.method, "eigen_products": space.products,
        "power_iterations": power_iterations, "reach": space.reach(lam), "damping": lam, "mean_eigenvalue": mean_eigenvalue, "horizon": horizon, "propagation": propagation,
        "lambda_max": float(space.eigenvalues[0]), "curvature_products": space.products + probes,
        "sketch": sketch, "complement_mean": complement, **rule,
        "curvature_examples": sum(batch_size_of(b) for b in curvature_batches),
    }  # fmt: skip
    return EigenResponses(basis, space.eigenvalues, lam, coordinates), finite, info


def complement_sketch(vectors: Tensor, rows: int, generator: torch.Generator | None = None) -> Tensor:
    """``Tensor[rows, P]``: Gaussian rows (variance ``1 / rows``) projected off the span of ``vectors``
    (``Tensor[k, P]``, orthonormal rows), ``Pi (I - V^T V)``.

    For any ``a, b``: ``E[(Pi' a) . (Pi' b)] = a^T (I - V^T V) b`` (Johnson-Lindenstrauss), so a query's tangents
    along these rows, dotted with a source's coordinates along them, estimate the complement's part of the score
    without bias; the error shrinks as ``1 / sqrt(rows)`` relative to the two complement norms.
    """
    sketch = torch.randn(rows, vectors.shape[1], generator=generator, dtype=torch.float64) / rows**0.5
    basis = vectors.double().cpu()
    return (sketch - (sketch @ basis.T) @ basis).to(vectors.device, torch.float32)


@dataclass(frozen=True)
class EigenResponses:
    """Codec ``"eigen"``: responses ``r_b = basis^T coordinates[b]`` in the curvature's top-k eigenspace.

    Attributes:
        basis: ``Tensor[k + k', P]`` float32: the top-k eigenvectors of the curvature (orthonormal rows), then
            the ``k'`` rows of a random sketch of its complement (``sketch``; :func:`complement_sketch`), if any.
        eigenvalues: ``Tensor[k]`` float32 ``sigma``, descending (loss per squared parameter unit).
        damping: ``lam`` the coordinates were damped with.
        coordinates: ``Tensor[S, k + k']`` float32, ``diag(p) basis grad l_b / n`` (:func:`spectral_filter`; ``p(mu)``
            on the sketch rows).
    """

    basis: Tensor
    eigenvalues: Tensor
    damping: float
    coordinates: Tensor
    codec: ClassVar[str] = "eigen"

    @property
    def num_sources(self) -> int:
        return int(self.coordinates.shape[0])

    @property
    def rank(self) -> int:
        return int(self.basis.shape[0])

    def to(self, device: torch.device | str) -> EigenResponses:
        return EigenResponses(self.basis.to(device), self.eigenvalues.to(device), self.damping, self.coordinates.to(device))

    def to_dense(self) -> Tensor:
        """The same responses as ``Tensor[S, P]`` (``S x P`` floats: for tests and small stores)."""
        return self.coordinates @ self.basis

    def _check(self, readout: str) -> None:
        check_readout(readout)
        if readout != "linear":
            raise ValueError(
                f"readout={readout!r} is not available for responses stored with codec 'eigen' (they are kept as "
                f"{self.rank} coordinates per source, read out by forward-mode tangents, which is the 'linear' "
                "readout). Use readout='linear', or simulate with codec='dense' for the 'central' / 'step' readouts."
            )

    def scores(self, model: FunctionalModel, theta: Tensor, batch: Any, readout: str, chunk_size: int) -> Tensor:
        self._check(readout)
        return query_tangents(model, theta, self.basis, batch, chunk_size) @ self.coordinates.T

    def paired(self, model: FunctionalModel, theta: Tensor, batch: Any, sources: Tensor, readout: str) -> Tensor:
        self._check(readout)
        tangents = query_tangents(model, theta, self.basis, batch)
        return (tangents * self.coordinates[sources]).sum(dim=1)
