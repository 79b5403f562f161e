"""The automatic damping rules (lightning_attr.damping): what each reads, against an explicit spectrum."""

from __future__ import annotations

import pytest
import torch
from conftest import fit, small_mlp

from lightning_attr import AttributionCallback, ResponseStore
from lightning_attr.damping import MEAN_FACTOR, RITZ_FACTOR, RITZ_INDEX, eigenspace_damping, resolve_damping
from lightning_attr.data import load_digits
from lightning_attr.evaluation.exact import ExactInfluence


def test_the_eigenspace_rule_its_floor_and_its_fallback_on_a_given_spectrum():
    sigma = torch.logspace(0, -4, 200)  # descending, sigma_64 = 10^(-4 * 63 / 199)
    s64 = float(sigma[RITZ_INDEX - 1])
    lam, record = eigenspace_damping("auto", 2.0, sigma, mean_eigenvalue=1e-6)
    assert lam == pytest.approx(2.0 * RITZ_FACTOR * s64) and record["damping_rule"] == f"{RITZ_FACTOR:g} x sigma_64"
    assert record["damping_rule_sigma"] == pytest.approx(s64) and record["damping_scale"] == 2.0
    # the floor: curvature in fewer than 64 directions puts sigma_64 below the mean eigenvalue
    lam, record = eigenspace_damping("auto", 2.0, sigma, mean_eigenvalue=1.0)
    assert lam == pytest.approx(2.0) and record["damping_rule"].startswith("trace(G)/P (above")
    # fewer than 64 pairs (rank < 64 or P < 64): the step rules' mean rule
    lam, record = eigenspace_damping("auto", 2.0, sigma[:10], mean_eigenvalue=0.5)
    assert lam == pytest.approx(2.0 * MEAN_FACTOR * 0.5) and "only 10 eigenvalues" in record["damping_rule"]
    assert eigenspace_damping(0.25, 2.0, sigma, 1.0) == (0.25, {"damping_rule": "given"})
    assert resolve_damping("auto", 1.0, 0.1) == pytest.approx(MEAN_FACTOR * 0.1)
    with pytest.raises(ValueError, match="damping resolved to -1.0"):
        eigenspace_damping(-1.0, 1.0, sigma, 1.0)


def test_the_callback_reads_sigma_64_and_the_trace_of_the_explicit_ggn(tmp_path):
    """A 64-32-10 MLP (P = 2,410) on 300 digits: its top eigenvalues hold the curvature (0.42 sigma_64 above the mean
    eigenvalue, which the flat directions of 32 hidden units pull down), so lam is the eigenspace rule's. The manifest's
    sigma_64 is the explicit GGN's (eigvalsh) to 1e-3, its trace(G)/P the Hutchinson estimate's (32 probes), lam their
    rule, and the responses match the explicit damped matrix at that lam."""
    from conftest import exact_influence, pearson

    digits = load_digits(n_train=300)
    x, y, xq, yq = digits.x_train, digits.y_train, digits.x_test[:16], digits.y_test[:16]
    torch.manual_seed(0)
    model = small_mlp(64, 10, hidden=32)
    cb = AttributionCallback(tmp_path / "r", rank=256, checkpoint_epochs=None)
    fit(model, x, y, [cb], epochs=10)
    rule = ResponseStore.load(cb.dirpath).checkpoint_info("final")["step_rule"]
    eigenvalues = torch.linalg.eigvalsh(ExactInfluence(model.net, x, y).ggn).flip(0)
    s64, mean = float(eigenvalues[RITZ_INDEX - 1]), float(eigenvalues.mean())
    assert RITZ_FACTOR * s64 > 1.5 * mean  # the rule, not its floor, sets lam here
    assert rule["damping_rule"] == f"{RITZ_FACTOR:g} x sigma_64" and rule["damping_rule_index"] == RITZ_INDEX
    assert rule["damping_rule_sigma"] == pytest.approx(s64, rel=1e-3)
    assert rule["mean_eigenvalue"] == pytest.approx(mean, rel=0.3)
    assert rule["damping"] == pytest.approx(RITZ_FACTOR * s64, rel=1e-3)
    exact = exact_influence(model, x, y, xq, yq, rule["damping"])
    assert pearson(model.attribute((xq, yq), responses=cb.dirpath), exact) >= 0.95


def test_rank_auto_reads_its_threshold_from_the_ritz_values_as_the_space_grows():
    """adaptive_eigenspace with the threshold as a rule of the Ritz values (the callback's eigenspace rule) stops where
    the same threshold given as the explicit spectrum's number stops, with the same pairs (explicit PSD matrix,
    P = 1,500, eigenvalues 10^0 .. 10^-3: the threshold 0.135 sigma_64 is sigma_674)."""
    from lightning_attr.spectral import DEFAULT_RESIDUAL_TOLERANCE, adaptive_eigenspace

    dim = 1500
    sigma = torch.logspace(0, -3, dim, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    g = ((q * sigma) @ q.T).float()

    def rule(values, mean_eigenvalue):
        return None if values.numel() < RITZ_INDEX else 0.5 * RITZ_FACTOR * float(values[RITZ_INDEX - 1])

    spaces = [
        adaptive_eigenspace(lambda v: v @ g, dim, threshold, max_products=dim, tolerance=DEFAULT_RESIDUAL_TOLERANCE,
                            generator=torch.Generator().manual_seed(1))
        for threshold in (rule, 0.5 * RITZ_FACTOR * float(sigma[RITZ_INDEX - 1]))
    ]  # fmt: skip
    assert spaces[0].stop == spaces[1].stop == "reached" and spaces[0].rank == spaces[1].rank > 256
    assert float(spaces[0].eigenvalues[-1]) <= 0.5 * RITZ_FACTOR * float(sigma[RITZ_INDEX - 1]) * (1 + DEFAULT_RESIDUAL_TOLERANCE)
    assert torch.allclose(spaces[0].eigenvalues, spaces[1].eigenvalues, rtol=1e-4)
