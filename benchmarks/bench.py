"""Benchmark: ours vs TRAK / influence functions / TracIn / EK-FAC on the same model and ground truth.

    python benchmarks/bench.py --out benchmarks/results/latest.json --cache-dir /work/cache/bench --threads 1
    python benchmarks/bench.py --settings mnist1d-cnn1d --stages truth peers   # the parts that do not depend on ours

Settings (issue 7: where influence is hard): ``digits-mlp`` (MLP 64-64-10, SGD), ``mnist1d-mlp``
(MLP 40-100-100-10, SGD) and ``mnist1d-cnn1d`` (the 1D CNN, Adam). Per setting and regime
(``example``: one source per training example; ``source``: 10 random groups of examples), one
JSON record per method, a Markdown table with issue 7's targets as pass/fail columns
(``<out>.md``, see :mod:`lightning_attr.evaluation.targets`) and a figure (``<out>.png``).

Stages, each cached under ``--cache-dir/<setting>`` and keyed by everything it depends on:
``truth`` (100 half-data retrains, leave-outs: :class:`RetrainingHarness`), ``peers`` (their scores
and timings, keyed by the attributed model's weights digest), ``ours`` (never cached: the point of
a rerun) with the exact damped-GGN target at the same model (the explicit matrix, cached).
The attributed model is ONE Lightning fit whose example order is the harness's seed 0, so the
harness's retrains stand in for that fit on a part of the data. Peers' regularization is tuned on
validation queries, never on the reported ones; ours runs with its defaults.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_attr import AttributionCallback, IndexedDataset, ResponseStore  # noqa: E402
from lightning_attr.data import load_digits, load_mnist1d  # noqa: E402
from lightning_attr.evaluation import (  # noqa: E402
    FixedOrderSampler,
    RetrainingHarness,
    TrainingRecipe,
    leave_out_correlations,
    linear_datamodeling_scores,
)
from lightning_attr.evaluation.exact import ExactInfluence  # noqa: E402
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
from lightning_attr._io import atomic_save_tensors, atomic_write, atomic_write_json, atomic_write_text  # noqa: E402
from lightning_attr.evaluation.retrain import tensor_digest  # noqa: E402
from lightning_attr.evaluation.targets import markdown  # noqa: E402
from lightning_attr.models import CNN1d, Classifier, mlp  # noqa: E402

FIELDS = (
    "setting", "regime", "method", "config", "lds", "lds_ci95", "loo", "group_corr", "pearson_to_exact", "setup_s",
    "setup_ratio", "query_ms_single", "query_ms_batched", "storage_bytes", "peak_rss_mb", "n_train", "n_sources",
    "n_queries", "torch", "machine",
)  # fmt: skip


# --------------------------------------------------------------------------------------- settings
@dataclass
class Setting:
    """One bench setting: data, network, training recipe, queries, and its simulation-cost limit."""

    name: str
    load: Callable
    build: Callable  # (data) -> nn.Module, freshly initialized from the global seed
    arch: str
    recipe: TrainingRecipe
    n_val_queries: int
    n_report_queries: int | None = None  # None: every test point not used for validation
    setup_limit: float | None = None  # issue 7: simulation <= this x the plain fit
    n_groups: int = 10
    n_subsets: int = 100
    alpha: float = 0.5
    n_loo: int = 100
    loo_seeds: int = 3
    group_seeds: int = 3
    extra: dict = field(default_factory=dict)


SGD = TrainingRecipe(30, 64, 0.05, 0.9, 1e-3)
SETTINGS = {
    "digits-mlp": Setting(
        "digits-mlp", lambda: load_digits(1400, seed=0), lambda d: mlp(64, [64], d.num_classes), "mlp-64-64-10", SGD, 97,
        setup_limit=10.0,
    ),
    "mnist1d-mlp": Setting(
        "mnist1d-mlp", lambda: load_mnist1d(4000, 1000), lambda d: mlp(40, [100, 100], d.num_classes), "mlp-40-100-100-10", SGD,
        100, 300, n_loo=50, loo_seeds=2, group_seeds=2,
    ),
    "mnist1d-cnn1d": Setting(
        "mnist1d-cnn1d", lambda: load_mnist1d(4000, 1000), lambda d: CNN1d([40], d.num_classes, (16, 32), 5), "cnn1d-16-32-k5",
        TrainingRecipe(30, 64, 3e-3, 0.9, 1e-3, "adam"), 100, 300, setup_limit=30.0, n_loo=50, loo_seeds=2, group_seeds=2,
    ),
}  # fmt: skip


def recipe_key(recipe: TrainingRecipe) -> dict:
    """The recipe as the harness keys its cache (an SGD recipe without the ``optimizer`` field)."""
    return {k: v for k, v in asdict(recipe).items() if (k, v) != ("optimizer", "sgd")}


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


def current_commit() -> str:
    """The checkout's short commit, with '+uncommitted changes' when tracked files (results aside) differ from it."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results"], cwd=root, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+uncommitted changes" if dirty else "")


CODE_COMMIT = current_commit()  # the code this process loaded (a commit made while it runs does not change what it runs)


def load_average() -> tuple[float, ...]:
    """The 1, 5 and 15 minute load averages (empty where /proc is absent): the machine is shared."""
    try:
        return tuple(round(float(v), 2) for v in Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return ()


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


def lds_on_first_queries(per_query: Tensor, args) -> dict[str, float]:
    """``{str(n): LDS over the first n reported queries}`` for the slow peers' ``n`` (``--slow-queries``) if fewer."""
    n = getattr(args, "slow_queries", None)
    return {str(n): round(nanmean(per_query[:n]), 4)} if n and n < len(per_query) else {}


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
    return setting.build(data)


def fit(setting: Setting, data, callbacks: list, seed: int = 0, accelerator: str = "cpu") -> tuple[Classifier, float]:
    """One Lightning fit with the harness's example order for ``seed`` on ``accelerator``; returns (model, seconds)."""
    r = setting.recipe
    model = Classifier(make_net(setting, data, seed), lr=r.lr, momentum=r.momentum, weight_decay=r.weight_decay, optimizer=r.optimizer)
    n = len(data.x_train)
    loader = DataLoader(
        IndexedDataset(TensorDataset(data.x_train, data.y_train)),
        batch_size=r.batch_size,
        sampler=FixedOrderSampler(n, r.epochs, seed),
    )
    trainer = L.Trainer(
        max_epochs=r.epochs, accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, default_root_dir=tempfile.gettempdir(),
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, loader)
    return model, time.perf_counter() - start


# ------------------------------------------------------------------------------------------ cache
def _key(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


class ResultCache:
    """Tensors + a JSON description per entry (``<name>-<key>.safetensors`` / ``.json``), JSON written last."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _paths(self, name: str, key: str) -> tuple[Path, Path]:
        slug = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
        return self.root / f"{slug}-{key}.safetensors", self.root / f"{slug}-{key}.json"

    def load(self, name: str, key: str) -> tuple[dict[str, Tensor], dict] | None:
        tensors, meta = self._paths(name, key)
        if not (tensors.exists() and meta.exists()):
            return None
        return load_file(str(tensors)), json.loads(meta.read_text())

    def save(self, name: str, key: str, tensors: dict[str, Tensor], meta: dict) -> None:
        tensors_path, meta_path = self._paths(name, key)
        atomic_save_tensors(tensors_path, tensors)
        atomic_write_json(meta_path, meta)


# ---------------------------------------------------------------------------------------- methods
@dataclass
class Result:
    method: str
    config: dict
    scores: Tensor  # [q, S] for the first q reported queries
    setup_s: float
    query_ms_single: float
    query_ms_batched: float
    storage_bytes: int
    peak_rss_mb: float
    setup_ratio: float | None = None
    final_scores: Tensor | None = None  # ours with several checkpoints: the last one alone (what the exact target compares with)


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


NO_DEFAULTS_ROW = object()


def run_peer(peer: Peer, models, data, xq, yq, args, slow: bool, setup_s: float | None = None) -> Result:
    """Set the peer up (unless ``setup_s`` says it already was, e.g. while tuning) and time its queries."""
    with PeakRSS() as rss:
        if setup_s is None:
            start = time.perf_counter()
            peer.setup(models[: peer.n_models], data.x_train, data.y_train)
            setup_s = time.perf_counter() - start
        reps_single = 3 if slow else args.single_repeats
        reps_batched = 1 if slow else args.batched_repeats
        single, batched, scores = time_queries(peer.score, xq, yq, reps_single, reps_batched)
    return Result(peer.name, dict(peer.config), scores.float(), setup_s, single, batched, peer.storage_bytes(), rss.peak_mb)


PEER_SPECS = [  # (label, make(setting, value), default value or NO_DEFAULTS_ROW, tuning grid, slow: fewer queries/repeats)
    # Grids: one decade either side of what digits chose with a wider grid in the first run (traker 1e2-1e3,
    # dattri TRAK 0.1, IF-CG 1e-2, EK-FAC 1e-4-1e-3); a choice at a grid's edge is flagged in the config.
    # traker's defaults (lambda_reg=0) collapse (digits: LDS -0.006 / 0.007), so only its tuned rows are run.
    ("TRAK-1 traker", lambda s, v: TraKerTRAK(1, proj_dim=2048, lambda_reg=v), NO_DEFAULTS_ROW, [10.0, 100.0, 1e3, 1e4], False),
    ("TRAK-10 traker", lambda s, v: TraKerTRAK(10, proj_dim=2048, lambda_reg=v), NO_DEFAULTS_ROW, [10.0, 100.0, 1e3, 1e4], False),
    ("TRAK-1 dattri", lambda s, v: DattriTRAK(1, proj_dim=512, regularization=v), 0.0, [1e-2, 0.1, 1.0], False),
    ("TRAK-10 dattri", lambda s, v: DattriTRAK(10, proj_dim=512, regularization=v), 0.0, [1e-2, 0.1, 1.0], False),
    ("IF-CG", lambda s, v: DattriIFCG(regularization=v), 0.0, [1e-3, 1e-2, 1e-1], False),
    ("IF-LiSSA", lambda s, v: DattriIFLiSSA(damping=v), 0.0, None, True),
    ("grad-dot", lambda s, v: DattriTracIn([1.0]), None, None, False),
    ("TracIn", lambda s, v: DattriTracIn([s.recipe.lr] * 5), None, None, False),
    ("EK-FAC", lambda s, v: KronfluenceEKFAC(damping_factor=v), 1e-8, [None, 1e-4, 1e-3, 1e-2], False),
]
PEER_SPECS_BY_LABEL = {spec[0]: spec for spec in PEER_SPECS}
# the order peers are computed in when compute time is short: the targets' anchors first
PEER_PRIORITY = ["TRAK-10 dattri", "IF-CG", "TRAK-1 dattri", "EK-FAC", "grad-dot", "TracIn", "TRAK-1 traker", "TRAK-10 traker", "IF-LiSSA"]


def tune(make_peer, grid, models, data, x_val, y_val, lds_val_fn) -> tuple[object, dict, Peer, float]:
    """Pick the grid value with the best LDS on the validation queries; returns the chosen peer, set up, and its setup seconds."""
    results, best_peer = {}, (None, None, float("-inf"))
    for value in grid:
        peer = make_peer(value)
        try:
            start = time.perf_counter()
            peer.setup(models[: peer.n_models], data.x_train, data.y_train)
            setup_s = time.perf_counter() - start
            results[value] = lds_val_fn(peer.score(x_val, y_val).float())
            if results[value] > best_peer[2]:
                best_peer = (peer, setup_s, results[value])
        except Exception as err:  # a grid point that fails (e.g. singular kernel) is recorded, not fatal
            results[value] = float("nan")
            print(f"    tuning {peer.name} at {value}: {type(err).__name__}: {err}", flush=True)
        print(f"    tuning {peer.name}: {value} -> val LDS {results[value]:.4f}", flush=True)
        del peer
    finite = {k: v for k, v in results.items() if math.isfinite(v)}
    if not finite:
        raise RuntimeError(f"every grid value failed for {make_peer(grid[0]).name}: {results}")
    best = max(finite, key=finite.get)
    edge = best in (grid[0], grid[-1]) and best is not None
    info = {"grid": {str(k): round(v, 4) for k, v in results.items()}, "chosen": best, "chosen_at_grid_edge": edge,
            "tuned_on": "validation queries"}  # fmt: skip
    return best, info, best_peer[0], best_peer[1]


# ------------------------------------------------------------------------------------------- bench
class SettingBench:
    """One setting: data, query splits, ground truth, the attributed model, and the records made from them."""

    def __init__(self, setting: Setting, args) -> None:
        self.setting, self.args = setting, args
        torch.manual_seed(0)
        self.data = data = setting.load()
        n, q_all = len(data.x_train), len(data.x_test)
        perm = torch.randperm(q_all, generator=torch.Generator().manual_seed(1))
        n_rep = setting.n_report_queries or q_all - setting.n_val_queries
        if args.quick:
            n_rep = min(n_rep, args.quick_queries)
        self.val_idx = perm[: setting.n_val_queries].sort().values
        self.rep_idx = perm[setting.n_val_queries : setting.n_val_queries + n_rep].sort().values
        self.x_val, self.y_val = data.x_test[self.val_idx], data.y_test[self.val_idx]
        self.x_rep, self.y_rep = data.x_test[self.rep_idx], data.y_test[self.rep_idx]
        self.groups = torch.randperm(n, generator=torch.Generator().manual_seed(2)) % setting.n_groups  # equal-size random groups
        n_loo = min(setting.n_loo, args.quick_queries) if args.quick else setting.n_loo
        self.loo_examples = torch.randperm(n, generator=torch.Generator().manual_seed(3))[:n_loo].sort().values
        self.n_subsets = args.quick_subsets if args.quick else setting.n_subsets
        self.cache_root = Path(args.cache_dir) / setting.name
        self.cache = ResultCache(self.cache_root)
        self.signature = {
            "setting": setting.name, "arch": setting.arch, "recipe": recipe_key(setting.recipe),
            "data": tensor_digest(data.x_train, data.y_train, data.x_test, data.y_test),
            "val": tensor_digest(self.val_idx), "report": tensor_digest(self.rep_idx),
        }  # fmt: skip
        self.records: list[dict] = []
        self._model: nn.Module | None = None
        self._members: list[nn.Module] | None = None
        self._exact: ExactInfluence | None = None
        self._trak1: DattriTRAK | None = None
        self._exact_recorded: set[float] = set()
        self.on_record: Callable[[], None] = lambda: None  # called after each row of ours (main: write the outputs)

    def make(self, seed: int) -> nn.Module:
        return make_net(self.setting, self.data, seed)

    # -- ground truth
    def harness(self, groups: Tensor | None = None) -> RetrainingHarness:
        """The retraining harness of this setting (cached under ``cache_root``); ``groups``: source of each example."""
        s, d = self.setting, self.data
        return RetrainingHarness(self.make, f"{s.name}-{s.arch}", d.x_train, d.y_train, d.x_test, d.y_test, groups, s.recipe, self.cache_root)

    def example_truth(self) -> None:
        """Only what LDS in the example regime needs: the half-data retrains (no leave-outs)."""
        t = time.perf_counter()
        self.gt = {"example": {"subsets": self.harness().subsets(self.n_subsets, self.setting.alpha)}}
        print(f"[{self.setting.name}] LDS ground truth ready in {time.perf_counter() - t:.0f}s", flush=True)

    def truth(self) -> None:
        s = self.setting
        ex, gr = self.harness(), self.harness(self.groups)
        t = time.perf_counter()
        print(f"[{s.name}] ground truth (cache {self.cache_root})", flush=True)
        seeds = {"example": 1 if self.args.quick else s.loo_seeds, "source": 1 if self.args.quick else s.group_seeds}
        removed = {"example": self.loo_examples, "source": list(range(s.n_groups))}
        harness = {"example": ex, "source": gr}
        if self.args.peer_scores_only:  # tuning needs the example regime's subsets only
            self.example_truth()
            return
        self.gt = {
            regime: {"subsets": harness[regime].subsets(self.n_subsets, s.alpha), "leave_out": harness[regime].leave_out(removed[regime], seeds[regime])}
            for regime in self.args.truth_regimes
        }
        retrain_s = sum(g.train_seconds for r in self.gt.values() for g in r.values())
        print(f"[{s.name}] ground truth ready in {time.perf_counter() - t:.1f}s (retrain seconds when computed: {retrain_s:.1f})", flush=True)

    def lds(self, regime: str, scores: Tensor, idx: Tensor) -> Tensor:
        g = self.gt[regime]["subsets"]
        return linear_datamodeling_scores(scores, g.masks, g.values[:, idx])

    # -- the attributed model (plain fits, timed), TracIn's snapshots, TRAK's extra members
    def model(self) -> nn.Module:
        """The attributed model: the plain fit (cached with its timings and TracIn's snapshots; ``--plain-fits 0`` reuses it)."""
        if self._model is None:
            s = self.setting
            self.snap_epochs = [round(s.recipe.epochs * k / 5) for k in range(1, 6)]
            key = _key({**self.signature, "torch": torch.__version__, "snapshots": self.snap_epochs, "format": 1})
            hit = self.cache.load("plain-fit", key)
            if hit is None or self.args.plain_fits > 0:
                snaps = EpochSnapshots(self.snap_epochs)
                times = []
                for _ in range(max(1, self.args.plain_fits)):
                    snaps.states.clear()
                    model, seconds = fit(s, self.data, [snaps])
                    times.append(seconds)
                tensors = {f"final.{k}": v.detach() for k, v in model.net.state_dict().items()}
                tensors.update({f"epoch{e}.{k}": v for e, st in snaps.states.items() for k, v in st.items()})
                meta = {"seconds": times, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                if hit is not None and any(not torch.equal(hit[0][k], v) for k, v in tensors.items()):
                    raise RuntimeError(f"[{s.name}] the plain fit is no longer deterministic against the cached one; clear {self.cache_root}.")
                self.cache.save("plain-fit", key, tensors, meta)
            else:
                tensors, meta = hit
            times = meta["seconds"]
            self.plain_fit_s = statistics.median(times)
            self.plain_fit_all_s = [round(t, 3) for t in times]
            self._model = self._load_state(tensors, "final.")
            self.snapshots = {e: {k[len(f"epoch{e}.") :]: v for k, v in tensors.items() if k.startswith(f"epoch{e}.")} for e in self.snap_epochs}
            self.weights = tensor_digest(*[p.detach() for p in self._model.parameters()])
            with torch.no_grad():
                acc = (self._model(self.data.x_test).argmax(1) == self.data.y_test).float().mean().item()
            self.test_accuracy = round(acc, 4)
            print(f"[{s.name}] plain fit {self.plain_fit_s:.2f}s (median of {len(times)}{', cached' if hit is not None and self.args.plain_fits == 0 else ''}), "
                  f"test accuracy {acc:.3f}", flush=True)  # fmt: skip
        return self._model

    def _load_state(self, tensors: dict[str, Tensor], prefix: str) -> nn.Module:
        m = self.make(0)
        m.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        return m.eval()

    def members(self) -> list[nn.Module]:
        if self._members is None:
            key = _key({**self.signature, "torch": torch.__version__, "seeds": list(range(1, 10)), "format": 1})
            hit = self.cache.load("trak-members", key)
            if hit is None:
                t = time.perf_counter()
                extra = self.harness().full(list(range(1, 10)))
                self.cache.save("trak-members", key, extra, {"seconds": time.perf_counter() - t})
                hit = extra, {"seconds": time.perf_counter() - t}
            extra, self.ens_train_s = hit[0], hit[1]["seconds"]
            self._members = [self.model()]
            for i in range(9):
                m = self.make(0)
                m.load_state_dict({k: v[i] for k, v in extra.items()})
                self._members.append(m.eval())
            print(f"[{self.setting.name}] 9 extra TRAK members in {self.ens_train_s:.1f}s", flush=True)
        return self._members

    def tracin_models(self) -> list[nn.Module]:
        self.model()
        return [self._load_state(self.snapshots[e], "") for e in self.snap_epochs]

    # -- records
    def record(self, regime: str, r: Result, pearson: float | None = None) -> dict:
        s, n = self.setting, len(self.data.x_train)
        idx = self.rep_idx[: len(r.scores)]
        lds = self.lds(regime, r.scores, idx)
        lo = self.gt[regime]["leave_out"]
        cols = self.loo_examples if regime == "example" else torch.arange(s.n_groups)
        corr = nanmean(leave_out_correlations(r.scores[:, cols], lo.values[:, idx]))
        rec = {
            "setting": s.name, "regime": regime, "method": r.method, "config": dict(r.config),
            "lds": round(nanmean(lds), 4), "lds_ci95": ci95(lds),
            "loo": round(corr, 4) if regime == "example" else None,
            "group_corr": round(corr, 4) if regime == "source" else None,
            "pearson_to_exact": None if pearson is None else round(pearson, 4),
            "setup_s": None if r.setup_s is None else round(r.setup_s, 3),
            "setup_ratio": None if r.setup_ratio is None else round(r.setup_ratio, 2),
            "query_ms_single": _round(r.query_ms_single, 4), "query_ms_batched": _round(r.query_ms_batched, 5),
            "storage_bytes": None if r.storage_bytes is None else int(r.storage_bytes), "peak_rss_mb": _round(r.peak_rss_mb, 1),
            "n_train": n, "n_sources": n if regime == "example" else s.n_groups, "n_queries": len(idx),
            "torch": torch.__version__, "machine": machine(),
        }  # fmt: skip
        rec["config"]["ground_truth"] = {
            "lds": f"{self.n_subsets} retrains on {s.alpha:.0%} of the sources, 1 seed each",
            "leave_out": f"{len(cols)} {'examples' if regime == 'example' else 'groups'} x {lo.settings['n_seeds']} seeds, seed held fixed",
        }
        rec["config"]["plain_fit"] = {"seconds": self.plain_fit_all_s, "test_accuracy": self.test_accuracy, "recipe": recipe_key(s.recipe)}
        if r.method.startswith("ours"):  # on a slow peer's queries too (targets.lds_on_queries)
            rec["config"]["lds_on_first_queries"] = lds_on_first_queries(lds, self.args)
            rec["config"]["lds_per_query"] = [round(float(v), 4) for v in lds]  # reported queries, in order
        assert tuple(rec) == FIELDS
        print(f"  => {s.name:14s} {regime:8s} {r.method:44s} LDS {rec['lds']:.3f}  corr {corr:.3f}  setup {_fmt(r.setup_s)}s  "
              f"Q=1 {_fmt(r.query_ms_single)}ms  batched {_fmt(r.query_ms_batched, 4)}ms/q", flush=True)  # fmt: skip
        self.records.append(rec)
        return rec

    def record_both_regimes(self, r: Result, pearson: float | None = None, pearson_source: float | None = None) -> None:
        """Per-example scores: the example regime as is, the source regime summed per group (the sum timed and added)."""
        self.record("example", r, pearson)
        g = self.setting.n_groups
        t_sum, grouped = timed(lambda: sum_over_sources(r.scores, self.groups, g), 5)
        t_one, _ = timed(lambda: sum_over_sources(r.scores[:1], self.groups, g), 5)
        add = lambda ms, extra: None if ms is None else ms + extra  # noqa: E731
        self.record(
            "source",
            Result(r.method, {**r.config, "source_scores": "sum of per-example scores per group"}, grouped, r.setup_s,
                   add(r.query_ms_single, 1e3 * t_one), add(r.query_ms_batched, 1e3 * t_sum / len(r.scores)),
                   r.storage_bytes, r.peak_rss_mb, r.setup_ratio),
            pearson_source,
        )  # fmt: skip

    # -- peers: computed once per (model weights, settings), then read from the cache
    def peer_tags(self, label: str) -> list[str]:
        """The rows a peer gets: ``"tuned"`` (its grid, unless ``--no-tuning``) first, then ``"defaults"``, within ``--variants``."""
        _, _, default, grid, _ = PEER_SPECS_BY_LABEL[label]
        tags = ([] if grid is None or self.args.no_tuning else ["tuned"]) + ([] if default is NO_DEFAULTS_ROW else ["defaults"])
        return [t for t in tags if t in getattr(self.args, "variants", ("tuned", "defaults"))]

    def peer_result(self, label: str, tag: str, compute: bool) -> Result | None:
        """One peer row (``tag`` from :meth:`peer_tags`) on the reported queries: cached, else computed when
        ``compute`` (and cached), else None. A slow peer (``--slow-peers``) scores the first ``--slow-queries``."""
        s, args = self.setting, self.args
        _, make, default, grid, slow = PEER_SPECS_BY_LABEL[label]
        slow = slow or label in args.slow_peers
        n_q = min(args.slow_queries, len(self.rep_idx)) if slow else len(self.rep_idx)
        value, grid_ = (None, grid) if tag == "tuned" else (default, None)
        self.model()
        key = _key({**self.signature, "weights": self.weights, "peer": label, "tag": tag, "value": value, "grid": grid_,
                    "n_queries": n_q, "format": 1})  # fmt: skip
        hit = self.cache.load(f"peer-{label}-{tag}", key)
        if hit is None and not compute:
            print(f"[{s.name}] {label} [{tag}] on {n_q} queries: not cached (run --stages peers)", flush=True)
            return None
        if hit is None:
            hit = self._run_peer(label, make, tag, value, grid_, slow, n_q)
            self.cache.save(f"peer-{label}-{tag}", key, *hit)
        tensors, meta = hit
        r = Result(meta["method"], meta["config"], tensors["scores"], meta["setup_s"], meta["query_ms_single"],
                   meta["query_ms_batched"], meta["storage_bytes"], meta["peak_rss_mb"], meta["setup_s"] / self.plain_fit_s)  # fmt: skip
        r.config["measured_at"] = meta["measured_at"]
        return r

    def peers(self, compute: bool) -> None:
        args = self.args
        wanted = lambda name: not args.methods or any(m.lower() in name.lower() for m in args.methods)  # noqa: E731
        for label in PEER_PRIORITY:
            if not wanted(label) or label in args.skip:
                continue
            for tag in self.peer_tags(label):
                try:
                    r = self.peer_result(label, tag, compute)
                except ImportError as err:
                    print(f"  skipped: {err}", flush=True)
                    break
                except Exception:
                    traceback.print_exc()
                    continue
                if r is not None and not args.peer_scores_only:
                    self.record_both_regimes(r)

    def _run_peer(self, label, make, tag, value, grid, slow, n_q) -> tuple[dict[str, Tensor], dict]:
        s = self.setting
        models = self.tracin_models() if label in ("TracIn",) else self.members() if label.startswith("TRAK-10") else [self.model()]
        tuning = None
        if grid is not None:
            print(f"[{s.name}] tuning {label} on {len(self.val_idx)} validation queries", flush=True)
            lds_val = lambda sc: nanmean(self.lds("example", sc, self.val_idx))  # noqa: E731
            value, tuning, peer, setup_s = tune(lambda v: make(s, v), grid, models, self.data, self.x_val, self.y_val, lds_val)
        else:
            peer, setup_s = make(s, value), None
        print(f"[{s.name}] {label} ({tag}: {value}) on {n_q} queries", flush=True)
        res = run_peer(peer, models, self.data, self.x_rep[:n_q], self.y_rep[:n_q], self.args, slow, setup_s)
        config = {**res.config, "variant": tag, **(tuning or {})}
        if label.startswith("TRAK-10"):
            config["extra_models_trained"] = 9
            config["extra_training_s"] = round(self.ens_train_s, 2)
        if slow:
            config["queries"] = f"the first {n_q} reported queries only (a slow peer on this machine: --slow-peers / LiSSA)"
        config["timing_repeats"] = {"single": 3 if slow else self.args.single_repeats, "batched": 1 if slow else self.args.batched_repeats}
        meta = {
            "method": f"{res.method} [{tag}]", "config": config, "setup_s": res.setup_s, "query_ms_single": res.query_ms_single,
            "query_ms_batched": res.query_ms_batched, "storage_bytes": res.storage_bytes, "peak_rss_mb": res.peak_rss_mb,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }  # fmt: skip
        return {"scores": res.scores.float()}, meta

    # -- query cost at Q=1 against TRAK-1 timed at the same moment (the machine's load varies by 10x)
    def paired_q1(self, score_fn) -> dict:
        """Q=1 milliseconds of ``score_fn`` and of dattri's TRAK-1 on the same model, interleaved query by query (medians)."""
        if self._trak1 is None:
            self._trak1 = DattriTRAK(1, proj_dim=512, regularization=0.1)  # the query cost does not depend on the ridge
            self._trak1.setup([self.model()], self.data.x_train, self.data.y_train)
        ours, trak = [], []
        for k in range(self.args.paired_rounds + 1):
            x, y = self.x_rep[k : k + 1], self.y_rep[k : k + 1]
            for fn, out in ((score_fn, ours), (self._trak1.score, trak)):
                t = time.perf_counter()
                fn(x, y)
                if k:  # the first round warms up
                    out.append(1e3 * (time.perf_counter() - t))
        return {"paired_q1": {"ours_ms": round(statistics.median(ours), 3), "trak1_dattri_ms": round(statistics.median(trak), 3),
                              "rounds": self.args.paired_rounds, "how": "alternating single queries, medians"}}

    # -- the exact target at the same model
    def _exact_key(self) -> str:
        self.model()
        return _key({**self.signature, "weights": self.weights, "format": 1})

    def explicit_ggn(self) -> Tensor:
        """The full-data GGN at the attributed model, ``Tensor[P, P]`` (cached in float32)."""
        key = self._exact_key()
        hit = self.cache.load("ggn", key)
        if self._exact is None:
            self._exact = ExactInfluence(self.model(), self.data.x_train, self.data.y_train, ggn=None if hit is None else hit[0]["ggn"])
        if hit is None:
            t = time.perf_counter()
            print(f"[{self.setting.name}] explicit GGN, P = {self._exact.num_parameters}", flush=True)
            g = self._exact.ggn
            self.cache.save("ggn", key, {"ggn": g.float()}, {"seconds": time.perf_counter() - t, "P": self._exact.num_parameters})
            print(f"[{self.setting.name}] explicit GGN in {time.perf_counter() - t:.1f}s", flush=True)
        return self._exact.ggn

    def exact_scores(self, damping: float) -> tuple[Tensor, float]:
        """``Tensor[Q_rep, n]`` exact damped-GGN influence at the attributed model, and the seconds it took (cached)."""
        key = self._exact_key()
        name = f"exact-{damping:.6g}"
        hit = self.cache.load(name, key)
        if hit is not None:
            return hit[0]["scores"], hit[1]["seconds"]
        t = time.perf_counter()
        self.explicit_ggn()
        scores = self._exact.scores(self.x_rep, self.y_rep, damping)
        seconds = time.perf_counter() - t
        self.cache.save(name, key, {"scores": scores}, {"seconds": seconds, "damping": damping})
        return scores, seconds

    # -- ours
    def ours(self) -> None:
        s, args = self.setting, self.args
        self.model()
        variants = {  # callback options on top of its defaults
            "default": {},  # the trajectory ensemble (checkpoint_epochs="auto")
            "single": {"checkpoint_epochs": None},  # the final model alone
        }
        names = list(args.ours)
        if getattr(args, "ours_options", None):
            variants[args.ours_label] = json.loads(args.ours_options)
            names.append(args.ours_label)
        for name in names:
            for regime in getattr(args, "ours_regimes", ("example", "source")):
                print(f"[{s.name}/{regime}] ours {name}: {variants[name] or 'the callback defaults'}", flush=True)
                try:
                    r, damping = run_ours(self, regime, variants[name], name)
                except Exception:
                    traceback.print_exc()
                    continue
                pearson = None
                if not args.no_exact and damping is not None:
                    self.record_exact(damping)
                    pearson = self.pearson_to_exact(r, damping, regime)
                self.record(regime, r, pearson)
                self.on_record()  # written at once: a later fit that fails or is stopped loses nothing

    def record_exact(self, damping: float) -> None:
        """The exact target's rows (both regimes) at ``damping``, once per damping."""
        if damping not in self._exact_recorded:
            self._exact_recorded.add(damping)
            exact, seconds = self.exact_scores(damping)
            er = Result(f"exact damped-GGN target (λ={damping:.3g}, same model)",
                        {"damping": damping, "how": "explicit [P, P] GGN, Cholesky solve (lightning_attr.evaluation.exact)"},
                        exact, seconds, None, None, None, None)  # fmt: skip
            self.record_both_regimes(er, 1.0, 1.0)

    def pearson_to_exact(self, r: Result, damping: float, regime: str = "example") -> float:
        """Pearson of every (query, source) score of ours (its last checkpoint alone) with the exact target at ``damping``."""
        exact = self.exact_scores(damping)[0]
        if regime == "source":
            exact = sum_over_sources(exact, self.groups, self.setting.n_groups)
        ours = r.scores if r.final_scores is None else r.final_scores
        return float(torch.corrcoef(torch.stack([ours.flatten().double(), exact[: len(ours)].flatten().double()]))[0, 1])


def run_ours(bench: SettingBench, regime: str, options: dict | None = None, label: str = "default") -> tuple[Result, float | None]:
    """One fit with the callback (``options``: callback arguments over its defaults, e.g. ``{"mode": "end"}``)
    and its read-out through ``attribute()``'s defaults (every checkpoint of the store); returns the row
    ``ours (<label>)`` and the damping ``lambda`` the store's last checkpoint used (None if it records none)."""
    s, args = bench.setting, bench.args
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{s.name}-"))
    dirpath = workdir / "responses"
    groups = bench.groups
    cb = AttributionCallback(dirpath=str(dirpath), sources=groups if regime == "source" else None, **(options or {}))
    try:
        with PeakRSS() as rss:
            model, fit_s = fit(s, bench.data, [cb])
            model.eval()

            def score(x, y):
                return model.attribute((x, y), responses=cb.dirpath)

            single, batched, scores = time_queries(score, bench.x_rep, bench.y_rep, args.single_repeats, args.batched_repeats)
            paired = bench.paired_q1(score) if args.paired_rounds > 0 else None
        store = ResponseStore.load(cb.dirpath)
        final = None
        if len(store.checkpoints) > 1:
            final = model.attribute((bench.x_rep, bench.y_rep), responses=cb.dirpath, checkpoints=store.checkpoints[-1])
        if regime == "source":  # order the columns as group ids 0..G-1
            order = [store.source_ids.index(g) for g in range(s.n_groups)]
            scores = scores[:, order]
            final = None if final is None else final[:, order]
        info = store.checkpoint_info(store.checkpoints[-1])
        storage = dir_bytes(cb.dirpath)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    # setup = the callback's own wall time (its hooks + end-of-fit simulation), cumulative over checkpoints;
    # the rest of the same fit is the plain training it rode on, timed under the same machine load.
    sim_s = float(info.get("simulation_seconds", float("nan")))
    train_s = fit_s - sim_s
    rule = info.get("step_rule") or {}
    damping = rule.get("damping") if isinstance(rule, dict) else None
    config = {
        "options": dict(options or {}), "mode": cb.mode, "propagation": cb.propagation, "horizon": cb.horizon, "damping": cb.damping,
        "curvature": cb.curvature, "readout": "linear", "checkpoints": "attribute()'s default", "store_checkpoints": store.checkpoints,
        "checkpoint_epochs": cb.checkpoint_epochs,
        "fit_s_with_callback": round(fit_s, 3), "training_s_in_that_fit": round(train_s, 3),
        "plain_fit_s_separate_runs": round(bench.plain_fit_s, 3),
        "step_rule": rule, "curvature_products": info.get("curvature_products"), "n_shortfall": info.get("n_shortfall"),
        **(paired or {}),
        "commit": CODE_COMMIT, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load_average": load_average(),
        "callback": {k: v for k, v in vars(cb).items() if not k.startswith("_") and isinstance(v, (int, float, str, bool, type(None), list))},
    }  # fmt: skip
    n_ckpts = len(store.checkpoints)
    method = f"ours ({label}{f', {n_ckpts} ckpts' if n_ckpts > 1 else ''})"
    r = Result(method, config, scores, sim_s, single, batched, storage, rss.peak_mb, sim_s / train_s, final)
    return r, (float(damping) if damping is not None else None)


def _round(x, digits):
    return None if x is None else round(x, digits)


def _fmt(x, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


RENAMED_SETTINGS = {"digits": "digits-mlp", "mnist1d": "mnist1d-mlp"}  # names before issue 7's settings


def imported_peers(path: str | None, setting: str, bench: SettingBench) -> list[dict]:
    """Peer rows of an earlier run of the same setting (same model recipe, seeds and ground truth) that this run lacks
    (the exact target's rows are not peers: they are recomputed, from the cache, at this run's damping)."""
    if path is None:
        return []
    have = {(r["regime"], r["method"]) for r in bench.records}
    out = []
    for r in json.loads(Path(path).read_text()):
        if (RENAMED_SETTINGS.get(r["setting"], r["setting"]) != setting or r["method"].startswith(("ours", "exact"))
                or (r["regime"], r["method"]) in have):  # fmt: skip
            continue
        rec = {k: r.get(k) for k in FIELDS}
        rec["setting"] = setting
        # a row that was already carried over keeps the name of the run that measured it
        rec["config"] = {**r["config"], "carried_over_from": r["config"].get("carried_over_from", Path(path).name),
                         "note": "not re-run: same model recipe, seeds, queries and ground truth; timings from that run's load"}  # fmt: skip
        out.append(rec)
    return out


# ------------------------------------------------------------------------------------------ output
def figure(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys((r["setting"], r["regime"]) for r in records))
    cols = 2
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.5 * rows), squeeze=False)
    for ax, (setting, regime) in zip(axes.flat, keys):
        for r in (r for r in records if r["setting"] == setting and r["regime"] == regime):
            if r["query_ms_batched"] is None:  # the exact target: a horizontal line
                ax.axhline(r["lds"], color="C2", ls="--", lw=1)
                ax.annotate(r["method"], (1e-3, r["lds"]), xycoords=("axes fraction", "data"), fontsize=7, color="C2")
                continue
            ours = r["method"].startswith("ours")
            ax.scatter(r["query_ms_batched"], r["lds"], marker="*" if ours else "o", s=120 if ours else 40, color="C3" if ours else "C0")
            ax.annotate(r["method"], (r["query_ms_batched"], r["lds"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("per-query cost, batched (ms, log scale)")
        ax.set_ylabel("LDS")
        ax.set_title(f"{setting}, {regime} regime")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))


def write_outputs(out: Path, records: list[dict]) -> None:
    if not records:  # e.g. --stages truth exact: nothing to report yet
        return
    atomic_write_json(out, records, sort_keys=False)
    limits = {name: s.setup_limit for name, s in SETTINGS.items()}
    md = out.with_suffix(".md")
    atomic_write_text(md, f"<!-- generated by benchmarks/bench.py from {out.name}; do not edit -->\n\n" + markdown(records, limits))
    figure(records, out.with_suffix(".png"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/latest.json")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=sorted(SETTINGS))
    p.add_argument("--stages", nargs="+", default=["truth", "peers", "ours"], choices=["truth", "exact", "peers", "ours"],
                   help="exact: the explicit GGN at the attributed model; peers: compute the peers missing from the cache "
                        "(cached peers are always reported)")  # fmt: skip
    p.add_argument("--truth-regimes", nargs="+", default=["example", "source"], choices=["example", "source"],
                   help="compute only these regimes' ground truth (to split the retraining over processes)")
    p.add_argument("--peer-scores-only", action="store_true",
                   help="with --stages peers: compute and cache peers' scores without reporting (needs only the example subsets)")
    p.add_argument("--ours", nargs="*", default=["default", "single"], choices=["default", "single"])
    p.add_argument("--ours-options", default=None, metavar="JSON", help="one more variant of ours: callback options over the defaults")
    p.add_argument("--ours-label", default="options", help="its row is 'ours (<label>)'")
    p.add_argument("--ours-regimes", nargs="+", default=["example", "source"], choices=["example", "source"])
    p.add_argument("--merge", nargs="*", default=None, help="only merge these result JSONs (records of later files win) into --out")
    p.add_argument("--cache-dir", default="benchmarks/results/cache")
    p.add_argument("--import-peers", default=None,
                   help="an earlier results JSON whose peer rows are reported (marked) where this run has no such row")
    p.add_argument("--methods", nargs="*", default=None, help="substring filter on peer labels (default: all)")
    p.add_argument("--skip", nargs="*", default=[], help="peer labels to skip, e.g. IF-LiSSA")
    p.add_argument("--no-tuning", action="store_true")
    p.add_argument("--variants", nargs="+", default=["tuned", "defaults"], choices=["tuned", "defaults"],
                   help="which rows of each peer to compute and report (tuned: regularization chosen on validation queries)")
    p.add_argument("--no-exact", action="store_true", help="skip the exact damped-GGN target")
    p.add_argument("--slow-queries", type=int, default=30, help="reported queries scored by the slow peers (LiSSA)")
    p.add_argument("--slow-peers", nargs="*", default=[], help="further peer labels run as slow ones (fewer queries), e.g. IF-CG")
    p.add_argument("--single-repeats", type=int, default=20)
    p.add_argument("--batched-repeats", type=int, default=3)
    p.add_argument("--paired-rounds", type=int, default=20, help="Q=1 timings of ours alternated with dattri's TRAK-1 (0 = off)")
    p.add_argument("--plain-fits", type=int, default=3, help="plain fits timed (median)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="smoke run: few subsets and queries")
    p.add_argument("--quick-subsets", type=int, default=20)
    p.add_argument("--quick-queries", type=int, default=40)
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.merge is not None:
        merged: dict[tuple, dict] = {}
        for path in args.merge:
            for r in json.loads(Path(path).read_text()):
                merged[(r["setting"], r["regime"], r["method"])] = r
        write_outputs(out, list(merged.values()))
        print(f"merged {len(merged)} records into {out}")
        return
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    records = []
    if out.exists():  # keep other settings' records from an earlier run
        records = [r for r in json.loads(out.read_text()) if r["setting"] not in args.settings]
    for name in args.settings:
        bench = SettingBench(SETTINGS[name], args)
        if set(args.stages) & {"truth", "peers", "ours"}:
            bench.truth()
        if "exact" in args.stages and not args.no_exact:
            bench.explicit_ggn()
        if "peers" in args.stages or "ours" in args.stages:
            bench.peers(compute="peers" in args.stages)
            write_outputs(out, records + bench.records)
        if "ours" in args.stages:
            bench.on_record = lambda: write_outputs(out, records + bench.records)
            bench.ours()
        records += bench.records + imported_peers(args.import_peers, name, bench)
        write_outputs(out, records)
    print(f"wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
