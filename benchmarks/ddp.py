"""Simulation wall and CPU time on 2 processes of one thread each against 1 process of one thread, in the same run.

Setting: sklearn digits, MLP 64-64-10 (P = 4,810), 1,400 per-example sources, SGD, batch 64 per optimizer
step (32 per process on 2: the same 64 examples as one process, ``_SameBatches``), 20 epochs, the callback's defaults otherwise (end mode: propagation="spectral",
rank="auto", checkpoint_epochs="auto", i.e. 3 members, after epochs 2, 4 and 20). End mode on 2 processes: after the
fit, the members after epochs 2 and 4 go to one process each (every source, at their own weights, no collective) and
the final one is shared (each process its half of the sources and of the examples, sharing the eigenspace's curvature
products and its Krylov algebra); ``--checkpoint-epochs none`` measures that shared final checkpoint alone. Online:
each process simulates its half of the sources alongside the last epochs, the live batches of both processes pooled.
Every process writes its shards. Compared, from the store's manifest: ``simulation_seconds`` (wall time of the slowest process,
every checkpoint together) and ``simulation_cpu_seconds`` (CPU time of the slowest process: what the split of the work
buys when every process has a core of its own), and per process its seconds per phase (``process_costs``:
:mod:`lightning_attr.phases`). The 2-process fits use Lightning's ``ddp_fork`` strategy (gloo on CPU). Fits alternate
(1, 2, 1, 2, ...); medians over ``--repeats``. Needs only sklearn's digits (no cache, no download).

    OMP_NUM_THREADS=1 python benchmarks/ddp.py [--repeats 3] [--modes end online] [--out F] [--hidden 64]
        [--checkpoint-epochs auto|none] -> F (default benchmarks/results/ddp.json)

``--hidden``: the MLP's hidden width (a larger ``P`` against the same Krylov space: the split ``O(m^2 P)`` work grows,
the replicated ``O(m^3)`` Rayleigh-Ritz steps do not).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

# CPU processes only: with a GPU visible, Lightning's RNG bookkeeping initializes CUDA in this process, and the forked
# processes of `ddp_fork` then cannot start ("Cannot re-initialize CUDA in forked subprocess")
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_attr import AttributionCallback, IndexedDataset  # noqa: E402
from lightning_attr._io import atomic_write_json  # noqa: E402
from lightning_attr.data import load_digits  # noqa: E402
from lightning_attr.models import Classifier, mlp  # noqa: E402
from lightning_attr.store import ResponseStore  # noqa: E402

GLOBAL_BATCH = 64
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "ddp.json")


class _SameBatches(torch.utils.data.Sampler):
    """Every optimizer step trains on the same examples on 1 or ``W`` processes: each epoch a permutation of the
    training set from ``Generator(epoch)``, of which process ``r`` reads positions ``r, r + W, ...`` (in batches of
    ``GLOBAL_BATCH / W``: its share of each global batch). Lightning's ``DistributedSampler`` would give the processes
    other batches than one process gets, hence other weights and, by chance, other eigenspace sizes (1,216 against
    1,280 products at ``7325dc3``): the ratio would then compare two different simulations. Lightning calls
    ``set_epoch``; the process rank is read when the loader is iterated, inside the process."""

    def __init__(self, n: int, world_size: int) -> None:
        self.n, self.world_size, self.epoch = n, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        rank = torch.distributed.get_rank() if self.world_size > 1 else 0
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.epoch))
        return iter(order[rank :: self.world_size].tolist())

    def __len__(self) -> int:
        return self.n // self.world_size


def simulate(mode: str, devices: int, out: str, hidden: int = 64, checkpoint_epochs: str = "auto") -> dict:
    """One fit on ``devices`` processes; the final checkpoint's costs as its manifest records them (every checkpoint
    of the fit together), and each process's phases."""
    digits = load_digits(n_train=1400)
    L.seed_everything(0, verbose=False)
    model = Classifier(mlp(64, [hidden], 10), lr=0.05, momentum=0.9, weight_decay=1e-3)
    train = IndexedDataset(TensorDataset(digits.x_train, digits.y_train))
    loader = DataLoader(train, batch_size=GLOBAL_BATCH // devices, sampler=_SameBatches(len(train), devices))
    trainer = L.Trainer(
        max_epochs=20, callbacks=[AttributionCallback(out, mode=mode, overwrite=True, checkpoint_epochs=None if checkpoint_epochs == "none" else "auto")], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
        devices=devices, strategy="ddp_fork" if devices > 1 else "auto", use_distributed_sampler=False,
    )  # fmt: skip
    start, load = time.perf_counter(), os.getloadavg()[0]
    trainer.fit(model, loader)
    store = ResponseStore.load(out)
    info = store.checkpoint_info("final")
    return {
        "simulation_seconds": info["simulation_seconds"], "simulation_cpu_seconds": info["simulation_cpu_seconds"],
        "curvature_products": info["curvature_products"], "checkpoints": store.checkpoints,
        "fit_seconds": round(time.perf_counter() - start, 2), "n_valid": info["n_valid"], "processes": info["processes"],
        "phases": [costs["phases"] for costs in info["process_costs"]],
        "load_average_before": load,  # the 1-minute load average of the machine when the fit started
        # per checkpoint, each process's simulation seconds so far when it was committed (one process: cumulative in
        # checkpoint order; two: the members simulated alone are committed first, both at once)
        "eigenspace_products": {  # end mode: each checkpoint's eigenspace (online: none)
            name: store.checkpoint_info(name)["step_rule"].get("eigenspace_products") for name in store.checkpoints
        } if mode == "end" else None,
        "seconds_at_commit": {
            name: [c["simulation_seconds"] for c in store.checkpoint_info(name)["process_costs"]] for name in store.checkpoints
        },
    }  # fmt: skip


def _median_phases(runs: list[dict], process: int) -> dict[str, dict[str, float]]:
    """Per phase, the medians over the runs of process ``process``'s wall and CPU seconds."""
    names = sorted({name for run in runs for name in run["phases"][process]})
    return {
        name: {
            unit: round(statistics.median(run["phases"][process].get(name, {}).get(unit, 0.0) for run in runs), 3)
            for unit in ("seconds", "cpu_seconds")
        }
        for name in names
    }


def _table(mode: str, phases: dict[str, dict]) -> str:
    """The phases of every process as text, wall / CPU seconds."""
    names = sorted({name for columns in phases.values() for name in columns})
    lines = [f"{mode}: seconds per phase, wall / CPU (medians)", "phase".ljust(20) + "".join(k.rjust(22) for k in phases)]
    for name in names + ["total"]:
        cells = []
        for columns in phases.values():
            if name == "total":
                wall, cpu = (sum(c[unit] for c in columns.values()) for unit in ("seconds", "cpu_seconds"))
            else:
                wall, cpu = (columns.get(name, {}).get(unit, 0.0) for unit in ("seconds", "cpu_seconds"))
            cells.append(f"{wall:.2f} / {cpu:.2f}".rjust(22))
        lines.append(name.ljust(20) + "".join(cells))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["end", "online"], choices=["end", "online"])
    parser.add_argument("--out", default=RESULTS, help="the JSON written (default: benchmarks/results/ddp.json)")
    parser.add_argument("--hidden", type=int, default=64, help="the MLP's hidden width (64: P = 4,810; 256: P = 19,210)")
    parser.add_argument(
        "--checkpoint-epochs", default="auto", choices=["auto", "none"],
        help="auto: the default trajectory ensemble (3 checkpoints in end mode); none: the final checkpoint only",
    )
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    torch.set_num_threads(1)
    started, load_at_start = time.perf_counter(), os.getloadavg()
    results = {}
    for mode in args.modes:
        runs = {1: [], 2: []}
        for _ in range(args.repeats):
            for devices in (1, 2):
                with tempfile.TemporaryDirectory() as tmp:
                    runs[devices].append(simulate(mode, devices, os.path.join(tmp, "r"), args.hidden, args.checkpoint_epochs))
                run = runs[devices][-1]
                print(mode, devices, {k: v for k, v in run.items() if k != "phases"}, flush=True)
        median = lambda key, devices: statistics.median(r[key] for r in runs[devices])  # noqa: E731
        one, two = median("simulation_seconds", 1), median("simulation_seconds", 2)
        cpu_one, cpu_two = median("simulation_cpu_seconds", 1), median("simulation_cpu_seconds", 2)
        phases = {"1 process": _median_phases(runs[1], 0)}
        phases.update({f"2 processes, rank {r}": _median_phases(runs[2], r) for r in range(2)})
        results[mode] = {
            "one_process_seconds": one, "two_processes_seconds": two, "ratio": round(two / one, 3),
            "one_process_cpu_seconds": cpu_one, "two_processes_cpu_seconds_slowest": cpu_two,
            "cpu_ratio": round(cpu_two / cpu_one, 3), "phases": phases, "runs": runs,
        }  # fmt: skip
        print(_table(mode, phases), flush=True)
        print(mode, "2 processes / 1 process: wall", round(two / one, 3), "cpu", round(cpu_two / cpu_one, 3), flush=True)
    result = {
        "command": "OMP_NUM_THREADS=1 python benchmarks/ddp.py " + " ".join(sys.argv[1:]),
        "cpu_count": os.cpu_count(), "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg(),
        "seconds": round(time.perf_counter() - started, 1), "torch_threads": torch.get_num_threads(), **results,
    }  # fmt: skip
    atomic_write_json(args.out, result, sort_keys=False, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
