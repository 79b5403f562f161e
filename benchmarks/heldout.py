"""Ours with any callback options on every setting, the bench's three and the two held out, against their ground truth.

    python benchmarks/heldout.py --label defaults --cache-dir /work/cache/bench
    python benchmarks/heldout.py --label converged-reference --cache-dir /work/cache/bench \
        --options '{"mode": "end", "propagation": "chebyshev", "curvature_batch_size": 100000, "damping_scale": 3}'
    python benchmarks/heldout.py --report-only            # rewrite heldout.md from heldout.json

Settings (``convergence.HERE``): ``digits-mlp``, ``mnist1d-mlp``, ``mnist1d-cnn1d`` (the bench's,
``bench.py``) and two that no default was tuned on: ``digits01-mlp`` (the digits MLP with pixels
scaled to [0, 1], not standardized) and ``digits-cnn-adam`` (a 2-conv CNN on the 8x8 images, Adam).
``EXTRA_SETTINGS`` vary what the defaults were measured on (results in ``results/heldout-extra.*``): the digits
MLP with Adam (``digits-mlp-adam``), 64-128-128-10 (``digits-mlp-wide``), logistic regression
(``digits-logreg``), plain SGD with weight decay 1e-2 (``digits-mlp-sgd-wd``), 700 training examples
(``digits700-mlp``), and the MNIST-1D MLP trained 10 or 60 epochs (``mnist1d-mlp-10ep``, ``mnist1d-mlp-60ep``).
Each uses the bench's attributed model (one Lightning fit, the harness's example order), reported
queries and 100 half-data retrains (cached under ``--cache-dir``), example regime.

Per setting and ``--label`` (one Lightning fit with ``AttributionCallback(**options)``, read out by
``attribute()``'s defaults, ``bench.run_ours``): LDS with its 95% interval; the exact damped-GGN
target at the same model and the same ``lambda`` as the store's (its LDS, and the Pearson of every
(query, source) score of our last checkpoint with it); the simulation time over the training time of
the same fit (``setup_ratio``); Q=1 and batched milliseconds per query, Q=1 also paired with dattri's
TRAK-1 (alternated query by query); the store's bytes. Anchors per setting: tuned TRAK-10 and tuned
IF-CG (dattri) from the bench's peer cache, computed with ``--peers`` where missing, else taken from
``--anchors-from`` (a ``bench.py`` result of the same model, queries and ground truth; marked). The
pass/fail columns are :func:`lightning_attr.evaluation.targets.check`'s.

Results accumulate in ``--out`` (JSON, written after every setting): a rerun skips every (label,
setting) it holds, so an interrupted run resumes; the same label with other options is refused.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import SettingBench, ci95, lds_on_first_queries, nanmean, run_ours  # noqa: E402
from convergence import HERE  # noqa: E402

from lightning_attr._io import atomic_write_json, atomic_write_text  # noqa: E402
from lightning_attr.evaluation.targets import check, lds_on_queries  # noqa: E402

SETTINGS = ["digits-mlp", "mnist1d-mlp", "mnist1d-cnn1d", "digits01-mlp", "digits-cnn-adam"]
EXTRA_SETTINGS = [  # convergence.HERE's settings held out from the defaults' choice (results/heldout-extra.*)
    "digits-mlp-adam", "digits-mlp-wide", "digits-logreg", "digits-mlp-sgd-wd", "digits700-mlp", "mnist1d-mlp-10ep",
    "mnist1d-mlp-60ep", "digits-mlp-deep",
]  # fmt: skip
ANCHORS = {"trak10_tuned_lds": "TRAK-10 dattri", "ifcg_tuned_lds": "IF-CG"}  # targets.anchors' key -> bench.py's peer label


class Results:
    """``--out``'s content: ``{"runs": {label: {"options": {...}, "settings": {setting: row}}}, "anchors": {setting: {...}}}``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {"runs": {}, "anchors": {}}

    def run(self, label: str, options: dict) -> dict:
        """The rows of ``label``; a label already recorded with other options is an error (nothing is overwritten)."""
        runs = self.data["runs"]
        if label in runs and runs[label]["options"] != options:
            raise SystemExit(
                f"{self.path} already holds label {label!r} with options {runs[label]['options']}, not {options}: "
                "pick another --label (or delete that label from the file to measure it again)."
            )
        return runs.setdefault(label, {"options": options, "settings": {}})["settings"]

    def save(self) -> None:
        atomic_write_json(self.path, self.data)
        atomic_write_text(self.path.with_suffix(".md"), markdown(self.data))


def from_bench(records: list[dict], name: str, options: dict, source: str) -> dict | None:
    """The row of ``name`` from a ``bench.py`` result (``records``): its example-regime ours row with the same
    callback options (the same fit, model, queries and ground truth; its commit is kept in the row), or None."""
    ours = [r for r in records if (r["setting"], r["regime"]) == (name, "example") and r["method"].startswith("ours")
            and r["config"].get("options") == options]  # fmt: skip
    if not ours:
        return None
    r, c = ours[0], ours[0]["config"]
    damping = (c.get("step_rule") or {}).get("damping")
    row = {
        "method": r["method"], "lds": r["lds"], "lds_ci95": r["lds_ci95"], "damping": damping, "setup_s": r["setup_s"],
        "setup_ratio": r["setup_ratio"], "fit_s_with_callback": c["fit_s_with_callback"], "plain_fit_s_cached": c["plain_fit_s_separate_runs"],
        "query_ms_single": r["query_ms_single"], "query_ms_batched": r["query_ms_batched"], "storage_bytes": r["storage_bytes"],
        "peak_rss_mb": r["peak_rss_mb"], "n_queries": r["n_queries"], "n_sources": r["n_sources"], "config": c,
        "commit": c["commit"], "measured_at": c["measured_at"], "from": f"{source} (bench.py's row of the same fit)",
    }  # fmt: skip
    exact = [x for x in records if (x["setting"], x["regime"]) == (name, "example") and x["method"].startswith("exact")
             and x["config"].get("damping") == damping]  # fmt: skip
    if exact:
        row["exact"] = {"damping": damping, "lds": exact[0]["lds"], "lds_ci95": exact[0]["lds_ci95"]}
        row["pearson_to_exact"] = r["pearson_to_exact"]
        row["pearson_of"] = "our last checkpoint" if len(c.get("store_checkpoints") or []) > 1 else "our scores"
    return row


class SettingRun:
    """One setting's bench (model, queries, LDS ground truth, exact target, peer cache) as ``bench.py`` builds it."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        bench_args = SimpleNamespace(
            quick=False, quick_queries=0, quick_subsets=0, cache_dir=args.cache_dir, plain_fits=0, no_tuning=False,
            variants=("tuned",), slow_peers=args.slow_peers, slow_queries=args.slow_queries,
            single_repeats=args.single_repeats, batched_repeats=args.batched_repeats, paired_rounds=args.paired_rounds,
        )  # fmt: skip
        self.name, self.args = name, args
        self.bench = b = SettingBench(HERE[name], bench_args)
        b.model()
        b.example_truth()

    def lds(self, scores: torch.Tensor) -> tuple[float, list[float]]:
        per_query = self._per_query(scores)
        return round(nanmean(per_query), 4), ci95(per_query)

    def _per_query(self, scores: torch.Tensor) -> torch.Tensor:
        return self.bench.lds("example", scores, self.bench.rep_idx[: len(scores)])

    def has_exact(self) -> bool:
        b = self.bench
        return self.args.build_ggn or b.cache.load("ggn", b._exact_key()) is not None

    def ours(self, label: str, options: dict) -> dict:
        b = self.bench
        r, damping = run_ours(b, "example", options, label)
        lds, ci = self.lds(r.scores)
        r.config["lds_on_first_queries"] = lds_on_first_queries(self._per_query(r.scores), b.args)
        row = {
            "method": r.method, "lds": lds, "lds_ci95": ci, "damping": damping,
            "lds_per_query": [round(float(v), 4) for v in self._per_query(r.scores)],  # reported queries, in order
            "setup_s": round(r.setup_s, 2), "setup_ratio": round(r.setup_ratio, 2),
            "fit_s_with_callback": r.config["fit_s_with_callback"], "plain_fit_s_cached": round(b.plain_fit_s, 3),
            "query_ms_single": round(r.query_ms_single, 3), "query_ms_batched": round(r.query_ms_batched, 4),
            "storage_bytes": r.storage_bytes, "peak_rss_mb": round(r.peak_rss_mb, 1), "n_queries": len(r.scores),
            "n_sources": r.scores.shape[1], "config": r.config, "commit": r.config["commit"], "measured_at": r.config["measured_at"],
        }  # fmt: skip
        if damping is not None and self.has_exact():
            exact, _ = b.exact_scores(damping)
            e_lds, e_ci = self.lds(exact)
            row["exact"] = {"damping": damping, "lds": e_lds, "lds_ci95": e_ci}
            row["pearson_to_exact"] = round(b.pearson_to_exact(r, damping), 4)
            row["pearson_of"] = "our last checkpoint" if r.final_scores is not None else "our scores"
        return row

    def anchors(self, compute: bool, imported: list[dict]) -> dict:
        """``{targets key: {"method", "lds", "lds_ci95", "n_queries", "source"}}`` for tuned TRAK-10 and IF-CG."""
        out = {}
        for key, label in ANCHORS.items():
            r = None
            try:
                r = self.bench.peer_result(label, "tuned", compute)
            except Exception:
                traceback.print_exc()
            if r is not None:
                lds, ci = self.lds(r.scores)
                out[key] = {"method": r.method, "lds": lds, "lds_ci95": ci, "n_queries": len(r.scores), "source": "bench cache",
                            "measured_at": r.config.get("measured_at")}  # fmt: skip
                continue
            rows = [x for x in imported if x["setting"] == self.name and x["regime"] == "example" and x["method"].startswith(
                label.split()[0] + " ") and "[tuned]" in x["method"] and "dattri" in x["method"]]  # fmt: skip
            if rows:
                x = rows[0]
                out[key] = {"method": x["method"], "lds": x["lds"], "lds_ci95": x["lds_ci95"], "n_queries": x["n_queries"],
                            "source": f"{Path(self.args.anchors_from).name} (same model, queries and ground truth)"}  # fmt: skip
        return out


# ------------------------------------------------------------------------------------------ output
def _num(x, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def _provenance(anchor: dict, row: dict) -> str:
    """† for an anchor from a result JSON rather than the cache; where it scored fewer queries than ours,
    how many, and ours on them (what the verdict compares)."""
    mark = "" if anchor["source"] == "bench cache" else " †"
    n = anchor["n_queries"]
    if n == row["n_queries"]:
        return mark
    ours = lds_on_queries(row, n)
    return mark + f" ({n} q; ours {'–' if ours is None else format(ours, '.3f')})"


def markdown(data: dict) -> str:
    lines = ["<!-- generated by benchmarks/heldout.py from heldout.json; do not edit -->", ""]
    for label, run in data["runs"].items():
        if not run["settings"]:
            continue
        lines += [
            f"### `{label}`: callback options {json.dumps(run['options'])} over the defaults", "",
            "| setting | ours: LDS (95% CI) | exact target, same λ: LDS | Pearson to exact | TRAK-10 tuned (+0.02) | IF-CG tuned "
            "| setup / training (same fit) | Q=1 ms (paired: ours vs TRAK-1) | ms/query (batched) | storage MB | λ "
            "| LDS ≥ TRAK-10+0.02 | LDS ≥ IF-CG | setup ≤ limit | Q=1 ≤ TRAK-1 |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]  # fmt: skip
        order = SETTINGS + EXTRA_SETTINGS
        for name in [s for s in order if s in run["settings"]] + [s for s in run["settings"] if s not in order]:
            row, anchor = run["settings"][name], data["anchors"].get(name, {})
            a = {k: (anchor.get(k) or {}).get("lds") for k in ANCHORS}
            a["n_queries"] = {k: (anchor.get(k) or {}).get("n_queries") for k in ANCHORS}
            verdict = check(row, {**a, "trak1_query_ms_single": None}, HERE[name].setup_limit if name in HERE else None)
            exact, paired = row.get("exact") or {}, row["config"].get("paired_q1")
            trak, ifcg = anchor.get("trak10_tuned_lds"), anchor.get("ifcg_tuned_lds")
            trak_cell = "–" if trak is None else f"{trak['lds']:.3f} ({trak['lds'] + 0.02:.3f})" + _provenance(trak, row)
            ifcg_cell = "–" if ifcg is None else f"{ifcg['lds']:.3f}" + _provenance(ifcg, row)
            q1 = f"{row['query_ms_single']:.1f}" + ("" if not paired else f" ({paired['ours_ms']:.1f} vs {paired['trak1_dattri_ms']:.1f})")
            ci = row["lds_ci95"]
            lines.append(
                f"| {name} | {row['lds']:.3f} ({ci[0]:.3f}–{ci[1]:.3f}) | {_num(exact.get('lds'), '.3f')} "
                f"| {_num(row.get('pearson_to_exact'), '.3f')} | {trak_cell} | {ifcg_cell} | {row['setup_ratio']:.1f}x | {q1} "
                f"| {row['query_ms_batched']:.3f} | {row['storage_bytes'] / 1e6:.2f} | {_num(row.get('damping'), '.3g')} "
                f"| {verdict['lds_vs_trak10']} | {verdict['lds_vs_ifcg']} | {verdict['setup']} | {verdict['query_q1']} |"
            )
        lines += ["", f"Commit(s): {', '.join(sorted({r['commit'] for r in run['settings'].values()}))}; "
                  f"measured {min(r['measured_at'] for r in run['settings'].values())} to "
                  f"{max(r['measured_at'] for r in run['settings'].values())} UTC.", ""]  # fmt: skip
    if any(x["source"] != "bench cache" for a in data["anchors"].values() for x in a.values()):
        lines += ["† anchor taken from the bench's result JSON (same model, queries and ground truth), not from its cache.", ""]
    lines += ["Setup limits: 10x the training on the digits MLPs, 30x on the Adam CNNs, none on the MNIST-1D MLP. "
              "An anchor scored on fewer queries than ours (q) is compared with ours on those queries.", ""]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", default="defaults", help="the name of this set of options in --out")
    p.add_argument("--options", default="{}", help="callback options over its defaults, as JSON")
    p.add_argument("--settings", nargs="+", default=SETTINGS, choices=sorted(HERE))
    p.add_argument("--cache-dir", default="benchmarks/results/cache")
    p.add_argument("--out", default="benchmarks/results/heldout.json")
    p.add_argument("--peers", action="store_true", help="compute tuned TRAK-10 / IF-CG where the cache lacks them")
    p.add_argument("--anchors-from", default="benchmarks/results/latest.json", help="bench.py result to take missing anchors from")
    p.add_argument("--slow-peers", nargs="*", default=["IF-CG"], help="peers scored on the first --slow-queries reported queries")
    p.add_argument("--slow-queries", type=int, default=100)
    p.add_argument("--from-bench", default=None, metavar="JSON",
                   help="a bench.py result of the same code: its ours rows with the same options are taken, not refitted")
    p.add_argument("--build-ggn", action="store_true", help="build the explicit GGN where it is not cached (minutes, P^2 floats)")
    p.add_argument("--single-repeats", type=int, default=20)
    p.add_argument("--batched-repeats", type=int, default=3)
    p.add_argument("--paired-rounds", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    try:
        options = json.loads(args.options)
    except json.JSONDecodeError as err:
        raise SystemExit(f"--options must be a JSON object of callback arguments, e.g. '{{\"mode\": \"end\"}}': {err}") from None
    if not isinstance(options, dict):
        raise SystemExit(f"--options must be a JSON object of callback arguments, got {options!r}.")
    results = Results(Path(args.out))
    if args.report_only:
        results.save()
        return
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    rows = results.run(args.label, options)
    imported = json.loads(Path(args.anchors_from).read_text()) if args.anchors_from and Path(args.anchors_from).exists() else []
    for name in args.settings:
        have_anchors = set(results.data["anchors"].get(name, {})) == set(ANCHORS)
        if name in rows and (have_anchors or not args.peers):
            print(f"[{name}] {args.label}: in {args.out}, skipped", flush=True)
            continue
        run = SettingRun(name, args)
        results.data["anchors"][name] = {**results.data["anchors"].get(name, {}), **run.anchors(args.peers, imported)}
        results.save()
        taken = from_bench(json.loads(Path(args.from_bench).read_text()), name, options, Path(args.from_bench).name) if args.from_bench else None
        if name not in rows and taken is not None:
            rows[name] = taken
            print(f"[{name}] {args.label}: taken from {args.from_bench}", flush=True)
            results.save()
        if name not in rows:
            print(f"[{name}] ours, {args.label}: {options or 'the callback defaults'}", flush=True)
            rows[name] = run.ours(args.label, options)
            print(f"[{name}]   LDS {rows[name]['lds']}, exact {rows[name].get('exact')}, Pearson {rows[name].get('pearson_to_exact')}, "
                  f"setup {rows[name]['setup_ratio']}x", flush=True)  # fmt: skip
            results.save()
    print(f"wrote {args.out}, {Path(args.out).with_suffix('.md')}")


if __name__ == "__main__":
    main()
