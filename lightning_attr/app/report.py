"""The HTML report: per-query explanations drawn, dataset-level views, and the raw top-k table.

Everything is written atomically into ``out_dir``: ``report.html``, ``figures/*.png`` (matplotlib,
Agg backend, no display needed), ``attributions.csv`` and ``attributions.json``.
"""

from __future__ import annotations

import csv
import html
import io
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from lightning_attr.app.io import atomic_write, write_json, write_text  # noqa: E402

PRO, OPP, NEUTRAL, FLIP = "#1b7837", "#b2182b", "#4d4d4d", "#d6604d"


# ---------------------------------------------------------------------- drawing helpers
def draw_example(ax, x: Tensor | str, display_shape: tuple[int, ...] | None, color: str = NEUTRAL) -> None:
    """Draw one input: text as text, an image when ``display_shape`` is set, else a 1D signal."""
    if isinstance(x, str):
        ax.text(0.02, 0.98, x, family="monospace", fontsize=6, va="top", ha="left", wrap=True, transform=ax.transAxes)
    elif display_shape is not None:
        x = x.detach().float().cpu()
        ax.imshow(x.reshape(display_shape).numpy(), cmap="gray_r", interpolation="nearest")
    else:
        ax.plot(x.detach().float().cpu().reshape(-1).numpy(), color=color, lw=1.5)
    ax.set_xticks([]), ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(2 if color != NEUTRAL else 0.8)


def _save(fig, path: Path) -> Path:
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path


class _Sources:
    """Which training examples make each source, and how to label a source in a figure."""

    def __init__(self, result, datamodule) -> None:
        self.ids = result.source_ids
        self.e2s = result.example_to_source
        n_sources = len(self.ids)
        self.counts = torch.bincount(self.e2s, minlength=n_sources)
        self.per_example = bool((self.counts == 1).all())
        self.example_of = torch.full((n_sources,), -1, dtype=torch.long)
        if self.per_example:
            self.example_of[self.e2s] = torch.arange(len(self.e2s))
        self.x = getattr(datamodule, "display_train", None)
        # per-example labels, where the data has them (a language model's windows have none)
        self.label = datamodule.metadata.get("label")
        self.flipped = datamodule.metadata.get("flipped")
        self.true_label = datamodule.metadata.get("true_label")
        self.poisoned = datamodule.metadata.get("poisoned")
        #: training examples can be drawn with their labels (per-example figures and the self-influence grid)
        self.drawable = self.label is not None and self.flipped is not None and self.x is not None

    def name(self, j: int) -> str:
        return str(self.ids[j])

    def describe(self, j: int) -> dict[str, Any]:
        row: dict[str, Any] = {"source_position": j, "source_id": self.name(j), "n_examples": int(self.counts[j])}
        if self.per_example:
            e = int(self.example_of[j])
            row["example"] = e
            if self.drawable:
                row.update(source_label=int(self.label[e]), flipped=bool(self.flipped[e]))
            if self.poisoned is not None:
                row["poisoned"] = bool(self.poisoned[e])
        return row


# ---------------------------------------------------------------------- figures
def _top(values: Tensor, k: int) -> tuple[list[int], list[int]]:
    """Positions of the ``k`` largest and ``k`` most negative entries (NaN never ranks)."""
    pro = values.nan_to_num(float("-inf")).topk(k).indices.tolist()
    opp = (-values).nan_to_num(float("-inf")).topk(k).indices.tolist()
    return pro, opp


def _percent(value: float) -> str:
    return f"{100 * value:+.2g}%" if abs(value) < 0.1 else f"{100 * value:+.0f}%"


def score_label(result, q: int, j: int) -> str:
    """How a source's score for query ``q`` is written in figures: the raw score, its share of the query's
    loss, and (when self-influence was computed) the relative score the lists are ranked by."""
    text = f"{float(result.scores[q, j]):+.2g} ({_percent(float(result.fraction[q, j]))} of loss)"
    if result.relative is not None:
        text += f"\nrelative {float(result.relative[q, j]):+.2g}"
    return text


def figure_query(path: Path, q: int, result, sources: _Sources, display_shape) -> Path:
    k = result.top_k
    scores, ranking = result.scores[q], result.ranking[q]
    finite = scores.nan_to_num(float("-inf"))
    pro, opp = _top(ranking, k)
    title = f"query {q}: {_query_caption(result, q)}"
    if result.y_true is not None:
        title += f" (triggered; true class {int(result.y_true[q])})"
    if sources.per_example and sources.drawable and not result.is_sequence:
        y, pred = int(result.y_query[q]), int(result.pred[q])
        fig, axes = plt.subplots(2, k + 1, figsize=(1.9 * (k + 1), 4.5), squeeze=False)
        fig.subplots_adjust(hspace=0.5)
        ok = PRO if pred == y else OPP
        draw_example(axes[0, 0], result.x_query[q], display_shape, ok)
        axes[0, 0].set_title(f"query {q}\nlabel {y} / pred {pred}\nloss {float(result.measurement[q]):.3g}",
                             fontsize=8, color=ok)
        if result.y_true is not None:
            fig.suptitle(title, fontsize=9)
        axes[1, 0].axis("off")
        axes[1, 0].text(0.5, 0.5, "top: proponents\n(removing them\nraises the loss)\n\nbottom: opponents"
                        + ("\n\nranked by\nrelative score" if result.rank_by == "relative" else ""),
                        ha="center", va="center", fontsize=7, transform=axes[1, 0].transAxes)
        for row, picks, color in ((0, pro, PRO), (1, opp, OPP)):
            for c, j in enumerate(picks, start=1):
                e = int(sources.example_of[j])
                flipped = bool(sources.flipped[e])
                draw_example(axes[row, c], sources.x[e], display_shape, FLIP if flipped else color)
                note = " (flipped)" if flipped else ""
                axes[row, c].set_title(f"#{e} label {int(sources.label[e])}{note}\n{score_label(result, q, j)}",
                                       fontsize=6.5, color=FLIP if flipped else color)
    else:
        show = sorted(set(pro) | set(opp), key=lambda j: -float(finite[j])) if len(scores) > 24 else list(range(len(scores)))
        fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(9, max(2.6, 0.26 * len(show) + 1)),
                                       gridspec_kw={"width_ratios": [1, 3]})
        ok = OPP if _misclassified(result, q) else PRO
        draw_example(ax0, result.x_query[q], display_shape, ok)
        ax0.set_title(_query_caption(result, q), fontsize=8, color=ok)
        vals = [float(scores[j]) for j in show]
        ax1.barh(range(len(show)), vals, color=[PRO if v > 0 else OPP for v in vals])
        ax1.set_yticks(range(len(show)), [sources.name(j) for j in show], fontsize=7)
        ax1.invert_yaxis()
        ax1.axvline(0, color=NEUTRAL, lw=0.8)
        for row, j in enumerate(show):  # each bar's share of the query's loss
            ax1.annotate(_percent(float(result.fraction[q, j])), (vals[row], row), fontsize=6, va="center",
                         xytext=(3 if vals[row] >= 0 else -3, 0), textcoords="offset points",
                         ha="left" if vals[row] >= 0 else "right")
        ax1.set_xlabel(f"score: predicted rise of the query loss ({float(result.measurement[q]):.3g}) if the source "
                       "were removed; % = share of that loss", fontsize=8)
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def _query_caption(result, q: int) -> str:
    """``label 3 / pred 5`` for a class; the continuation's loss for a sequence (drawn as text beside it)."""
    if result.is_sequence:
        return f"continuation, loss {float(result.measurement[q]):.3g}"
    return f"label {int(result.y_query[q])} / pred {int(result.pred[q])}"


def _misclassified(result, q: int) -> bool:
    """The prediction is wrong (a class), or most scored next tokens are (a sequence)."""
    if result.is_sequence:
        scored = result.y_query[q] != -100
        return float((result.pred[q] == result.y_query[q])[scored].float().mean()) < 0.5
    return int(result.pred[q]) != int(result.y_query[q])


def figure_top_sources(path: Path, result, sources: _Sources, n: int = 20) -> tuple[Path, list[int]]:
    mean = result.scores.nanmean(dim=0)
    strength = result.scores.abs().nanmean(dim=0).nan_to_num(-1.0)
    top = strength.argsort(descending=True)[: min(n, len(strength))].tolist()
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(top) + 1.2))
    vals = [float(mean[j]) for j in top]
    ax.barh(range(len(top)), [float(strength[j]) for j in top], color="#cccccc")
    ax.barh(range(len(top)), vals, height=0.45, color=[PRO if v > 0 else OPP for v in vals])
    labels = []
    for j in top:
        d = sources.describe(j)
        labels.append(f"{d['source_id']}" + (f" (label {d['source_label']}{', flipped' if d['flipped'] else ''})" if "source_label" in d else f" ({d['n_examples']} ex.)"))
    ax.set_yticks(range(len(top)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0, color=NEUTRAL, lw=0.8)
    handles = [Patch(color="#cccccc", label="mean |score|"), Patch(color=PRO, label="mean score > 0 (proponent)"),
               Patch(color=OPP, label="mean score < 0 (opponent)")]
    ax.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.05), ncol=3, frameon=False)
    ax.set_title(f"most influential sources over {len(result.scores)} queries (raw scores)", fontsize=9)
    return _save(fig, path), top


def figure_examples_grid(path: Path, examples: list[int], sources: _Sources, display_shape, caption, values=None) -> Path:
    cols = min(8, max(len(examples), 1))
    rows = max(1, -(-len(examples) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.5 * cols, 1.9 * rows), squeeze=False)
    fig.subplots_adjust(hspace=0.6)
    for ax in axes.flat:
        ax.axis("off")
    for ax, e, i in zip(axes.flat, examples, range(len(examples))):
        ax.axis("on")
        flipped = bool(sources.flipped[e])
        draw_example(ax, sources.x[e], display_shape, FLIP if flipped else NEUTRAL)
        text = f"#{e} label {int(sources.label[e])}"
        if flipped:
            text += f" (true {int(sources.true_label[e])})"
        if values is not None:
            text += f"\n{values[i]:.3g}"
        ax.set_title(text, fontsize=7, color=FLIP if flipped else "black")
    fig.suptitle(caption, fontsize=9, y=1 + 0.35 / (1.9 * rows))  # above the panel titles
    return _save(fig, path)


def figure_self_influence(path: Path, si: Tensor, flipped: Tensor) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 3))
    finite = torch.isfinite(si)
    clean, bad = si[finite & ~flipped].numpy(), si[finite & flipped].numpy()
    bins = torch.linspace(float(si[finite].min()), float(si[finite].max()), 50).numpy()
    ax.hist(clean, bins=bins, color="#999999", alpha=0.8, label=f"clean ({len(clean)})")
    if len(bad):
        ax.hist(bad, bins=bins, color=FLIP, alpha=0.9, label=f"flipped label ({len(bad)})")
    ax.set_yscale("log")
    ax.set_xlabel("self-influence (score of a training example against its own source)", fontsize=8)
    ax.legend(fontsize=8)
    return _save(fig, path)


def figure_score_distribution(path: Path, scores: Tensor) -> Path:
    vals = scores[torch.isfinite(scores)].flatten()
    fig, ax = plt.subplots(figsize=(6.5, 3))
    if len(vals):
        ax.hist(vals.numpy(), bins=80, color="#4393c3")
    ax.set_yscale("log")
    ax.axvline(0, color=NEUTRAL, lw=0.8)
    ax.set_xlabel("score (all queries x sources): positive = proponent, negative = opponent", fontsize=8)
    return _save(fig, path)


def figure_sources_bar(path: Path, result, sources: _Sources) -> Path:
    mean = result.scores.nanmean(dim=0)
    s = len(mean)
    fig, ax = plt.subplots(figsize=(max(5, 0.45 * s + 1), 3.2))
    colors = [PRO if float(v) > 0 else OPP for v in mean]
    ax.bar(range(s), mean.numpy(), color=colors)
    ax.set_xticks(range(s), [sources.name(j) for j in range(s)], rotation=60, ha="right", fontsize=7)
    ax.axhline(0, color=NEUTRAL, lw=0.8)
    ax.set_ylabel("mean score over queries", fontsize=8)
    ax.set_title(f"per-source attribution ({result.queries} queries)", fontsize=9)
    return _save(fig, path)


def queries_to_draw(result, draw: str, n_drawn: int) -> list[int]:
    """Positions of the queries that get a figure: the first ``n_drawn`` (``draw="first"``) or the first
    ``n_drawn`` whose prediction is wrong (``draw="misclassified"``)."""
    if draw == "first":
        return list(range(min(n_drawn, len(result.scores))))
    return [q for q in range(len(result.scores)) if _misclassified(result, q)][:n_drawn]


# ---------------------------------------------------------------------- tables
def topk_rows(result, sources: _Sources) -> list[dict[str, Any]]:
    """The raw top-k table: one row per (query, proponent/opponent, rank)."""
    rows = []
    k = result.top_k
    for q in range(len(result.scores)):
        scores = result.scores[q]
        relative = result.relative[q] if result.relative is not None else None
        pro, opp = _top(result.ranking[q], k)
        for kind, order in (("proponent", pro), ("opponent", opp)):
            for rank, j in enumerate(order, start=1):
                row = {"query": q, **_query_columns(result, q), "query_loss": float(result.measurement[q]), "kind": kind, "rank": rank,
                       "ranked_by": result.rank_by, "score": float(scores[j]),
                       "score_fraction_of_query_loss": float(result.fraction[q, j])}
                if relative is not None:
                    row["relative_score"] = float(relative[j])
                rows.append(row | sources.describe(j))
    return rows


def _query_columns(result, q: int) -> dict[str, Any]:
    """What a table says about a query: its label and prediction, or a continuation's text."""
    if result.is_sequence:
        return {"query_text": result.x_query[q]}
    return {"query_label": int(result.y_query[q]), "prediction": int(result.pred[q])}


def query_rows(result, sources: _Sources) -> list[dict[str, Any]]:
    """One row per query: its label, prediction and loss, and its strongest proponent and opponent (by
    the ranking in use) with raw score, share of the query's loss and relative score."""
    rows = []
    for q in range(len(result.scores)):
        pro, opp = _top(result.ranking[q], 1)
        row: dict[str, Any] = {"query": q, **_query_columns(result, q), "loss": float(result.measurement[q])}
        for kind, j in (("proponent", pro[0]), ("opponent", opp[0])):
            row[f"top {kind}"] = sources.name(j) + (
                f" (label {int(sources.label[sources.example_of[j]])})" if sources.per_example and sources.drawable else "")
            row[f"{kind} score"] = float(result.scores[q, j])
            row[f"{kind} % of loss"] = 100 * float(result.fraction[q, j])
            if result.relative is not None:
                row[f"{kind} relative"] = float(result.relative[q, j])
        rows.append(row)
    return rows


def class_rows(result, sources: _Sources) -> list[dict[str, Any]]:
    """Per query label: count, accuracy, mean loss, and what explains the class (top-k by the ranking in
    use): the share of proponents with the query's label and of opponents with a flipped label (one
    source per example), or the most frequent top proponent (grouped sources)."""
    k, rows = result.top_k, []
    for c in result.y_query.unique().tolist():
        members = (result.y_query == c).nonzero().squeeze(1)
        row: dict[str, Any] = {"label": c, "queries": len(members),
                               "accuracy": float((result.pred[members] == c).float().mean()),
                               "mean loss": float(result.measurement[members].mean())}
        picks = [_top(result.ranking[q], k) for q in members.tolist()]
        top1 = torch.tensor([pro[0] for pro, _ in picks])
        row["top proponent % of loss (median)"] = 100 * float(result.fraction[members, top1].median())
        if sources.per_example and sources.drawable:
            pro = torch.tensor([p for p, _ in picks]).flatten()
            opp = torch.tensor([o for _, o in picks]).flatten()
            row[f"top-{k} proponents with this label"] = float((sources.label[sources.example_of[pro]] == c).float().mean())
            row[f"top-{k} opponents flipped"] = float(sources.flipped[sources.example_of[opp]].float().mean())
        else:
            common = int(top1.mode().values)
            row["most frequent top proponent"] = f"{sources.name(common)} ({int((top1 == common).sum())} queries)"
        rows.append(row)
    return rows


_SORT_JS = """<script>
document.querySelectorAll('table.sortable th').forEach((th, i) => th.addEventListener('click', () => {
  const body = th.closest('table').tBodies[0], up = th.dataset.up !== '1';
  const key = r => r.cells[i].dataset.v ?? r.cells[i].textContent;
  const rows = [...body.rows].sort((a, b) => {
    const x = parseFloat(key(a)), y = parseFloat(key(b));
    return (isNaN(x) || isNaN(y) ? key(a).localeCompare(key(b)) : x - y) * (up ? 1 : -1);
  });
  th.dataset.up = up ? '1' : '0';
  rows.forEach(r => body.appendChild(r));
}));
</script>"""


def _sortable_table(rows: list[dict[str, Any]]) -> str:
    """An HTML table whose columns sort on click (numbers by value); floats shown with 3 significant digits."""
    if not rows:
        return ""
    cols = list(rows[0])

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"<td data-v='{v!r}'>{v:.3g}</td>"
        return f"<td>{html.escape(str(v))}</td>"

    head = "".join(f"<th title='click to sort'>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(cell(r[c]) for c in cols) + "</tr>" for r in rows)
    return f"<table class='sortable'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    fields = list(dict.fromkeys(key for row in rows for key in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return write_text(path, buf.getvalue())


# ---------------------------------------------------------------------- html
_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left}
img{max-width:100%;border:1px solid #eee}.pro{color:#1b7837}.opp{color:#b2182b}.kv td:first-child{font-weight:600}
.note{color:#555;font-size:.9em}th{cursor:pointer;background:#f4f4f4}.scroll{max-height:32em;overflow:auto}"""


def _kv_table(items: list[tuple[str, Any]]) -> str:
    return "<table class='kv'>" + "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in items) + "</table>"


def _img(rel: str, alt: str) -> str:
    return f"<p><img src='{html.escape(rel)}' alt='{html.escape(alt)}'></p>"


def write_report(out_dir: Path, result, datamodule, train_cfg, run: dict[str, Any], cfg) -> dict[str, Any]:
    """Write ``report.html``, ``figures/*.png``, ``attributions.csv`` and ``attributions.json``.

    Returns ``{"report": Path, "csv": Path, "json": Path, "figures": [Path, ...]}``.
    """
    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    display_shape = datamodule.display_shape
    sources = _Sources(result, datamodule)
    figures: list[Path] = []
    body: list[str] = []
    m = result.metrics

    # -- header
    t = run.get("timings", {})
    items = [
        ("run", run["run_dir"]),
        ("data", f"{datamodule.dataset}: {datamodule.n_train:,} training examples"
                 + (f", {int(sources.flipped.sum())} labels flipped" if sources.flipped is not None and bool(sources.flipped.any()) else "")),
        ("model", (train_cfg.model.get("net") or {}).get("_target_", train_cfg.model.get("_target_"))),
        ("sources", f"{len(result.source_ids):,} ({'one per example' if sources.per_example else 'groups'})"),
        ("attribution", ", ".join(f"{k}={v}" for k, v in train_cfg.callbacks.get(next(iter(run['responses'])), {}).items()
                                  if k in ("horizon", "damping", "curvature", "mode"))),
        ("queries", f"{len(result.scores):,} ({result.queries}), accuracy {m['accuracy']:.3f}"),
        ("training fit", f"{t.get('fit_s', float('nan')):.1f} s"
         + (f", of which the attribution callback {t['attribution_callback_s']:.1f} s" if "attribution_callback_s" in t else "")),
    ]
    if "mislabel_auc" in m:
        items.append(("mislabel detection AUC (self-influence)", f"{m['mislabel_auc']:.3f} over {m['n_flipped']} flipped labels"))
    if "poison" in m:
        p = m["poison"]
        items.append(("poisoned source is the top proponent", f"{p['top1_rate']:.0%} of queries ({p['source_id']}; mean rank {p['mean_rank']:.2f})"))
        if p.get("affected_top1_rate") is not None:
            items.append(("... of the queries the trigger flipped", f"{p['affected_top1_rate']:.0%} of {p['n_affected']}"))
    body.append("<h1>lightning_attr report</h1>")
    body.append("<p class='note'>A score is the predicted rise of the query's loss if the source were removed "
                "from training: <span class='pro'>positive = proponent</span> (it helped this prediction), "
                "<span class='opp'>negative = opponent</span>. Computed from responses simulated during training, "
                "read out with forward passes only.</p>")
    body.append(_kv_table(items))

    # -- per query
    body.append("<h2>Queries: top proponents and opponents</h2>")
    if result.rank_by == "relative":
        body.append("<p class='note'>Ranked by the <b>relative score</b>, score / sqrt(self-influence of the source) "
                    "(as in RelatIF, Barshan et al. 2020): raw scores favour the few examples the model memorized "
                    "(often mislabelled ones) for every query; dividing by their self-influence shows what explains "
                    "<i>this</i> query. Each source shows its raw score, that score as a share of the query's loss, and "
                    "the relative score the list is ranked by; <code>rank_by=score</code> ranks by raw scores.</p>")
    drawn = queries_to_draw(result, cfg.get("draw", "first"), int(cfg.n_drawn))
    if cfg.get("draw", "first") == "misclassified":
        wrong = int((result.pred != result.y_query).sum())
        body.append(f"<p class='note'>Drawn: {len(drawn)} of the {wrong} misclassified queries "
                    "(<code>draw=misclassified</code>).</p>")
    for q in drawn:
        path = figure_query(fig_dir / f"query_{q:03d}.png", q, result, sources, display_shape)
        figures.append(path)
        body.append(_img(f"figures/{path.name}", f"query {q}"))

    if not result.is_sequence:  # a continuation has no class
        body.append("<h2>Per class</h2>")
        body.append("<p class='note'>Queries grouped by their label. <i>% of loss</i>: a score as a share of the "
                    "query's own loss (+10% = removing the source would raise this query's loss by a tenth).</p>")
        body.append(_sortable_table(class_rows(result, sources)))
    body.append("<h2>Every query (click a column to sort)</h2>")
    body.append(f"<div class='scroll'>{_sortable_table(query_rows(result, sources))}</div>")

    # -- dataset level
    body.append("<h2>Most influential sources overall</h2>")
    path, top = figure_top_sources(fig_dir / "top_sources.png", result, sources)
    figures.append(path)
    body.append(_img(f"figures/{path.name}", "most influential sources"))
    if sources.per_example and sources.drawable:
        path = figure_examples_grid(fig_dir / "top_sources_examples.png", [int(sources.example_of[j]) for j in top[:16]],
                                    sources, display_shape, "the 16 most influential training examples (mean |score|)")
        figures.append(path)
        body.append(_img(f"figures/{path.name}", "most influential examples"))
    elif not sources.per_example:
        path = figure_sources_bar(fig_dir / "sources_bar.png", result, sources)
        figures.append(path)
        body.append(_img(f"figures/{path.name}", "per-source bar chart"))

    if result.self_influence is not None:
        si = result.self_influence
        body.append("<h2>Self-influence: likely mislabelled or atypical examples</h2>")
        body.append("<p class='note'>Each training example scored against its own source. High values mark examples "
                    "the model fits only by memorizing them; flipped labels are drawn in red.</p>")
        if "mislabel_auc" in m:
            body.append(f"<p><b>Mislabel detection AUC: {m['mislabel_auc']:.3f}</b> ({m['n_flipped']} flipped labels among "
                        f"{len(si):,} examples).</p>")
        if sources.drawable:
            order = si.nan_to_num(float("-inf")).argsort(descending=True)[:16].tolist()
            path = figure_examples_grid(fig_dir / "self_influence_top.png", order, sources, display_shape,
                                        "highest self-influence", values=[float(si[e]) for e in order])
            figures.append(path)
            body.append(_img(f"figures/{path.name}", "highest self-influence examples"))
        flipped = sources.flipped if sources.flipped is not None else torch.zeros(len(si), dtype=torch.bool)
        path = figure_self_influence(fig_dir / "self_influence_hist.png", si, flipped)
        figures.append(path)
        body.append(_img(f"figures/{path.name}", "self-influence distribution"))

    body.append("<h2>Score distribution</h2>")
    path = figure_score_distribution(fig_dir / "score_distribution.png", result.scores)
    figures.append(path)
    body.append(_img(f"figures/{path.name}", "score distribution"))

    # -- raw tables
    rows = topk_rows(result, sources)
    csv_path = _write_csv(out_dir / "attributions.csv", rows)
    json_path = write_json(out_dir / "attributions.json", {"top_k": result.top_k, "queries": result.queries, "rows": rows})
    body.append("<h2>Raw data</h2>")
    body.append(f"<p>Top-{result.top_k} table (one row per query, kind and rank): "
                f"<a href='{csv_path.name}'>{csv_path.name}</a>, <a href='{json_path.name}'>{json_path.name}</a>. "
                f"Run summary: <a href='attribution.json'>attribution.json</a>.</p>")
    config_yaml = html.escape(json.dumps(run.get("timings", {}), indent=1))
    body.append(f"<details><summary>training timings</summary><pre>{config_yaml}</pre></details>")

    page = f"<!doctype html><html><head><meta charset='utf-8'><title>lightning_attr report</title><style>{_CSS}</style></head><body>{''.join(body)}{_SORT_JS}</body></html>\n"
    report = write_text(out_dir / "report.html", page)
    return {"report": report, "csv": csv_path, "json": json_path, "figures": figures}
