"""Simulation cost as a multiple of plain training, with fits interleaved so that each sees the same load.

    python benchmarks/setup_ratio.py --out benchmarks/results/setup_ratio.json [--setting digits] [--rounds 3]

Round by round: a plain fit, a fit with ``AttributionCallback(mode="online")``, one with
``mode="end"`` (per-example sources and 10 groups). Reports the median over rounds of
``(fit with callback - plain fit) / plain fit``, next to the callback's own clock.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import SETTINGS, fit  # noqa: E402

from lightning_attr import AttributionCallback, ResponseStore  # noqa: E402
from lightning_attr.evaluation.retrain import atomic_write_json  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/setup_ratio.json")
    p.add_argument("--setting", default="digits", choices=sorted(SETTINGS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    setting = SETTINGS[args.setting]
    data = setting.load()
    groups = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(2)) % setting.n_groups
    variants = [(m, r) for r in ("example", "source") for m in ("online", "end")]
    plain, with_cb, own = [], {v: [] for v in variants}, {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            plain.append(fit(setting, data, [])[1])
            for mode, regime in variants:
                path = Path(tmp) / f"{round_}-{mode}-{regime}"
                cb = AttributionCallback(dirpath=str(path), mode=mode, sources=groups if regime == "source" else None)
                with_cb[(mode, regime)].append(fit(setting, data, [cb])[1])
                store = ResponseStore.load(path)
                own[(mode, regime)].append(float(store.checkpoint_info(store.checkpoints[-1])["simulation_seconds"]))
            print(f"round {round_}: plain {plain[-1]:.2f}s, " + ", ".join(f"{m}/{r} {with_cb[(m, r)][-1]:.2f}s" for m, r in variants), flush=True)
    base = statistics.median(plain)
    out = {
        "setting": setting.name, "rounds": args.rounds, "torch": torch.__version__, "threads": args.threads,
        "plain_fit_s": [round(t, 3) for t in plain],
        "variants": [
            {
                "mode": m, "regime": r, "fit_s": [round(t, 3) for t in with_cb[(m, r)]],
                "callback_seconds": [round(t, 3) for t in own[(m, r)]],
                "ratio_by_difference": round(statistics.median((c - p) / p for c, p in zip(with_cb[(m, r)], plain)), 3),
                "ratio_by_callback_clock": round(statistics.median(o / p for o, p in zip(own[(m, r)], plain)), 3),
            }
            for m, r in variants
        ],
        "plain_fit_median_s": round(base, 3),
    }  # fmt: skip
    atomic_write_json(Path(args.out), out, sort_keys=False)
    for v in out["variants"]:
        print(f"{v['mode']:6s} {v['regime']:8s} setup/training: {v['ratio_by_difference']:.2f} (difference), {v['ratio_by_callback_clock']:.2f} (callback clock)")


if __name__ == "__main__":
    main()
