"""Convergence of the propagation rules, and damping, against the exact target and retraining.

    python benchmarks/convergence.py --settings digits-mlp digits01-mlp digits-cnn-adam mnist1d-mlp \
        --out benchmarks/results/convergence.json

Per setting: ONE Lightning fit (the bench's recipe and example order, ``benchmarks/bench.py``), then

- ``end``: Pearson between our scores and the explicit damped-GGN influence at the same trained model
  (``lightning_attr.evaluation.ExactInfluence``, same damping) against the number of curvature
  products ``K``, per propagation rule, on ``--curve-sources`` random sources (the rules act on each
  source independently), replayed batches of ``curvature_batch_size`` as the callback's end mode does;
- ``online``: the same Pearson for fits with ``AttributionCallback(mode="online", horizon=K,
  propagation=rule)``, all sources, and the callback's simulation time as a multiple of the
  training time of the same fit (``setup_ratio``);
- ``lds``: LDS against 100 half-data retrains (``RetrainingHarness``; the bench's cache layout,
  so ground truth is shared with ``bench.py``) for the exact target and for the online fits;
- ``damping``: LDS of the exact target and of the chosen online rule against ``damping_scale``.

Scores are the linear readout ``(1/n) grad f_q^T r_b`` with the exact query gradients, so the
comparison measures the responses only. Writes ``--out`` (JSON; a rerun adds to it) and, with
``--figure``, Pearson against K per rule for every setting in it with end curves
(``docs/img/propagation.png``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import SETTINGS, Setting, SettingBench, fit, make_net  # noqa: E402

from lightning_attr import AttributionCallback, ResponseStore  # noqa: E402
from lightning_attr.curvature import curvature_operator  # noqa: E402
from lightning_attr.data import TensorSplit, load_digits, load_mnist1d  # noqa: E402
from lightning_attr.evaluation import RetrainingHarness, TrainingRecipe, linear_datamodeling_scores  # noqa: E402
from lightning_attr.evaluation.exact import ExactInfluence  # noqa: E402
from lightning_attr._io import atomic_write_json  # noqa: E402
from lightning_attr.functional import functional_view  # noqa: E402
from lightning_attr.models import CNN, mlp  # noqa: E402
from lightning_attr.parameters import ParameterSpace  # noqa: E402
from lightning_attr.simulation import PROPAGATIONS, estimate_step_rule, propagate  # noqa: E402


def load_digits_unit(n_train: int = 1400, seed: int = 0) -> TensorSplit:
    """The digits split of :func:`load_digits` with raw pixels scaled to [0, 1] (not standardized)."""
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    x, y = torch.as_tensor(data.data / 16.0, dtype=torch.float32), torch.as_tensor(data.target)
    perm = torch.as_tensor(np.random.default_rng(seed).permutation(len(x)))
    tr, te = perm[:n_train], perm[n_train:]
    return TensorSplit(x[tr], y[tr], x[te], y[te], 10, "digits01")


SGD = TrainingRecipe(30, 64, 0.05, 0.9, 1e-3)
HERE = {
    **SETTINGS,
    "digits01-mlp": Setting(
        "digits01-mlp", lambda: load_digits_unit(1400, 0), lambda d: mlp(64, [64], d.num_classes), "mlp-64-64-10", SGD, 97,
        setup_limit=10.0,
    ),
    "digits-cnn-adam": Setting(
        "digits-cnn-adam", lambda: load_digits(1400, seed=0), lambda d: CNN([64], d.num_classes, (16, 32)), "cnn-16-32",
        TrainingRecipe(30, 64, 3e-3, 0.9, 1e-3, "adam"), 97, setup_limit=30.0,
    ),
    # Held out from every default (issue 7, heldout2): each stresses what the trajectory ensemble's rule
    # (checkpoints after 10% and 20% of the epochs, ``callback.early_checkpoint_epochs``) assumes. Data and
    # queries as the bench's setting they vary; setup limits as the bench's for a digits MLP.
    "digits-mlp-adam": Setting(  # another optimizer: Adam on the bench's digits MLP
        "digits-mlp-adam", lambda: load_digits(1400, seed=0), lambda d: mlp(64, [64], d.num_classes), "mlp-64-64-10",
        TrainingRecipe(30, 64, 3e-3, 0.9, 1e-3, "adam"), 97, setup_limit=10.0,
    ),
    "digits-mlp-wide": Setting(  # deeper and wider: 26k parameters (the bench's digits MLP has 4.8k)
        "digits-mlp-wide", lambda: load_digits(1400, seed=0), lambda d: mlp(64, [128, 128], d.num_classes),
        "mlp-64-128-128-10", SGD, 97, setup_limit=10.0,
    ),
    "digits-mlp-deep": Setting(  # deeper: five hidden layers of 64 (21k parameters; issue 7's damping study)
        "digits-mlp-deep", lambda: load_digits(1400, seed=0), lambda d: mlp(64, [64] * 5, d.num_classes),
        "mlp-64x5-10", SGD, 97, setup_limit=10.0,
    ),
    "digits-logreg": Setting(  # convex: multinomial logistic regression, one linear layer
        "digits-logreg", lambda: load_digits(1400, seed=0), lambda d: mlp(64, [], d.num_classes), "linear-64-10", SGD, 97,
        setup_limit=10.0,
    ),
    "digits-mlp-sgd-wd": Setting(  # plain SGD (no momentum) with 10x the weight decay
        "digits-mlp-sgd-wd", lambda: load_digits(1400, seed=0), lambda d: mlp(64, [64], d.num_classes), "mlp-64-64-10",
        TrainingRecipe(30, 64, 0.1, 0.0, 1e-2), 97, setup_limit=10.0,
    ),
    "digits700-mlp": Setting(  # half the training set (700 examples; 1,000 reported queries)
        "digits700-mlp", lambda: load_digits(700, seed=0), lambda d: mlp(64, [64], d.num_classes), "mlp-64-64-10", SGD, 97,
        setup_limit=10.0,
    ),
    "mnist1d-mlp-10ep": Setting(  # a third of the epochs: "auto" checkpoints after epochs 1 and 2
        "mnist1d-mlp-10ep", lambda: load_mnist1d(4000, 1000), lambda d: mlp(40, [100, 100], d.num_classes),
        "mlp-40-100-100-10", TrainingRecipe(10, 64, 0.05, 0.9, 1e-3), 100, 300, n_loo=50, loo_seeds=2, group_seeds=2,
    ),
    "mnist1d-mlp-60ep": Setting(  # twice the epochs: "auto" checkpoints after epochs 6 and 12
        "mnist1d-mlp-60ep", lambda: load_mnist1d(4000, 1000), lambda d: mlp(40, [100, 100], d.num_classes),
        "mlp-40-100-100-10", TrainingRecipe(60, 64, 0.05, 0.9, 1e-3), 100, 300, n_loo=50, loo_seeds=2, group_seeds=2,
    ),
}  # fmt: skip


def pearson(a: Tensor, b: Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


class Study:
    """One setting: the fitted model, its exact target, the ground truth, and the measurements."""

    def __init__(self, setting: Setting, args) -> None:
        self.setting, self.args = setting, args
        self.data = d = setting.load()
        q = torch.randperm(len(d.x_test), generator=torch.Generator().manual_seed(1))[: args.queries].sort().values
        self.xq, self.yq, self.q_idx = d.x_test[q], d.y_test[q], q
        t = time.perf_counter()
        self.module, self.plain_fit_s = fit(setting, d, [])
        self.net = self.module.net.eval()
        self.exact = ExactInfluence(self.net, d.x_train, d.y_train, ggn=self._cached_ggn())
        self.g_query = self.exact.gradients(self.xq, self.yq).float()  # [Q, P]
        _ = self.exact.ggn
        self.n = len(d.x_train)
        print(f"[{setting.name}] fit {self.plain_fit_s:.1f}s, P={self.exact.num_parameters}, exact GGN in {time.perf_counter() - t:.0f}s", flush=True)
        self._targets: dict[float, Tensor] = {}
        self._truth = None

    def _cached_ggn(self) -> Tensor | None:
        """The explicit GGN from ``bench.py``'s cache (``--cache-dir``) if it was built for these very weights."""
        args = SimpleNamespace(quick=False, quick_queries=0, quick_subsets=0, cache_dir=self.args.cache_dir, plain_fits=0)
        bench = SettingBench(self.setting, args)
        hit = bench.cache.load("ggn", bench._exact_key())
        same = all(torch.equal(a, b) for a, b in zip(bench.model().parameters(), self.net.parameters()))
        return hit[0]["ggn"] if hit is not None and same else None

    def target(self, damping: float) -> Tensor:
        key = round(damping, 12)
        if key not in self._targets:
            self._targets[key] = self.exact.scores(self.xq, self.yq, damping)
        return self._targets[key]

    def truth(self):
        if self._truth is None:
            s, d = self.setting, self.data
            harness = RetrainingHarness(
                lambda seed: make_net(s, d, seed), f"{s.name}-{s.arch}", d.x_train, d.y_train, d.x_test, d.y_test, None,
                s.recipe, Path(self.args.cache_dir) / s.name,
            )  # fmt: skip
            t = time.perf_counter()
            self._truth = harness.subsets(self.args.subsets, 0.5)
            print(f"[{s.name}] ground truth: {self.args.subsets} retrains ready in {time.perf_counter() - t:.0f}s", flush=True)
        return self._truth

    def lds(self, scores: Tensor) -> float:
        gt = self.truth()
        return float(linear_datamodeling_scores(scores, gt.masks, gt.values[:, self.q_idx]).nanmean())

    def scores(self, responses: Tensor) -> Tensor:
        """Linear readout ``[Q, S]`` of ``responses: [S, P]`` (already divided by n)."""
        return self.g_query @ responses.T

    # -- end of training: one propagation per rule, Pearson recorded along the way
    def end_curves(self, ks: list[int], damping_scale: float = 1.0, safety=None) -> dict:
        d, args = self.data, self.args
        sources = torch.randperm(self.n, generator=torch.Generator().manual_seed(4))[: args.curve_sources].sort().values
        space = ParameterSpace.of(self.module)
        out = {}
        with functional_view(self.module, space) as (model, theta):
            u0 = self.exact.gradients(d.x_train[sources], d.y_train[sources]).float()
            shuffled = DataLoader(TensorDataset(d.x_train, d.y_train), args.curvature_batch_size, shuffle=True,
                                  generator=torch.Generator().manual_seed(1), drop_last=True)  # fmt: skip
            batches = list(itertools.islice(itertools.cycle(shuffled), max(ks)))
            operators = [curvature_operator("ggn", model, theta, [b], 2048) for b in batches]
            for rule_name in PROPAGATIONS:
                rule = estimate_step_rule(operators[0], theta.numel(), "auto", "auto", damping_scale,
                                          torch.Generator().manual_seed(0), theta.device, rule_name)  # fmt: skip
                target = self.target(rule.damping)[:, sources]
                curve = {}

                def record(k, estimate):
                    if k in ks:
                        curve[k] = round(pearson(self.scores(estimate / self.n), target), 4)

                t = time.perf_counter()
                propagate(u0, operators, rule, on_step=record)
                out[rule_name] = {"pearson": curve, "step_rule": rule.to_json(), "seconds": round(time.perf_counter() - t, 2)}
                print(f"[{self.setting.name}] end {rule_name}: " + " ".join(f"K={k}:{v:.3f}" for k, v in curve.items()), flush=True)
        return out

    # -- online: one fit per (rule, horizon)
    def online(self, spec: dict, lds: bool = False) -> dict:
        """One online fit with ``AttributionCallback(mode="online", **spec)``."""
        with tempfile.TemporaryDirectory() as tmp:
            cb = AttributionCallback(dirpath=tmp + "/r", mode="online", **spec)
            module, fit_s = fit(self.setting, self.data, [cb])
            store = ResponseStore.load(cb.dirpath)
            info = store.checkpoint_info("final")
            responses = store.responses("final").float()
        sim_s = float(info["simulation_seconds"])
        scores = self.scores(responses)
        target = self.target(info["step_rule"]["damping"])
        rec = {
            **spec, "pearson": round(pearson(scores, target), 4),
            "setup_ratio": round(sim_s / (fit_s - sim_s), 2), "simulation_s": round(sim_s, 2), "fit_s": round(fit_s, 2),
            "step_rule": info["step_rule"], "n_valid": info["n_valid"],
        }  # fmt: skip
        if lds:
            rec["lds"] = round(self.lds(scores), 4)
            rec["lds_exact"] = round(self.lds(target), 4)
        print(f"[{self.setting.name}] online: " + json.dumps({k: v for k, v in rec.items() if k != "step_rule"}), flush=True)
        return rec


def figure(results: dict, path: Path) -> None:
    """Pearson to the exact target against K, one panel per setting, one line per rule (end mode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name, rec in results.items() if rec.get("end")]
    if not names:
        return
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        rec = results[name]
        for rule, curve in rec["end"].items():
            points = sorted((int(k), v) for k, v in curve["pearson"].items())
            ax.plot([k for k, _ in points], [v for _, v in points], "o-", label=rule)
        ax.set_xscale("log")
        ax.set_xlabel("K (curvature products per source)")
        ax.set_ylabel("Pearson to the exact target")
        ax.set_title(f"{name}, P = {rec['P']:,}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def parse_spec(spec: str) -> dict:
    """``'propagation=heavy_ball,horizon=20'`` -> callback kwargs (ints and floats parsed)."""
    out = {}
    for item in filter(None, spec.split(",")):
        key, value = item.split("=", 1)
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                pass
        out[key] = value
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=["digits-mlp", "digits01-mlp", "digits-cnn-adam", "mnist1d-mlp"], choices=sorted(HERE))
    p.add_argument("--out", default="benchmarks/results/convergence.json")
    p.add_argument("--cache-dir", default="benchmarks/results/cache")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--subsets", type=int, default=100)
    p.add_argument("--curve-sources", type=int, default=300)
    p.add_argument("--curvature-batch-size", type=int, default=256)
    p.add_argument("--end-ks", type=int, nargs="+", default=[5, 10, 20, 30, 50, 100, 200])
    p.add_argument("--online", nargs="*", default=[], metavar="SPEC",
                   help="online fits, each 'propagation=heavy_ball,horizon=20,curvature_batch_size=256' (callback kwargs)")
    p.add_argument("--lds", action="store_true", help="also LDS (retraining ground truth) for every online fit")
    p.add_argument("--damping", default=None, metavar="SPEC", help="damping sweep of this online spec (default: none)")
    p.add_argument("--damping-scales", type=float, nargs="+", default=[0.1, 0.3, 1.0, 3.0, 10.0])
    p.add_argument("--skip-end", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--figure", default=None, help="write the Pearson-vs-K figure here (e.g. docs/img/propagation.png)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    out_path = Path(args.out)
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    for name in args.settings:
        study = Study(HERE[name], args)
        rec = results.setdefault(name, {})
        rec.update({"plain_fit_s": round(study.plain_fit_s, 2), "P": study.exact.num_parameters, "n": study.n, "queries": len(study.xq)})
        if not args.skip_end:
            rec["end"] = study.end_curves(args.end_ks)
        online = rec.setdefault("online", {})
        for spec in args.online:
            online[spec] = study.online(parse_spec(spec), lds=args.lds)
            atomic_write_json(out_path, results)
        if args.damping:
            sweep = rec.setdefault("damping", {})
            for scale in args.damping_scales:
                sweep[f"{args.damping},damping_scale={scale}"] = study.online({**parse_spec(args.damping), "damping_scale": scale}, lds=True)
                atomic_write_json(out_path, results)
        atomic_write_json(out_path, results)
    if args.figure:
        figure(results, Path(args.figure))


if __name__ == "__main__":
    main()
