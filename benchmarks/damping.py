"""Damping sweep (issue 7, item 2): LDS of our default and of the exact target against ``damping_scale``.

    python benchmarks/damping.py --settings digits-mlp digits01-mlp mnist1d-mlp mnist1d-cnn1d \
        --cache-dir /work/cache/bench --out benchmarks/results/damping.json

Per setting, on the bench's attributed model, reported queries and LDS ground truth (``bench.py``'s
``SettingBench``; held-out settings from ``convergence.py``, ground truth cached the same way):

- ``ours``: one Lightning fit per ``damping_scale`` with ``AttributionCallback(damping_scale=s)`` and
  every other option at its default (online, ``propagation="auto"``, ``horizon=20``), example regime.
  Records its LDS, the damping ``lambda`` it resolved (``s x`` the Hutchinson mean eigenvalue of its
  first curvature batch), its Pearson to the exact target at that same ``lambda``, and the callback's
  simulation time over the training time of the same fit (``setup_ratio``).
  ``pearson_to_exact_sweep``: its Pearson to the exact target at every ``lambda`` of the exact sweep
  (where it peaks is the damping the finite horizon actually delivers).
- ``exact``: the explicit damped-GGN influence at the same model (``ExactInfluence``) at
  ``lambda = s x lambda_1`` for every ``s`` of ``--exact-scales``, ``lambda_1`` being the damping our
  ``damping_scale=1`` fit resolved, so the two curves share their x axis. Only where the explicit
  GGN is cached or ``--build-ggn`` is given (``P = 15,210`` takes minutes and 2 GB per copy).
  ``mean_eigenvalue_full``: ``trace(G)/P`` of the full-data GGN, to compare with the estimate.

Measured before ``lightning_attr.damping`` (results/damping.md): then ``damping_scale=s`` meant ``s x trace(G)/P``; the
step rules now take ``s x 3 trace(G)/P``, so a rerun's online scales are 3x those of the table (the exact sweep's
``lambda_1`` is whatever the scale-1 fit resolved). The eigenspace rule's study is ``damping_rules.py``.

If the exact target's LDS peaks where ours does, the damping rule is the limit; if ours peaks at a
smaller scale than the exact target, the finite horizon already damps. Results accumulate in
``--out`` (a rerun skips what it holds); ``<out>.md`` is the table and ``--figure`` the plot.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import SettingBench, nanmean, run_ours  # noqa: E402
from convergence import HERE  # noqa: E402

from lightning_attr._io import atomic_write_json  # noqa: E402

SCALES = [0.03, 0.1, 0.3, 1.0, 3.0, 10.0]
EXACT_SCALES = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0]


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


class DampingStudy:
    """One setting of the bench (or a held-out one): its model, ground truth and the two sweeps."""

    def __init__(self, name: str, args: argparse.Namespace, record: dict) -> None:
        bench_args = SimpleNamespace(
            quick=False, quick_queries=0, quick_subsets=0, cache_dir=args.cache_dir, plain_fits=0,
            single_repeats=1, batched_repeats=1, paired_rounds=0,
        )  # fmt: skip
        self.bench = b = SettingBench(HERE[name], bench_args)
        self.record, self.args = record, args
        b.model()
        s, d = b.setting, b.data
        b.example_truth()
        record.update({"P": sum(p.numel() for p in b.model().parameters()), "n": len(d.x_train), "queries": len(b.rep_idx),
                       "test_accuracy": b.test_accuracy, "recipe": s.recipe.__dict__})  # fmt: skip

    def lds(self, scores: torch.Tensor) -> float:
        return round(nanmean(self.bench.lds("example", scores, self.bench.rep_idx)), 4)

    @property
    def has_exact(self) -> bool:
        b = self.bench
        return self.args.build_ggn or b.cache.load("ggn", b._exact_key()) is not None

    def exact(self, damping: float) -> torch.Tensor:
        return self.bench.exact_scores(damping)[0]

    def ours(self, scale: float) -> dict:
        """One default fit at ``damping_scale=scale``: LDS, lambda, Pearson to the exact target at it, cost."""
        r, damping = run_ours(self.bench, "example", {"mode": "online", "damping_scale": scale})
        rule = r.config["step_rule"]
        rec = {
            "damping_scale": scale, "damping": damping, "mean_eigenvalue_estimate": rule.get("mean_eigenvalue"),
            "lambda_max_estimate": rule.get("lambda_max"), "step_size": rule.get("step_size"), "lds": self.lds(r.scores),
            "setup_ratio": round(r.setup_ratio, 2), "simulation_s": round(r.setup_s, 2),
            "fit_s": r.config["fit_s_with_callback"],
        }  # fmt: skip
        if self.has_exact:
            rec["pearson_to_exact"] = round(_pearson(r.scores, self.exact(damping)), 4)
            # which damping does the finite horizon deliver? Pearson to the exact target along its whole sweep
            lam1 = damping / scale if scale == 1.0 else self.record.get("exact", {}).get("lambda_1")
            if lam1 is not None:
                rec["pearson_to_exact_sweep"] = {str(s): round(_pearson(r.scores, self.exact(s * lam1)), 4) for s in self.args.exact_scales}
        return rec

    def from_bench(self, path: Path) -> dict | None:
        """The scale-1 point from a ``bench.py`` result of the same setting (its ``ours (default)`` example row)."""
        name = self.bench.setting.name
        rows = [r for r in json.loads(path.read_text()) if (r["setting"], r["regime"], r["method"]) == (name, "example", "ours (default)")]
        if not rows:
            return None
        r = rows[0]
        if r["config"]["callback"].get("damping_scale") != 1.0 or r["n_queries"] != len(self.bench.rep_idx):
            raise ValueError(f"{path}: its ours (default) row of {name} is not at damping_scale 1 on this setting's reported queries.")
        rule = r["config"]["step_rule"]
        return {
            "damping_scale": 1.0, "damping": rule["damping"], "mean_eigenvalue_estimate": rule["mean_eigenvalue"],
            "lambda_max_estimate": rule["lambda_max"], "step_size": rule["step_size"], "lds": r["lds"],
            "setup_ratio": r["setup_ratio"], "simulation_s": r["setup_s"], "fit_s": r["config"]["fit_s_with_callback"],
            "pearson_to_exact": r["pearson_to_exact"], "from": f"{path.name} (bench.py, the same fit)",
        }  # fmt: skip

    def run(self) -> None:
        rec, args = self.record, self.args
        name = self.bench.setting.name
        ours = rec.setdefault("ours", {})
        if args.from_bench and "1.0" not in ours:
            imported = self.from_bench(Path(args.from_bench))
            if imported is not None:
                ours["1.0"] = imported
        for scale in [1.0] + [s for s in args.scales if s != 1.0]:  # scale 1 first: it fixes the exact sweep's lambda_1
            if str(scale) in ours:
                continue
            print(f"[{name}] ours, damping_scale={scale}", flush=True)
            ours[str(scale)] = self.ours(scale)
            print(f"[{name}]   {json.dumps(ours[str(scale)])}", flush=True)
            self.save()
            if scale == 1.0:
                self.exact_sweep()
        self.exact_sweep()

    def exact_sweep(self) -> None:
        rec = self.record
        if not self.has_exact or "1.0" not in rec.get("ours", {}):
            return
        lam1 = rec["ours"]["1.0"]["damping"]
        exact = rec.setdefault("exact", {"lambda_1": lam1, "by_scale": {}})
        if "mean_eigenvalue_full" not in exact:
            g = self.bench.explicit_ggn()
            exact["mean_eigenvalue_full"] = float(g.diagonal().mean())
        for scale in self.args.exact_scales:
            if str(scale) not in exact["by_scale"]:
                exact["by_scale"][str(scale)] = {"damping": scale * lam1, "lds": self.lds(self.exact(scale * lam1))}
                print(f"[{self.bench.setting.name}] exact, scale {scale}: {exact['by_scale'][str(scale)]}", flush=True)
                self.save()

    def save(self) -> None:
        self.args.save()


# ------------------------------------------------------------------------------------------ output
def markdown(results: dict) -> str:
    lines = ["<!-- generated by benchmarks/damping.py from damping.json; do not edit -->", ""]
    for name, rec in results.items():
        ours, exact = rec.get("ours", {}), rec.get("exact", {})
        lines += [f"#### {name} (P = {rec.get('P')}, n = {rec.get('n')}, {rec.get('queries')} queries, test accuracy {rec.get('test_accuracy')})", ""]
        if exact:
            lines += [f"`lambda_1` (our scale-1 damping, Hutchinson on its first curvature batch) = {exact['lambda_1']:.4g}; "
                      f"full-data `trace(G)/P` = {exact['mean_eigenvalue_full']:.4g}.", ""]  # fmt: skip
        lines += ["| damping_scale | λ | ours: LDS | ours: Pearson to exact at its λ | ours: closest exact target (scale: Pearson) "
                  "| ours: setup / fit | exact target: LDS |", "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        scales = sorted({float(s) for s in ours} | {float(s) for s in exact.get("by_scale", {})})
        for s in scales:
            o, e = ours.get(str(s), {}), exact.get("by_scale", {}).get(str(s), {})
            lam = o.get("damping", e.get("damping"))
            sweep = o.get("pearson_to_exact_sweep")
            closest = "–" if not sweep else "{}: {:.3f}".format(*max(sweep.items(), key=lambda kv: kv[1]))
            cells = [f"{s:g}", "–" if lam is None else f"{lam:.3g}", _cell(o.get("lds")), _cell(o.get("pearson_to_exact")), closest,
                     _cell(o.get("setup_ratio"), 1), _cell(e.get("lds"))]  # fmt: skip
            best_o = max((v["lds"] for v in ours.values()), default=None)
            best_e = max((v["lds"] for v in exact.get("by_scale", {}).values()), default=None)
            if o and o.get("lds") == best_o:
                cells[2] = f"**{cells[2]}**"
            if e and e.get("lds") == best_e:
                cells[6] = f"**{cells[6]}**"
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _cell(v, digits: int = 3) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def figure(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        return
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.6), squeeze=False)
    for ax, (name, rec) in zip(axes[0], results.items()):
        for key, label, style in (("ours", "ours (default rule, online)", "o-"), ("exact", "exact damped-GGN target", "s--")):
            pts = rec.get(key, {})
            pts = pts.get("by_scale", {}) if key == "exact" else pts
            xs = sorted(float(s) for s in pts)
            if xs:
                ax.plot(xs, [pts[str(s)]["lds"] for s in xs], style, label=label)
        low, high = ax.get_ylim()
        if high - low < 0.1:  # a flat curve should look flat: at least 0.1 of LDS on the axis
            mid = (low + high) / 2
            ax.set_ylim(mid - 0.05, mid + 0.05)
        ax.set_xscale("log")
        ax.set_xlabel("damping_scale (λ / mean eigenvalue)")
        ax.set_ylabel("LDS")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=["digits-mlp", "digits01-mlp", "mnist1d-mlp", "mnist1d-cnn1d"], choices=sorted(HERE))
    p.add_argument("--scales", type=float, nargs="+", default=SCALES)
    p.add_argument("--exact-scales", type=float, nargs="+", default=EXACT_SCALES)
    p.add_argument("--from-bench", default=None, metavar="JSON", help="take the scale-1 point from this bench.py result (same fit)")
    p.add_argument("--build-ggn", action="store_true", help="build the explicit GGN where it is not cached")
    p.add_argument("--cache-dir", default="benchmarks/results/cache")
    p.add_argument("--out", default="benchmarks/results/damping.json")
    p.add_argument("--figure", default="docs/img/damping.png")
    p.add_argument("--report-only", action="store_true", help="rewrite <out>.md and the figure from <out>")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}

    def save() -> None:
        atomic_write_json(out, results)
        tmp = out.with_suffix(".md.tmp")
        tmp.write_text(markdown(results))
        tmp.replace(out.with_suffix(".md"))

    args.save = save
    if not args.report_only:
        for name in args.settings:
            DampingStudy(name, args, results.setdefault(name, {})).run()
            save()
    save()
    figure(results, Path(args.figure))
    print(f"wrote {out}, {out.with_suffix('.md')}, {args.figure}")


if __name__ == "__main__":
    main()
