"""The top-k eigenspace finder (``top_eigenspace``): block Krylov and subspace iteration against
``torch.linalg.eigh`` on explicit PSD matrices (a known spectrum, a tiny MLP's GGN), the product count each
claims, the warm start, the residuals it reports, and its errors; ``adaptive_eigenspace`` (``rank="auto"``):
where it stops, against the fixed rank it stops at."""

from __future__ import annotations

import pytest
import torch
from conftest import blobs, fit, small_mlp

from lightning_attr import spectral
from lightning_attr.models import CNN, Classifier

from lightning_attr.curvature import curvature_operator
from lightning_attr.deflated import DeflatedInverse
from lightning_attr.functional import functional_view
from lightning_attr.spectral import Eigenspace, adaptive_eigenspace, eigenspace_products, product_cap, supported_rank, top_eigenspace


class CountingOperator:
    """``V -> V G`` for an explicit symmetric ``G``, counting the vectors it was applied to."""

    def __init__(self, matrix: torch.Tensor) -> None:
        self.matrix, self.products = matrix.float(), 0

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        assert rows.dim() == 2 and rows.dtype == torch.float32
        self.products += rows.shape[0]
        return rows @ self.matrix


def known_spectrum(dim: int = 240, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``G = U diag(lambda) U^T`` float64: a decaying top (1 to 0.05 over 30 values) above a flat-ish tail, as
    a trained network's GGN (METHOD.md); returns ``(G, lambda descending, U columns)``."""
    g = torch.Generator().manual_seed(seed)
    values = torch.cat([torch.logspace(0, -1.3, 30, dtype=torch.float64), 0.02 * torch.rand(dim - 30, generator=g, dtype=torch.float64)])
    values = values.sort(descending=True).values
    vectors, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    return (vectors * values) @ vectors.T, values, vectors


def subspace_cosine(found: torch.Tensor, true: torch.Tensor) -> float:
    """Smallest cosine of the principal angles between the rows of ``found`` and the columns of ``true``."""
    return float(torch.linalg.svdvals(true.T @ found.double().T).min())


@pytest.mark.parametrize("method", ["krylov", "subspace"])
def test_finder_matches_eigh_on_a_known_spectrum_with_the_products_it_claims(method):
    matrix, values, vectors = known_spectrum()
    operator = CountingOperator(matrix)
    rank = 20
    # subspace: its defaults (block 2k, q = 3: 10k products); krylov: 4k products in blocks of 10
    options = {"block": 10, "products": 4 * rank} if method == "krylov" else {}
    found = top_eigenspace(operator, 240, rank, method=method, generator=torch.Generator().manual_seed(1), **options)
    assert found.products == operator.products == (4 * rank if method == "krylov" else 10 * rank)
    assert found.products == eigenspace_products(240, rank, method=method, **options)
    assert torch.allclose(found.eigenvalues.double(), values[:rank], rtol=1e-4)
    assert subspace_cosine(found.vectors, vectors[:, :rank]) > 0.999
    assert torch.allclose(found.vectors @ found.vectors.T, torch.eye(rank), atol=1e-5)
    if method == "krylov":
        true_residuals = torch.linalg.vector_norm(found.vectors.double() @ matrix - found.eigenvalues.double()[:, None] * found.vectors.double(), dim=1)
        assert torch.allclose(found.residuals.double(), true_residuals, atol=1e-6), (found.residuals, true_residuals)
    else:
        assert bool(found.residuals.isnan().all())  # subspace iteration does not measure them


def test_krylov_beats_subspace_iteration_for_the_same_products():
    """Same budget (block 2k, q = 0: 4k products): the Krylov space contains more than the last block."""
    matrix, values, _ = known_spectrum(seed=3)
    rank = 16
    subspace = top_eigenspace(CountingOperator(matrix), 240, rank, method="subspace", power_iterations=0, generator=torch.Generator().manual_seed(0))
    krylov = top_eigenspace(CountingOperator(matrix), 240, rank, block=8, products=subspace.products, generator=torch.Generator().manual_seed(0))
    assert krylov.products == subspace.products == 4 * rank
    # power_iterations alone buys method="krylov" the budget of method="subspace" with the same arguments
    assert top_eigenspace(CountingOperator(matrix), 240, rank, power_iterations=0).products == subspace.products
    error = lambda space: float(((space.eigenvalues.double() - values[:rank]).abs() / values[:rank]).max())  # noqa: E731
    assert error(krylov) < 1e-6 < 1e-3 < error(subspace), (error(krylov), error(subspace))


@pytest.mark.parametrize("method", ["krylov", "subspace"])
def test_finder_on_a_tiny_mlp_ggn_matches_eigh(method):
    x, y = blobs(n=160, d=6, classes=3)
    torch.manual_seed(0)  # the starting weights, whatever ran before (with those of another order rtol=1e-4 failed)
    model = small_mlp(6, 3)
    fit(model, x, y, epochs=8)
    with functional_view(model) as (fmodel, theta):
        dim = theta.numel()
        ggn = curvature_operator("ggn", fmodel, theta, [(x, y)])
        calls = []
        operator = lambda rows: calls.append(rows.shape[0]) or ggn(rows)  # noqa: E731
        dense = ggn(torch.eye(dim)).double()
        values, vectors = torch.linalg.eigh((dense + dense.T) / 2)
        values, vectors = values.flip(0), vectors.flip(1)
        for rank in (5, 12):
            calls.clear()
            options = {"products": 48} if method == "krylov" else {}  # subspace: block 2k, q = 3
            found = top_eigenspace(operator, dim, rank, method=method, generator=torch.Generator().manual_seed(1), **options)
            assert found.products == sum(calls) == (48 if method == "krylov" else 2 * rank * 5)
            assert torch.allclose(found.eigenvalues.double(), values[:rank], rtol=1e-4, atol=1e-6 * values[0])
            # principal angles between the found and the true top-k subspaces: cosines all ~1
            assert subspace_cosine(found.vectors, vectors[:, :rank]) > 0.9999
            assert torch.allclose(found.vectors @ found.vectors.T, torch.eye(rank), atol=1e-5)


def test_a_cnn_ggn_with_a_large_null_space_keeps_the_basis_orthonormal():
    """A small CNN (P = 363) whose GGN has rank about 50: float32 products of its null space are rounding noise,
    which must not enter the basis (such directions are replaced by random ones; test_exactness.py's CNN, whose
    end-mode fit ran into it, had rows with cosines of 0.7 and Pearson -0.33 to the exact target before)."""
    x, y = blobs(n=160, d=16, classes=3)
    model = Classifier(CNN([16], 3, (4, 8)), lr=0.1, momentum=0.9, weight_decay=1e-3)
    fit(model, x, y, epochs=15)
    with functional_view(model) as (fmodel, theta):
        dim = theta.numel()
        operator = curvature_operator("ggn", fmodel, theta, [(x, y)])
        dense = operator(torch.eye(dim)).double()
        values = torch.linalg.eigvalsh((dense + dense.T) / 2).flip(0)
        found = top_eigenspace(operator, dim, 256, generator=torch.Generator().manual_seed(0))
    assert found.products == dim == 363  # 512 products would be more than P: the space is all of R^P
    assert torch.allclose(found.vectors @ found.vectors.T, torch.eye(256), atol=1e-5)
    assert torch.allclose(found.eigenvalues.double(), values[:256].clamp_min(0), rtol=1e-3, atol=1e-4 * float(values[0]))


def test_a_space_as_large_as_p_is_exact_and_stops_there():
    matrix, values, _ = known_spectrum(dim=50)
    operator = CountingOperator(matrix)
    found = top_eigenspace(operator, 50, 50, block=16, products=10**6)
    assert found.products == operator.products == 50  # blocks of 16, 16, 16, then the 2 directions left
    assert eigenspace_products(50, 50, block=16, products=10**6) == 50
    assert eigenspace_products(5000, 512) == 1024  # the default: 2 products per pair,
    assert eigenspace_products(5000, 10) == 266  # and at least k + 256
    assert eigenspace_products(50, 40) == 50  # and never more than P
    assert torch.allclose(found.eigenvalues.double(), values, rtol=1e-5, atol=1e-7)
    assert float(found.residuals.max()) < 1e-5


@pytest.mark.parametrize(("rank", "products"), [(12, 48), (30, 60), (30, 52)])
def test_a_rank_deficient_operator_gives_zeros_not_nans(rank, products):
    """A GGN has rank at most n x C: directions past it come out with eigenvalue 0, orthonormal and finite
    (the Krylov space runs into the null space after 8 directions and goes on with random ones)."""
    g = torch.Generator().manual_seed(0)
    factor = torch.randn(8, 60, generator=g, dtype=torch.float64)
    matrix = factor.T @ factor / 8  # rank 8
    found = top_eigenspace(CountingOperator(matrix), 60, rank, block=4, products=products, generator=g)
    exact = torch.linalg.eigvalsh(matrix).flip(0)
    assert bool(torch.isfinite(found.vectors).all()) and torch.allclose(found.vectors @ found.vectors.T, torch.eye(rank), atol=1e-5)
    assert torch.allclose(found.eigenvalues.double()[:8], exact[:8], rtol=1e-5)
    assert float(found.eigenvalues[8:].max()) < 1e-5 * float(exact[0])


def test_warm_start_from_the_exact_basis_needs_fewer_products():
    matrix, values, vectors = known_spectrum(seed=5)
    rank = 20

    def error(initial, products: int) -> float:
        """Max relative error of the top-k Ritz values after ``products`` (blocks of 8 after the first)."""
        found = top_eigenspace(CountingOperator(matrix), 240, rank, block=8, products=products, initial=initial, generator=torch.Generator().manual_seed(0))
        assert found.products == products
        return float(((found.eigenvalues.double() - values[:rank]).abs() / values[:rank]).max())

    cold = next(m for m in range(rank, 240, 8) if error(None, m) < 1e-6)
    exact_start = vectors[:, :rank].T.float()
    assert error(exact_start, rank) < 1e-6 and rank < cold  # the exact basis is an invariant space: its own block suffices
    # a perturbed basis (rows moved by about 0.15 of their norm): after the same 44 products, far closer than a cold
    # start (measured 7e-5 against 4e-3)
    noisy = exact_start + 0.01 * torch.randn(exact_start.shape, generator=torch.Generator().manual_seed(2))
    assert error(noisy, 44) < 0.1 * error(None, 44)


def test_reach_compares_the_kth_eigenvalue_with_the_damping():
    matrix, values, _ = known_spectrum()
    found = top_eigenspace(CountingOperator(matrix), 240, 10, products=60, generator=torch.Generator().manual_seed(0))
    assert found.reach(0.5) == pytest.approx(float(values[9]) / 0.5, rel=1e-4)
    with pytest.raises(ValueError, match="damping must be > 0"):
        found.reach(0.0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"method": "lanczos"}, "method must be one of"),
        ({"block": 0}, "block must be a positive number"),
        ({"power_iterations": -1}, "power_iterations must be >= 0"),
        ({"products": 4}, "cannot find 5 eigenpairs"),
        ({"products": 6, "block": 8}, r"the first block holds 8\); give products >= 8"),
        ({"products": 40, "power_iterations": 2}, "not both"),
        ({"initial": torch.zeros(3, 7)}, r"initial must be a basis Tensor\[r, P=30\]"),
        ({"initial": torch.full((3, 30), float("nan"))}, "NaN or infinite"),
        ({"method": "subspace", "initial": torch.eye(30)[:3]}, "options of method='krylov'"),
        ({"method": "subspace", "block": 2}, r"block \(2\) must be at least rank"),
    ],
)
def test_bad_arguments_are_refused_with_the_fix(options, message):
    operator = CountingOperator(torch.eye(30))
    with pytest.raises(ValueError, match=message):
        top_eigenspace(operator, 30, 5, **options)
    assert operator.products == 0  # refused before any product
    with pytest.raises(ValueError, match="rank must be in"):
        top_eigenspace(operator, 30, 31)


def slow_decay(dim: int = 800) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``G`` float64 with eigenvalues ``logspace(0, -4, dim)`` (no gap to stop at) in a random basis: ``(G, lambda, U)``."""
    values = torch.logspace(0, -4, dim, dtype=torch.float64)
    vectors, _ = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    return (vectors * values) @ vectors.T, values, vectors


def test_auto_rank_grows_until_the_threshold_and_equals_the_fixed_rank_it_stops_at():
    """sigma_300 is the first eigenvalue <= the threshold: the space grows past the default 512 products (rank 256)
    in blocks of 32 (growth=0), every product kept, and stops at the first size whose supported rank reaches it (608
    products, rank 304); a fixed rank=304 (its default budget: 608 products) finds the same pairs."""
    matrix, values, vectors = slow_decay()
    operator = CountingOperator(matrix)
    threshold = float(values[299])
    found = adaptive_eigenspace(operator, 800, threshold, max_products=800, growth=0.0, generator=torch.Generator().manual_seed(0))
    assert found.stop == "reached" and found.products == operator.products == 608
    assert found.rank == supported_rank(608) == 304
    assert float(found.eigenvalues[-1]) <= threshold < float(found.eigenvalues[298])
    assert torch.allclose(found.eigenvalues.double(), values[:304], rtol=1e-3)
    fixed = top_eigenspace(CountingOperator(matrix), 800, 304, generator=torch.Generator().manual_seed(0))
    assert fixed.products == 608 and fixed.stop == "budget"
    assert torch.allclose(found.eigenvalues, fixed.eigenvalues, rtol=2e-3)  # both within 1e-3 of eigh's
    # the responses they give (the deflated damped inverse at lam = 2 x threshold, as rank="auto" aims at): equal
    grads = torch.randn(16, 800, generator=torch.Generator().manual_seed(4))
    auto, fixed_rank = (DeflatedInverse(space, 2 * threshold).apply(grads) for space in (found, fixed))
    assert float((auto - fixed_rank).norm() / fixed_rank.norm()) < 1e-3
    assert subspace_cosine(found.vectors[:250], vectors[:, :250]) > 0.999


def test_auto_rank_keeps_the_least_rank_stops_at_the_cap_and_at_the_whole_space():
    matrix, values, _ = slow_decay()
    # the threshold above every eigenvalue: the least rank (256) at its budget
    easy = adaptive_eigenspace(CountingOperator(matrix), 800, 2.0, max_products=800, generator=torch.Generator().manual_seed(0))
    assert (easy.stop, easy.rank, easy.products) == ("reached", 256, 512)
    # sigma_400 is not reached within 544 products: the cap, its supported rank, sigma_k above the threshold
    capped = adaptive_eigenspace(CountingOperator(matrix), 800, float(values[399]), max_products=544, growth=0.0, generator=torch.Generator().manual_seed(0))
    assert (capped.stop, capped.rank, capped.products) == ("cap", 272, 544)
    assert float(capped.eigenvalues[-1]) > float(values[399])
    # P = 300 < 512: the space becomes all of R^P, every pair kept, exact
    small, small_values, _ = slow_decay(300)
    whole = adaptive_eigenspace(CountingOperator(small), 300, 0.0, max_products=300, generator=torch.Generator().manual_seed(0))
    assert (whole.stop, whole.rank, whole.products) == ("whole space", 300, 300)
    assert torch.allclose(whole.eigenvalues.double(), small_values, rtol=1e-3, atol=1e-6)


def test_auto_rank_cap_bounds_the_finders_memory():
    """20 m P bytes at most: m = memory / (20 P), never below the default rank's 512 products nor above P."""
    assert product_cap(15_210, 1024) == 1024 * 2**20 // (20 * 15_210) == 3529
    assert product_cap(10**7, 1024) == 512  # rank=256 spends 512 whatever the memory
    assert product_cap(300, 1024) == 300
    assert supported_rank(512) == 256 and supported_rank(300) == 44 and supported_rank(200) == 0 and supported_rank(2000) == 1000
    with pytest.raises(ValueError, match="max_products=400 cannot reach the least rank 256"):
        adaptive_eigenspace(CountingOperator(torch.eye(600)), 600, 0.1, max_products=400)
    with pytest.raises(ValueError, match="threshold must be"):
        adaptive_eigenspace(CountingOperator(torch.eye(600)), 600, -1.0, max_products=600)


def test_auto_rank_with_growing_blocks_stops_in_fewer_steps_at_the_same_accuracy():
    """growth=1/8 (the default): blocks of m/8 vectors in whole blocks of 32 past 512 (the default budget of rank 256 is unchanged), so fewer
    Rayleigh-Ritz steps; it still stops at sigma_k <= threshold and matches eigh as the fixed-block run does."""

    class Steps(CountingOperator):
        def __call__(self, rows):
            self.steps = getattr(self, "steps", 0) + 1
            return super().__call__(rows)

    matrix, values, _ = slow_decay()
    threshold = float(values[349])
    plain, grown = Steps(matrix), Steps(matrix)
    fixed_blocks = adaptive_eigenspace(plain, 800, threshold, max_products=800, growth=0.0, generator=torch.Generator().manual_seed(0))
    growing = adaptive_eigenspace(grown, 800, threshold, max_products=800, growth=0.125, generator=torch.Generator().manual_seed(0))
    assert fixed_blocks.stop == growing.stop == "reached" and growing.rank >= 350 and fixed_blocks.rank >= 350
    assert grown.steps < plain.steps  # 512 in 16 blocks of 32, then blocks of 64 up to 768, then 96, ...
    assert growing.products % 32 == 0
    assert growing.products == grown.products and growing.rank == supported_rank(growing.products)
    assert float(growing.eigenvalues[-1]) <= threshold
    # wider blocks, lower Krylov degree for the same products: the last Ritz values converge less (measured: within
    # 1.5% here, against 0.1% in blocks of 32), the top as well
    assert torch.allclose(growing.eigenvalues.double(), values[: growing.rank], rtol=3e-2)
    assert torch.allclose(growing.eigenvalues[:250].double(), values[:250], rtol=1e-3)


def test_a_space_grown_in_doubling_buffers_equals_one_allocated_whole(monkeypatch):
    """Off the CPU the finder's buffers start at one block and double (CUDA allocates an empty tensor's every row at once);
    forced here on the CPU: the same products, eigenvalues and vectors, to the bit, as the buffer of the whole budget."""
    matrix, _, _ = slow_decay()
    run = lambda: adaptive_eigenspace(  # noqa: E731
        CountingOperator(matrix), 800, 0.05, max_products=800, generator=torch.Generator().manual_seed(0)
    )
    whole = run()
    allocated = []

    def first_block_only(capacity, first, device):
        allocated.append((capacity, first))
        return first

    grown_rows = []
    real_grown, real_rows = spectral._grown, spectral._space_rows
    monkeypatch.setattr(spectral, "_space_rows", first_block_only)
    monkeypatch.setattr(spectral, "_grown", lambda buffer, rows, capacity: grown_rows.append(rows) or real_grown(buffer, rows, capacity))
    grown = run()
    assert allocated == [(800, 32)] and len(grown_rows) >= 2 * 3  # both buffers, 32 -> 64 -> 128 -> ...
    assert grown.products == whole.products and grown.rank == whole.rank and grown.stop == whole.stop
    assert torch.equal(grown.eigenvalues, whole.eigenvalues) and torch.equal(grown.vectors, whole.vectors)
    assert real_rows(800, 32, torch.device("cpu")) == 800
    assert real_rows(800, 32, torch.device("meta")) == 256 and real_rows(100, 32, torch.device("meta")) == 100


def _tiny_mlp_ggns() -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit GGNs (float64, ``[P, P]``, P = 163) of a 6-16-3 MLP on 160 blobs after 3 and after 10 epochs: two
    checkpoints of one fit, as ``checkpoint_epochs`` takes them."""
    x, y = blobs(n=160, d=6, classes=3)
    torch.manual_seed(0)
    model = small_mlp(6, 3)
    dense = []
    for epochs in (3, 7):
        fit(model, x, y, epochs=epochs)
        with functional_view(model) as (fmodel, theta):
            g = curvature_operator("ggn", fmodel, theta, [(x, y)])(torch.eye(theta.numel())).double()
        dense.append((g + g.T) / 2)
    return dense[0], dense[1]


def _deflated_error(space, matrix: torch.Tensor, damping: float) -> float:
    """Relative error of the deflated damped inverse of ``space`` (``mu`` from the exact trace) against
    ``(G + lam)^{-1}`` on 32 Gaussian vectors."""
    dim = matrix.shape[0]
    grads = torch.randn(32, dim, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    exact = torch.linalg.solve(matrix + damping * torch.eye(dim, dtype=torch.float64), grads.T).T
    found = DeflatedInverse.from_trace(space, damping, float(matrix.trace()), dim).apply(grads.float()).double()
    return float((found - exact).norm() / exact.norm())


def test_auto_rank_warm_started_from_the_previous_checkpoint_equals_a_cold_start():
    """rank="auto" at a later checkpoint of a tiny MLP: started from the earlier checkpoint's eigenvectors (and a Gaussian
    block), it stops by the Ritz residuals of the NEW curvature at sigma_k <= threshold, and its deflated damped inverse
    matches the explicit matrix as closely as a cold start does. Not in fewer products: 124 against the cold start's 96
    (before the finder kept its residual rows whole, the cold start took 144)."""
    early, late = _tiny_mlp_ggns()
    dim = late.shape[0]
    lam = 0.01 * float(late.trace()) / dim
    values, vectors = torch.linalg.eigh(late)
    values, vectors = values.flip(0), vectors.flip(1)
    options = {"max_products": dim, "min_rank": 8, "block": 8, "tolerance": 0.1}

    def find(matrix, initial=None, threshold=0.5 * lam):
        return adaptive_eigenspace(CountingOperator(matrix), dim, threshold, initial=initial, generator=torch.Generator().manual_seed(0), **options)

    first = find(early, threshold=0.5 * 0.01 * float(early.trace()) / dim)
    cold, warm = find(late), find(late, first.vectors)
    assert warm.seeded == first.rank and cold.seeded == 0
    assert cold.stop == warm.stop == "reached" and max(cold.products, warm.products) < dim
    for space in (cold, warm):
        assert float(space.eigenvalues[-1]) <= 0.5 * lam  # the threshold, at the new weights
        top = int((values > lam).sum())  # the pairs above the damping: eigh's, to the residual tolerance (measured 1.3%)
        assert torch.allclose(space.eigenvalues[:top].double(), values[:top], rtol=2e-2)
        assert subspace_cosine(space.vectors[:top], vectors[:, :top]) > 0.98
    # the deflated inverse against the explicit matrix (its error is mostly the flat complement's): as close as with
    # eigh's own top pairs of the same rank (measured: 0.085 cold, 0.089 warm)
    exact_pairs = Eigenspace(values[: warm.rank].float(), vectors[:, : warm.rank].T.float(), 0)
    floor = _deflated_error(exact_pairs, late, lam)
    assert _deflated_error(cold, late, lam) < floor + 0.01 and _deflated_error(warm, late, lam) < floor + 0.01


def test_a_stale_basis_is_not_taken_as_converged():
    """The Ritz pairs and residuals of the new operator decide, never the warm start: a basis of unrelated directions
    grows until the new pairs converge; a basis that spans an exact invariant space of the new operator WITHOUT its top
    eigenvectors (every residual 0) is refused by the Gaussian probes (curvature above the threshold outside it); both
    end at eigh's top pairs."""
    matrix, values, vectors = slow_decay()
    threshold = float(values[299])
    random_basis = torch.linalg.qr(torch.randn(800, 300, generator=torch.Generator().manual_seed(11), dtype=torch.float64))[0].T
    without_top = vectors[:, 10:310].T  # eigenvectors 11..310: invariant, all residuals 0, the top 10 missing
    for stale in (random_basis, without_top):
        operator = CountingOperator(matrix)
        found = adaptive_eigenspace(operator, 800, threshold, max_products=800, initial=stale.float(), tolerance=0.1, generator=torch.Generator().manual_seed(0))
        assert found.seeded == 300 and found.products == operator.products > 300 + 32  # more than the first block
        assert found.stop in ("reached", "whole space") and float(found.eigenvalues[-1]) <= threshold
        assert torch.allclose(found.eigenvalues[:250].double(), values[:250], rtol=1e-2)
        assert subspace_cosine(found.vectors[:10], vectors[:, :10]) > 0.999
    with pytest.raises(ValueError, match="initial= needs tolerance="):
        adaptive_eigenspace(CountingOperator(matrix), 800, threshold, max_products=800, initial=random_basis.float())


def test_auto_rank_residual_rule_stops_once_the_pairs_down_to_the_threshold_converge():
    """tolerance=: the space also stops once every Ritz pair down to the first at or below the threshold has a residual
    <= tolerance (theta + threshold) (measured here: 448 products against 640 by the 2-products-per-pair rule alone),
    with sigma_k still at most the threshold and the deflated inverse as close to the explicit matrix as eigh's pairs."""
    matrix, values, _ = slow_decay()
    threshold = float(values[299])
    budget = adaptive_eigenspace(CountingOperator(matrix), 800, threshold, max_products=800, generator=torch.Generator().manual_seed(0))
    residual = adaptive_eigenspace(CountingOperator(matrix), 800, threshold, max_products=800, tolerance=0.1, generator=torch.Generator().manual_seed(0))
    assert budget.stop == residual.stop == "reached" and residual.products < budget.products
    # the first Ritz value at or below the threshold is the last kept; Ritz values lie below the eigenvalues by up to
    # about the residual, 3 ranks of this spectrum here (budget: 0)
    assert 295 <= residual.rank <= 300 and float(residual.eigenvalues[-1]) <= threshold < float(residual.eigenvalues[-2])
    assert bool((residual.residuals <= 0.1 * (residual.eigenvalues + threshold) * 1.001).all())  # what it stopped on
    assert torch.allclose(residual.eigenvalues[:250].double(), values[:250], rtol=1e-2)
    exact_pairs = Eigenspace(values[:300].float(), torch.linalg.eigh(matrix)[1].flip(1)[:, :300].T.float(), 0)
    floor = _deflated_error(exact_pairs, matrix, 2 * threshold)
    assert _deflated_error(residual, matrix, 2 * threshold) < floor + 0.01


def test_a_rank_deficient_spectrum_spanning_many_decades_converges_as_block_krylov():
    """A GGN of rank 46 whose eigenvalues fall from 1 to 1e-13 (a small CNN's, test_exactness.py's at some inits):
    three blocks of 32 span its range, so the top pairs must have converged to rounding. While the orthonormalization
    kept the meaningful residual rows' parts orthogonal to the vanished (rounding) rows before them, the top pair's
    residual stayed at 6% of sigma_1 here (7% on the CNN after 320 products, where rank="auto" stopped with it: its
    leak into the complement, inverted by 1/lam, gave Pearson 0.10 to the exact target)."""
    g = torch.Generator().manual_seed(0)
    dim, rank = 200, 46
    values = torch.cat([torch.tensor([1.0, 0.3], dtype=torch.float64), torch.logspace(-2, -13, rank - 2, dtype=torch.float64)])
    vectors, _ = torch.linalg.qr(torch.randn(dim, rank, generator=g, dtype=torch.float64))
    matrix = (vectors * values) @ vectors.T
    found = top_eigenspace(CountingOperator(matrix), dim, 32, block=32, products=128, generator=g)
    assert float(found.residuals[:8].max()) < 1e-6  # was 1e-3 and more
    assert subspace_cosine(found.vectors[:8], vectors[:, :8]) > 1 - 1e-6  # float32 vectors


def test_the_first_block_estimates_the_trace_as_well_as_hutchinson_at_no_product():
    """A cold Krylov start reads trace(G) from its first block (``P / b trace(Q_1 G Q_1^T)``, ``b`` orthonormalized Gaussian
    rows: a Haar frame), which rank="auto" uses instead of 32 Rademacher probes of its own: over 200 starts on an explicit
    spectrum (random basis, P = 240) the estimate is unbiased (mean within 3 standard errors of the trace) and its RMS
    error at most 1.2x that of 32 Rademacher probes (measured here: 0.042 vs 0.047; on the bench's GGNs 0.033 vs 0.032 on
    the digits MLP, 0.062 vs 0.056 on the digits CNN, benchmarks/results/auto-rank.json); exact when the block is all of
    R^P, NaN after a warm start."""
    from lightning_attr.curvature import estimate_spectrum

    matrix, values, vectors = known_spectrum()
    trace, dim = float(values.sum()), matrix.shape[0]
    first, hutchinson = [], []
    for seed in range(200):
        space = top_eigenspace(CountingOperator(matrix), dim, 32, block=32, products=32, generator=torch.Generator().manual_seed(seed))
        assert space.probes == 32 and space.products == 32
        first.append(space.trace / trace - 1)
        probes = estimate_spectrum(CountingOperator(matrix), dim, probes=32, power_iterations=0, generator=torch.Generator().manual_seed(seed))
        hutchinson.append(probes.mean_eigenvalue * dim / trace - 1)
    first, hutchinson = torch.tensor(first, dtype=torch.float64), torch.tensor(hutchinson, dtype=torch.float64)
    assert abs(float(first.mean())) <= 3 * float(first.std()) / 200**0.5
    assert float(first.square().mean().sqrt()) <= 1.2 * float(hutchinson.square().mean().sqrt())
    whole = top_eigenspace(CountingOperator(matrix), dim, 8, block=dim, products=dim, generator=torch.Generator().manual_seed(0))
    assert whole.probes == dim and whole.trace == pytest.approx(trace, rel=1e-5)
    warm = top_eigenspace(CountingOperator(matrix), dim, 8, initial=vectors[:, :8].T.float(), products=64)
    assert warm.probes == 0 and warm.trace != warm.trace  # NaN: the rows after a seed are not a Haar frame
