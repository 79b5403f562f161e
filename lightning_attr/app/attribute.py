"""``lightning-attr-attribute``: explain a trained run's predictions and write the report (Hydra app).

    lightning-attr-attribute run_dir=runs/demo
    lightning-attr-attribute run_dir=runs/poisoned queries=triggered top_k=10
    lightning-attr-attribute run_dir=runs/multirun/<time>        # every job's store, ensembled
    lightning-attr-attribute 'run_dir=[runs/seed0,runs/seed1]'   # the same, for a list of runs

Reads what ``lightning-attr-train`` wrote into ``run_dir`` (``config.yaml``, ``model.pt``,
``responses/``), scores the queries against every source with forward passes only, computes every
training example's self-influence, and writes ``report.html``, ``figures/*.png`` and the raw top-k
table ``attributions.csv`` / ``attributions.json`` into ``out_dir`` (default: ``run_dir``).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_attr.app.io import write_json
from lightning_attr.app.logs import UsageError, exit_on_usage_error, route_logging_to_job_log
from lightning_attr.models.causal_lm import IGNORE_INDEX


@dataclass
class AttributionResult:
    """Everything the report draws. Shapes: ``Q`` queries, ``S`` sources, ``n`` training examples, ``k`` top-k."""

    queries: str
    x_query: Tensor | list[str]  # [Q, *input_shape] as drawn (raw pixels where the dataset has them), or each query's text
    y_query: Tensor  # [Q] classes, or [Q, T] a language model's next tokens (-100 where not scored)
    pred: Tensor  # [Q], or [Q, T] (argmax of the outputs)
    scores: Tensor  # [Q, S] predicted rise of the query loss if the source were removed
    source_ids: list
    example_to_source: Tensor  # [n] source position of each training example
    top_k: int
    self_influence: Tensor | None  # [n]
    y_true: Tensor | None = None  # [Q] true classes of triggered queries (their labels are the poison target)
    relative: Tensor | None = None  # [Q, S] score / sqrt(self-influence of the source)
    rank_by: str = "score"  # what the per-query top-k lists are ranked by: "score" or "relative"
    metrics: dict[str, Any] = field(default_factory=dict)
    measurement: Tensor | None = None  # [Q] each query's measurement (its loss by default): the scores' scale

    @property
    def is_sequence(self) -> bool:
        """Queries are sequences scored position by position (a language model's continuations), not classes."""
        return self.y_query.dim() > 1

    @property
    def ranking(self) -> Tensor:
        return self.relative if self.rank_by == "relative" else self.scores

    @property
    def fraction(self) -> Tensor:
        """``[Q, S]`` scores as a fraction of the query's measurement: 0.1 = removing the source would raise
        the query's loss by 10% of its value."""
        return self.scores / self.measurement.clamp_min(1e-12).unsqueeze(1)


class NotARunError(UsageError, FileNotFoundError):
    """``run_dir`` lacks what ``lightning-attr-train`` writes."""


def _load_run(run_dir: Path) -> tuple[DictConfig, dict[str, Any]]:
    missing = [name for name in ("config.yaml", "model.pt", "run.json") if not (run_dir / name).is_file()]
    if missing:
        raise NotARunError(
            f"{run_dir} is not a finished lightning-attr-train run (missing {', '.join(missing)}); "
            f"train first: lightning-attr-train hydra.run.dir={run_dir}"
        )
    return OmegaConf.load(run_dir / "config.yaml"), json.loads((run_dir / "run.json").read_text())


def run_directories(run_dir: Any) -> list[Path]:
    """The train runs to attribute: ``run_dir`` itself; or, for a multirun folder (no ``run.json``, job
    directories that have one), its jobs in job order; or a list of run directories. Several runs are
    ensembled (same model and data: each store is checked); the first gives the model and the data."""
    if OmegaConf.is_list(run_dir) or isinstance(run_dir, (list, tuple)):
        runs = [Path(d) for d in run_dir]
        if not runs:
            raise ValueError("run_dir is an empty list: give a run directory, a multirun folder, or a list of runs.")
        return runs
    path = Path(run_dir)
    if path.is_dir() and not (path / "run.json").is_file():
        jobs = [p for p in path.iterdir() if (p / "run.json").is_file()]
        if jobs:
            return sorted(jobs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))
    return [path]


def _run_store(run_dir: Path) -> Path:
    """The response store of another run of an ensemble (its first attribution callback's)."""
    _, run = _load_run(run_dir)
    if not run["responses"]:
        raise ValueError(f"{run_dir} was trained without an attribution callback (run.json lists no responses).")
    store = Path(next(iter(run["responses"].values())))
    return store if store.is_absolute() else run_dir / store


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())


def attribute_run(cfg: DictConfig) -> dict[str, Any]:
    """Score, evaluate and report one train run; returns the summary written to ``attribution.json``."""
    from torchmetrics.functional.classification import binary_auroc

    from lightning_attr.app.report import write_report
    from lightning_attr.app.summary import print_attribute_summary

    rank_by = cfg.get("rank_by", "score")
    if rank_by not in ("score", "relative"):
        raise UsageError(f"rank_by must be 'score' or 'relative', got {rank_by!r}.")
    if rank_by == "relative" and not cfg.self_influence:
        raise UsageError("rank_by=relative divides by each source's self-influence: set self_influence=true.")
    if cfg.get("draw", "first") not in ("first", "misclassified"):
        raise UsageError(f"draw must be 'first' or 'misclassified', got {cfg.draw!r}.")
    if cfg.top_k < 1 or cfg.batch_size < 1:
        raise UsageError(f"top_k and batch_size must be >= 1, got top_k={cfg.top_k}, batch_size={cfg.batch_size}.")
    run_dirs = run_directories(cfg.run_dir)
    run_dir = run_dirs[0]  # its model and data are used; every run's store joins the ensemble
    out_dir = Path(cfg.out_dir) if cfg.get("out_dir") else Path(run_dir if OmegaConf.is_list(cfg.run_dir) else cfg.run_dir)
    train_cfg, run = _load_run(run_dir)
    queries = cfg.get("queries") or train_cfg.get("report", {}).get("queries", "test")
    timings: dict[str, float] = {}

    start = time.perf_counter()
    datamodule = hydra.utils.instantiate(train_cfg.data)
    datamodule.setup("fit")
    model = hydra.utils.instantiate(train_cfg.model)
    model.load_state_dict(torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True))
    model.eval()
    if not run["responses"]:
        raise UsageError(f"{run_dir} was trained without an attribution callback (run.json lists no responses).")
    responses = Path(cfg.get("responses") or next(iter(run["responses"].values())))
    if not responses.is_absolute() and not cfg.get("responses"):
        responses = run_dir / responses  # run.json records it relative to the run directory
    from lightning_attr import ResponseStore

    store = ResponseStore.load(responses)
    members = [responses] + [_run_store(other) for other in run_dirs[1:]]
    timings["load_s"] = time.perf_counter() - start

    readout = cfg.get("readout", "linear")
    checkpoints = cfg.get("checkpoints", "last")
    if not isinstance(checkpoints, str):
        checkpoints = list(checkpoints)
    dataset = datamodule.query_dataset(queries)
    if cfg.get("max_queries"):
        dataset = torch.utils.data.Subset(dataset, range(min(int(cfg.max_queries), len(dataset))))
    loader = DataLoader(dataset, batch_size=int(cfg.batch_size))
    ys, preds, scores, measured = [], [], [], []
    start = time.perf_counter()
    with _progress() as progress:
        task = progress.add_task("attributing queries", total=len(dataset))
        for x, y in loader:
            with torch.no_grad():
                outputs = model.attribution_outputs((x, y))
                preds.append(outputs.argmax(-1))
                measured.append(model.attribution_measurement(outputs, (x, y)))  # the scores' unit and scale
            ensemble = store if len(members) == 1 else members
            scores.append(model.attribute((x, y), responses=ensemble, readout=readout, checkpoints=checkpoints))
            ys.append(y)
            progress.advance(task, len(y))
    timings["scores_s"] = time.perf_counter() - start
    timings["ms_per_query"] = 1000 * timings["scores_s"] / max(len(dataset), 1)

    self_influence = None
    if cfg.self_influence:
        start = time.perf_counter()
        values = []
        train_loader = DataLoader(datamodule.train_dataset(), batch_size=int(cfg.batch_size))
        with _progress() as progress:
            task = progress.add_task("self-influence", total=datamodule.n_train)
            for batch in train_loader:
                values.append(model.self_influence(batch, responses=store, readout=readout))
                progress.advance(task, len(batch[-1]))
        self_influence = torch.cat(values)
        timings["self_influence_s"] = time.perf_counter() - start

    result = AttributionResult(
        queries=queries,
        x_query=datamodule.display_queries(queries)[: len(dataset)],
        y_query=torch.cat(ys),
        pred=torch.cat(preds),
        measurement=torch.cat(measured),
        scores=torch.cat(scores),
        source_ids=list(store.source_ids),
        example_to_source=store.example_to_source(),
        top_k=min(int(cfg.top_k), store.n_sources),
        self_influence=self_influence,
        y_true=datamodule.split.y_test[: len(dataset)] if queries == "triggered" else None,
    )
    if self_influence is not None:
        result.relative = relative_scores(result.scores, self_influence, result.example_to_source)
        result.rank_by = rank_by
    scored = result.y_query != IGNORE_INDEX  # every label of a classifier; a continuation's positions of a language model
    result.metrics["accuracy"] = float((result.pred == result.y_query)[scored].float().mean())
    flipped = datamodule.metadata.get("flipped")
    if self_influence is not None and flipped is not None and bool(flipped.any()):
        finite = torch.isfinite(self_influence)
        result.metrics["mislabel_auc"] = float(binary_auroc(self_influence[finite], flipped[finite].long()))
        result.metrics["n_flipped"] = int(flipped.sum())
    if "poisoned" in datamodule.metadata:
        affected = None
        if result.y_true is not None:  # triggered queries the backdoor flipped to the target class
            affected = (result.y_true != result.y_query) & (result.pred == result.y_query)
        result.metrics["poison"] = poison_metrics(result, datamodule.metadata["poisoned"], affected)

    start = time.perf_counter()
    files = write_report(out_dir, result, datamodule, train_cfg, run, cfg)
    timings["report_s"] = time.perf_counter() - start

    summary = {
        "run_dir": str(run_dir),
        "responses": str(responses) if len(members) == 1 else [str(m) for m in members],
        "report": str(files["report"]),
        "tables": [str(files["csv"]), str(files["json"])],
        "figures": [str(p) for p in files["figures"]],
        "queries": queries,
        "rank_by": result.rank_by,
        "n_queries": len(dataset),
        "n_sources": store.n_sources,
        "accuracy": result.metrics["accuracy"],
        "mislabel_auc": result.metrics.get("mislabel_auc"),
        "n_flipped": result.metrics.get("n_flipped"),
        "poison": result.metrics.get("poison"),
        "timings": timings,
        "train_timings": run.get("timings"),
    }
    write_json(out_dir / "attribution.json", summary)
    print_attribute_summary(summary)
    return summary


def relative_scores(scores: Tensor, self_influence: Tensor, example_to_source: Tensor) -> Tensor:
    """``scores: Tensor[Q, S]`` divided by the square root of each source's self-influence.

    A source's self-influence is the sum of its examples' (the first-order rise of the source's own
    loss if it were removed), always >= 0 in exact arithmetic; small or negative estimates are floored
    at 1% of the median positive one so that no source is inflated without bound.
    """
    n_sources = scores.shape[1]
    per_source = torch.zeros(n_sources, dtype=scores.dtype).index_add_(
        0, example_to_source, self_influence.to(scores.dtype).nan_to_num(0.0)
    )
    positive = per_source[per_source > 0]
    floor = float(positive.median()) * 1e-2 if len(positive) else 1.0
    return scores / per_source.clamp_min(floor).sqrt()


def poison_metrics(result: AttributionResult, poisoned: Tensor, affected: Tensor | None = None) -> dict[str, Any]:
    """How often a poisoned source is the top proponent of a query.

    A source counts as poisoned when all its examples are. Returns ``top1_rate`` (share of queries
    whose strongest proponent is poisoned), ``source_id`` (the poisoned source ids, joined),
    ``mean_rank`` (mean 1-based rank of the best-ranked poisoned source) and, given ``affected:
    Tensor[Q] bool`` (queries the poison changed), ``affected_top1_rate`` and ``n_affected``.
    """
    n_sources = len(result.source_ids)
    counts = torch.bincount(result.example_to_source, minlength=n_sources)
    hits = torch.bincount(result.example_to_source, weights=poisoned.double(), minlength=n_sources)
    is_poisoned = (hits == counts) & (counts > 0)
    if not bool(is_poisoned.any()):
        return {"top1_rate": 0.0, "source_id": "none (no source is entirely poisoned)", "mean_rank": None}
    scores = result.scores.nan_to_num(float("-inf"))
    order = scores.argsort(dim=1, descending=True)
    ranks = torch.where(is_poisoned[order])[1].reshape(len(scores), -1)[:, 0] + 1 if len(scores) else torch.zeros(0)
    ids = [str(result.source_ids[i]) for i in torch.where(is_poisoned)[0].tolist()]
    out = {}
    if affected is not None:
        out["n_affected"] = int(affected.sum())
        out["affected_top1_rate"] = float((ranks[affected] == 1).float().mean()) if bool(affected.any()) else None
    return out | {
        "top1_rate": float((ranks == 1).float().mean()) if len(scores) else 0.0,
        "source_id": ids[0] if len(ids) == 1 else f"{len(ids)} poisoned sources",
        "mean_rank": float(ranks.float().mean()) if len(scores) else None,
    }


@hydra.main(version_base="1.3", config_path="pkg://lightning_attr.conf", config_name="attribute")
def _hydra_main(cfg: DictConfig) -> None:
    route_logging_to_job_log()
    with exit_on_usage_error():
        attribute_run(cfg)


def main() -> None:
    """The console script: ``run_dir=`` is checked before Hydra starts (it names the job's log directory)."""
    args = sys.argv[1:]
    flags = any(a.startswith("-") for a in args)  # --help, --cfg, --config-dir: Hydra's business
    if not flags and not any(a.lstrip("+~").split("=", 1)[0] == "run_dir" for a in args):
        print(
            "error: run_dir= is missing: the directory a training run wrote, e.g.\n"
            "  lightning-attr-attribute run_dir=runs/demo\n"
            "(lightning-attr-attribute --help lists every option)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    _hydra_main()


if __name__ == "__main__":
    main()
