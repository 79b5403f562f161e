"""Rules for where ``checkpoint_epochs="auto"`` puts a trajectory ensemble's early members, compared on every setting.

    python benchmarks/ensemble_rules.py [--records benchmarks/results/ensembles.jsonl] \\
        [--anchors benchmarks/results/heldout.json benchmarks/results/heldout-extra.json] [--out FILE.md]

A rule is a set of fractions of the epochs: the early members sit after epochs ``max(1, round(f * epochs))`` (distinct,
before the last; the rule of :func:`lightning_attr.callback.early_checkpoint_epochs`), read out paired with the final
one. No fit happens here: each rule's LDS is read from a ``benchmarks/ensembles.py`` record of the setting whose fit
wrote a checkpoint at every epoch the rule needs (its ``subsets``: the paired ensemble of each subset of the members
that holds the final one; the final member alone for the empty rule). One fit per setting thus scores every rule on the
same trajectory, queries and ground truth (100 half-data retrains). Only records of the default callback but for
``checkpoint_epochs`` count; per setting the one that scores the most rules (the latest of those) is used, and named.

Prints, per setting, each rule's LDS and its difference to the final member alone (the single model), with tuned
TRAK-10 + 0.02 and tuned IF-CG from ``--anchors`` (``heldout.py`` results); then per rule: the number of settings it
scores, its mean gain over the single model, its worst gain, and how many settings reach each anchor. A rule is only
compared on the settings that score it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from convergence import HERE  # noqa: E402

from lightning_attr._io import atomic_write_text  # noqa: E402

RULES: dict[str, tuple[float, ...]] = {
    "single": (),
    "{0.1}": (0.1,),
    "{0.2}": (0.2,),
    "{0.1, 0.2} (today's auto)": (0.1, 0.2),
    "{0.05, 0.1, 0.2}": (0.05, 0.1, 0.2),
    "{0.1, 0.2, 0.33}": (0.1, 0.2, 0.33),
    "{0.2, 0.33}": (0.2, 0.33),
    "{0.1, 0.33}": (0.1, 0.33),
    "{0.1, 0.2, 0.5}": (0.1, 0.2, 0.5),
    "{0.1, 0.2, 0.33, 0.5}": (0.1, 0.2, 0.33, 0.5),
}

MEMBER_FRACTIONS = (0.05, 0.1, 0.2, 0.33, 0.5)  # members shown alone


def rule_epochs(fractions: tuple[float, ...], epochs: int) -> list[int]:
    """The early members' epochs (1-based) of ``fractions`` in a fit of ``epochs`` epochs."""
    return sorted(e for e in {max(1, round(epochs * f)) for f in fractions} if e < epochs)


def rule_lds(record: dict, members: list[int]) -> float | None:
    """The paired LDS of ``members`` + the final checkpoint in ``record`` (None: the fit has no such checkpoints)."""
    names = [f"epoch={e}" for e in members]
    held = list(record["members"])
    if any(n not in held for n in names):
        return None
    if not names:
        return record["members"]["final"]["lds"]
    if len(names) == len(held) - 1:
        return record["paired"]
    return (record.get("subsets", {}).get("+".join([*names, "final"])) or {}).get("paired")


def load_anchors(paths: list[Path]) -> dict[str, dict[str, float]]:
    """``{setting: {"trak10": LDS, "ifcg": LDS}}`` from ``heldout.py`` results (later files win)."""
    out: dict[str, dict[str, float]] = {}
    for path in paths:
        for name, a in json.loads(path.read_text())["anchors"].items():
            out.setdefault(name, {}).update(
                {k: a[key]["lds"] for k, key in (("trak10", "trak10_tuned_lds"), ("ifcg", "ifcg_tuned_lds")) if key in a}
            )
    return out


def pick_records(records: list[dict]) -> dict[str, dict]:
    """Per setting, the record that scores the most rules (the latest of those)."""
    best: dict[str, tuple[int, dict]] = {}
    for r in records:
        epochs = HERE[r["setting"]].recipe.epochs
        scored = sum(rule_lds(r, rule_epochs(f, epochs)) is not None for f in RULES.values())
        if r["setting"] not in best or scored >= best[r["setting"]][0]:
            best[r["setting"]] = (scored, r)
    return {name: r for name, (_, r) in best.items()}


def table(records: dict[str, dict], anchors: dict[str, dict[str, float]]) -> str:
    """Markdown: per setting (``records``: its chosen record) each rule's LDS and gain; then per rule its summary."""
    per_rule: dict[str, list[tuple[str, float, float]]] = {rule: [] for rule in RULES}
    head = ["setting", "epochs", *RULES, "TRAK-10+0.02", "IF-CG", "record (ensembles.py variant, commit)"]
    lines = ["| " + " | ".join(head) + " |", "| --- " * len(head) + "|"]
    for name, rec in records.items():
        epochs, single = HERE[name].recipe.epochs, rec["members"]["final"]["lds"]
        cells = []
        for rule, fractions in RULES.items():
            lds = rule_lds(rec, rule_epochs(fractions, epochs))
            if lds is not None:
                per_rule[rule].append((name, lds, lds - single))
            cells.append("–" if lds is None else f"{lds:.3f} ({lds - single:+.3f})")
        a = anchors.get(name, {})
        trak = f"{a['trak10'] + 0.02:.3f}" if "trak10" in a else "–"
        ifcg = f"{a['ifcg']:.3f}" if "ifcg" in a else "–"
        lines.append(f"| {name} | {epochs} | " + " | ".join(cells) + f" | {trak} | {ifcg} | {rec['variant']}, {rec.get('commit', '?')} |")
    lines += ["", "Each member alone (read out at its own parameters), the same records:", "",
              "| setting | " + " | ".join(f"after {f:g} of the epochs" for f in MEMBER_FRACTIONS) + " | final |",
              "| --- " * (len(MEMBER_FRACTIONS) + 2) + "|"]  # fmt: skip
    for name, rec in records.items():
        epochs, held = HERE[name].recipe.epochs, rec["members"]
        alone = [held.get(f"epoch={max(1, round(epochs * f))}", {}).get("lds") for f in MEMBER_FRACTIONS]
        cells = ["–" if v is None else f"{v:.3f} (epoch {max(1, round(epochs * f))})" for v, f in zip(alone, MEMBER_FRACTIONS)]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {held['final']['lds']:.3f} |")
    lines += ["", "| rule | settings scored | mean gain over single | worst gain | >= TRAK-10+0.02 | >= IF-CG |", "| --- " * 6 + "|"]
    for rule, rows in per_rule.items():
        if not rows:
            continue
        gains = [g for _, _, g in rows]
        trak = sum(lds >= anchors[n]["trak10"] + 0.02 for n, lds, _ in rows if "trak10" in anchors.get(n, {}))
        ifcg = sum(lds >= anchors[n]["ifcg"] for n, lds, _ in rows if "ifcg" in anchors.get(n, {}))
        n_trak = sum("trak10" in anchors.get(n, {}) for n, _, _ in rows)
        n_ifcg = sum("ifcg" in anchors.get(n, {}) for n, _, _ in rows)
        worst = min(rows, key=lambda r: r[2])
        lines.append(f"| {rule} | {len(rows)} | {sum(gains) / len(gains):+.3f} | {worst[2]:+.3f} ({worst[0]}) "
                     f"| {trak} of {n_trak} | {ifcg} of {n_ifcg} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=Path, default=Path("benchmarks/results/ensembles.jsonl"))
    p.add_argument("--anchors", type=Path, nargs="*",
                   default=[Path("benchmarks/results/heldout.json"), Path("benchmarks/results/heldout-extra.json")])  # fmt: skip
    p.add_argument("--out", type=Path, help="also write the tables here (markdown)")
    args = p.parse_args(argv)
    records = [json.loads(line) for line in args.records.read_text().splitlines() if line.strip()]
    # the default callback but for where the checkpoints sit (no other rank, codec, ...)
    records = [r for r in records if "members" in r and "final" in r["members"] and r["setting"] in HERE
               and set(r.get("kwargs", {})) <= {"checkpoint_epochs"}]  # fmt: skip
    text = table(pick_records(records), load_anchors([a for a in args.anchors if a.exists()]))
    print(text)
    if args.out:
        atomic_write_text(args.out, f"<!-- generated by: python benchmarks/ensemble_rules.py --records {args.records} -->\n\n" + text)


if __name__ == "__main__":
    main()
