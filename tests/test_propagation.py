"""Propagation rules: the same recurrence end-of-training and online, and what each converges to."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_attr import AttributionCallback
from lightning_attr.curvature import Spectrum
from lightning_attr.simulation import PROPAGATIONS, OnlineSimulation, StepRule, propagate, resolve_step_rule


def _quadratic(dim: int = 12, seed: int = 0) -> tuple[torch.Tensor, StepRule]:
    """A fixed SPD curvature ``A: [P, P]`` with condition number ~1e3 and its spectrum."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    eigenvalues = torch.logspace(-3, 0, dim, dtype=torch.float64)
    return (basis * eigenvalues) @ basis.T, Spectrum(float(eigenvalues.max()), float(eigenvalues.mean()))


@pytest.mark.parametrize("propagation", PROPAGATIONS)
def test_online_steps_equal_end_of_training_propagation(propagation):
    """With one fixed curvature, K online steps of every live row give what `propagate` gives."""
    a, spectrum = _quadratic()
    a = a.float()
    rule = resolve_step_rule(spectrum, propagation=propagation)
    initial = torch.randn(3, a.shape[0], generator=torch.Generator().manual_seed(1))
    horizon = 25
    end = propagate(initial, [lambda v: v @ a] * horizon, rule)

    retired = {}
    sink = lambda sources, rows: retired.update(zip(sources.tolist(), rows))  # noqa: E731
    online = OnlineSimulation(torch.arange(3), 3, a.shape[0], horizon, rule, torch.device("cpu"), sink=sink, num_examples=1)
    online.live_sources, online.residual = torch.arange(3), initial.clone()
    online.solution, online.pending_members = torch.zeros_like(initial), torch.zeros(3, dtype=torch.long)  # all injected
    online.increment = initial * online.rule.coefficients(1)[1][0].item()
    online.iteration, online.remaining = torch.zeros(3, dtype=torch.long), torch.full((3,), horizon)
    for _ in range(horizon + 1):  # the last step only retires the rows
        online.step(lambda v: v @ a)
    assert online.products == 3 * horizon
    assert sorted(retired) == [0, 1, 2] and online.num_live == 0  # retired to the sink as their horizon ran out
    online.finish()
    torch.testing.assert_close(torch.stack([retired[s] for s in range(3)]), end, rtol=1e-5, atol=1e-5)


def test_accelerated_rules_reach_the_damped_inverse_in_sqrt_kappa_products():
    """kappa = (2 lambda_max + lam) / lam = 2001 here: Chebyshev and heavy-ball (momentum 1 - 2/sqrt(kappa)) are
    within 1% / 5% of (A + lam I)^{-1} g after 150 products, where the Neumann series has not resolved the small
    eigenvalues."""
    a, spectrum = _quadratic()
    g = torch.randn(4, a.shape[0], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    lam = 1e-3
    target = torch.linalg.solve(a + lam * torch.eye(a.shape[0], dtype=a.dtype), g.T).T
    errors = {}
    for propagation in PROPAGATIONS:
        rule = resolve_step_rule(spectrum, damping=lam, propagation=propagation, momentum=0.955)
        estimate = propagate(g, [lambda v: v @ a] * 150, rule)
        errors[propagation] = float((estimate - target).norm() / target.norm())
    # heavy-ball keeps Neumann's step (robust to minibatch curvature), so it is slower than Polyak's optimum
    assert errors["chebyshev"] < 0.01 and errors["heavy_ball"] < 0.05, errors
    assert errors["neumann"] > 0.3, errors


def test_chebyshev_residual_never_grows_on_its_interval():
    """The Chebyshev residual polynomial is bounded by 1 on [lam, 1/eta]: no transient growth."""
    a, spectrum = _quadratic()
    rule = resolve_step_rule(spectrum, damping=1e-3, propagation="chebyshev")
    g = torch.randn(1, a.shape[0], dtype=torch.float64)
    norms = []
    propagate(g, [lambda v: v @ a] * 60, rule, on_step=lambda k, x: norms.append(float((g - x @ a - 1e-3 * x).norm())))
    assert max(norms) <= float(g.norm()) * (1 + 1e-9)


def test_propagation_option_is_validated():
    with pytest.raises(MisconfigurationException, match="propagation must be 'auto', 'spectral' or one of"):
        AttributionCallback(propagation="cg", mode="online")
    with pytest.raises(MisconfigurationException, match="needs damping > 0"):
        AttributionCallback(propagation="chebyshev", damping=0.0, mode="online")
    with pytest.raises(ValueError, match="propagation must be one of"):
        resolve_step_rule(Spectrum(1.0, 0.1), propagation="momentum")
