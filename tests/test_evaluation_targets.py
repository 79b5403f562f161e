"""Issue 7's pass/fail columns are computed from the bench's numbers (never typed)."""

from __future__ import annotations

from lightning_attr.evaluation.targets import FAIL, NA, PASS, anchors, check, markdown


def _rec(method, lds=0.5, q1=10.0, ratio=None, setting="s", regime="example", **config):
    return {
        "setting": setting, "regime": regime, "method": method, "config": config, "lds": lds, "lds_ci95": [lds - 0.01, lds + 0.01],
        "loo": 0.5, "group_corr": None, "pearson_to_exact": None, "setup_s": 1.0, "setup_ratio": ratio,
        "query_ms_single": q1, "query_ms_batched": 0.1, "storage_bytes": 1000, "n_sources": 7, "n_queries": 3,
    }  # fmt: skip


PEERS = [
    _rec("TRAK-10 (traker) [tuned]", lds=0.60),
    _rec("TRAK-10 (dattri) [tuned]", lds=0.62),
    _rec("TRAK-10 (dattri) [defaults]", lds=0.90),  # defaults are not the anchor
    _rec("IF-CG (dattri) [tuned]", lds=0.63),
    _rec("TRAK-1 (dattri) [defaults]", q1=15.0),
    _rec("TRAK-1 (traker) [tuned]", q1=40.0),
    _rec("TRAK-10 (dattri) [tuned]", lds=0.99, setting="other"),  # another setting's anchor is never used
]


def test_anchors_take_the_best_tuned_trak10_the_tuned_ifcg_and_the_cheapest_trak1():
    a = anchors(PEERS, "s", "example")
    assert a == {"trak10_tuned_lds": 0.62, "ifcg_tuned_lds": 0.63, "trak1_query_ms_single": 15.0,
                 "n_queries": {"trak10_tuned_lds": 3, "ifcg_tuned_lds": 3}}  # fmt: skip
    assert anchors(PEERS, "s", "source") == {"trak10_tuned_lds": None, "ifcg_tuned_lds": None, "trak1_query_ms_single": None,
                                             "n_queries": {"trak10_tuned_lds": None, "ifcg_tuned_lds": None}}  # fmt: skip


def test_an_anchor_on_fewer_queries_is_compared_with_ours_on_the_same_queries():
    slow_ifcg = {**_rec("IF-CG (dattri) [tuned]", lds=0.63), "n_queries": 2}
    a = anchors([PEERS[1], slow_ifcg], "s", "example")
    assert a["n_queries"] == {"trak10_tuned_lds": 3, "ifcg_tuned_lds": 2}
    # over all 3 queries ours clears IF-CG, over IF-CG's 2 it does not: the 2 decide
    ours = _rec("ours (default)", lds=0.70, lds_on_first_queries={"2": 0.60})
    assert check(ours, a, None)["lds_vs_ifcg"] == FAIL and check(ours, a, None)["lds_vs_trak10"] == PASS
    ours["config"]["lds_on_first_queries"] = {"2": 0.64}
    assert check(ours, a, None)["lds_vs_ifcg"] == PASS
    assert check(_rec("ours (default)", lds=0.70), a, None)["lds_vs_ifcg"] == NA  # not on the same queries: no verdict
    assert "on the first 2 reported queries" in markdown([PEERS[1], slow_ifcg, ours], {"s": None})
    # a row recorded for other slow queries (bench.py ran with another --slow-queries) falls back to its per-query LDS
    other = _rec("ours (default)", lds=0.70, lds_on_first_queries={"1": 0.5}, lds_per_query=[0.70, float("nan"), 0.71])
    assert check(other, a, None)["lds_vs_ifcg"] == PASS  # 0.70 over the 2 (one NaN) >= 0.63
    other["config"]["lds_per_query"] = [0.60, 0.62, 0.99]
    assert check(other, a, None)["lds_vs_ifcg"] == FAIL  # 0.61 < 0.63 although 0.70 over all three


def test_checks_pass_fail_at_the_boundaries_and_na_without_an_anchor():
    a = anchors(PEERS, "s", "example")
    assert check(_rec("ours (default)", lds=0.64, q1=15.0, ratio=10.0), a, 10.0) == {
        "lds_vs_trak10": PASS, "lds_vs_ifcg": PASS, "setup": PASS, "query_q1": PASS}  # fmt: skip
    assert check(_rec("ours (default)", lds=0.635, q1=15.1, ratio=10.5), a, 10.0) == {
        "lds_vs_trak10": FAIL, "lds_vs_ifcg": PASS, "setup": FAIL, "query_q1": FAIL}  # fmt: skip
    assert check(_rec("ours (end)", lds=0.62, ratio=3.0), a, None)["setup"] == NA  # no limit for this setting
    assert check(_rec("ours (end)", lds=float("nan")), a, 10.0)["lds_vs_ifcg"] == NA
    assert set(check(_rec("ours (end)"), anchors([], "s", "example"), 10.0).values()) == {NA}
    assert check(PEERS[0], a, 10.0) == {}  # peers are not checked


def test_markdown_shows_the_checks_ours_first_and_marks_carried_rows():
    recs = [*PEERS[:6], _rec("exact target"), _rec("ours (default)", lds=0.7, q1=5.0, ratio=4.0)]
    recs[0]["config"]["carried_over_from"] = "old.json"
    md = markdown(recs, {"s": 10.0})
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    assert lines[2].startswith("| ours (default) |") and lines[2].endswith("| pass | pass | pass | pass |")
    assert lines[3].startswith("| exact target |")
    assert "| TRAK-10 (traker) [tuned] † |" in md and "carried over" in md
    assert "target 0.640" in md


def test_a_paired_timing_decides_the_query_check():
    a = anchors(PEERS, "s", "example")  # cheapest TRAK-1 row: 15 ms, measured at another time
    rec = _rec("ours (default)", q1=30.0, paired_q1={"ours_ms": 30.0, "trak1_dattri_ms": 45.0})
    assert check(rec, a, None)["query_q1"] == PASS
    rec["config"]["paired_q1"] = {"ours_ms": 30.0, "trak1_dattri_ms": 29.0}
    assert check(rec, a, None)["query_q1"] == FAIL
    assert "FAIL (30.0 vs 29.0)" in markdown([*PEERS, rec], {})
