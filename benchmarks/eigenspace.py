"""How many curvature products the top-k GGN eigenspace needs (issue 7): block Krylov against subspace iteration.

    python benchmarks/eigenspace.py accuracy --settings digits-mlp digits01-mlp digits-cnn-adam mnist1d-cnn1d \
        --cache-dir /work/cache/bench --out benchmarks/results/eigenspace.json
    python benchmarks/eigenspace.py warm --cache-dir /work/cache/bench --out benchmarks/results/eigenspace-warm.json
    OMP_NUM_THREADS=1 python benchmarks/eigenspace.py members --settings digits-mlp --cache-dir /work/cache/bench \
        --out benchmarks/results/eigenspace-members.jsonl
    OMP_NUM_THREADS=1 python benchmarks/eigenspace.py timing --settings digits-mlp --out benchmarks/results/eigenspace-members.jsonl

``accuracy``: on the bench's attributed model and its cached explicit full-data GGN ``G`` (the operator is
``V -> V G``, so a product is a matrix product), each finder of :func:`lightning_attr.spectral.top_eigenspace`
at several ranks ``k`` and product budgets. Two measures of what it found, ``(V, sigma)``:

- ``pearson``: Pearson of the deflated damped responses ``(1/n) [g/lam + V^T diag(1/(sigma+lam) - 1/lam) V g]``,
  read out linearly on the reported test queries, against the exact target ``(1/n) g_q^T (G + lam)^-1 g_b``
  (``torch.linalg.eigh`` of ``G`` in float64), at ``lam = --damping-scale x trace(G)/P``; ``lds`` is theirs on
  the bench's ground truth (``lds_exact``: the exact target's).
- ``ritz_error``: max over the top ``k`` of ``|sigma_j - lambda_j| / lambda_j`` (and its median), with
  ``lambda_j`` from ``eigh``; ``reach`` = ``sigma_k / lam``.

``warm``: digits MLP, two checkpoints of its one bench fit (the cached epoch-24 snapshot and the final model
at epoch 30), the real matrix-free GGN operator (:func:`lightning_attr.curvature.curvature_operator`, full
training set). The basis found at epoch 24 (``--warm-products``) starts the finder at epoch 30; cold and warm
runs at the same budgets are scored as in ``accuracy`` against the final model's cached explicit GGN.
``members``: the trajectory ensemble's eigenspaces (``checkpoint_epochs="auto"``, ``rank="auto"``, the defaults)
found in up to three ways in one process, on one trajectory per setting (the same fit, seed 0, via ``ensembles.py``'s
``Evaluation``): ``budget`` (every checkpoint cold, stopped by the 2-products-per-pair rule alone: the finder before
the residual rule), ``residual`` (cold, also stopped once the Ritz residuals converge, ``DEFAULT_RESIDUAL_TOLERANCE``:
what the callback does) and ``warm`` (each checkpoint after the first starts from the previous one's eigenvectors,
``initial=``, and stops by the residual rule alone; the callback does not: measured, it costs more products). Per
member: curvature products, simulation wall seconds over the plain fit (timed in the same process) and CPU seconds,
rank, why it stopped, LDS, Pearson to ``budget``'s member and, where ``P <= --explicit-max-p``, Pearson to the exact
damped-GGN target at the member's own weights (explicit GGN, Cholesky); per variant the paired ensemble's LDS.
``timing``: the finder's seconds, ``budget`` against ``residual`` alternated in one process (see :func:`timing`).
``members`` and ``timing`` append their records to ``--out`` (JSON lines), no table; ``accuracy`` and ``warm``:
Results accumulate in ``--out`` (one JSON list of rows); ``<out>.md`` is the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from damping import DampingStudy, _pearson  # noqa: E402

from lightning_attr._io import atomic_write_json, atomic_write_text  # noqa: E402
from lightning_attr.curvature import curvature_operator  # noqa: E402
from lightning_attr.functional import functional_view  # noqa: E402
from lightning_attr.models import Classifier  # noqa: E402
from lightning_attr.spectral import Eigenspace, top_eigenspace  # noqa: E402


class Target:
    """The exact damped target of one model and the measures of a found eigenspace against it."""

    def __init__(self, study: DampingStudy, ggn: torch.Tensor, damping_scale: float) -> None:
        b = study.bench
        self.study = study
        self.ggn = ggn.float()  # the operator's matrix
        g = ggn.double()
        exact = b._exact
        self.queries = exact.gradients(b.x_rep, b.y_rep)  # [Q, P] float64
        self.train = exact.gradients(b.data.x_train, b.data.y_train)  # [n, P]
        self.n = self.train.shape[0]
        t = time.perf_counter()
        values, vectors = torch.linalg.eigh(g)
        self.eigh_s = time.perf_counter() - t
        self.eigenvalues, self.eigenvectors = values.flip(0).clamp_min(0), vectors.flip(1)  # [P], [P, P] columns
        self.damping = damping_scale * float(g.diagonal().mean())
        qv, tv = self.queries @ self.eigenvectors, self.train @ self.eigenvectors
        self.exact = (qv / (self.eigenvalues + self.damping)) @ tv.T / self.n  # [Q, n]
        self.plain = self.queries @ self.train.T / self.damping / self.n  # the g/lam part of every deflated response
        self.lds_exact = study.lds(self.exact.float())

    def operator(self, rows: torch.Tensor) -> torch.Tensor:
        return rows @ self.ggn

    def measure(self, space: Eigenspace) -> dict:
        v, sigma = space.vectors.double(), space.eigenvalues.double()
        correction = 1 / (sigma + self.damping) - 1 / self.damping
        scores = self.plain + ((self.queries @ v.T) * correction) @ (self.train @ v.T).T / self.n
        true = self.eigenvalues[: space.rank]
        error = (sigma - true).abs() / true
        return {
            "products": space.products, "pearson": round(_pearson(scores, self.exact), 4), "lds": self.study.lds(scores.float()),
            "ritz_error_max": float(f"{float(error.max()):.3g}"), "ritz_error_median": float(f"{float(error.median()):.3g}"),
            "reach": round(space.reach(self.damping), 3),
        }  # fmt: skip


def _study(name: str, cache_dir: str) -> DampingStudy:
    return DampingStudy(name, argparse.Namespace(cache_dir=cache_dir, build_ggn=False, exact_scales=[]), {})


def accuracy(args: argparse.Namespace, rows: list[dict]) -> None:
    for name in args.settings:
        study = _study(name, args.cache_dir)
        target = Target(study, study.bench.explicit_ggn(), args.damping_scale)
        dim = target.ggn.shape[0]
        head = {"setting": name, "P": dim, "n": target.n, "damping": target.damping, "lds_exact": target.lds_exact}
        print(f"[{name}] P {dim}, eigh {target.eigh_s:.0f}s, lam {target.damping:.3g}, exact LDS {target.lds_exact}", flush=True)
        for rank in args.ranks:
            runs = [("subspace", 2 * rank, {"power_iterations": q}) for q in args.power_iterations]
            budgets = {(b, b * int(f * rank // b)) for b in args.blocks for f in args.budgets}  # whole blocks
            runs += [("krylov", b, {"products": m}) for b, m in sorted(budgets) if m >= b]
            runs.append(("exact", 0, {}))
            for method, block, options in runs:
                for seed in range(args.seeds):
                    if method == "exact":
                        space = Eigenspace(target.eigenvalues[:rank].float(), target.eigenvectors[:, :rank].T.float(), 0)
                    else:
                        space = top_eigenspace(
                            target.operator, dim, rank, method=method, block=block, generator=torch.Generator().manual_seed(seed), **options
                        )
                    row = {**head, "rank": rank, "method": method, "block": block, "seed": seed, **target.measure(space)}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                    if method == "exact":
                        break


def warm(args: argparse.Namespace, rows: list[dict]) -> None:
    study = _study("digits-mlp", args.cache_dir)
    b = study.bench
    final = b.model()
    target = Target(study, b.explicit_ggn(), args.damping_scale)
    dim = target.ggn.shape[0]
    earlier_epoch = max(e for e in b.snap_epochs if e < b.setting.recipe.epochs)
    data = (b.data.x_train, b.data.y_train)

    def real_operator(net: torch.nn.Module):
        with functional_view(Classifier(net)) as (fmodel, theta):
            return curvature_operator("ggn", fmodel, theta, [data], chunk_size=args.chunk_size)

    earlier = b._load_state({f"e.{k}": v for k, v in b.snapshots[earlier_epoch].items()}, "e.")
    head = {"setting": "digits-mlp", "P": dim, "n": target.n, "damping": target.damping, "lds_exact": target.lds_exact,
            "previous_epoch": earlier_epoch, "epoch": b.setting.recipe.epochs}  # fmt: skip
    for rank in args.ranks:
        t = time.perf_counter()
        previous = top_eigenspace(real_operator(earlier), dim, rank, products=args.warm_products * rank, generator=torch.Generator().manual_seed(7))
        print(f"[warm] basis at epoch {earlier_epoch}, k={rank}: {previous.products} products in {time.perf_counter() - t:.0f}s", flush=True)
        operator = real_operator(final)
        runs = [("cold", None, b) for b in args.blocks] + [("warm", previous.vectors, None)]
        for start, initial, block in runs:
            for f in args.budgets:
                t = time.perf_counter()
                space = top_eigenspace(
                    operator, dim, rank, block=block, products=int(f * rank), initial=initial, generator=torch.Generator().manual_seed(0)
                )
                seconds = time.perf_counter() - t
                row = {**head, "rank": rank, "method": "krylov", "start": start, "block": space.block, "seconds": round(seconds, 1), **target.measure(space)}
                print(json.dumps(row), flush=True)
                rows.append(row)


def table(rows: list[dict]) -> str:
    keys = ["setting", "rank", "method", "start", "block", "products", "pearson", "lds", "lds_exact", "ritz_error_max", "ritz_error_median", "reach", "seconds"]
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


MEMBER_VARIANTS = ("budget", "residual", "warm")


def _finder_of(variant: str, found: list):
    """``adaptive_eigenspace`` as the engine calls it, made ``variant``'s (see the module's docstring), appending each
    eigenspace to ``found``; for ``"warm"`` the last one starts the next (one fit per finder)."""
    from lightning_attr import spectral

    def finder(*args, tolerance=None, **kwargs):
        tolerance = None if variant == "budget" else tolerance or spectral.DEFAULT_RESIDUAL_TOLERANCE
        initial = found[-1].vectors if variant == "warm" and found else None
        found.append(spectral.adaptive_eigenspace(*args, tolerance=tolerance, initial=initial, **kwargs))
        return found[-1]

    return finder


def members(args: argparse.Namespace) -> None:
    import copy
    import shutil
    import tempfile
    from unittest import mock

    from ensembles import Evaluation
    from convergence import HERE

    from lightning_attr import ResponseStore, engine
    from lightning_attr.evaluation.exact import ExactInfluence

    for name in args.settings:
        evaluation = Evaluation(HERE[name], Path(args.cache_dir), 64)
        x_train, y_train = evaluation.data.x_train, evaluation.data.y_train
        work = Path(tempfile.mkdtemp(prefix="eigenspace-members-"))
        exact: dict[str, torch.Tensor] = {}  # checkpoint -> exact target at its weights (one trajectory: shared by variants)
        reference: dict[str, torch.Tensor] = {}
        try:
            for variant in args.variants:
                found: list = []
                with mock.patch.object(engine, "adaptive_eigenspace", _finder_of(variant, found)):
                    record, scores, model = evaluation.run(variant, {"checkpoint_epochs": "auto"}, 0, work / variant)
                store = ResponseStore.load(work / variant)
                cpu = 0.0
                for (c, member), space in zip(record["members"].items(), found):
                    info = store.checkpoint_info(c)
                    rule = info["step_rule"]
                    member["simulation_cpu_s"], cpu = round(info["simulation_cpu_seconds"] - cpu, 2), info["simulation_cpu_seconds"]
                    member.update({k: rule.get(k) for k in ("eigenspace_stop", "eigenspace_products")}, warm_start_rows=space.seeded)
                    paired = scores[c]["paired"]
                    reference.setdefault(c, paired)
                    member["pearson_to_budget"] = round(_pearson(paired.double(), reference[c].double()), 4)
                    if store.space.size <= args.explicit_max_p:
                        if c not in exact:
                            at = copy.deepcopy(model)
                            torch.nn.utils.vector_to_parameters(store.theta(c), [p for p in at.parameters() if p.requires_grad])
                            t = time.perf_counter()
                            exact[c] = ExactInfluence(at.net, x_train, y_train).scores(*evaluation.queries, rule["damping"])
                            print(f"[{name}] exact target at {c} in {time.perf_counter() - t:.0f}s", flush=True)
                        member["pearson_to_exact"] = round(_pearson(paired.double(), exact[c].double()), 4)
                record.update(study="members", P=store.space.size, command=" ".join(sys.argv))
                print(json.dumps(record), flush=True)
                with open(args.out, "a") as fh:
                    fh.write(json.dumps(record) + "\n")
        finally:
            shutil.rmtree(work, ignore_errors=True)


def timing(args: argparse.Namespace) -> None:
    """``timing``: the callback's finder at the end of one plain fit per setting (seed 0), the real matrix-free GGN over
    the training set in the callback's batches, at the damping it would use; ``budget`` and ``residual``
    (:data:`MEMBER_VARIANTS`) alternated for ``--rounds`` rounds in one process: products and the finder's wall and CPU
    seconds, and their medians' ratio (residual / budget)."""
    import statistics

    from bench import fit
    from convergence import HERE

    from lightning_attr import spectral
    from lightning_attr.curvature import estimate_spectrum
    from lightning_attr.deflated import AUTO_RANK_RATIO
    from lightning_attr.settings import AttributionSettings
    from lightning_attr.simulation import resolve_damping

    defaults = AttributionSettings()
    for name in args.settings:
        setting = HERE[name]
        data = setting.load()
        model, _ = fit(setting, data, [], seed=0)
        with functional_view(model) as (fmodel, theta):
            batches = [(x, y) for x, y in zip(data.x_train.split(defaults.curvature_batch_size), data.y_train.split(defaults.curvature_batch_size))]
            operator = curvature_operator("ggn", fmodel, theta, batches, defaults.chunk_size)
            dim = theta.numel()
            generator = torch.Generator().manual_seed(0)
            mean = estimate_spectrum(operator, dim, probes=spectral.TRACE_PROBES, power_iterations=0, generator=generator).mean_eigenvalue
            damping = resolve_damping(defaults.damping, defaults.damping_scale, mean)
            cap = spectral.product_cap(dim, defaults.memory_budget_mb)
            runs: dict[str, list[dict]] = {"budget": [], "residual": []}
            for _ in range(args.rounds):
                for variant, tolerance in (("budget", None), ("residual", spectral.DEFAULT_RESIDUAL_TOLERANCE)):
                    wall, cpu = time.perf_counter(), time.process_time()
                    space = spectral.adaptive_eigenspace(
                        operator, dim, AUTO_RANK_RATIO * damping, max_products=cap, tolerance=tolerance, generator=torch.Generator().manual_seed(0)
                    )  # fmt: skip
                    run = {"products": space.products, "rank": space.rank, "wall_s": round(time.perf_counter() - wall, 2), "cpu_s": round(time.process_time() - cpu, 2)}
                    runs[variant].append(run)
                    print(f"[{name}] {variant}: {run}", flush=True)
        medians = {v: {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "cpu_s")} for v, rs in runs.items()}
        record = {
            "study": "timing", "setting": name, "P": dim, "damping": damping, "runs": runs,
            "residual_over_budget": {k: round(medians["residual"][k] / medians["budget"][k], 3) for k in ("wall_s", "cpu_s")},
            "products": {v: rs[0]["products"] for v, rs in runs.items()}, "command": " ".join(sys.argv),
        }  # fmt: skip
        print(json.dumps(record), flush=True)
        with open(args.out, "a") as fh:
            fh.write(json.dumps(record) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", choices=["accuracy", "warm", "members", "timing"])
    p.add_argument("--settings", nargs="+", default=["digits-mlp", "digits01-mlp", "digits-cnn-adam", "mnist1d-cnn1d"])
    p.add_argument("--cache-dir", default="benchmarks/.cache")
    p.add_argument("--ranks", nargs="+", type=int, default=[128, 256])
    p.add_argument("--power-iterations", nargs="+", type=int, default=[0, 1, 3], help="subspace iteration's q (block 2k)")
    p.add_argument("--blocks", nargs="+", type=int, default=[32, 64, 128], help="block Krylov's block widths")
    p.add_argument("--budgets", nargs="+", type=float, default=[1.0, 1.5, 2.0, 3.0, 4.0], help="products, in units of k")
    p.add_argument("--damping-scale", type=float, default=3.0, help="lam = this x trace(G)/P")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--warm-products", type=float, default=3.0, help="warm: the earlier basis's budget, in units of k")
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--variants", nargs="+", choices=MEMBER_VARIANTS, default=list(MEMBER_VARIANTS), help="members: which finders (budget first)")
    p.add_argument("--rounds", type=int, default=2, help="timing: alternated rounds of the two finders")
    p.add_argument("--explicit-max-p", type=int, default=7000, help="members: the exact target at each member's weights up to this P")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.seeds < 1 or any(k < 1 for k in args.ranks) or any(f <= 0 for f in args.budgets):
        p.error("--seeds, --ranks and --budgets must be positive.")
    if args.study in ("members", "timing"):
        return (members if args.study == "members" else timing)(args)
    rows: list[dict] = []
    (accuracy if args.study == "accuracy" else warm)(args, rows)
    old = json.loads(args.out.read_text()) if args.out.exists() else []
    atomic_write_json(args.out, old + rows)
    atomic_write_text(args.out.with_suffix(".md"), table(old + rows))


if __name__ == "__main__":
    main(sys.argv[1:] if len(sys.argv) > 1 else None)
