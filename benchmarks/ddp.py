"""Simulation wall time on 2 processes of one thread each against 1 process of one thread, in the same run.

Setting: sklearn digits, MLP 64-64-10 (P = 4,810), 1,400 per-example sources, SGD, batch 64 per optimizer
step (32 per process on 2), 20 epochs, the callback's defaults otherwise. Each process simulates its half of
the sources (end mode: after the fit, at the final weights; online: alongside the last epochs, the live
batches of both processes pooled) and writes its shards. The time compared is the checkpoint's
``simulation_seconds`` (wall time, the slowest process's); ``simulation_cpu_seconds`` (CPU time of the
slowest process) says what the split of the work buys when every process has a core of its own. The 2-process fits use Lightning's ``ddp_fork`` strategy
(gloo on CPU). Fits alternate (1, 2, 1, 2, ...); medians over ``--repeats``.

    python benchmarks/ddp.py [--repeats 3] [--modes end online]  -> benchmarks/results/ddp.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_attr import AttributionCallback, IndexedDataset
from lightning_attr.data import load_digits
from lightning_attr.models import Classifier, mlp
from lightning_attr.store import ResponseStore

GLOBAL_BATCH = 64


def simulate(mode: str, devices: int, out: str) -> dict:
    """One fit on ``devices`` processes; the final checkpoint's cost as its manifest records it."""
    digits = load_digits(n_train=1400)
    L.seed_everything(0, verbose=False)
    model = Classifier(mlp(64, [64], 10), lr=0.05, momentum=0.9, weight_decay=1e-3)
    loader = DataLoader(
        IndexedDataset(TensorDataset(digits.x_train, digits.y_train)), batch_size=GLOBAL_BATCH // devices, shuffle=True
    )  # fmt: skip
    trainer = L.Trainer(
        max_epochs=20, callbacks=[AttributionCallback(out, mode=mode, overwrite=True)], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
        devices=devices, strategy="ddp_fork" if devices > 1 else "auto",
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, loader)
    info = ResponseStore.load(out).checkpoint_info("final")
    return {
        "simulation_seconds": info["simulation_seconds"], "simulation_cpu_seconds": info["simulation_cpu_seconds"],
        "curvature_products": info["curvature_products"],
        "fit_seconds": round(time.perf_counter() - start, 2), "n_valid": info["n_valid"], "processes": info["processes"],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["end", "online"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    for mode in args.modes:
        runs = {1: [], 2: []}
        for _ in range(args.repeats):
            for devices in (1, 2):
                with tempfile.TemporaryDirectory() as tmp:
                    runs[devices].append(simulate(mode, devices, os.path.join(tmp, "r")))
                print(mode, devices, runs[devices][-1], flush=True)
        median = lambda key, devices: statistics.median(r[key] for r in runs[devices])  # noqa: E731
        one, two = median("simulation_seconds", 1), median("simulation_seconds", 2)
        cpu_one, cpu_two = median("simulation_cpu_seconds", 1), median("simulation_cpu_seconds", 2)
        results[mode] = {
            "one_process_seconds": one, "two_processes_seconds": two, "ratio": round(two / one, 3),
            "one_process_cpu_seconds": cpu_one, "two_processes_cpu_seconds_slowest": cpu_two,
            "cpu_ratio": round(cpu_two / cpu_one, 3), "runs": runs,
        }  # fmt: skip
        print(mode, "2 processes / 1 process: wall", round(two / one, 3), "cpu", round(cpu_two / cpu_one, 3), flush=True)
    result = {
        "command": "OMP_NUM_THREADS=1 python benchmarks/ddp.py " + " ".join(sys.argv[1:]),
        "cpu_count": os.cpu_count(), "load_average_at_end": os.getloadavg(), **results,
    }  # fmt: skip
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "ddp.json")
    with open(path, "w") as fh:
        json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
