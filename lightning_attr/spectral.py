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

The eigenspace comes from a randomized range finder (Halko, Martinsson & Tropp 2011, Alg. 4.4 and
5.3): a Gaussian block of ``2k`` vectors, a few power iterations with re-orthonormalization, and
Rayleigh-Ritz on the block. Curvature products are over the whole training set (or a large
subsample), not minibatches: minibatch subspace iteration converged poorly (METHOD.md).

Pure ``torch`` / ``torch.func``: no Lightning here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.func import jvp, vmap

from lightning_attr.curvature import CurvatureOperator, batch_size_of, curvature_operator, estimate_spectrum
from lightning_attr.functional import FunctionalModel
from lightning_attr.readout import check_readout
from lightning_attr.simulation import DEFAULT_MOMENTUM, STEP_SAFETY, Damping, StepRule, initial_perturbations, propagate, resolve_damping


@dataclass(frozen=True)
class Eigenspace:
    """Top eigenpairs of a PSD curvature ``G`` (units of ``sigma``: loss per squared parameter unit).

    Attributes:
        eigenvalues: ``Tensor[k]`` float32, descending, clamped at 0.
        vectors: ``Tensor[k, P]`` float32, orthonormal rows (``vectors[j]`` goes with ``eigenvalues[j]``).
        products: curvature-vector products spent finding them.
    """

    eigenvalues: Tensor
    vectors: Tensor
    products: int

    @property
    def rank(self) -> int:
        return int(self.eigenvalues.numel())


def top_eigenspace(
    operator: CurvatureOperator,
    dim: int,
    rank: int,
    *,
    block: int | None = None,
    power_iterations: int = 3,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Eigenspace:
    """The ``rank`` largest eigenpairs of the PSD operator ``G`` (``operator: Tensor[C, P] -> G V: Tensor[C, P]``).

    Randomized range finder: ``Y = G^(q+1) Omega`` for a Gaussian ``Omega`` of ``block`` columns
    (default ``min(2 rank, P)``), orthonormalized after every product, then Rayleigh-Ritz:
    the eigenpairs of ``Q^T G Q`` (``block x block``, in float64). Costs ``block * (q + 2)`` products.
    With ``block = P`` it is exact (up to float32 rounding of the products).

    Draws only from ``generator`` (never from the global RNG).
    """
    if not 1 <= rank <= dim:
        raise ValueError(f"rank must be in [1, P={dim}], got {rank}.")
    width = min(dim, block if block is not None else 2 * rank)
    if width < rank:
        raise ValueError(f"block ({width}) must be at least rank ({rank}).")
    if power_iterations < 0:
        raise ValueError(f"power_iterations must be >= 0, got {power_iterations}.")
    omega = torch.randn(width, dim, generator=generator).to(device)
    basis = _orthonormal_rows(operator(omega))
    for _ in range(power_iterations):
        basis = _orthonormal_rows(operator(basis))
    projected = operator(basis)  # G Q, rows
    small = (projected.double() @ basis.double().T)  # Q^T G Q, [width, width]
    small = (small + small.T) / 2
    values, vectors = torch.linalg.eigh(small)
    top = values.argsort(descending=True)[:rank]
    ritz = (vectors[:, top].T @ basis.double()).float()  # [rank, P], orthonormal: Q times an orthogonal matrix
    return Eigenspace(values[top].clamp_min(0).float(), ritz.contiguous(), eigenspace_products(dim, rank, block=block, power_iterations=power_iterations))


def eigenspace_products(dim: int, rank: int, *, block: int | None = None, power_iterations: int = 3) -> int:
    """Curvature-vector products :func:`top_eigenspace` spends with these arguments (for progress bars)."""
    return min(dim, block if block is not None else 2 * rank) * (power_iterations + 2)


def _orthonormal_rows(rows: Tensor) -> Tensor:
    """An orthonormal basis (rows) of the row space of ``rows: Tensor[C, P]``, ``C <= P``, same order."""
    q, r = torch.linalg.qr(rows.T.double())
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1
    return (q * signs).T.float().contiguous()


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
    power_iterations: int = 3,
    chunk_size: int = 2048,
    generator: torch.Generator | None = None,
) -> tuple[EigenResponses, Tensor, dict]:
    """Responses of every source in codec ``"eigen"``, at ``theta``, with the GGN of ``curvature_batches``.

    Args:
        gradient_batches: ``(data, example index LongTensor[B])`` covering the training set once.
        curvature_batches: batches (no index) whose pooled GGN is ``G``: the whole training set, or a
            large subsample (each batch weighs by its size).
        num_examples: ``n`` of the ``1/n`` (the training set's size).
        rank: ``k``, eigenpairs kept (at most ``P``).
        damping: ``"auto"`` = ``damping_scale * trace(G)/P`` (32 Hutchinson probes of ``G``), or a float.
        horizon, propagation, momentum: the spectral filter (:func:`spectral_filter`): ``horizon=None`` = the
            damped inverse, ``K`` = what ``K`` steps of the dense simulation's rule make of each direction.
        block, power_iterations: of :func:`top_eigenspace`.

    Returns:
        ``(block, finite: BoolTensor[S], info)``; ``info`` is JSON-able (damping, products, rank, ...).
        ``S x P`` is never held: each batch's source gradients are projected on the basis at once.
    """
    dim = theta.numel()
    operator = curvature_operator("ggn", model, theta, curvature_batches, chunk_size)
    probes = 32 if damping == "auto" else 0
    mean_eigenvalue = float("nan")
    if probes:
        mean_eigenvalue = estimate_spectrum(operator, dim, probes=probes, power_iterations=0, generator=generator, device=theta.device).mean_eigenvalue
    lam = resolve_damping(damping, damping_scale, mean_eigenvalue)
    space = top_eigenspace(
        operator, dim, min(rank, dim), block=block, power_iterations=power_iterations, generator=generator, device=theta.device
    )
    projected, finite = initial_perturbations(
        model, theta, gradient_batches, example_to_source, num_sources, basis=space.vectors
    )
    coordinates = projected * (spectral_filter(space.eigenvalues, lam, horizon, propagation, momentum) / num_examples)
    coordinates[~finite] = 0.0
    info = {
        "codec": "eigen", "rank": space.rank, "block": min(dim, block or 2 * space.rank),
        "power_iterations": power_iterations, "damping": lam, "mean_eigenvalue": mean_eigenvalue, "horizon": horizon, "propagation": propagation,
        "lambda_max": float(space.eigenvalues[0]), "curvature_products": space.products + probes,
        "curvature_examples": sum(batch_size_of(b) for b in curvature_batches),
    }  # fmt: skip
    return EigenResponses(space.vectors, space.eigenvalues, lam, coordinates), finite, info


@dataclass(frozen=True)
class EigenResponses:
    """Codec ``"eigen"``: responses ``r_b = basis^T coordinates[b]`` in the curvature's top-k eigenspace.

    Attributes:
        basis: ``Tensor[k, P]`` float32, orthonormal rows: the top-k eigenvectors of the curvature.
        eigenvalues: ``Tensor[k]`` float32 ``sigma``, descending (loss per squared parameter unit).
        damping: ``lam`` the coordinates were damped with.
        coordinates: ``Tensor[S, k]`` float32, ``diag(p(sigma)) basis grad l_b / n`` (:func:`spectral_filter`).
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
