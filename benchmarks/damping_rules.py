"""Which automatic damping rule puts ``lambda`` at the LDS optimum on every setting (issue 7, item 2).

    OMP_NUM_THREADS=1 python benchmarks/damping_rules.py measure --settings digits-mlp digits-mlp-wide ... \\
        --cache-dir /work/cache/bench --out benchmarks/results/damping-rules.json
    python benchmarks/damping_rules.py report --out benchmarks/results/damping-rules.json   # rules -> damping-rules.md

``measure``, per setting (the bench's attributed model, reported queries and 100 half-data retrains from
``--cache-dir``; ``convergence.HERE``): the eigenpairs ``(sigma_j, v_j)`` of the full-data GGN, all of them
(``torch.linalg.eigh`` of the cached explicit GGN, ``P <= --eigh-max``) or the top ``--rank`` (the package's
``top_eigenspace`` on the explicit GGN or, where none is cached, on the curvature operator over the training set,
with the rest as its mean eigenvalue ``mu``, as ``propagation="spectral"`` does), the per-example gradients of the
training set and of the reported queries, and from them the LDS of the damped target

    score(q, b) = (1/n) g_q^T [V diag(1/(sigma + lam)) V^T + (I - V V^T) / (mu + lam)] g_b

at every ``lam`` of a log grid (``GRID`` x ``trace(G)/P``): one eigendecomposition, then a diagonal per ``lam``.
With all ``P`` pairs it is the exact damped-GGN target; with the top ``k`` it is what ``"spectral"`` computes at
that rank (``lam`` below about ``2 sigma_k`` is marked as approximate). It also records the spectrum's scales
(``trace``, ``trace(G^2)``, the top eigenvalues) that candidate rules read.

``report``: for each candidate rule (a unit ``u`` computed per setting from what the simulation has: the
Hutchinson trace and ``trace(G^2)`` of its probes, the Ritz values of its eigenspace), the one multiplier ``c``
(from a grid) that minimises the largest LDS loss ``max_settings [best LDS - LDS(c u)]``, with every setting's
loss at that ``c``, and the loss of today's rule (``3 trace(G)/P``). LDS between grid points is interpolated
linearly in ``log lam``. Writes ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import SettingBench, current_commit, nanmean  # noqa: E402
from convergence import HERE  # noqa: E402

from lightning_attr._io import atomic_write_json, atomic_write_text  # noqa: E402
from lightning_attr.curvature import curvature_operator  # noqa: E402
from lightning_attr.damping import ritz_damping  # noqa: E402
from lightning_attr.evaluation.exact import ExactInfluence  # noqa: E402
from lightning_attr.functional import functional_view  # noqa: E402
from lightning_attr.models import Classifier  # noqa: E402
from lightning_attr.spectral import top_eigenspace  # noqa: E402

GRID = [0.03, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 50.0, 100.0, 200.0, 300.0, 1000.0]  # x trace(G)/P
TOP_EIGENVALUES = 2048  # eigenvalues kept in the record (the rules read the top of the spectrum)
PROBES = 128  # Hutchinson probes for trace(G) and trace(G^2) where the spectrum is not complete


# ------------------------------------------------------------------------------------------ measure
def _bench(name: str, cache_dir: str) -> SettingBench:
    args = SimpleNamespace(quick=False, quick_queries=0, quick_subsets=0, cache_dir=cache_dir, plain_fits=0)
    bench = SettingBench(HERE[name], args)
    bench.model()
    bench.example_truth()
    return bench


def _operator(bench: SettingBench, ggn: Tensor | None, chunk: int = 16):
    """``Tensor[C, P] -> G V`` on the explicit GGN if cached, else the GGN operator over the training set; and a
    context to close."""
    if ggn is not None:
        g = ggn.float()
        return (lambda v: v @ g), None
    data = bench.data
    view = functional_view(Classifier(bench.model()).eval())
    fm, theta = view.__enter__()
    batches = [(data.x_train[i : i + 700], data.y_train[i : i + 700]) for i in range(0, len(data.x_train), 700)]
    return curvature_operator("ggn", fm, theta, batches, chunk_size=chunk), view


def measure(name: str, args: argparse.Namespace) -> dict:
    """One setting's LDS-vs-lambda curve of the damped target and its spectrum's scales (module docstring)."""
    start = time.perf_counter()
    bench = _bench(name, args.cache_dir)
    data = bench.data
    hit = bench.cache.load("ggn", bench._exact_key())
    ggn = None if hit is None else hit[0]["ggn"]
    exact = ExactInfluence(bench.model(), data.x_train, data.y_train, ggn=ggn)
    p, n = exact.num_parameters, len(data.x_train)
    g_train = exact.gradients(data.x_train, data.y_train).float()  # [n, P]
    g_query = exact.gradients(bench.x_rep, bench.y_rep).float()  # [Q, P]
    gen = torch.Generator().manual_seed(0)
    if ggn is not None and p <= args.eigh_max:
        sigma, vectors = torch.linalg.eigh(ggn.double())
        sigma, vectors = sigma.flip(0).clamp_min(0), vectors.flip(1).T.float()  # descending; rows
        trace, trace_sq, how = float(sigma.sum()), float((sigma**2).sum()), "eigh of the explicit GGN (all P pairs: exact)"
        sigma = sigma.float()
    else:
        operator, view = _operator(bench, ggn)
        try:
            space = top_eigenspace(operator, p, min(args.rank, p), generator=gen)
            z = torch.randint(0, 2, (PROBES, p), generator=gen).float() * 2 - 1
            gz = torch.cat([operator(z[i : i + 16]) for i in range(0, PROBES, 16)])
        finally:
            if view is not None:
                view.__exit__(None, None, None)
        trace, trace_sq = float((z * gz).sum(1).mean()), float((gz * gz).sum(1).mean())
        if ggn is not None:
            trace = float(ggn.diagonal().double().sum())
        sigma, vectors = space.eigenvalues, space.vectors
        how = (f"top {space.rank} pairs by top_eigenspace ({space.products} products) on "
               f"{'the explicit GGN' if ggn is not None else 'the GGN operator over the training set'}; "
               f"trace {'exact' if ggn is not None else f'Hutchinson ({PROBES} probes)'}, trace(G^2) Hutchinson ({PROBES} probes)")  # fmt: skip
    k = int(sigma.numel())
    mu = 0.0 if k == p else min(max(0.0, (trace - float(sigma.sum())) / (p - k)), float(sigma[-1]))
    a_train, a_query = g_train @ vectors.T, g_query @ vectors.T  # [n, k], [Q, k]
    cross = None if k == p else g_query @ g_train.T - a_query @ a_train.T  # the complement's inner products [Q, n]
    mean = trace / p
    curve = {}
    for c in GRID:
        lam = c * mean
        scores = (a_query / (sigma + lam)) @ a_train.T
        if cross is not None:
            scores += cross / (mu + lam)
        curve[str(c)] = round(nanmean(bench.lds("example", scores / n, bench.rep_idx)), 4)
        print(f"[{name}] lam = {c:g} x trace/P = {lam:.3g}: LDS {curve[str(c)]}", flush=True)
    r = bench.setting.recipe
    return {
        "P": p, "n": n, "queries": len(bench.rep_idx), "test_accuracy": bench.test_accuracy, "arch": bench.setting.arch,
        "recipe": dict(r.__dict__), "how": how, "complete": k == p, "rank": k, "sigma_k": float(sigma[-1]), "complement_mean": mu,
        "trace": trace, "trace_sq": trace_sq, "mean_eigenvalue": mean, "eigenvalues": [float(f"{s:.5g}") for s in sigma[:TOP_EIGENVALUES]],
        "lds_by_scale": curve, "approximate_below_scale": None if k == p else round(2 * float(sigma[-1]) / mean, 3),
        "seconds": round(time.perf_counter() - start, 1), "commit": current_commit(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }  # fmt: skip


# ------------------------------------------------------------------------------------------ rules
def _sigma_at_fraction(rec: dict, fraction: float) -> float | None:
    """``sigma_j`` for the least ``j`` whose top-j eigenvalues hold ``fraction`` of ``trace(G)`` (None: not reached)."""
    total = 0.0
    for s in rec["eigenvalues"]:
        total += s
        if total >= fraction * rec["trace"]:
            return s
    return None


def _sigma_at(rec: dict, j: int) -> float | None:
    e = rec["eigenvalues"]
    return e[j - 1] if len(e) >= j else None


def _shipped(rec: dict) -> float | None:
    """``lightning_attr.damping.ritz_damping`` at ``damping_scale=1`` on the setting's spectrum."""
    return ritz_damping(torch.tensor(rec["eigenvalues"]), 1.0, rec["trace"] / rec["P"])


def _sgd_unit(rec: dict) -> float | None:
    """The curvature below which SGD's fit barely moves: ``1 / (eta_eff T) + wd`` with ``eta_eff = lr / (1 - momentum)``
    and ``T`` the fit's optimizer steps (None for Adam)."""
    r = rec["recipe"]
    if r.get("optimizer", "sgd") != "sgd":
        return None
    steps = r["epochs"] * math.ceil(rec["n"] / r["batch_size"])
    return (1 - r["momentum"]) / (r["lr"] * steps) + r["weight_decay"]
RULES = {  # name -> (unit of lambda per setting, what it reads)
    "trace/P (today)": (lambda r: r["trace"] / r["P"], "Hutchinson trace"),
    "trace(G^2)/trace(G)": (lambda r: r["trace_sq"] / r["trace"], "the same probes' |Gz|^2"),
    "lambda_max": (lambda r: r["eigenvalues"][0], "top Ritz value"),
    "trace": (lambda r: r["trace"], "Hutchinson trace"),
    **{f"sigma_{j}": ((lambda j: lambda r: _sigma_at(r, j))(j), f"the {j}-th Ritz value") for j in (16, 32, 64, 128, 256)},
    **{f"sigma at {int(f * 100)}% of trace": ((lambda f: lambda r: _sigma_at_fraction(r, f))(f), "Ritz values and trace")
       for f in (0.5, 0.7, 0.8, 0.9, 0.95)},  # fmt: skip
    "mean of the top 256": (lambda r: sum(r["eigenvalues"][:256]) / min(256, len(r["eigenvalues"])), "Ritz values"),
    "sqrt(trace/P x lambda_max)": (lambda r: math.sqrt(r["trace"] / r["P"] * r["eigenvalues"][0]), "trace, top Ritz value"),
    "the eigenspace rule shipped (lightning_attr.damping)": (_shipped, "Ritz values, trace"),
    "weight decay (not scale-free)": (lambda r: r["recipe"]["weight_decay"], "the optimizer's weight decay"),
    "1/(lr/(1-momentum) x steps) + weight decay, SGD": (lambda r: _sgd_unit(r), "the optimizer (SGD only)"),
}  # fmt: skip


MULTIPLIERS = [10 ** (e / 16) for e in range(-80, 65)]  # 1e-5 .. 1e4


def lds_at(rec: dict, lam: float) -> float | None:
    """The setting's LDS at ``lam`` (linear in log lambda between grid points; None outside the grid)."""
    pts = sorted((float(c) * rec["mean_eigenvalue"], v) for c, v in rec["lds_by_scale"].items())
    x = math.log(lam)
    for (l0, v0), (l1, v1) in zip(pts, pts[1:]):
        if math.log(l0) <= x <= math.log(l1):
            t = (x - math.log(l0)) / (math.log(l1) - math.log(l0))
            return v0 + t * (v1 - v0)
    return None


def evaluate(results: dict, rule, multipliers=MULTIPLIERS) -> dict | None:
    """The multiplier minimising the worst LDS loss of ``rule`` over the settings, and each setting's loss there."""
    units = {name: rule(rec) for name, rec in results.items()}
    results = {name: rec for name, rec in results.items() if units[name] is not None and units[name] > 0}
    if not results:
        return None
    best = {name: max(rec["lds_by_scale"].values()) for name, rec in results.items()}
    choice = None
    for c in multipliers:
        losses = {}
        for name, rec in results.items():
            v = lds_at(rec, c * units[name])
            losses[name] = None if v is None else best[name] - v
        if any(v is None for v in losses.values()):
            continue
        worst, mean = max(losses.values()), sum(losses.values()) / len(losses)
        if choice is None or (worst, mean) < (choice["worst"], choice["mean"]):
            choice = {"multiplier": c, "worst": worst, "mean": mean, "losses": losses, "units": units}
    return choice


def report(results: dict) -> str:
    names = list(results)
    lines = ["<!-- generated by benchmarks/damping_rules.py from damping-rules.json; do not edit -->", "",
             "LDS of the damped target against `lambda` (rows: lambda / (trace(G)/P); **bold**: the setting's best):", "",
             "| setting | P | spectrum | " + " | ".join(f"{c:g}" for c in GRID) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in GRID) + " |"]  # fmt: skip
    for name, rec in results.items():
        best = max(rec["lds_by_scale"].values())
        cells = []
        for c in GRID:
            v = rec["lds_by_scale"].get(str(c))
            approx = rec["approximate_below_scale"] is not None and c < rec["approximate_below_scale"]
            cell = "–" if v is None else (f"**{v:.3f}**" if v == best else f"{v:.3f}") + ("~" if approx else "")
            cells.append(cell)
        spec = "exact (all P)" if rec["complete"] else f"top {rec['rank']} + mean"
        lines.append(f"| {name} | {rec['P']} | {spec} | " + " | ".join(cells) + " |")
    lines += ["", "~: below 2 sigma_k / lam of a truncated spectrum (approximate: the complement is taken as its mean).", "",
              "Rules: the one multiplier `c` (of `lambda = c x unit`) with the least worst-case LDS loss against each "
              "setting's best over the grid; per setting its loss at that `c`:", "",
              "| rule (unit) | reads | c | worst loss | mean loss | " + " | ".join(names) + " |",
              "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in names) + " |"]  # fmt: skip
    rows = []
    for label, (rule, reads) in RULES.items():
        r = evaluate(results, rule)
        if r is None:
            lines_missing = f"| {label} | {reads} | – | not available on every setting | | " + " | ".join("" for _ in names) + " |"
            rows.append((math.inf, lines_missing))
            continue
        cells = " | ".join(f"{r['losses'][n]:.3f}" if n in r["losses"] else "n/a" for n in names)
        partial = "" if len(r["losses"]) == len(names) else f" (on {len(r['losses'])} of {len(names)} settings)"
        rank = r["worst"] if not partial else math.inf
        rows.append((rank, f"| {label} | {reads} | {r['multiplier']:.3g} | {r['worst']:.3f}{partial} | {r['mean']:.3f} | {cells} |"))
    lines += [row for _, row in sorted(rows, key=lambda t: t[0])]
    for label, unit in (("The step rules' mean rule at damping_scale 1 (`3 x trace(G)/P`, the default before)", lambda r: 3 * r["trace"] / r["P"]),
                        ("The eigenspace rule shipped at damping_scale 1", _shipped)):  # fmt: skip
        losses = {name: max(rec["lds_by_scale"].values()) - lds_at(rec, unit(rec)) for name, rec in results.items()}
        lines += ["", f"{label}, LDS loss per setting: " + ", ".join(f"{n} {v:.3f}" for n, v in losses.items())
                  + f"; worst {max(losses.values()):.3f}, mean {sum(losses.values()) / len(losses):.3f}."]  # fmt: skip
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["measure", "report"])
    p.add_argument("--settings", nargs="+", default=[], choices=sorted(HERE))
    p.add_argument("--cache-dir", default="benchmarks/results/cache")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/damping-rules.json"))
    p.add_argument("--rank", type=int, default=1024, help="eigenpairs where eigh of the explicit GGN is not used")
    p.add_argument("--eigh-max", type=int, default=7000, help="eigh the cached explicit GGN up to this P")
    p.add_argument("--redo", action="store_true", help="measure settings already in --out again")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    if args.command == "measure":
        for name in args.settings:
            if name in results and not args.redo:
                print(f"[{name}] in {args.out}, skipped", flush=True)
                continue
            results[name] = measure(name, args)
            atomic_write_json(args.out, results)
    atomic_write_text(args.out.with_suffix(".md"), report(results))
    print(f"wrote {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
