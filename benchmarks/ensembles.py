"""Trajectory and multi-run ensembles against the bench's ground truth (LDS over 100 half-data retrains).

    OMP_NUM_THREADS=1 python benchmarks/ensembles.py SETTING NAME='{callback kwargs}' ... [--seeds 0 1]

e.g. ``benchmarks/ensembles.py digits-mlp 'auto={"checkpoint_epochs": "auto"}' --seeds 0 1``. Per variant
and seed: one fit of the bench's setting (the harness's example order for that seed) with the callback;
the LDS of every response checkpoint alone and of ``checkpoints="all"``; the callback's own simulation
seconds (its clock, in the manifest) against a plain fit in the same process. With several seeds, also
the ensemble of the runs' stores (``responses=[...]``, last and all checkpoints). One JSON line each,
printed and appended to ``--out``.

Settings: the bench's (``bench.SETTINGS``; ground truth from its cache, computed on first use) and
``digits01-mlp``: the digits MLP on raw pixels scaled to [0, 1] instead of standardized (issue 7).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import SETTINGS, Setting, fit, make_net  # noqa: E402

from lightning_attr import AttributionCallback, ResponseStore  # noqa: E402
from lightning_attr.data.embedded import TensorSplit  # noqa: E402
from lightning_attr.evaluation import RetrainingHarness, linear_datamodeling_scores  # noqa: E402


def load_digits01() -> TensorSplit:
    """sklearn's digits with the bench's split, pixels scaled to [0, 1] (not standardized)."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    x, y = torch.as_tensor(raw.data, dtype=torch.float32) / 16.0, torch.as_tensor(raw.target)
    perm = torch.as_tensor(np.random.default_rng(0).permutation(len(x)))
    train, test = perm[:1400], perm[1400:]
    return TensorSplit(x[train], y[train], x[test], y[test], 10, "digits01")


_digits = SETTINGS["digits-mlp"]
SETTINGS["digits01-mlp"] = Setting(
    "digits01-mlp", load_digits01, _digits.build, _digits.arch, _digits.recipe, _digits.n_val_queries
)


class Evaluation:
    """One setting: its data, report queries (the bench's split) and LDS against the cached ground truth."""

    def __init__(self, setting: Setting, cache_dir: Path) -> None:
        self.setting = s = setting
        torch.manual_seed(0)
        self.data = d = s.load()
        perm = torch.randperm(len(d.x_test), generator=torch.Generator().manual_seed(1))
        n_report = s.n_report_queries or len(d.x_test) - s.n_val_queries
        self.report = perm[s.n_val_queries : s.n_val_queries + n_report].sort().values
        self.queries = (d.x_test[self.report], d.y_test[self.report])
        harness = RetrainingHarness(
            lambda seed: make_net(s, d, seed), f"{s.name}-{s.arch}", d.x_train, d.y_train, d.x_test, d.y_test,
            None, s.recipe, cache_dir / s.name,
        )  # fmt: skip
        self.truth = harness.subsets(s.n_subsets, s.alpha)
        self.plain_fit_s = min(fit(s, d, [])[1] for _ in range(2))

    def lds(self, model, responses, checkpoints: str) -> float:
        scores = model.attribute(self.queries, responses=responses, checkpoints=checkpoints)
        values = self.truth.values[:, self.report]
        return round(float(linear_datamodeling_scores(scores, self.truth.masks, values).nanmean()), 4)

    def run(self, name: str, kwargs: dict, seed: int, dirpath: Path) -> tuple[dict, object]:
        model, fit_s = fit(self.setting, self.data, [AttributionCallback(dirpath=str(dirpath), **kwargs)], seed=seed)
        model.eval()
        store = ResponseStore.load(dirpath)
        last = store.checkpoint_info(store.checkpoints[-1])
        record = {
            "setting": self.setting.name, "variant": name, "seed": seed, "kwargs": kwargs,
            "plain_fit_s": round(self.plain_fit_s, 2), "fit_s": round(fit_s, 2),
            "simulation_s": last["simulation_seconds"],
            "simulation_over_plain_fit": round(last["simulation_seconds"] / self.plain_fit_s, 2),
            "curvature_products": last["curvature_products"], "members": {},
        }  # fmt: skip
        for c in store.checkpoints:
            info = store.checkpoint_info(c)
            record["members"][c] = {
                "lds": self.lds(model, dirpath, c), "global_step": info["global_step"],
                "step_size": round(info["step_rule"]["step_size"], 4), "damping": float(f"{info['step_rule']['damping']:.3g}"),
            }  # fmt: skip
        if len(store.checkpoints) > 1:
            record["lds_all"] = self.lds(model, dirpath, "all")
        return record, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("setting", choices=sorted(SETTINGS))
    parser.add_argument("variants", nargs="+", help="NAME='{json callback kwargs}'")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--cache-dir", type=Path, default=Path("benchmarks/results/cache"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ensembles.jsonl"))
    args = parser.parse_args()
    start = time.perf_counter()
    evaluation = Evaluation(SETTINGS[args.setting], args.cache_dir)
    print(f"[{args.setting}] ground truth and plain fits in {time.perf_counter() - start:.0f}s", flush=True)

    def emit(record: dict) -> None:
        print(json.dumps(record), flush=True)
        with open(args.out, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    work = Path(tempfile.mkdtemp(prefix="ensembles-"))
    try:
        for spec in args.variants:
            name, kwargs = spec.split("=", 1)
            runs = []
            for seed in args.seeds:
                record, model = evaluation.run(name, json.loads(kwargs), seed, work / f"{name}-{seed}")
                emit(record)
                runs.append((model, work / f"{name}-{seed}"))
            if len(runs) > 1:
                model, paths = runs[0][0], [p for _, p in runs]
                record = {"setting": args.setting, "variant": name, "runs": args.seeds,
                          "lds_runs_last": evaluation.lds(model, paths, "last")}  # fmt: skip
                if len(ResponseStore.load(paths[0]).checkpoints) > 1:
                    record["lds_runs_all"] = evaluation.lds(model, paths, "all")
                emit(record)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
