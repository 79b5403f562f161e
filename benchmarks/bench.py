"""Benchmark: ours vs TRAK / influence functions / TracIn / EK-FAC on the same model and ground truth.

    python benchmarks/bench.py --out benchmarks/results/latest.json [--settings digits mnist1d] [--quick]

Per setting (digits MLP 64-64-10, MNIST-1D MLP) and regime (``example``: one source per training
example; ``source``: 10 random groups of examples), one JSON record per method with the fields
of issue 4, plus a Markdown table (``<out>.md``) and a figure (``<out>.png``: LDS vs per-query
cost). Ground truth comes from :class:`lightning_attr.evaluation.RetrainingHarness` (cached under
``--cache-dir``); the attributed model is ONE Lightning fit whose example order is the harness's
seed 0, so the harness's leave-out retrains are that fit minus one source.

Peers need the ``[bench]`` extra; a peer whose package is missing is reported as skipped.
Regularization of peers is tuned on a validation split of the test queries, never on the
reported ones; ours runs with its defaults.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_attr import AttributionCallback, IndexedDataset  # noqa: E402
from lightning_attr.data import load_digits, load_mnist1d  # noqa: E402
from lightning_attr.evaluation import (  # noqa: E402
    FixedOrderSampler,
    RetrainingHarness,
    TrainingRecipe,
    leave_out_correlations,
    linear_datamodeling_scores,
)
from lightning_attr.evaluation.peers import (  # noqa: E402
    DattriIFCG,
    DattriIFLiSSA,
    DattriTracIn,
    DattriTRAK,
    KronfluenceEKFAC,
    Peer,
    TraKerTRAK,
    sum_over_sources,
)
from lightning_attr.evaluation.retrain import atomic_write_json  # noqa: E402
from lightning_attr.models import Classifier, mlp  # noqa: E402

FIELDS = (
    "setting", "regime", "method", "config", "lds", "lds_ci95", "loo", "group_corr", "setup_s",
    "query_ms_single", "query_ms_batched", "storage_bytes", "peak_rss_mb", "n_train", "n_sources",
    "n_queries", "torch", "machine",
)  # fmt: skip


# --------------------------------------------------------------------------------------- settings
@dataclass
class Setting:
    name: str
    load: callable
    hidden: tuple[int, ...]
    recipe: TrainingRecipe
    n_val_queries: int
    n_groups: int = 10
    n_subsets: int = 100
    alpha: float = 0.5
    n_loo: int = 100
    loo_seeds: int = 3
    group_seeds: int = 3
    extra: dict = field(default_factory=dict)


SETTINGS = {
    "digits": Setting("digits", lambda: load_digits(1400, seed=0), (64,), TrainingRecipe(30, 64, 0.05, 0.9, 1e-3), 97),
    "mnist1d": Setting("mnist1d", lambda: load_mnist1d(4000, 1000), (100, 100), TrainingRecipe(30, 64, 0.05, 0.9, 1e-3), 200),
}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} torch threads, {platform.system()} {platform.release()}"


# ------------------------------------------------------------------------------------ measurement
class PeakRSS:
    """Samples the process's resident set every 10 ms while active; ``peak_mb`` is the maximum."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> PeakRSS:
        self.peak = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20


def timed(fn, repeats: int, warmup: int = 1) -> tuple[float, object]:
    """Median seconds of ``repeats`` calls after ``warmup`` calls; returns (median, last result)."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def ci95(values: Tensor) -> list[float]:
    """Normal-approximation 95% interval of the mean of the finite per-query values."""
    v = values[torch.isfinite(values)].double()
    half = 1.96 * v.std(unbiased=True).item() / math.sqrt(len(v))
    m = v.mean().item()
    return [round(m - half, 4), round(m + half, 4)]


def dir_bytes(path: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def nanmean(v: Tensor) -> float:
    v = v[torch.isfinite(v)]
    return float(v.mean()) if len(v) else float("nan")


# ------------------------------------------------------------------------------------------ fits
class EpochSnapshots(L.Callback):
    """Keeps copies of the network after chosen epochs (TracIn's checkpoints)."""

    def __init__(self, epochs: list[int]) -> None:
        self.epochs, self.states = set(epochs), {}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch + 1 in self.epochs:
            self.states[trainer.current_epoch + 1] = {k: v.detach().clone() for k, v in pl_module.net.state_dict().items()}


def make_net(setting: Setting, data, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return mlp(int(torch.tensor(data.input_shape).prod()), list(setting.hidden), data.num_classes)


def fit(setting: Setting, data, callbacks: list, seed: int = 0) -> tuple[Classifier, float]:
    """One Lightning fit with the harness's example order for ``seed``; returns (model, seconds)."""
    r = setting.recipe
    model = Classifier(make_net(setting, data, seed), lr=r.lr, momentum=r.momentum, weight_decay=r.weight_decay)
    n = len(data.x_train)
    loader = DataLoader(
        IndexedDataset(TensorDataset(data.x_train, data.y_train)),
        batch_size=r.batch_size,
        sampler=FixedOrderSampler(n, r.epochs, seed),
    )
    trainer = L.Trainer(
        max_epochs=r.epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, default_root_dir=tempfile.gettempdir(),
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, loader)
    return model, time.perf_counter() - start


# ---------------------------------------------------------------------------------------- methods
@dataclass
class Result:
    method: str
    config: dict
    scores_report: Tensor  # [Q_report, S]
    setup_s: float
    query_ms_single: float
    query_ms_batched: float
    storage_bytes: int
    peak_rss_mb: float
    scorer: object = None  # (x, y) -> Tensor[Q, S]: kept for the interleaved timing at the end


def time_queries(score_fn, xq: Tensor, yq: Tensor, single_repeats: int, batched_repeats: int) -> tuple[float, float, Tensor]:
    """(ms for one query, ms per query when all are scored at once, scores of all queries)."""
    i = [0]

    def one():
        k = i[0] % len(xq)
        i[0] += 1
        return score_fn(xq[k : k + 1], yq[k : k + 1])

    single, _ = timed(one, single_repeats, warmup=1)
    batched, scores = timed(lambda: score_fn(xq, yq), batched_repeats, warmup=1 if batched_repeats > 1 else 0)
    return 1e3 * single, 1e3 * batched / len(xq), scores


def run_ours(setting, data, regime, groups, xq, yq, plain_fit_s, mode, workdir, args, checkpoint_epochs=None) -> Result:
    dirpath = Path(workdir) / f"ours-{regime}-{mode}{'-ens' if checkpoint_epochs else ''}"
    shutil.rmtree(dirpath, ignore_errors=True)
    sources = groups if regime == "source" else None
    cb = AttributionCallback(dirpath=str(dirpath), mode=mode, sources=sources, checkpoint_epochs=checkpoint_epochs)
    with PeakRSS() as rss:
        model, fit_s = fit(setting, data, [cb])
        model.eval()
        checkpoints = "all" if checkpoint_epochs else "last"

        def score(x, y):
            return model.attribute((x, y), responses=cb.dirpath, checkpoints=checkpoints)

        single, batched, scores = time_queries(score, xq, yq, args.single_repeats, args.batched_repeats)
    from lightning_attr import ResponseStore

    store = ResponseStore.load(cb.dirpath)
    if regime == "source":  # order the columns as group ids 0..G-1
        order = [store.source_ids.index(g) for g in range(int(groups.max()) + 1)]
        scores = scores[:, order]
    info = store.checkpoint_info(store.checkpoints[-1])
    # setup = the callback's own wall time (its hooks + end-of-fit simulation), cumulative over checkpoints;
    # the rest of the same fit is the plain training it rode on, timed under the same machine load.
    sim_s = float(info.get("simulation_seconds", float("nan")))
    train_s = fit_s - sim_s
    config = {
        "mode": mode, "horizon": cb.horizon, "damping": cb.damping, "curvature": cb.curvature,
        "readout": "linear", "checkpoints": checkpoints, "checkpoint_epochs": checkpoint_epochs,
        "fit_s_with_callback": round(fit_s, 3), "training_s_in_that_fit": round(train_s, 3),
        "setup_to_training_ratio": round(sim_s / train_s, 3),
        "plain_fit_s_separate_runs": round(plain_fit_s, 3),
        "setup_by_difference_s": round(fit_s - plain_fit_s, 3),
        "step_rule": info.get("step_rule"), "curvature_products": info.get("curvature_products"),
        "n_shortfall": info.get("n_shortfall"),
    }  # fmt: skip
    if regime == "source":
        base_score = score
        score = lambda x, y: base_score(x, y)[:, order]  # noqa: E731
    return Result(
        f"ours ({mode}{', ' + str(len(checkpoint_epochs) + 1) + ' ckpts' if checkpoint_epochs else ''})",
        config, scores, sim_s, single, batched, dir_bytes(cb.dirpath), rss.peak_mb, score,
    )  # fmt: skip


def run_peer(peer: Peer, models, data, xq, yq, args, slow: bool) -> Result:
    with PeakRSS() as rss:
        start = time.perf_counter()
        peer.setup(models[: peer.n_models], data.x_train, data.y_train)
        setup_s = time.perf_counter() - start
        reps_single = 3 if slow else args.single_repeats
        reps_batched = 1 if slow else args.batched_repeats
        single, batched, scores = time_queries(peer.score, xq, yq, reps_single, reps_batched)
    return Result(
        peer.name, dict(peer.config), scores.float(), setup_s, single, batched, peer.storage_bytes(), rss.peak_mb,
        None if slow else peer.score,
    )


def tune(make_peer, grid, models, data, x_val, y_val, lds_val_fn) -> tuple[object, dict]:
    """Pick the grid value with the best LDS on the validation queries."""
    results = {}
    for value in grid:
        peer = make_peer(value)
        try:
            peer.setup(models[: peer.n_models], data.x_train, data.y_train)
            results[value] = lds_val_fn(peer.score(x_val, y_val).float())
        except Exception as err:  # a grid point that fails (e.g. singular kernel) is recorded, not fatal
            results[value] = float("nan")
            print(f"    tuning {peer.name} at {value}: {type(err).__name__}: {err}", flush=True)
        print(f"    tuning {peer.name}: {value} -> val LDS {results[value]:.4f}", flush=True)
    finite = {k: v for k, v in results.items() if math.isfinite(v)}
    if not finite:
        raise RuntimeError(f"every grid value failed for {make_peer(grid[0]).name}: {results}")
    best = max(finite, key=finite.get)
    return best, {"grid": {str(k): round(v, 4) for k, v in results.items()}, "chosen": best, "tuned_on": "validation queries"}


# ------------------------------------------------------------------------------------------- main
def bench_setting(setting: Setting, args, emit) -> list[dict]:
    torch.manual_seed(0)
    data = setting.load()
    n, q_all = len(data.x_train), len(data.x_test)
    perm = torch.randperm(q_all, generator=torch.Generator().manual_seed(1))
    val_idx, rep_idx = perm[: setting.n_val_queries].sort().values, perm[setting.n_val_queries :].sort().values
    if args.quick:
        rep_idx = rep_idx[: args.quick_queries]
    x_val, y_val = data.x_test[val_idx], data.y_test[val_idx]
    x_rep, y_rep = data.x_test[rep_idx], data.y_test[rep_idx]
    groups = torch.randperm(n, generator=torch.Generator().manual_seed(2)) % setting.n_groups  # equal-size random groups
    loo_examples = torch.randperm(n, generator=torch.Generator().manual_seed(3))[: setting.n_loo].sort().values
    n_subsets = args.quick_subsets if args.quick else setting.n_subsets
    make = lambda s: make_net(setting, data, s)  # noqa: E731
    key = f"{setting.name}-mlp-{'-'.join(map(str, setting.hidden))}"
    cache = Path(args.cache_dir) / setting.name

    print(f"[{setting.name}] ground truth (cache {cache})", flush=True)
    ex = RetrainingHarness(make, key, data.x_train, data.y_train, data.x_test, data.y_test, None, setting.recipe, cache)
    gr = RetrainingHarness(make, key, data.x_train, data.y_train, data.x_test, data.y_test, groups, setting.recipe, cache)
    t = time.perf_counter()
    gt = {
        "example": {"subsets": ex.subsets(n_subsets, setting.alpha), "leave_out": ex.leave_out(loo_examples, setting.loo_seeds)},
        "source": {"subsets": gr.subsets(n_subsets, setting.alpha), "leave_out": gr.leave_out(list(range(setting.n_groups)), setting.group_seeds)},
    }
    print(f"[{setting.name}] ground truth ready in {time.perf_counter() - t:.1f}s "
          f"(retrain seconds: {sum(g.train_seconds for r in gt.values() for g in r.values()):.1f})", flush=True)  # fmt: skip

    def lds_of(regime, scores, idx):
        g = gt[regime]["subsets"]
        return linear_datamodeling_scores(scores, g.masks, g.values[:, idx])

    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{setting.name}-"))
    # the attributed model, plain, timed; snapshots for TracIn
    snap_epochs = [round(setting.recipe.epochs * k / 5) for k in range(1, 6)]
    snaps = EpochSnapshots(snap_epochs)
    plain_times = []
    for _ in range(args.plain_fits):
        model, seconds = fit(setting, data, [snaps])
        plain_times.append(seconds)
    plain_fit_s = statistics.median(plain_times)
    net = model.net.eval()
    extra_seeds = list(range(1, 10))
    t = time.perf_counter()
    ens = ex.full(extra_seeds)
    ens_train_s = time.perf_counter() - t
    members = [net]
    for i in range(len(extra_seeds)):
        m = make_net(setting, data, 0)
        m.load_state_dict({k: v[i] for k, v in ens.items()})
        members.append(m.eval())
    tracin_models = []
    for e in snap_epochs:
        m = make_net(setting, data, 0)
        m.load_state_dict(snaps.states[e])
        tracin_models.append(m.eval())
    print(f"[{setting.name}] plain fit {plain_fit_s:.2f}s; 9 ensemble members in {ens_train_s:.1f}s", flush=True)

    emitted: list[dict] = []
    kept: list[tuple[dict, Result]] = []
    def record(regime: str, r: Result) -> dict:
        lds = lds_of(regime, r.scores_report, rep_idx)
        lo = gt[regime]["leave_out"]
        cols = loo_examples if regime == "example" else torch.arange(setting.n_groups)
        corr = nanmean(leave_out_correlations(r.scores_report[:, cols], lo.values[:, rep_idx]))
        rec = {
            "setting": setting.name, "regime": regime, "method": r.method, "config": r.config,
            "lds": round(nanmean(lds), 4), "lds_ci95": ci95(lds),
            "loo": round(corr, 4) if regime == "example" else None,
            "group_corr": round(corr, 4) if regime == "source" else None,
            "setup_s": round(r.setup_s, 3), "query_ms_single": round(r.query_ms_single, 4),
            "query_ms_batched": round(r.query_ms_batched, 5), "storage_bytes": int(r.storage_bytes),
            "peak_rss_mb": round(r.peak_rss_mb, 1), "n_train": n,
            "n_sources": n if regime == "example" else setting.n_groups, "n_queries": len(rep_idx),
            "torch": torch.__version__, "machine": machine(),
        }  # fmt: skip
        rec["config"]["ground_truth"] = {
            "lds": f"{n_subsets} retrains on {setting.alpha:.0%} of the sources, 1 seed each",
            "leave_out": f"{len(cols)} {'examples' if regime == 'example' else 'groups'} x {lo.settings['n_seeds']} seeds, seed held fixed",
        }
        assert tuple(rec) == FIELDS
        print(f"  => {regime:8s} {r.method:40s} LDS {rec['lds']:.3f}  corr {corr:.3f}  setup {r.setup_s:.2f}s  "
              f"Q=1 {r.query_ms_single:.2f}ms  batched {r.query_ms_batched:.4f}ms/q", flush=True)  # fmt: skip
        emitted.append(rec)
        kept.append((rec, r))
        emit(emitted)
        return rec

    wanted = lambda name: not args.methods or any(m.lower() in name.lower() for m in args.methods)  # noqa: E731

    # ours, default settings, both modes, both regimes
    ens_epochs = [round(setting.recipe.epochs * k / 6) for k in (2, 3, 4, 5)]

    def run_ours_all(variants):
        for regime in ("example", "source"):
            for mode, ck in variants:
                if not wanted("ours"):
                    continue
                print(f"[{setting.name}/{regime}] ours {mode}{' + checkpoints ' + str(ck) if ck else ''}", flush=True)
                try:
                    record(regime, run_ours(setting, data, regime, groups, x_rep, y_rep, plain_fit_s, mode, workdir, args, ck))
                except Exception:
                    traceback.print_exc()

    run_ours_all([("online", None), ("end", None)])

    # peers: per-example scores on the SAME model; the source regime sums them per group
    lds_val = lambda s: nanmean(lds_of("example", s, val_idx))  # noqa: E731
    # TRAK's ridge: traker and dattri scale their features differently, so the grid is wide (1e-3..1e5)
    lam = [10.0**k for k in range(-3, 6)]
    specs = [
        ("TRAK-1 traker", lambda v: TraKerTRAK(1, proj_dim=2048, lambda_reg=v), 0.0, lam, False),
        ("TRAK-10 traker", lambda v: TraKerTRAK(10, proj_dim=2048, lambda_reg=v), 0.0, lam, False),
        ("TRAK-1 dattri", lambda v: DattriTRAK(1, proj_dim=512, regularization=v), 0.0, lam, False),
        ("TRAK-10 dattri", lambda v: DattriTRAK(10, proj_dim=512, regularization=v), 0.0, lam, False),
        ("IF-CG", lambda v: DattriIFCG(regularization=v), 0.0, [1e-4, 1e-3, 1e-2, 1e-1, 1.0], False),
        ("IF-LiSSA", lambda v: DattriIFLiSSA(damping=v), 0.0, None, True),
        ("grad-dot", lambda v: DattriTracIn([1.0]), None, None, False),
        ("TracIn", lambda v: DattriTracIn([setting.recipe.lr] * len(tracin_models)), None, None, False),
        ("EK-FAC", lambda v: KronfluenceEKFAC(damping_factor=v), 1e-8, [None, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1], False),
    ]
    for label, make_peer, default, grid, slow in specs:
        if not wanted(label) or label in args.skip:
            continue
        models = tracin_models if label == "TracIn" else members
        runs = [("defaults", default)]
        if grid is not None and not args.no_tuning:
            print(f"[{setting.name}] tuning {label} on {len(val_idx)} validation queries", flush=True)
            try:
                best, tuning = tune(make_peer, grid, models, data, x_val, y_val, lds_val)
                runs.append(("tuned", best, tuning))
            except Exception:
                traceback.print_exc()
        for run in runs:
            tag, value = run[0], run[1]
            print(f"[{setting.name}] {label} ({tag}: {value})", flush=True)
            try:
                res = run_peer(make_peer(value), models, data, x_rep, y_rep, args, slow)
            except ImportError as err:
                print(f"  skipped: {err}", flush=True)
                break
            except Exception:
                traceback.print_exc()
                continue
            res.method = f"{res.method} [{tag}]"
            res.config = {**res.config, "variant": tag, **(run[2] if len(run) > 2 else {})}
            if label.startswith("TRAK-10"):
                res.config["extra_models_trained"] = 9
                res.config["extra_training_s"] = round(ens_train_s, 2)
            record("example", res)
            # source regime: same per-example scores summed per group; the sum is timed and added
            t_sum, grouped = timed(lambda: sum_over_sources(res.scores_report, groups, setting.n_groups), 5)
            t_one, _ = timed(lambda: sum_over_sources(res.scores_report[:1], groups, setting.n_groups), 5)
            record(
                "source",
                Result(res.method, {**res.config, "source_scores": "sum of per-example scores per group"}, grouped, res.setup_s,
                       res.query_ms_single + 1e3 * t_one, res.query_ms_batched + 1e3 * t_sum / len(x_rep),
                       res.storage_bytes, res.peak_rss_mb,
                       None if res.scorer is None else (lambda f: lambda x, y: sum_over_sources(f(x, y), groups, setting.n_groups))(res.scorer)),
            )  # fmt: skip

    # response checkpoints along the run (10/15/20/25/30 of 30 epochs, as METHOD.md measured): last, it is the dearest
    if not args.no_ensemble:
        run_ours_all([("online", ens_epochs)])

    # query costs again, all methods interleaved round by round, so every method sees the same machine
    # load (the machine is shared): medians over rounds replace the first-pass numbers
    timed_pairs = [(rec, r) for rec, r in kept if r.scorer is not None]
    if timed_pairs and args.paired_rounds > 0:
        print(f"[{setting.name}] interleaved timing of {len(timed_pairs)} methods x {args.paired_rounds} rounds", flush=True)
        single = {id(rec): [] for rec, _ in timed_pairs}
        batched = {id(rec): [] for rec, _ in timed_pairs}
        for round_ in range(args.paired_rounds):
            for rec, r in timed_pairs:
                k = round_ % len(x_rep)
                s1, _ = timed(lambda: r.scorer(x_rep[k : k + 1], y_rep[k : k + 1]), 5, warmup=1)
                sb, _ = timed(lambda: r.scorer(x_rep, y_rep), 1, warmup=0)
                single[id(rec)].append(1e3 * s1)
                batched[id(rec)].append(1e3 * sb / len(x_rep))
        for rec, _ in timed_pairs:
            rec["config"]["first_pass_query_ms"] = [rec["query_ms_single"], rec["query_ms_batched"]]
            rec["config"]["query_timing"] = f"interleaved with the other methods, median of {args.paired_rounds} rounds"
            rec["query_ms_single"] = round(statistics.median(single[id(rec)]), 4)
            rec["query_ms_batched"] = round(statistics.median(batched[id(rec)]), 5)
            print(f"  {rec['regime']:8s} {rec['method']:40s} Q=1 {rec['query_ms_single']:.2f}ms  batched {rec['query_ms_batched']:.4f}ms/q", flush=True)
        emit(emitted)
    records = emitted
    shutil.rmtree(workdir, ignore_errors=True)
    return records


def markdown(records: list[dict]) -> str:
    lines = []
    for (setting, regime) in dict.fromkeys((r["setting"], r["regime"]) for r in records):
        rs = [r for r in records if r["setting"] == setting and r["regime"] == regime]
        corr = "LOO corr" if regime == "example" else "group corr"
        lines += [
            f"### {setting}, {regime} regime ({rs[0]['n_sources']} sources, {rs[0]['n_queries']} queries)", "",
            f"| method | LDS (95% CI) | {corr} | setup s | query ms (Q=1) | query ms/query (batched) | storage MB | peak RSS MB |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]  # fmt: skip
        for r in rs:
            c = r["loo"] if regime == "example" else r["group_corr"]
            lines.append(
                f"| {r['method']} | {r['lds']:.3f} ({r['lds_ci95'][0]:.3f}–{r['lds_ci95'][1]:.3f}) | {c:.3f} | {r['setup_s']:.2f} | "
                f"{r['query_ms_single']:.2f} | {r['query_ms_batched']:.4f} | {r['storage_bytes'] / 1e6:.2f} | {r['peak_rss_mb']:.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


def figure(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys((r["setting"], r["regime"]) for r in records))
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4.5), squeeze=False)
    for ax, (setting, regime) in zip(axes[0], keys):
        for r in (r for r in records if r["setting"] == setting and r["regime"] == regime):
            ours = r["method"].startswith("ours")
            ax.scatter(r["query_ms_batched"], r["lds"], marker="*" if ours else "o", s=120 if ours else 40, color="C3" if ours else "C0")
            ax.annotate(r["method"], (r["query_ms_batched"], r["lds"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("per-query cost, batched (ms, log scale)")
        ax.set_ylabel("LDS")
        ax.set_title(f"{setting}, {regime} regime")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=130)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/latest.json")
    p.add_argument("--settings", nargs="+", default=["digits", "mnist1d"], choices=sorted(SETTINGS))
    p.add_argument("--cache-dir", default="benchmarks/results/cache")
    p.add_argument("--methods", nargs="*", default=None, help="substring filter on method labels (default: all)")
    p.add_argument("--skip", nargs="*", default=[], help="peer labels to skip, e.g. IF-LiSSA")
    p.add_argument("--no-tuning", action="store_true")
    p.add_argument("--no-ensemble", action="store_true", help="skip ours with response checkpoints")
    p.add_argument("--single-repeats", type=int, default=20)
    p.add_argument("--batched-repeats", type=int, default=3)
    p.add_argument("--plain-fits", type=int, default=3, help="plain fits timed (median), reported beside the setup ratio")
    p.add_argument("--paired-rounds", type=int, default=5, help="rounds of interleaved query timing at the end (0 = off)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="smoke run: few subsets and queries")
    p.add_argument("--quick-subsets", type=int, default=20)
    p.add_argument("--quick-queries", type=int, default=40)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    out = Path(args.out)
    records = []
    if out.exists():  # keep other settings' records from an earlier run
        records = [r for r in json.loads(out.read_text()) if r["setting"] not in args.settings]
    def write(all_records: list[dict]) -> None:
        atomic_write_json(out, all_records, sort_keys=False)
        md = out.with_suffix(".md")
        tmp = md.with_suffix(".md.tmp")
        tmp.write_text(markdown(all_records))
        os.replace(tmp, md)
        figure(all_records, out.with_suffix(".png"))

    for name in args.settings:
        done = list(records)
        records = done + bench_setting(SETTINGS[name], args, lambda partial: write(done + partial))
        write(records)
    print(f"wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
