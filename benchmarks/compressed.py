"""Compressed responses (``codec="eigen"``) against dense responses and TRAK-1, per example (issue 8's targets).

    OMP_NUM_THREADS=1 python benchmarks/compressed.py --settings digits-mlp mnist1d-mlp --ranks 64 128 256 512 \\
        --cache-dir /work/cache/bench --out benchmarks/results/compressed.json

Per setting (the bench's digits MLP and MNIST-1D MLP, same fit recipe, example order and query split as
``bench.py``) and per rank ``k``: LDS against ``bench.py``'s ground truth (100 half-data retrains,
``RetrainingHarness``, cached), Pearson to the exact damped-GGN target at the same model and damping
(``ExactInfluence``: explicit ``G``, only where ``P <= --exact-max-params``), setup seconds (the callback's clock) against a
plain fit of the same model, per-query cost (Q=1 and batched) interleaved round by round with dattri's
and traker's TRAK-1 in the same process, and storage bytes. Our dense responses (the callback's
defaults) are scored once per setting for the LDS comparison; their scores are cached.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import SETTINGS, ci95, dir_bytes, fit, make_net, nanmean, timed  # noqa: E402

from lightning_attr import AttributionCallback, ResponseStore  # noqa: E402
from lightning_attr.settings import AttributionSettings  # noqa: E402
from lightning_attr.evaluation import RetrainingHarness, linear_datamodeling_scores  # noqa: E402
from lightning_attr.evaluation.exact import ExactInfluence  # noqa: E402
from lightning_attr.evaluation.peers import DattriTRAK, TraKerTRAK  # noqa: E402
from lightning_attr.evaluation.retrain import atomic_write_json  # noqa: E402


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/compressed.json")
    p.add_argument("--settings", nargs="+", default=["digits-mlp", "mnist1d-mlp"], choices=sorted(SETTINGS))
    p.add_argument("--ranks", nargs="+", type=int, default=[64, 128, 256, 512])
    p.add_argument(
        "--horizons", nargs="+", type=int, default=[0],
        help="spectral filter per run: 0 = the codec's default, the damped inverse; K > 0 = the K-step Neumann series",
    )
    p.add_argument("--store-dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--lorif-ranks", nargs="*", type=int, default=[], help="also codec 'lorif' at these c (callback defaults otherwise)")
    p.add_argument("--cache-dir", default="benchmarks/results/cache")
    p.add_argument("--exact-max-params", type=int, default=8000, help="explicit G only up to this P")
    p.add_argument("--no-dense", action="store_true", help="skip our dense responses (LDS comparison)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (ours vs TRAK-1)")
    p.add_argument("--single-repeats", type=int, default=10)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    out = Path(args.out)
    records = [r for r in json.loads(out.read_text()) if r["setting"] not in args.settings] if out.exists() else []
    for name in args.settings:
        records += run_setting(SETTINGS[name], args)
        atomic_write_json(out, records, sort_keys=False)
        out.with_suffix(".md").write_text(markdown(records))
    print(f"wrote {out} and {out.with_suffix('.md')}")


def run_setting(setting, args) -> list[dict]:
    torch.manual_seed(0)
    data = setting.load()
    n = len(data.x_train)
    perm = torch.randperm(len(data.x_test), generator=torch.Generator().manual_seed(1))  # bench.py's split
    n_rep = setting.n_report_queries or len(data.x_test) - setting.n_val_queries
    rep_idx = perm[setting.n_val_queries : setting.n_val_queries + n_rep].sort().values
    xq, yq = data.x_test[rep_idx], data.y_test[rep_idx]
    key = f"{setting.name}-{setting.arch}"
    cache = Path(args.cache_dir) / setting.name
    harness = RetrainingHarness(
        lambda s: make_net(setting, data, s), key, data.x_train, data.y_train, data.x_test, data.y_test, None, setting.recipe, cache
    )
    t = time.perf_counter()
    gt = harness.subsets(setting.n_subsets, setting.alpha)
    print(f"[{setting.name}] ground truth in {time.perf_counter() - t:.1f}s", flush=True)

    def lds(scores):
        values = linear_datamodeling_scores(scores, gt.masks, gt.values[:, rep_idx])
        return round(nanmean(values), 4), ci95(values)

    plain = []
    for _ in range(2):
        model, seconds = fit(setting, data, [])
        plain.append(seconds)
    plain_s = statistics.median(plain)
    net = model.net.eval()
    dim = sum(p.numel() for p in net.parameters())
    print(f"[{setting.name}] plain fit {plain_s:.2f}s, P = {dim}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix=f"compressed-{setting.name}-"))
    base = {"setting": setting.name, "n_sources": n, "n_queries": len(rep_idx), "P": dim, "plain_fit_s": round(plain_s, 3)}
    records, timers = [], []

    # ours, codec "eigen", per rank; the damping is the same rule for all (trace(G)/P over the training set)
    exact = None
    for rank, horizon in [(r, h) for h in args.horizons for r in args.ranks]:
        dirpath = workdir / f"eigen-{rank}-{horizon}"
        series = {"propagation": "neumann", "horizon": horizon} if horizon else {}
        cb = AttributionCallback(dirpath=str(dirpath), codec="eigen", rank=rank, store_dtype=args.store_dtype, **series)
        model, fit_s = fit(setting, data, [cb])
        model.eval()
        info = ResponseStore.load(dirpath).checkpoint_info("final")
        score = (lambda m, d: lambda x, y: m.attribute((x, y), responses=d))(model, str(dirpath))
        scores = score(xq, yq)
        if exact is None and dim <= args.exact_max_params:
            t = time.perf_counter()
            exact = ExactInfluence(model.net, data.x_train, data.y_train).scores(xq, yq, info["damping"])
            print(f"[{setting.name}] exact target in {time.perf_counter() - t:.1f}s", flush=True)
            value, ci = lds(exact)
            records.append({**base, "method": "exact damped GGN (same model, same damping)", "lds": value, "lds_ci95": ci})
            print(f"  exact target: LDS {value}", flush=True)
        value, ci = lds(scores)
        rec = {
            **base, "method": f"ours, codec eigen, k={rank}, {args.store_dtype}, "
            + (f"K={horizon} {info['spectral']['propagation']} series" if horizon else "damped inverse"),
            "lds": value, "lds_ci95": ci,
            "pearson_exact": None if exact is None else round(pearson(scores, exact), 4),
            "setup_s": info["simulation_seconds"], "setup_to_plain_fit": round(info["simulation_seconds"] / plain_s, 2),
            "storage_bytes": dir_bytes(dirpath), "store_dtype": args.store_dtype, "spectral": info["spectral"],
        }  # fmt: skip
        print(f"  {rec['method']}: LDS {value} Pearson(exact) {rec['pearson_exact']} setup {rec['setup_s']}s "
              f"({rec['setup_to_plain_fit']}x) storage {rec['storage_bytes'] / 1e6:.2f} MB", flush=True)  # fmt: skip
        records.append(rec)
        timers.append((rec, score))

    if not args.no_dense:
        records.append(dense_record(setting, data, xq, yq, base, lds, workdir, cache, plain_s))

    # ours, codec "lorif" (callback defaults otherwise; each weight's response as rank-c factors)
    for rank in args.lorif_ranks:
        dirpath = workdir / f"lorif-{rank}"
        cb = AttributionCallback(dirpath=str(dirpath), codec="lorif", rank=rank, store_dtype=args.store_dtype)
        model, _ = fit(setting, data, [cb])
        model.eval()
        info = ResponseStore.load(dirpath).checkpoint_info("final")
        score = (lambda m, d: lambda x, y: m.attribute((x, y), responses=d))(model, str(dirpath))
        value, ci = lds(score(xq, yq))
        rec = {
            **base, "method": f"ours, codec lorif, c={rank}, {args.store_dtype}", "lds": value, "lds_ci95": ci,
            "setup_s": info["simulation_seconds"], "setup_to_plain_fit": round(info["simulation_seconds"] / plain_s, 2),
            "storage_bytes": dir_bytes(dirpath), "store_dtype": args.store_dtype, "factored": info["factored"],
        }  # fmt: skip
        print(f"  {rec['method']}: LDS {value} setup {rec['setup_s']}s storage {rec['storage_bytes'] / 1e6:.2f} MB", flush=True)
        records.append(rec)
        timers.append((rec, score))

    # TRAK-1 on the plain fit's model (dattri: proj 512, traker: proj 2048, as bench.py), defaults
    for peer in (DattriTRAK(1, proj_dim=512), TraKerTRAK(1, proj_dim=2048)):
        t = time.perf_counter()
        peer.setup([net], data.x_train, data.y_train)
        setup_s = time.perf_counter() - t
        rec = {**base, "method": peer.name, "setup_s": round(setup_s, 3), "storage_bytes": peer.storage_bytes(), "config": peer.config}
        records.append(rec)
        timers.append((rec, peer.score))

    # query cost, every method interleaved round by round (the machine is shared)
    single = {id(r): [] for r, _ in timers}
    batched = {id(r): [] for r, _ in timers}
    for round_ in range(args.rounds):
        for rec, score in timers:
            k = round_ % len(xq)
            s1, _ = timed(lambda: score(xq[k : k + 1], yq[k : k + 1]), args.single_repeats, warmup=1)
            sb, _ = timed(lambda: score(xq, yq), 1, warmup=1 if round_ == 0 else 0)
            single[id(rec)].append(1e3 * s1)
            batched[id(rec)].append(1e3 * sb / len(xq))
    for rec, _ in timers:
        rec["query_ms_single"] = round(statistics.median(single[id(rec)]), 4)
        rec["query_ms_batched"] = round(statistics.median(batched[id(rec)]), 5)
        rec["query_timing"] = f"interleaved, median of {args.rounds} rounds (Q=1: median of {args.single_repeats} per round)"
        print(f"  {rec['method']}: Q=1 {rec['query_ms_single']:.2f} ms, batched {rec['query_ms_batched']:.4f} ms/q", flush=True)
    shutil.rmtree(workdir, ignore_errors=True)
    return records


def dense_record(setting, data, xq, yq, base, lds, workdir, cache, plain_s) -> dict:
    """Our dense responses (the callback's defaults): LDS and setup; scores cached (costly) under a key of the
    defaults, so a change of defaults is measured again."""
    defaults = hashlib.sha256(json.dumps(AttributionSettings().to_manifest(), sort_keys=True).encode()).hexdigest()[:12]
    path = cache / f"compressed-dense-{base['n_queries']}q-{defaults}.safetensors"
    if path.exists():
        saved = load_file(str(path))
        scores, setup_s, storage = saved["scores"], float(saved["setup_s"]), int(saved["storage_bytes"])
    else:
        cb = AttributionCallback(dirpath=str(workdir / "dense"))
        model, _ = fit(setting, data, [cb])
        scores = model.eval().attribute((xq, yq), responses=cb.dirpath)
        setup_s = ResponseStore.load(cb.dirpath).checkpoint_info("final")["simulation_seconds"]
        storage = dir_bytes(cb.dirpath)
        cache.mkdir(parents=True, exist_ok=True)
        save_file({"scores": scores.contiguous(), "setup_s": torch.tensor(setup_s, dtype=torch.float64),
                   "storage_bytes": torch.tensor(storage)}, str(path))  # fmt: skip
    value, ci = lds(scores)
    print(f"  ours dense (callback defaults): LDS {value} setup {setup_s:.1f}s", flush=True)
    return {**base, "method": "ours, codec dense (callback defaults)", "lds": value, "lds_ci95": ci,
            "setup_s": round(setup_s, 3), "setup_to_plain_fit": round(setup_s / plain_s, 2), "storage_bytes": storage}  # fmt: skip


def markdown(records: list[dict]) -> str:
    lines = []
    for setting in dict.fromkeys(r["setting"] for r in records):
        rs = [r for r in records if r["setting"] == setting]
        lines += [
            f"### {setting} (per example: {rs[0]['n_sources']} sources, {rs[0]['n_queries']} queries, P = {rs[0]['P']}, "
            f"plain fit {rs[0]['plain_fit_s']} s)", "",
            "| method | LDS (95% CI) | Pearson to exact | setup s (x plain fit) | ms, Q=1 | ms/query, batched | storage MB |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]  # fmt: skip
        for r in rs:
            def f(key, fmt):
                return format(r[key], fmt) if r.get(key) is not None else "-"

            ldsv = f"{r['lds']:.3f} ({r['lds_ci95'][0]:.3f}-{r['lds_ci95'][1]:.3f})" if "lds" in r else "-"
            setup = f"{f('setup_s', '.2f')} ({f('setup_to_plain_fit', '.1f')}x)" if "setup_to_plain_fit" in r else f("setup_s", ".2f")
            storage = f"{r['storage_bytes'] / 1e6:.2f}" if "storage_bytes" in r else "-"
            lines.append(
                f"| {r['method']} | {ldsv} | {f('pearson_exact', '.3f')} | {setup} | {f('query_ms_single', '.2f')} | "
                f"{f('query_ms_batched', '.4f')} | {storage} |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
