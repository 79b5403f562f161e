"""Trajectory and multi-run ensembles against the bench's ground truth (LDS over 100 half-data retrains).

    OMP_NUM_THREADS=1 python benchmarks/ensembles.py SETTING NAME='{callback kwargs}' ... [--seeds 0 1] \\
        [--mix-final NAME] --cache-dir /work/cache/bench

e.g. ``benchmarks/ensembles.py digits-mlp 'auto={"checkpoint_epochs": "auto"}' 'r128={"checkpoint_epochs": "auto",
"rank": 128}' --mix-final auto``. Per variant and seed: one fit of the setting (the harness's example order for that
seed, so every variant of one seed trains the same trajectory) with the callback, then, from each response
checkpoint's linear-readout scores on the bench's report queries (``Tensor[Q, S]``, computed as
``readout="gradient"``: the same scores, faster for hundreds of queries):

- ``members``: each checkpoint alone, read out at the parameters it was simulated at (its LDS, its own simulation
  seconds and curvature products, its eigenspace's rank and ``sigma_k / lambda``);
- ``paired``: the trajectory ensemble as ``attribute(checkpoints="all")`` reads it (each member at its own
  parameters, normalized per query by its std over sources, averaged: :func:`~lightning_attr.attributor.ensemble_mean`);
- ``unpaired``: the same mean with every member read out at the final weights;
- ``collapsed``: ONE response per source, ``sum_e r_e / c_e``, read out at the final weights (one member's query
  cost); ``c_e``: the std over sources of member ``e``'s scores at the final weights, root mean square over
  ``--probes`` training examples as queries (not the report queries). By linearity of the readout its scores are
  ``sum_e s_e / c_e`` of the members' scores at the final weights; ``collapsed_norm``: the same with ``c_e`` the
  Frobenius norm of member ``e``'s responses centred over sources (no queries needed);
- ``subsets``: ``paired`` and ``collapsed`` for every subset of the members that holds the final one;
- with ``--mix-final NAME``: every other variant's earlier members with the final checkpoint of variant ``NAME``
  (same seed, hence the same trajectory): e.g. cheaper earlier members (a smaller ``rank``) around a full final one.

Costs: the callback's own clock per checkpoint (from the manifest) against a plain fit in the same process. With
several seeds, also the ensemble of the runs' stores (``responses=[...]``, last and all checkpoints). One JSON line
per record, printed and appended to ``--out``.

Settings: the bench's and the held-out ones (``convergence.HERE``: ``digits01-mlp``, ``digits-cnn-adam``); ground
truth from ``--cache-dir``, computed on first use.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import Setting, current_commit, fit, make_net  # noqa: E402
from convergence import HERE as SETTINGS  # noqa: E402

from lightning_attr import AttributionCallback, ResponseStore  # noqa: E402
from lightning_attr.attributor import ensemble_mean  # noqa: E402
from lightning_attr.evaluation import RetrainingHarness, linear_datamodeling_scores  # noqa: E402
from lightning_attr.functional import functional_view  # noqa: E402


class Evaluation:
    """One setting: its data, report queries (the bench's split) and LDS against the cached ground truth."""

    def __init__(self, setting: Setting, cache_dir: Path, n_probes: int) -> None:
        self.setting = s = setting
        torch.manual_seed(0)
        self.data = d = s.load()
        perm = torch.randperm(len(d.x_test), generator=torch.Generator().manual_seed(1))
        n_report = s.n_report_queries or len(d.x_test) - s.n_val_queries
        self.report = perm[s.n_val_queries : s.n_val_queries + n_report].sort().values
        self.queries = (d.x_test[self.report], d.y_test[self.report])
        probes = torch.randperm(len(d.x_train), generator=torch.Generator().manual_seed(2))[:n_probes]
        self.probes = (d.x_train[probes], d.y_train[probes])
        harness = RetrainingHarness(
            lambda seed: make_net(s, d, seed), f"{s.name}-{s.arch}", d.x_train, d.y_train, d.x_test, d.y_test,
            None, s.recipe, cache_dir / s.name,
        )  # fmt: skip
        self.truth = harness.subsets(s.n_subsets, s.alpha)
        self.plain_fit_s = min(fit(s, d, [])[1] for _ in range(2))

    def lds(self, scores: Tensor) -> float:
        """Mean LDS over the report queries of ``scores: Tensor[Q, S]``."""
        values = self.truth.values[:, self.report]
        return round(float(linear_datamodeling_scores(scores, self.truth.masks, values).nanmean()), 4)

    def run(self, name: str, kwargs: dict, seed: int, dirpath: Path) -> tuple[dict, dict, object]:
        """One fit with the callback; returns (record, the members' score matrices, the fitted model)."""
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
        members, seconds, products = member_scores(model, store, self.queries, self.probes), 0.0, 0
        for c in store.checkpoints:
            info = store.checkpoint_info(c)
            rule = info.get("step_rule") or {**info["spectral"], "complement_ratio": info["spectral"]["reach"]}  # codec "eigen"
            record["members"][c] = {
                "lds": self.lds(members[c]["paired"]), "global_step": info["global_step"],
                "simulation_over_plain_fit": round((info["simulation_seconds"] - seconds) / self.plain_fit_s, 2),
                "curvature_products": info["curvature_products"] - products, "damping": float(f"{rule['damping']:.3g}"),
                **({"rank": rule["rank"], "complement_ratio": round(rule["complement_ratio"], 3)} if "rank" in rule else {}),
            }  # fmt: skip
            seconds, products = info["simulation_seconds"], info["curvature_products"]
        if len(store.checkpoints) > 1:
            record.update(self.ensembles(members))
        return record, members, model

    def ensembles(self, members: dict) -> dict:
        """LDS of the ensembles of ``members`` (``{checkpoint: {"paired", "at_final", "scale"}}``, the final one
        last): paired, unpaired, collapsed, and paired / collapsed for every subset holding the final member."""
        names, final = list(members), list(members)[-1]
        out = {
            "paired": self.lds(ensemble_mean([members[c]["paired"] for c in names])),
            "unpaired": self.lds(ensemble_mean([members[c]["at_final"] for c in names])),
            "collapsed": self.lds(collapsed([members[c] for c in names])),
            "collapsed_norm": self.lds(collapsed([members[c] for c in names], "norm")),
            "subsets": {},
        }
        for size in range(1, len(names) - 1):
            for subset in itertools.combinations(names[:-1], size):
                chosen = [*subset, final]
                out["subsets"]["+".join(chosen)] = {
                    "paired": self.lds(ensemble_mean([members[c]["paired"] for c in chosen])),
                    "collapsed": self.lds(collapsed([members[c] for c in chosen])),
                    "collapsed_norm": self.lds(collapsed([members[c] for c in chosen], "norm")),
                }
        return out


def member_scores(model, store: ResponseStore, queries: tuple, probes: tuple) -> dict[str, dict]:
    """Per checkpoint: ``paired``, ``Tensor[Q, S]`` read out at its own parameters; ``at_final``, at the model's
    (final) weights; ``scale``, the root mean square over the probe queries of the std over sources of its scores
    at the final weights (the collapsed ensemble's ``c_e``); ``norm``, the Frobenius norm of its responses centred over
    sources (a ``c_e`` that needs no queries)."""
    out = {}
    with functional_view(model) as (fm, theta):
        batch, probe_batch = (tuple(t.clone() for t in b) for b in (queries, probes))
        for c in store.checkpoints:
            block = store.block(c)
            # dense: "gradient", the linear readout's scores in one matrix product (faster here); other codecs: "linear"
            readout = "gradient" if store.codec(c) == "dense" else "linear"
            chunk = None if readout == "gradient" else 256
            at_final = block.scores(fm, theta, batch, readout, chunk)
            probe = block.scores(fm, theta, probe_batch, readout, chunk)
            out[c] = {
                "paired": block.scores(fm, store.theta(c), batch, readout, chunk),
                "at_final": at_final,
                "scale": float(probe.std(dim=1).square().mean().sqrt()),
                "norm": float(centred_norm(block.responses if store.codec(c) == "dense" else block.to_dense())),
            }
    return out


def collapsed(members: list[dict], scale: str = "scale") -> Tensor:
    """Scores of the collapsed ensemble, ``sum_e s_e / c_e`` (members' scores at the final weights); ``scale``:
    which ``c_e`` (``"scale"``: from the probe queries, ``"norm"``: the responses' centred norm)."""
    return torch.stack([m["at_final"] / m[scale] for m in members]).sum(dim=0)


def centred_norm(responses: Tensor) -> Tensor:
    """Frobenius norm of ``responses: Tensor[S, P]`` minus their mean over sources."""
    return (responses - responses.mean(dim=0)).norm()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("setting", choices=sorted(SETTINGS))
    parser.add_argument("variants", nargs="+", help="NAME='{json callback kwargs}'")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--mix-final", help="a variant whose final checkpoint joins every other variant's earlier members")
    parser.add_argument("--probes", type=int, default=64, help="training examples that set the collapsed ensemble's c_e")
    parser.add_argument("--cache-dir", type=Path, default=Path("benchmarks/results/cache"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ensembles.jsonl"))
    args = parser.parse_args()
    start = time.perf_counter()
    evaluation = Evaluation(SETTINGS[args.setting], args.cache_dir, args.probes)
    print(f"[{args.setting}] ground truth and plain fits in {time.perf_counter() - start:.0f}s", flush=True)

    def emit(record: dict) -> None:
        record["command"], record["commit"] = " ".join(sys.argv), current_commit()
        print(json.dumps(record), flush=True)
        with open(args.out, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    work = Path(tempfile.mkdtemp(prefix="ensembles-"))
    scores: dict[tuple[str, int], dict] = {}
    try:
        for spec in args.variants:
            name, kwargs = spec.split("=", 1)
            runs = []
            for seed in args.seeds:
                record, scores[name, seed], model = evaluation.run(name, json.loads(kwargs), seed, work / f"{name}-{seed}")
                emit(record)
                runs.append((model, work / f"{name}-{seed}"))
            if len(runs) > 1:
                model, paths = runs[0][0], [p for _, p in runs]
                record = {"setting": args.setting, "variant": name, "runs": args.seeds}
                for which in ("last", "all") if len(ResponseStore.load(paths[0]).checkpoints) > 1 else ("last",):
                    record[f"lds_runs_{which}"] = evaluation.lds(model.attribute(evaluation.queries, responses=paths, checkpoints=which))
                emit(record)
        for (name, seed), members in scores.items():
            if args.mix_final and name != args.mix_final and len(members) > 1:
                final = list(scores[args.mix_final, seed].items())[-1]
                mixed = {**{c: m for c, m in list(members.items())[:-1]}, f"{args.mix_final}:{final[0]}": final[1]}
                emit({"setting": args.setting, "variant": f"{name} + final of {args.mix_final}", "seed": seed,
                      **evaluation.ensembles(mixed)})  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
