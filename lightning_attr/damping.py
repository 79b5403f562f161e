"""The automatic damping ``lam`` (``damping="auto"``): one rule per propagation, by what it has in hand.

- **Eigenspace rule** (``propagation="spectral"`` and codec ``"eigen"``: end mode's defaults):
  ``lam = damping_scale x max(RITZ_FACTOR x sigma_j, trace(G)/P)`` with ``sigma_j`` the ``j = RITZ_INDEX``-th largest
  eigenvalue of the full-data GGN, a Ritz value of the eigenspace those propagations find anyway (no extra curvature
  product), and ``trace(G)/P`` its mean eigenvalue (which the complement needs anyway: with ``rank="auto"`` from the first
  block of that eigenspace, :attr:`lightning_attr.spectral.Eigenspace.trace`, else 32 Hutchinson probes). The top of
  the spectrum holds the directions the data determine; parameters the loss barely curves along (a wider layer) add
  eigenvalues near 0 and leave ``sigma_j`` where it was, where they pull the mean eigenvalue ``trace(G)/P`` down (4x on a
  64-128-128-10 MLP against 64-64-10). Chosen by measurement (``benchmarks/damping_rules.py``,
  ``benchmarks/results/damping-rules.md``): the LDS of the damped target against ``lam`` on 13 settings (MLPs 1-5 hidden
  layers and 64-128 wide, logistic regression, two CNNs, SGD with and without momentum, Adam, 700-4,000 examples, 10-60
  epochs); ``RITZ_FACTOR`` is the multiplier with the least worst-case LDS loss over them. The floor at the mean
  eigenvalue is for models whose curvature lives in fewer than ``j`` directions (a 3-class CNN with ``P = 363`` on
  160 examples: ``sigma_64 = 1.6e-11``, ``4e-9 sigma_1``, where ``lam`` would sit in the null space); on the 13
  settings it binds on one (logistic regression, P = 650, where it is the best lam of the grid).
- **Mean rule** (the step rules: online mode, ``"neumann"`` / ``"chebyshev"`` / ``"heavy_ball"``, which estimate no
  eigenspace): ``lam = damping_scale x MEAN_FACTOR x trace(G)/P`` (Hutchinson). Online responses are flat in ``lam``
  (within 0.010 LDS over ``damping_scale`` 0.03-10): the finite horizon damps more than ``lam`` does.

An eigenspace with fewer than ``RITZ_INDEX`` pairs (a model with ``P < RITZ_INDEX``, or ``rank < RITZ_INDEX``) falls
back to the mean rule, and the record says so (:func:`eigenspace_damping`).
Units of ``lam``: those of the curvature (loss per squared parameter unit).
"""

from __future__ import annotations

import math
from typing import Union

from torch import Tensor

Damping = Union[str, float]
RITZ_INDEX = 64  # j of sigma_j
RITZ_FACTOR = 0.27  # lam = 0.27 sigma_64 at damping_scale 1: the least worst-case LDS loss over 13 settings (0.016)
MEAN_FACTOR = 3.0  # lam = 3 trace(G)/P at damping_scale 1 (the step rules)


def _checked(lam: float) -> float:
    if not math.isfinite(lam) or lam < 0:
        raise ValueError(f"damping resolved to {lam}; it must be finite and >= 0.")
    return lam


def resolve_damping(damping: Damping, damping_scale: float, mean_eigenvalue: float) -> float:
    """The mean rule: ``lam = damping_scale x MEAN_FACTOR x mean_eigenvalue`` (``trace(G)/P``) for ``"auto"``, else
    ``float(damping)``; raises unless it is finite and >= 0."""
    return _checked(damping_scale * MEAN_FACTOR * mean_eigenvalue if damping == "auto" else float(damping))


def ritz_damping(eigenvalues: Tensor, damping_scale: float, mean_eigenvalue: float) -> float | None:
    """The eigenspace rule's ``lam = damping_scale x max(RITZ_FACTOR x sigma_j, mean_eigenvalue)`` from ``eigenvalues:
    Tensor[k]`` (descending; the top-k of ``G``) and ``trace(G)/P``, or None when ``k < RITZ_INDEX``."""
    if eigenvalues.numel() < RITZ_INDEX:
        return None
    return _checked(damping_scale * max(RITZ_FACTOR * float(eigenvalues[RITZ_INDEX - 1]), mean_eigenvalue))


def eigenspace_damping(damping: Damping, damping_scale: float, eigenvalues: Tensor, mean_eigenvalue: float) -> tuple[float, dict]:
    """``lam`` for a propagation that found the top-k eigenvalues of ``G`` (``Tensor[k]``, descending), and the record
    of how (JSON-able, for the store's manifest): the eigenspace rule, the mean rule when ``k < RITZ_INDEX``, or the
    user's float."""
    if damping != "auto":
        return resolve_damping(damping, damping_scale, mean_eigenvalue), {"damping_rule": "given"}
    lam = ritz_damping(eigenvalues, damping_scale, mean_eigenvalue)
    if lam is not None:
        sigma = float(eigenvalues[RITZ_INDEX - 1])
        floor = mean_eigenvalue >= RITZ_FACTOR * sigma
        return lam, {
            "damping_rule": f"trace(G)/P (above {RITZ_FACTOR:g} x sigma_{RITZ_INDEX})" if floor else f"{RITZ_FACTOR:g} x sigma_{RITZ_INDEX}",
            "damping_scale": damping_scale, "damping_rule_sigma": sigma, "damping_rule_index": RITZ_INDEX,
            "damping_rule_factor": RITZ_FACTOR,
        }  # fmt: skip
    lam = resolve_damping(damping, damping_scale, mean_eigenvalue)
    return lam, {
        "damping_rule": f"{MEAN_FACTOR:g} x trace(G)/P (only {eigenvalues.numel()} eigenvalues, fewer than {RITZ_INDEX})",
        "damping_scale": damping_scale, "damping_rule_factor": MEAN_FACTOR,
    }  # fmt: skip
