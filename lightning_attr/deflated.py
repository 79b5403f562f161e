"""The damped inverse exact in the top-k eigenspace of the curvature, the rest by the damping.

``propagation="spectral"`` (end mode). With the top-k eigenpairs ``(sigma_j, v_j)`` of the full-data GGN
``G`` (rows of ``V: Tensor[k, P]``, :func:`lightning_attr.spectral.top_eigenspace`) and ``mu``, the mean
eigenvalue of ``G`` outside their span (``(trace(G) - sum sigma) / (P - k)``),

    (G + lam I)^{-1} g  ~  g / (mu + lam)  +  V^T diag(1/(sigma + lam) - 1/(mu + lam)) V g

is exact inside the span of ``V`` and exact everywhere at ``k = P``. A direction outside it with curvature
``s <= sigma_k`` gets ``1/(mu + lam)`` instead of ``1/(s + lam)``: the approximation is as good as
``sigma_k / lam`` is small (measured on the bench's explicit GGNs at ``lam = 3 trace(G)/P``: Pearson to the
exact target 0.994 where ``sigma_k / lam = 0.63``, 0.88 where it is 2.2; docs/propagation.md).

Unlike the step rules of :mod:`lightning_attr.simulation`, the cost does not grow with the number of
sources: ``O(k)`` full-data curvature products for the eigenspace, then one gradient per source and two
``[C, P] x [P, k]`` products per block. Pure ``torch``: no Lightning here.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from lightning_attr.spectral import Eigenspace

COMPLEMENT_WARNING_RATIO = 1.0  # warn when sigma_k / lam exceeds this: the eigenspace stops short of the damping
AUTO_RANK_RATIO = 0.5  # rank="auto" grows the eigenspace until sigma_k <= this x lam (chosen by measurement, see below)


@dataclass(frozen=True)
class DeflatedInverse:
    """``(G + lam I)^{-1}``, exact on ``eigenspace``, ``1/(mu + lam)`` on its complement.

    Attributes:
        eigenspace: the top-k eigenpairs of ``G`` (``vectors: Tensor[k, P]``, orthonormal rows).
        damping: ``lam`` (loss per squared parameter unit), > 0.
        complement: ``mu >= 0``, the mean eigenvalue of ``G`` outside the eigenspace (same units).
    """

    eigenspace: Eigenspace
    damping: float
    complement: float = 0.0

    def __post_init__(self) -> None:
        if not self.damping > 0:
            raise ValueError(
                f"propagation='spectral' needs damping > 0 (it inverts G + damping on the complement of the top "
                f"eigenspace, where G is taken as {self.complement}), got {self.damping}; pass damping='auto' or a positive float."
            )
        if not self.complement >= 0:
            raise ValueError(f"complement (the mean eigenvalue outside the eigenspace) must be >= 0, got {self.complement}.")

    @classmethod
    def from_trace(cls, eigenspace: Eigenspace, damping: float, trace: float, dim: int) -> DeflatedInverse:
        """With ``mu`` from :meth:`Eigenspace.complement_mean` (the mean eigenvalue outside the space, at most ``sigma_k``)."""
        return cls(eigenspace, damping, eigenspace.complement_mean(trace, dim))

    @property
    def complement_ratio(self) -> float:
        """``sigma_k / lam``: the largest curvature the complement may hold, relative to the damping."""
        return self.eigenspace.reach(self.damping)

    def apply(self, gradients: Tensor) -> Tensor:
        """``Tensor[C, P]`` -> ``Tensor[C, P]``: the rows of ``gradients`` times the approximate inverse
        (units: parameter per unit of the gradient's loss)."""
        basis, sigma = self.eigenspace.vectors, self.eigenspace.eigenvalues.to(gradients.device)
        outside = 1.0 / (self.complement + self.damping)
        coordinates = gradients @ basis.T  # [C, k]
        coordinates.mul_(1.0 / (sigma + self.damping) - outside)
        return (gradients * outside).addmm_(coordinates, basis)

    def to_json(self) -> dict:
        e = self.eigenspace
        return {
            "propagation": "spectral", "damping": self.damping, "rank": e.rank, "complement_mean_eigenvalue": self.complement,
            "lambda_max": float(e.eigenvalues[0]), "sigma_k": float(e.eigenvalues[-1]), "complement_ratio": self.complement_ratio,
            "eigenspace_products": e.products, "eigenspace_stop": e.stop,
        }  # fmt: skip
