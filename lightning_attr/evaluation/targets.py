"""Issue 7's targets, checked from a bench's records, and the Markdown table that shows them.

A record is one JSON object of ``benchmarks/results/*.json`` (one setting x regime x method).
Every pass/fail below is computed from the records' numbers; nothing is typed by hand:

- ``lds_vs_trak10``: ours' LDS >= the best *tuned* TRAK-10 LDS of the same setting and regime + 0.02;
- ``lds_vs_ifcg``: ours' LDS >= the tuned IF-CG LDS of the same setting and regime;
- both on the anchor's queries: a slow peer scored only the first ``n`` reported queries, so ours is
  taken on those (``config.lds_on_first_queries``, or the row's per-query LDS), ``n/a`` if the row lacks both;
- ``setup``: ours' setup ratio (simulation seconds / training seconds of the same fit) <= the
  setting's limit (10x digits MLP, 30x the Adam CNN; no limit elsewhere: ``n/a``);
- ``query_q1``: ours' query milliseconds at Q=1 <= TRAK-1's. Where the row holds a paired timing
  (``config.paired_q1``: ours and dattri's TRAK-1 timed alternately, query by query, on a machine whose
  load varies), that pair decides; otherwise the cheapest TRAK-1 row of the same setting and regime.

A check whose anchor row is missing is ``n/a`` (never a pass).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

PASS, FAIL, NA = "pass", "FAIL", "n/a"
LDS_MARGIN = 0.02


def _finite(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def is_ours(record: Mapping) -> bool:
    return str(record["method"]).startswith("ours")


def anchors(records: Sequence[Mapping], setting: str, regime: str) -> dict:
    """The peer numbers the targets compare against, for one setting and regime (None if absent), and
    ``"n_queries"``: how many reported queries each LDS anchor was scored on (a slow peer scores fewer)."""
    rows = [r for r in records if r["setting"] == setting and r["regime"] == regime and not is_ours(r)]

    def best(pred, key, pick):
        found = [r for r in rows if pred(r["method"]) and _finite(r.get(key))]
        return pick(found, key=lambda r: r[key]) if found else None

    trak10 = best(lambda m: m.startswith("TRAK-10") and "[tuned]" in m, "lds", max)
    ifcg = best(lambda m: m.startswith("IF-CG") and "[tuned]" in m, "lds", max)
    trak1 = best(lambda m: m.startswith("TRAK-1 "), "query_ms_single", min)
    return {
        "trak10_tuned_lds": None if trak10 is None else trak10["lds"],
        "ifcg_tuned_lds": None if ifcg is None else ifcg["lds"],
        "trak1_query_ms_single": None if trak1 is None else trak1["query_ms_single"],
        "n_queries": {"trak10_tuned_lds": None if trak10 is None else trak10.get("n_queries"),
                      "ifcg_tuned_lds": None if ifcg is None else ifcg.get("n_queries")},  # fmt: skip
    }


def lds_on_queries(record: Mapping, n_queries: int | None) -> float | None:
    """Our LDS on the queries an anchor was scored on: the first ``n_queries`` reported queries. Where they
    are fewer than ours, the row's ``config.lds_on_first_queries[str(n)]``, else the mean of the first ``n`` finite
    values of its per-query LDS (``lds_per_query``, in the row or its config), else None."""
    if n_queries is None or n_queries == record.get("n_queries"):
        return record.get("lds")
    config = record.get("config") or {}
    found = (config.get("lds_on_first_queries") or {}).get(str(n_queries))
    per_query = record.get("lds_per_query") or config.get("lds_per_query")
    if found is None and per_query is not None and n_queries <= len(per_query):
        finite = [v for v in per_query[:n_queries] if _finite(v)]
        found = round(sum(finite) / len(finite), 4) if finite else None
    return found


def check(record: Mapping, anchor: Mapping[str, float | None], setup_limit: float | None) -> dict[str, str]:
    """Pass / FAIL / n/a of each target for one of our rows (empty for a peer's row)."""
    if not is_ours(record):
        return {}

    def cmp(value, bound, ok) -> str:
        return NA if not (_finite(value) and _finite(bound)) else (PASS if ok(value, bound) else FAIL)

    trak = anchor.get("trak10_tuned_lds")
    n_queries = anchor.get("n_queries") or {}
    ours = {key: lds_on_queries(record, n_queries.get(key)) for key in ("trak10_tuned_lds", "ifcg_tuned_lds")}
    return {
        "lds_vs_trak10": cmp(ours["trak10_tuned_lds"], None if trak is None else trak + LDS_MARGIN, lambda v, b: v >= b),
        "lds_vs_ifcg": cmp(ours["ifcg_tuned_lds"], anchor.get("ifcg_tuned_lds"), lambda v, b: v >= b),
        "setup": cmp(record.get("setup_ratio"), setup_limit, lambda v, b: v <= b),
        "query_q1": cmp(*_q1_pair(record, anchor), lambda v, b: v <= b),
    }


def _q1_pair(record: Mapping, anchor: Mapping) -> tuple:
    paired = (record.get("config") or {}).get("paired_q1")
    if paired:
        return paired["ours_ms"], paired["trak1_dattri_ms"]
    return record.get("query_ms_single"), anchor.get("trak1_query_ms_single")


def _paired(record: Mapping) -> str:
    paired = (record.get("config") or {}).get("paired_q1")
    return f" ({paired['ours_ms']:.1f} vs {paired['trak1_dattri_ms']:.1f})" if paired else ""


def _on_queries(anchor: Mapping, key: str, rows: Sequence[Mapping]) -> str:
    n = (anchor.get("n_queries") or {}).get(key)
    if n is None or all(r.get("n_queries") == n for r in rows if is_ours(r)):
        return ""
    return f" (on the first {n} reported queries; ours is checked on the same)"


def _num(x, fmt: str) -> str:
    return format(x, fmt) if _finite(x) else "–"


def markdown(records: Sequence[Mapping], setup_limits: Mapping[str, float | None], notes: Mapping[str, str] | None = None) -> str:
    """One table per setting and regime, our rows first, with the target columns."""
    lines: list[str] = []
    for setting, regime in dict.fromkeys((r["setting"], r["regime"]) for r in records):
        rows = [r for r in records if r["setting"] == setting and r["regime"] == regime]
        exact = [r for r in rows if str(r["method"]).startswith("exact")]
        rows = [r for r in rows if is_ours(r)] + exact + [r for r in rows if not is_ours(r) and r not in exact]
        anchor = anchors(records, setting, regime)
        limit = setup_limits.get(setting)
        corr = "LOO corr" if regime == "example" else "group corr"
        trak = anchor["trak10_tuned_lds"]
        lines += [
            f"### {setting}, {regime} regime ({rows[0]['n_sources']} sources)",
            "",
            f"Anchors: tuned TRAK-10 LDS {_num(trak, '.3f')} (target {_num(None if trak is None else trak + LDS_MARGIN, '.3f')}), "
            f"tuned IF-CG LDS {_num(anchor['ifcg_tuned_lds'], '.3f')}{_on_queries(anchor, 'ifcg_tuned_lds', rows)}, TRAK-1 at Q=1 {_num(anchor['trak1_query_ms_single'], '.2f')} ms, "
            f"setup limit {('%gx' % limit) if limit else 'none'}.",
            "",
            f"| method | LDS (95% CI) | {corr} | Pearson to exact | setup s | setup / fit | query ms (Q=1) | ms/query (batched) "
            "| storage MB | queries | LDS ≥ TRAK-10+0.02 | LDS ≥ IF-CG | setup ≤ limit | Q=1 ≤ TRAK-1 (paired ms) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        carried = False
        for r in rows:
            c = check(r, anchor, limit)
            mark = " †" if (r.get("config") or {}).get("carried_over_from") else ""
            carried = carried or bool(mark)
            ci = r.get("lds_ci95") or [None, None]
            lines.append(
                f"| {r['method']}{mark} | {_num(r.get('lds'), '.3f')} ({_num(ci[0], '.3f')}–{_num(ci[1], '.3f')}) "
                f"| {_num(r.get('loo') if regime == 'example' else r.get('group_corr'), '.3f')} "
                f"| {_num(r.get('pearson_to_exact'), '.3f')} | {_num(r.get('setup_s'), '.2f')} | {_num(r.get('setup_ratio'), '.1f')} "
                f"| {_num(r.get('query_ms_single'), '.2f')} | {_num(r.get('query_ms_batched'), '.4f')} "
                f"| {_num(None if r.get('storage_bytes') is None else r['storage_bytes'] / 1e6, '.2f')} | {r.get('n_queries', '–')} "
                f"| {c.get('lds_vs_trak10', '')} | {c.get('lds_vs_ifcg', '')} | {c.get('setup', '')} | {c.get('query_q1', '')}{_paired(r)} |"
            )
        if carried:
            lines += ["", "† not re-run here: carried over from an earlier run of the same model, seeds and ground truth "
                      "(its `config.carried_over_from`); its timings are that run's."]
        if notes and notes.get(setting):
            lines += ["", notes[setting]]
        lines.append("")
    return "\n".join(lines)
