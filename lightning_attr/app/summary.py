"""The clean console summaries printed at the end of each phase (also written, row by row, to the job log)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def _console() -> Console:
    # paths must stay whole in logs and pipes (rich would wrap them at 80 columns)
    console = Console()
    return console if console.is_terminal else Console(width=200)


SUMMARY_LOGGER = "lightning_attr.summary"  # the job log file only: the console shows the table (app.logs)


def _show(table: Table, console: Console) -> None:
    console.print(table)
    log = logging.getLogger(SUMMARY_LOGGER)
    key_column, value_column = table.columns
    for key, value in zip(key_column.cells, value_column.cells):
        log.info("%s: %s", str(key).strip(), value)


def _fmt_s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:,.1f} s"


def print_train_summary(summary: dict[str, Any], console: Console | None = None) -> None:
    console = console or _console()
    t = summary["timings"]
    table = Table(title="lightning-attr-train", show_header=False, title_justify="left")
    table.add_row("run directory", summary["run_dir"])
    for name, path in summary["responses"].items():
        table.add_row(f"responses ({name})", str(Path(summary["run_dir"]) / path))
    table.add_row("examples / sources", f"{summary['n_train']:,} / {summary['n_sources']:,}")
    for key in ("val/acc", "val/loss"):
        if key in summary["metrics"]:
            table.add_row(key, f"{summary['metrics'][key]:.4f}")
    table.add_row("setup", _fmt_s(t.get("setup_s")))
    table.add_row("fit (total)", _fmt_s(t.get("fit_s")))
    if "attribution_callback_s" in t:
        share = t["attribution_callback_s"] / max(t["fit_s"], 1e-9)
        table.add_row("  of which attribution callback", f"{_fmt_s(t['attribution_callback_s'])} ({share:.0%} of fit)")
    table.add_row("save", _fmt_s(t.get("save_s")))
    _show(table, console)
    console.print(f"next: [bold]lightning-attr-attribute run_dir={summary['run_dir']}[/bold]")


def print_attribute_summary(summary: dict[str, Any], console: Console | None = None) -> None:
    console = console or _console()
    t = summary["timings"]
    table = Table(title="lightning-attr-attribute", show_header=False, title_justify="left")
    table.add_row("report", summary["report"])
    table.add_row("raw top-k table", ", ".join(summary["tables"]))
    table.add_row("queries scored", f"{summary['n_queries']:,} ({summary['queries']}) x {summary['n_sources']:,} sources")
    if summary.get("accuracy") is not None:
        table.add_row("query accuracy", f"{summary['accuracy']:.4f}")
    if summary.get("mislabel_auc") is not None:
        table.add_row("mislabel detection AUC", f"{summary['mislabel_auc']:.3f} ({summary['n_flipped']} flipped labels)")
    if summary.get("poison") is not None:
        p = summary["poison"]
        table.add_row("poisoned source ranks first", f"{p['top1_rate']:.0%} of queries ({p['source_id']})")
        if p.get("affected_top1_rate") is not None:
            table.add_row("  of the queries the trigger flipped", f"{p['affected_top1_rate']:.0%} of {p['n_affected']}")
    table.add_row("scoring", f"{_fmt_s(t.get('scores_s'))} ({t.get('ms_per_query', 0):.2f} ms/query)")
    if "self_influence_s" in t:
        table.add_row("self-influence", _fmt_s(t["self_influence_s"]))
    table.add_row("report", _fmt_s(t.get("report_s")))
    if summary.get("train_timings"):
        tt = summary["train_timings"]
        table.add_row("training fit (earlier)", _fmt_s(tt.get("fit_s")))
        if "attribution_callback_s" in tt:
            table.add_row("  of which attribution callback", _fmt_s(tt["attribution_callback_s"]))
    _show(table, console)
