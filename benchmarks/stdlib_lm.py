"""The stdlib language model (``examples/stdlib_lm.py``): simulation cost and leave-one-module-out truth.

In one process, for the example's setting (``--setting fast`` by default, the one ``--fast`` runs):

1. the plain fit (no callback) and the fit with the callback (one source per module), both on the
   same fixed example order (:class:`lightning_attr.evaluation.FixedOrderSampler`, seed 0), so their
   final weights must be equal (checked); the simulation time is the callback's own hook time
   (:class:`lightning_attr.app.timing.HookTimer`), reported as a ratio to the plain fit and to the
   training steps of the same fit (its wall time less the callback's: the two are measured side by
   side, so a shared machine's changing load affects both alike);
2. scores of the held-out continuations against every module (forward-only readout);
3. leave-one-module-out retrains with Lightning on the same recipe and order (the left-out module's
   windows are skipped, the others keep their order), for ``--n-left-out`` modules evenly spaced over
   the module list and ``--seeds`` seeds (seed 0's full-data model is the plain fit of step 1);
   the actual change of each query's loss (without the module minus with it, averaged over seeds)
   against the predicted one gives the group correlation: Pearson per query over the left-out modules,
   averaged over queries (:class:`lightning_attr.evaluation.LeaveOneOutCorrelation`), for the
   continuations held out from the left-out modules and for all continuations.

Writes ``benchmarks/results/stdlib_lm.json`` and ``.md`` (atomically).

    OMP_NUM_THREADS=1 python benchmarks/stdlib_lm.py                  # fast setting, 10 modules, 2 seeds
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch
from torch.utils.data import Sampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from stdlib_lm import SETTINGS, Setting, in_module_order, own_module_ranks  # noqa: E402

from lightning_attr import ResponseStore  # noqa: E402
from lightning_attr.app.io import write_json, write_text  # noqa: E402
from lightning_attr.app.timing import HookTimer  # noqa: E402
from lightning_attr.data.stdlib_text import StdlibText  # noqa: E402
from lightning_attr.evaluation import LeaveOneOutCorrelation, training_orders  # noqa: E402
from lightning_attr.evaluation.metrics import leave_out_correlations  # noqa: E402
from lightning_attr.models.causal_lm import token_losses  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


class _KeptOrderSampler(Sampler[int]):
    """:func:`training_orders` of all ``n`` examples for ``seed``, restricted to ``keep`` (relative order kept)."""

    def __init__(self, keep: torch.Tensor, epochs: int, seed: int) -> None:
        self.orders = [order[keep[order]] for order in training_orders(len(keep), epochs, seed)]
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.orders[0])

    def __iter__(self) -> Iterator[int]:
        if self.epoch >= len(self.orders):
            raise RuntimeError(f"built for {len(self.orders)} epochs; a further epoch was requested.")
        self.epoch += 1
        return iter(self.orders[self.epoch - 1].tolist())


def _query_losses(model, text: StdlibText) -> torch.Tensor:
    """``Tensor[Q]`` each continuation's loss (nats per byte) under ``model``."""
    with torch.no_grad():
        return token_losses(model.eval()(text.x_query), text.y_query)


def _fit(setting: Setting, text: StdlibText, seed: int, left_out: int | None, callbacks=()) -> tuple:
    keep = torch.ones(len(text.x_train), dtype=torch.bool)
    if left_out is not None:
        keep = text.module_of_window != left_out
    return setting.fit(text, list(callbacks), seed=seed, sampler=_KeptOrderSampler(keep, setting.epochs, seed))


def _mean_correlation(scores: torch.Tensor, change: torch.Tensor) -> tuple[float, int]:
    metric = LeaveOneOutCorrelation()
    metric.update(scores, change)
    return float(metric.compute()), int(torch.isfinite(leave_out_correlations(scores, change)).sum())


def run(setting_name: str, n_left_out: int, seeds: int) -> dict:
    setting = SETTINGS[setting_name]
    text = setting.data()
    n_modules = len(text.modules)
    print(f"{setting_name}: {n_modules} modules, {len(text.x_train)} windows, {len(text.x_query)} continuations", flush=True)

    plain, plain_s = _fit(setting, text, seed=0, left_out=None)
    with tempfile.TemporaryDirectory() as tmp:
        callback = setting.callback(Path(tmp) / "responses", text)
        timer = HookTimer(callback)
        model, with_callback_s = _fit(setting, text, seed=0, left_out=None, callbacks=[callback])
        simulation_s = timer.total
        store = ResponseStore.load(callback.dirpath)
        products = store.checkpoint_info("final")["curvature_products"]
        start = time.perf_counter()
        scores = model.attribute((text.x_query, text.y_query), responses=callback.dirpath)
        attribute_s = time.perf_counter() - start
        scores = in_module_order(scores, store.source_ids, text.modules)  # [Q, n_modules]
    identical = all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), model.state_dict().values()))
    print(f"plain fit {plain_s:.1f} s, with the callback {with_callback_s:.1f} s, of which the simulation "
          f"{simulation_s:.1f} s: {simulation_s / plain_s:.2f}x the plain fit; weights identical: {identical}", flush=True)

    left_out = torch.linspace(0, n_modules - 1, n_left_out).round().long().unique()
    base = {0: _query_losses(plain, text)}
    change = torch.zeros(seeds, len(left_out), len(text.x_query))
    retrain_s = 0.0
    for seed in range(seeds):
        if seed not in base:
            full, seconds = _fit(setting, text, seed=seed, left_out=None)
            base[seed], retrain_s = _query_losses(full, text), retrain_s + seconds
        for k, module in enumerate(left_out.tolist()):
            retrained, seconds = _fit(setting, text, seed=seed, left_out=module)
            change[seed, k] = _query_losses(retrained, text) - base[seed]
            retrain_s += seconds
            print(f"seed {seed}: without {text.modules[module]} ({k + 1}/{len(left_out)}): mean change of the "
                  f"continuations' loss {float(change[seed, k].mean()):+.4f}", flush=True)
    actual = change.mean(0)  # [K, Q]
    predicted = scores[:, left_out]  # [Q, K]
    own = torch.isin(text.module_of_query, left_out)
    own_corr, own_defined = _mean_correlation(predicted[own], actual[:, own])
    all_corr, all_defined = _mean_correlation(predicted, actual)
    seed_corr = [_mean_correlation(predicted[own], change[s][:, own])[0] for s in range(seeds)]
    ranks = own_module_ranks(scores, text.module_of_query)
    is_own = left_out.unsqueeze(1) == text.module_of_query.unsqueeze(0)  # [K, Q]: module k is query q's own
    own_change = float(actual[is_own].mean()) if is_own.any() else None
    other_change = float(actual[~is_own & own.unsqueeze(0)].mean()) if own.any() else None
    return {
        "setting": setting_name,
        "recipe": asdict(setting),
        "n_modules": n_modules,
        "n_windows": len(text.x_train),
        "n_queries": len(text.x_query),
        "plain_fit_s": plain_s,
        "fit_with_callback_s": with_callback_s,
        "simulation_s": simulation_s,
        "simulation_over_plain_fit": simulation_s / plain_s,
        # the same fit's training steps (its wall time less the callback's): paired in time with the simulation
        "simulation_over_training_in_the_same_fit": simulation_s / (with_callback_s - simulation_s),
        "curvature_products": products,
        "weights_identical_with_callback": identical,
        "attribute_s": attribute_s,
        "own_module_in_top10": float((ranks <= 10).float().mean()),
        "own_module_mean_rank": float(ranks.float().mean()),
        "left_out_modules": [text.modules[m] for m in left_out.tolist()],
        "seeds": seeds,
        "retrain_s": retrain_s,
        "group_correlation_own_queries": own_corr,
        "group_correlation_own_queries_defined": own_defined,
        "group_correlation_own_queries_per_seed": seed_corr,
        "group_correlation_all_queries": all_corr,
        "group_correlation_all_queries_defined": all_defined,
        "mean_actual_change_own_module": own_change,
        "mean_actual_change_other_modules": other_change,
        "machine": f"{platform.machine()}, {platform.python_version()}, torch {torch.__version__}, threads {torch.get_num_threads()}",
    }


def _markdown(r: dict) -> str:
    return "\n".join([
        f"# stdlib LM: module sources ({r['setting']} setting of examples/stdlib_lm.py)",
        "",
        f"{r['n_modules']} modules (sources), {r['n_windows']} training windows, {r['n_queries']} held-out continuations; "
        f"recipe {r['recipe']}. Machine: {r['machine']}.",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| plain fit | {r['plain_fit_s']:.1f} s |",
        f"| simulation (callback hooks) | {r['simulation_s']:.1f} s = **{r['simulation_over_plain_fit']:.2f}x** the plain fit "
        f"({r['curvature_products']} curvature-vector products); "
        f"{r['simulation_over_training_in_the_same_fit']:.2f}x the training steps of the same fit |",
        f"| final weights equal with and without the callback | {r['weights_identical_with_callback']} |",
        f"| attribution of all continuations | {r['attribute_s']:.1f} s |",
        f"| own module in the top 10 | {r['own_module_in_top10']:.0%} (chance {10 / r['n_modules']:.0%}) |",
        f"| leave-one-module-out group correlation, continuations of the {len(r['left_out_modules'])} left-out modules "
        f"({r['group_correlation_own_queries_defined']} defined) | **{r['group_correlation_own_queries']:.3f}** "
        f"(per seed: {', '.join(f'{c:.3f}' for c in r['group_correlation_own_queries_per_seed'])}) |",
        f"| same, all continuations ({r['group_correlation_all_queries_defined']} defined) | {r['group_correlation_all_queries']:.3f} |",
        "",
        f"Mean actual change of a continuation's loss when its own module is left out: {r['mean_actual_change_own_module']:+.4f} "
        f"nats/byte; when another left-out module is: {r['mean_actual_change_other_modules']:+.4f}.",
        f"Left-out modules: {', '.join(r['left_out_modules'])}; {r['seeds']} seeds, retrains took {r['retrain_s']:.0f} s.",
        "Group correlation: Pearson per query between the predicted rise of its loss (the module's score) and the "
        "actual change (retrained without the module minus the full-data fit, same seed and order), averaged over queries.",
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="fast")
    parser.add_argument("--n-left-out", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "stdlib_lm.json")
    args = parser.parse_args()
    result = run(args.setting, args.n_left_out, args.seeds)
    result["command"] = "OMP_NUM_THREADS=1 python benchmarks/stdlib_lm.py " + " ".join(sys.argv[1:])
    write_json(args.out, result)
    write_text(args.out.with_suffix(".md"), _markdown(result))
    print(_markdown(result))


if __name__ == "__main__":
    main()
