"""Peak memory of the simulation at two numbers of sources: no ``S x P`` term (README, "Memory").

One fresh process per (mode, S) fits an MLP 64-256-10 (P = 19,210) on S synthetic examples, one source per
example, with ``memory_budget_mb`` (default 64), and reports its peak resident set size (``ru_maxrss``).
Holding ``[S, P]`` float32 would take ``4 S P`` bytes: 154 MB at S = 2,000 and 615 MB at S = 8,000. The
peak should instead grow by about the data (``S x 65`` floats) and the bookkeeping (a few ints per source).

    python benchmarks/memory.py [--sizes 2000 8000] [--modes end online] [--budget-mb 64]
        -> benchmarks/results/memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

HIDDEN, FEATURES, CLASSES = 256, 64, 10
P = FEATURES * HIDDEN + HIDDEN + HIDDEN * CLASSES + CLASSES


def child(mode: str, sources: int, budget_mb: float, out: str) -> dict:
    """One fit with the callback in this process; returns its peak RSS and what the simulation did."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_attr import AttributionCallback, IndexedDataset
    from lightning_attr.models import Classifier, mlp
    from lightning_attr.store import ResponseStore

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sources, FEATURES, generator=g)
    y = (x[:, :CLASSES] + 0.5 * torch.randn(sources, CLASSES, generator=g)).argmax(dim=1)
    L.seed_everything(0, verbose=False)
    model = Classifier(mlp(FEATURES, [HIDDEN], CLASSES))
    cb = AttributionCallback(
        out, mode=mode, horizon=3, curvature_batch_size=64, memory_budget_mb=budget_mb, overwrite=True
    )  # fmt: skip
    trainer = L.Trainer(
        max_epochs=3, callbacks=[cb], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=1,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=64, shuffle=True))
    store = ResponseStore.load(out)
    info = store.checkpoint_info("final")
    return {
        "mode": mode, "sources": sources, "P": P, "memory_budget_mb": budget_mb,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "s_times_p_float32_mb": 4 * sources * P / 2**20, "shards": len(info["shards"]),
        "curvature_products": info["curvature_products"], "fit_seconds": round(time.perf_counter() - start, 2),
        "n_valid": info["n_valid"],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs=2, default=[2000, 8000])
    parser.add_argument("--modes", nargs="+", default=["end", "online"])
    parser.add_argument("--budget-mb", type=float, default=64.0)
    parser.add_argument("--child", nargs=3, metavar=("MODE", "S", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, sources, out = args.child
        print(json.dumps(child(mode, int(sources), args.budget_mb, out)))
        return
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for mode in args.modes:
        for sources in args.sizes:
            with tempfile.TemporaryDirectory() as tmp:
                command = [sys.executable, __file__, "--budget-mb", str(args.budget_mb), "--child", mode, str(sources), tmp]
                done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    summary = {}
    for mode in args.modes:
        small, large = (r for r in rows if r["mode"] == mode)
        growth = large["peak_rss_mb"] - small["peak_rss_mb"]
        summary[mode] = {
            "peak_rss_growth_mb": round(growth, 1),
            "s_times_p_growth_mb": round(large["s_times_p_float32_mb"] - small["s_times_p_float32_mb"], 1),
            "bytes_per_added_source": round(growth * 2**20 / (large["sources"] - small["sources"])),
            "bytes_per_source_if_s_times_p": 4 * P,
        }
    result = {"command": "python benchmarks/memory.py " + " ".join(sys.argv[1:]), "runs": rows, "summary": summary}
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "memory.json")
    with open(path, "w") as fh:
        json.dump(result, fh, indent=1)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
