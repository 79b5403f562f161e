"""What ``rank="auto"`` costs and delivers, per variant of its finder, on the bench models' explicit GGNs.

    OMP_NUM_THREADS=1 python benchmarks/auto_rank.py --settings digits-mlp digits01-mlp digits-cnn-adam mnist1d-cnn1d \\
        mnist1d-mlp --cache-dir /work/cache/bench --out benchmarks/results/auto-rank.json

Per setting (the bench's attributed model, reported queries and 100 half-data retrains from ``--cache-dir``), on its
explicit full-data GGN ``G`` (``bench.py``'s cache; with ``--ggn-dir``, settings without one get it built there, in
float32, and reused): the finder as the callback runs it with its defaults (``engine._deflated_inverse``:
:func:`lightning_attr.spectral.adaptive_eigenspace` with the threshold ``AUTO_RANK_RATIO x lam``, ``lam`` the
eigenspace damping rule on the Ritz values found so far, the product cap of ``memory_budget_mb=1024``), with
``trace(G)/P`` exact instead of 32 Hutchinson probes, and each ``--variants`` entry's options on top (a JSON object of
``adaptive_eigenspace`` keyword arguments: ``min_rank``, ``growth``, ``tolerance``, ``block``; and ``ratio``, the threshold's multiple of ``lam``, default ``AUTO_RANK_RATIO``).

Every variant is scored at the SAME ``lam``: the damping rule on the exact ``sigma_64`` of ``G`` (the Ritz values of
every variant reach it within 1e-3, recorded as ``lam_ratio``), so the Pearson to the exact damped target
``(1/n) g_q^T (G + lam)^-1 g_b`` (one Cholesky solve per setting) measures the eigenspace alone. Per run: products,
rank, why it stopped, ``sigma_k / lam``, the finder's seconds (one process, on a loaded machine: compare products),
Pearson to the exact target, and LDS of the deflated responses and of the exact target.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from damping import EXACT_SCALES, DampingStudy, _pearson  # noqa: E402

from lightning_attr._io import atomic_write_json  # noqa: E402
from lightning_attr.damping import RITZ_INDEX, ritz_damping  # noqa: E402
from lightning_attr.deflated import AUTO_RANK_RATIO, DeflatedInverse  # noqa: E402
from lightning_attr.engine import _auto_rank_threshold  # noqa: E402
from lightning_attr.evaluation.exact import ExactInfluence  # noqa: E402
from lightning_attr.curvature import estimate_spectrum  # noqa: E402
from lightning_attr.spectral import DEFAULT_RESIDUAL_TOLERANCE, TRACE_PROBES, adaptive_eigenspace, product_cap, top_eigenspace  # noqa: E402

DEFAULT_VARIANTS = ['{"trace": "hutchinson"}', '{}']


def _explicit_ggn(study: DampingStudy, ggn_dir: str | None) -> tuple[torch.Tensor, ExactInfluence] | None:
    """``Tensor[P, P]`` float32, the GGN at the bench's attributed model: the bench's cached one, else one built in
    ``ggn_dir`` (None without it); with the :class:`ExactInfluence` for the gradients."""
    bench = study.bench
    if study.has_exact:
        return bench.explicit_ggn().float(), bench._exact
    if ggn_dir is None:
        return None
    exact = ExactInfluence(bench.model(), bench.data.x_train, bench.data.y_train)
    path = Path(ggn_dir) / f"{bench.setting.name}-{bench._exact_key()}.safetensors"
    if path.exists():
        return load_file(str(path))["ggn"], exact
    t = time.perf_counter()
    print(f"[{bench.setting.name}] building the explicit GGN, P = {exact.num_parameters}", flush=True)
    ggn = exact.build_ggn(torch.float32)
    print(f"[{bench.setting.name}] explicit GGN in {time.perf_counter() - t:.0f}s", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = path.with_suffix(".partial")
    save_file({"ggn": ggn}, str(written))
    written.replace(path)
    return ggn, exact


def measure(name: str, args: argparse.Namespace, variants: list[dict]) -> list[dict]:
    study = DampingStudy(name, argparse.Namespace(cache_dir=args.cache_dir, build_ggn=False, exact_scales=EXACT_SCALES), {})
    bench = study.bench
    found = _explicit_ggn(study, args.ggn_dir)
    if found is None:
        print(f"[{name}] no explicit GGN (pass --ggn-dir to build one): skipped", flush=True)
        return []
    ggn, exact = found
    g_query = exact.gradients(bench.x_rep, bench.y_rep).float()  # [Q, P]
    g_train = exact.gradients(bench.data.x_train, bench.data.y_train).float()  # [n, P]
    n, dim = g_train.shape
    trace = float(ggn.diagonal().double().sum())
    mean = trace / dim
    # sigma_64 of G: a Krylov space of 1,024 products (every variant's Ritz values approach it from below)
    sigma = top_eigenspace(lambda v: v @ ggn, dim, min(dim, 2 * RITZ_INDEX), products=min(dim, 1024), generator=torch.Generator().manual_seed(1)).eigenvalues
    lam = ritz_damping(sigma, 1.0, mean)
    t = time.perf_counter()
    target = bench.exact_scores(lam)[0].float() if study.has_exact else _exact_target(ggn, g_query, g_train, lam, args.float64_max)
    head = {"setting": name, "P": dim, "n": n, "damping": lam, "sigma_64": float(sigma[RITZ_INDEX - 1]), "mean_eigenvalue": mean,
            "exact_lds": study.lds(target), "exact_s": round(time.perf_counter() - t, 1), "product_cap": product_cap(dim, args.memory_budget_mb)}  # fmt: skip
    head["trace_errors"] = _trace_errors(ggn, trace, args.trace_seeds)
    print(json.dumps(head), flush=True)
    rows = []
    for seed in args.seeds:
        for options in variants:
            rows.append(_run(ggn, g_query, g_train, target, study, head, options, seed))
    return rows


def _exact_target(ggn: torch.Tensor, g_query: torch.Tensor, g_train: torch.Tensor, lam: float, float64_max: int) -> torch.Tensor:
    """``Tensor[Q, n]``: ``(1/n) g_q^T (G + lam)^-1 g_b`` by a Cholesky solve, in float64 up to ``P = float64_max`` (else
    float32: half the memory of a large ``P``)."""
    damped = ggn.double() if ggn.shape[0] <= float64_max else ggn.clone()
    damped.diagonal().add_(lam)
    factor = torch.linalg.cholesky(damped)
    del damped
    solved = torch.cholesky_solve(g_query.T.to(factor.dtype), factor).T.float()  # [Q, P]
    return solved @ g_train.T / g_train.shape[0]


def _run(ggn, g_query, g_train, target, study, head: dict, options: dict, seed: int) -> dict:
    """One finder run as the callback's ``_deflated_inverse`` does it (``"trace": "hutchinson"``: as before this script,
    32 Rademacher probes drawn first from the same generator), its deflated responses at ``head``'s ``lam`` with ``mu``
    from its own trace estimate, against the exact target."""
    n, dim = g_train.shape
    lam, mean = head["damping"], head["mean_eigenvalue"]
    generator = torch.Generator().manual_seed(seed)
    kwargs = {"tolerance": DEFAULT_RESIDUAL_TOLERANCE, **options}
    ratio, trace_from = kwargs.pop("ratio", AUTO_RANK_RATIO), kwargs.pop("trace", "first block")
    operator = lambda v: v @ ggn  # noqa: E731
    t = time.perf_counter()
    if trace_from == "hutchinson":
        estimate = estimate_spectrum(operator, dim, probes=TRACE_PROBES, power_iterations=0, generator=generator).mean_eigenvalue
        threshold = partial(_hutchinson_threshold, mean_eigenvalue=estimate, ratio=ratio)
    else:
        threshold = partial(_auto_rank_threshold, damping_scale=1.0, ratio=ratio)
    space = adaptive_eigenspace(operator, dim, threshold, max_products=head["product_cap"], generator=generator, **kwargs)
    seconds = time.perf_counter() - t
    if trace_from != "hutchinson":
        estimate = space.trace / dim
    inverse = DeflatedInverse.from_trace(space, lam, estimate * dim, dim)
    scores = g_query @ inverse.apply(g_train).T / n
    run_lam = ritz_damping(space.eigenvalues, 1.0, estimate)
    products = space.products + (TRACE_PROBES if trace_from == "hutchinson" else 0)
    row = {**head, "variant": options, "seed": seed, "products": products, "rank": space.rank, "stop": space.stop,
           "sigma_k_over_damping": round(inverse.complement_ratio, 3), "lam_ratio": None if run_lam is None else round(run_lam / lam, 5),
           "mean_eigenvalue_ratio": round(estimate / mean, 4), "finder_s": round(seconds, 1),
           "pearson": round(_pearson(scores, target), 4), "lds": study.lds(scores)}  # fmt: skip
    keys = ("setting", "variant", "seed", "products", "rank", "stop", "sigma_k_over_damping", "lam_ratio", "mean_eigenvalue_ratio", "finder_s", "pearson", "lds", "exact_lds")
    print(json.dumps({k: row[k] for k in keys}), flush=True)
    return row


def _hutchinson_threshold(ritz_values: torch.Tensor, _first_block_mean: float, mean_eigenvalue: float, ratio: float) -> float | None:
    return _auto_rank_threshold(ritz_values, mean_eigenvalue, 1.0, ratio)


def _trace_errors(ggn: torch.Tensor, trace: float, seeds: int) -> dict:
    """Relative error of ``trace(G)`` estimated from 32 Rademacher probes (``estimate_spectrum``, as before) and from the
    first block of 32 orthonormalized Gaussian rows (the finder's), over ``seeds`` draws: RMS and largest."""
    dim = ggn.shape[0]
    errors: dict[str, list[float]] = {"hutchinson": [], "first block": []}
    for seed in range(seeds):
        generator = torch.Generator().manual_seed(1000 + seed)
        hutch = estimate_spectrum(lambda v: v @ ggn, dim, probes=TRACE_PROBES, power_iterations=0, generator=generator).mean_eigenvalue * dim
        block = torch.linalg.qr(torch.randn(dim, TRACE_PROBES, generator=generator, dtype=torch.float64))[0].T.float()
        first = dim * float(((block @ ggn) * block).sum()) / TRACE_PROBES
        errors["hutchinson"].append(hutch / trace - 1)
        errors["first block"].append(first / trace - 1)
    return {k: {"rms": round(float(torch.tensor(v).square().mean().sqrt()), 4), "max": round(max(abs(e) for e in v), 4)} for k, v in errors.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=["digits-mlp", "digits01-mlp", "digits-cnn-adam", "mnist1d-cnn1d", "mnist1d-mlp"])
    p.add_argument("--cache-dir", required=True)
    p.add_argument("--ggn-dir", default=None, help="where to build (and reuse) the explicit GGN of settings the bench cache lacks")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, help="JSON objects of adaptive_eigenspace options")
    p.add_argument("--memory-budget-mb", type=float, default=1024.0, help="the callback's memory_budget_mb (the product cap)")
    p.add_argument("--float64-max", type=int, default=16000, help="largest P whose exact target is solved in float64 (else float32)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="the finder's generator seeds (one run per variant each)")
    p.add_argument("--trace-seeds", type=int, default=50, help="draws of each trace estimator for its error")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "auto-rank.json"))
    args = p.parse_args(argv)
    variants = [json.loads(v) for v in args.variants]
    out = Path(args.out)
    rows = json.loads(out.read_text()) if out.exists() else []
    for name in args.settings:
        done = [r["variant"] for r in rows if r["setting"] == name]
        todo = [v for v in variants if v not in done]  # (all seeds of a variant are measured together)
        if todo:
            rows += measure(name, args, todo)
            atomic_write_json(out, rows)


if __name__ == "__main__":
    main()
