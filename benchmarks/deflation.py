"""How many eigenpairs ``propagation="spectral"`` needs: the deflated inverse against the exact target.

    python benchmarks/deflation.py --settings digits-mlp digits01-mlp digits-cnn-adam mnist1d-cnn1d \
        --cache-dir /work/cache/bench --out benchmarks/results/deflation.json
    python benchmarks/deflation.py auto --ratios 1 0.7 0.5 0.3 --cache-dir /work/cache/bench \
        --out benchmarks/results/deflation-auto.json      # rank="auto"'s threshold, with the block Krylov finder

Per setting, on the bench's attributed model and its cached explicit full-data GGN ``G`` (``bench.py``'s
cache; settings without one are skipped), with the EXACT eigenpairs of ``G`` (``torch.linalg.eigh``), at
``lam = s trace(G)/P`` for each ``s`` of ``--scales`` and each ``k`` of ``--ranks``:

- ``deflated``: :class:`lightning_attr.deflated.DeflatedInverse` (top-k exact, ``1/(mu + lam)`` outside,
  ``mu`` the mean eigenvalue left there), as the callback computes it;
- ``dropped``: the top-k part alone (codec ``"eigen"``'s damped inverse: 0 outside the eigenspace);

each as Pearson to the exact target ``(1/n) grad f_q^T (G + lam)^{-1} grad l_b`` and LDS on the bench's
ground truth, with ``sigma_k / lam``. Isolates the eigenspace truncation from the eigenpairs' accuracy
(which ``top_eigenspace`` adds) and from the callback.

``auto``: the finder itself (block Krylov on the cached explicit GGN as the operator, ``V -> V G``) at the
damping the bench's default run used (``--dampings-from``, so the exact target is the cached one): the fixed
default ``rank=256`` and ``rank="auto"`` (:func:`lightning_attr.spectral.adaptive_eigenspace`) for each
threshold ``sigma_k <= c lam`` of ``--ratios``, within the callback's product cap at ``memory_budget_mb=1024``;
per run the rank reached, why it stopped, ``sigma_k / lam``, the products, the finder's seconds, and the deflated
responses' Pearson to the exact target and LDS (``mu`` from the exact trace).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from damping import EXACT_SCALES, DampingStudy, _pearson  # noqa: E402

from lightning_attr._io import atomic_write_json  # noqa: E402
from lightning_attr.deflated import DeflatedInverse  # noqa: E402
from lightning_attr.spectral import Eigenspace, adaptive_eigenspace, product_cap, top_eigenspace  # noqa: E402

DAMPINGS_LABEL = "spectral: end, damping_scale 3"  # heldout.json's rows of the default run (rank 256), one per setting


def measure(name: str, cache_dir: str, scales: list[float], ranks: list[int]) -> dict | None:
    study = DampingStudy(name, argparse.Namespace(cache_dir=cache_dir, build_ggn=False, exact_scales=EXACT_SCALES), {})
    bench = study.bench
    if not study.has_exact:
        print(f"[{name}] no cached explicit GGN: skipped (bench.py builds it)", flush=True)
        return None
    ggn = bench.explicit_ggn().double()
    exact = bench._exact
    g_query = exact.gradients(bench.x_rep, bench.y_rep).double()  # [Q, P]
    g_train = exact.gradients(bench.data.x_train, bench.data.y_train).double()  # [n, P]
    n, dim = g_train.shape
    sigma, vectors = torch.linalg.eigh(ggn)
    sigma, vectors = sigma.flip(0).clamp_min(0), vectors.flip(1).T.contiguous()  # descending, rows
    trace = float(ggn.diagonal().sum())
    q_coords, t_coords = g_query @ vectors.T, g_train @ vectors.T
    record = {"P": dim, "n": n, "mean_eigenvalue": trace / dim, "by_scale": {}}
    for scale in scales:
        lam = scale * trace / dim
        target = (q_coords / (sigma + lam)) @ t_coords.T / n
        row = {"damping": lam, "exact_lds": study.lds(target.float()), "by_rank": {}}
        for k in ranks:
            space = Eigenspace(sigma[:k].float(), vectors[:k].float(), products=0)
            inverse = DeflatedInverse.from_trace(space, lam, trace, dim)
            deflated = g_query.float() @ inverse.apply(g_train.float()).T / n
            dropped = (q_coords[:, :k] / (sigma[:k] + lam)) @ t_coords[:, :k].T / n
            row["by_rank"][str(k)] = {
                "sigma_k_over_damping": round(inverse.complement_ratio, 3),
                "complement_over_damping": round(inverse.complement / lam, 4),
                "deflated": {"pearson": round(_pearson(deflated, target), 4), "lds": study.lds(deflated)},
                "dropped": {"pearson": round(_pearson(dropped, target), 4), "lds": study.lds(dropped.float())},
            }  # fmt: skip
        print(f"[{name}] scale {scale}: {json.dumps(row)}", flush=True)
        record["by_scale"][str(scale)] = row
    return record


def auto(
    name: str, cache_dir: str, damping: float, ratios: list[float], memory_mb: float, growths: list[float], tolerances: list[float | None]
) -> list[dict]:
    """Fixed rank 256 and ``rank="auto"`` at each ratio on the explicit GGN of ``name`` (see the module's docstring)."""
    import time

    study = DampingStudy(name, argparse.Namespace(cache_dir=cache_dir, build_ggn=False, exact_scales=EXACT_SCALES), {})
    bench = study.bench
    if not study.has_exact:
        print(f"[{name}] no cached explicit GGN: skipped (bench.py builds it)", flush=True)
        return []
    ggn = bench.explicit_ggn().float()
    target = bench.exact_scores(damping)[0].double()  # [Q, n]
    exact = bench._exact
    g_query = exact.gradients(bench.x_rep, bench.y_rep).float()  # [Q, P]
    g_train = exact.gradients(bench.data.x_train, bench.data.y_train).float()  # [n, P]
    n, dim = g_train.shape
    trace, cap = float(ggn.diagonal().double().sum()), product_cap(dim, memory_mb)
    head = {"setting": name, "P": dim, "n": n, "damping": damping, "exact_lds": study.lds(target.float()), "product_cap": cap}
    runs = [("rank 256", None, 0.0, None)] + [
        (f"auto {c:g}, growth {g:g}" + ("" if tol is None else f", tolerance {tol:g}"), c, g, tol) for g in growths for c in ratios for tol in tolerances
    ]  # fmt: skip
    rows = []
    for label, ratio, growth, tolerance in runs:
        t = time.perf_counter()
        generator = torch.Generator().manual_seed(0)
        if ratio is None:
            space = top_eigenspace(lambda v: v @ ggn, dim, min(256, dim), generator=generator)
        else:
            space = adaptive_eigenspace(
                lambda v: v @ ggn, dim, ratio * damping, max_products=cap, growth=growth, tolerance=tolerance, generator=generator
            )
        seconds = time.perf_counter() - t
        inverse = DeflatedInverse.from_trace(space, damping, trace, dim)
        scores = g_query @ inverse.apply(g_train).T / n
        row = {**head, "run": label, "ratio": ratio, "growth": growth, "tolerance": tolerance, "rank": space.rank, "stop": space.stop, "products": space.products,
               "sigma_k_over_damping": round(inverse.complement_ratio, 3), "finder_s": round(seconds, 1),
               "pearson": round(_pearson(scores, target), 4), "lds": study.lds(scores.float())}  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["auto"]:
        return main_auto(argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=["digits-mlp", "digits01-mlp", "digits-cnn-adam", "mnist1d-cnn1d"])
    p.add_argument("--cache-dir", required=True)
    p.add_argument("--scales", nargs="+", type=float, default=[1.0, 3.0, 10.0])
    p.add_argument("--ranks", nargs="+", type=int, default=[32, 64, 128, 256, 512])
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "deflation.json"))
    args = p.parse_args(argv)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    for name in args.settings:
        if name in results:
            continue
        record = measure(name, args.cache_dir, args.scales, args.ranks)
        if record is not None:
            results[name] = record
            atomic_write_json(out, results)


def main_auto(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=["digits-mlp", "digits01-mlp", "digits-cnn-adam", "mnist1d-cnn1d", "mnist1d-mlp"])
    p.add_argument("--cache-dir", required=True)
    p.add_argument("--ratios", nargs="+", type=float, default=[1.0, 0.7, 0.5, 0.3])
    p.add_argument("--memory-budget-mb", type=float, default=1024.0, help="the callback's memory_budget_mb (the product cap)")
    p.add_argument("--growths", nargs="+", type=float, default=[0.0], help="adaptive_eigenspace's growth (block = max(32, growth m))")
    p.add_argument("--tolerances", nargs="+", type=float, default=[], help="adaptive_eigenspace's residual tolerance (besides none)")
    p.add_argument("--dampings-from", default=str(Path(__file__).parent / "results" / "heldout.json"))
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "deflation-auto.json"))
    args = p.parse_args(argv)
    dampings = {k: r["damping"] for k, r in json.loads(Path(args.dampings_from).read_text())["runs"][DAMPINGS_LABEL]["settings"].items()}
    out = Path(args.out)
    rows = json.loads(out.read_text()) if out.exists() else []
    for name in args.settings:
        if any(r["setting"] == name for r in rows):
            continue
        rows += auto(name, args.cache_dir, dampings[name], args.ratios, args.memory_budget_mb, args.growths, [None, *args.tolerances])
        atomic_write_json(out, rows)


if __name__ == "__main__":
    main()
