"""What the callback costs: plain training vs training with AttributionCallback, and readout latency.

Settings: sklearn digits MLP 64-64-10 (1,400 train) and MNIST-1D MLP 40-100-100-10 (4,000 train),
SGD momentum 0.9, lr 0.05, wd 1e-3, batch 64. Both fits of a pair run in this process, alternating,
and the medians are compared (the machine is noisy: only ratios measured in the same run mean much).

    python benchmarks/overhead.py [--epochs 30] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_attr import AttributionCallback, IndexedDataset
from lightning_attr.data import load_digits, load_mnist1d
from lightning_attr.models import Classifier, mlp

SETTINGS = {
    "digits": (lambda: load_digits(n_train=1400), [64]),
    "mnist1d": (lambda: load_mnist1d(n_train=4000, n_test=1000), [100, 100]),
}


def timed_fit(split, hidden, epochs, callback=None) -> tuple[float, Classifier]:
    L.seed_everything(0, verbose=False)
    model = Classifier(mlp(split.x_train.shape[1], hidden, split.num_classes))
    loader = DataLoader(IndexedDataset(TensorDataset(split.x_train, split.y_train)), batch_size=64, shuffle=True)
    trainer = L.Trainer(
        max_epochs=epochs, callbacks=[callback] if callback else [], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="auto", devices=1,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, loader)
    return time.perf_counter() - start, model


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def run(name: str, epochs: int, repeats: int, horizon: int) -> dict:
    load, hidden = SETTINGS[name]
    split = load()
    plain, attributed, sim = [], [], []
    for _ in range(repeats):
        plain.append(timed_fit(split, hidden, epochs)[0])
        with tempfile.TemporaryDirectory() as tmp:
            cb = AttributionCallback(tmp, mode="online", horizon=horizon, overwrite=True)
            seconds, model = timed_fit(split, hidden, epochs, cb)
            attributed.append(seconds)
            sim.append(cb._seconds)
            device = next(model.parameters()).device
            x, y = split.x_test.to(device), split.y_test.to(device)
            single = median_ms(lambda: model.attribute((x[:1], y[:1]), responses=tmp), 10)
            batched = median_ms(lambda: model.attribute((x, y), responses=tmp), 3) / len(x)
    result = {
        "setting": name, "n_sources": len(split.x_train), "epochs": epochs, "horizon": horizon,
        "plain_fit_s": statistics.median(plain), "fit_with_callback_s": statistics.median(attributed),
        "simulation_s": statistics.median(sim),
        "overhead_ratio": statistics.median(attributed) / statistics.median(plain),
        "readout_ms_single_query_all_sources": single, "readout_ms_per_query_batched": batched,
        "n_queries_batched": len(split.x_test), "device": str(device), "threads": torch.get_num_threads(),
    }  # fmt: skip
    print(
        f"{name:8s} S={result['n_sources']:5d}  plain fit {result['plain_fit_s']:6.1f}s  with callback "
        f"{result['fit_with_callback_s']:6.1f}s  ratio {result['overhead_ratio']:4.2f}x  | readout, all sources: "
        f"{single:7.2f} ms for 1 query, {batched:6.3f} ms/query batched ({len(split.x_test)} queries)"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--horizon", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [run(name, args.epochs, args.repeats, args.horizon) for name in args.settings]
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
