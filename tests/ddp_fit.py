"""The fits of tests/test_ddp.py. Several processes run in a script of their own (``ddp_fork`` forks them):

    python tests/ddp_fit.py OUT --devices 2 [--crash-at STEP]

Each mode writes a store to OUT/<mode> (and the crashed fit to OUT/crashed/online). The data order is the
same for any number of processes: process r of W reads examples r, r + W, ... of each global batch of 32, so
the optimizer steps on the same examples as one process with batches of 32.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset, random_split

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import blobs, small_mlp  # noqa: E402

from lightning_attr import AttributionCallback, IndexedDataset  # noqa: E402

GLOBAL_BATCH = 32


class CrashOnRankOne(L.Callback):
    """Process 1 fails at ``step``, inside the final simulation window."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_rank == 1 and trainer.global_step == self.step:
            raise RuntimeError(f"process 1 crashed at step {self.step} (on purpose)")


# checkpoint_epochs [2] unless given. End mode on 2 processes: 2 checkpoints go to one process each (the callback's
# checkpoint_owners); 3 (eigen, factored, untrained): two alone, the final one shared; 1 (subset): shared. "untrained": the
# sampler reads examples 0-159 only (each process its half of them), so 160-191 are never trained on
MODES = {
    "online": {"mode": "online"}, "end": {"mode": "end"}, "end_steps": {"mode": "end", "propagation": "heavy_ball"},
    "groups": {"mode": "online", "sources": [i % 10 for i in range(192)]},
    "eigen": {"mode": "end", "codec": "eigen", "rank": 24, "checkpoint_epochs": [2, 4]},
    "factored": {"mode": "end", "codec": "factored", "rank": 24, "checkpoint_epochs": [2, 4]},
    "subset": {"mode": "end", "checkpoint_epochs": None},
    "untrained": {"mode": "end", "codec": "dense", "checkpoint_epochs": [2, 4]},
}
UNTRAINED = 32  # mode "untrained": the last examples, in no process's batches


def fit_stores(out: str, devices: int, modes: Sequence[str] = tuple(MODES), crash_at: int | None = None) -> None:
    """One fit per entry of ``MODES`` on ``devices`` processes (``ddp_fork``: the processes are forked from this one,
    so they do not import torch again), each writing ``out/<name>``; ``"groups"``: 10 sources whose members are in
    every batch (re-injected at every step). ``crash_at``: process 1 fails at that global step."""
    torch.set_num_threads(1)
    x, y = blobs(n=192, d=6, classes=3)
    for name in modes:
        L.seed_everything(0, verbose=False)
        model = small_mlp(6, 3)
        cb = AttributionCallback(
            os.path.join(out, name), horizon=4, curvature_batch_size=64, overwrite=True, **{"checkpoint_epochs": [2], **MODES[name]}
        )
        callbacks = [cb] + ([CrashOnRankOne(crash_at)] if crash_at is not None else [])
        trainer = L.Trainer(
            max_epochs=6, accelerator="cpu", devices=devices, strategy="ddp_fork" if devices > 1 else "auto",
            callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, use_distributed_sampler=False,
        )  # fmt: skip
        train = IndexedDataset(TensorDataset(x, y))
        if name == "subset":  # 160 of the 192 examples: their indices (up to 191) are not their positions
            train = random_split(train, [160, 32], generator=torch.Generator().manual_seed(0))[0]
        read = len(train) - (UNTRAINED if name == "untrained" else 0)
        loader = DataLoader(train, batch_size=GLOBAL_BATCH // devices, sampler=_Interleaved(read, devices))
        trainer.fit(model, loader)


class _Interleaved(torch.utils.data.Sampler):
    """Process ``r`` of ``W`` reads examples ``r, r + W, ...`` in order (Lightning's ``DistributedSampler`` would
    shuffle); the process rank is read when the loader is iterated, inside the process."""

    def __init__(self, n: int, world_size: int) -> None:
        self.n, self.world_size = n, world_size

    def __iter__(self):
        rank = torch.distributed.get_rank() if self.world_size > 1 else 0
        return iter(range(rank, self.n, self.world_size))

    def __len__(self) -> int:
        return self.n // self.world_size


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--crash-at", type=int, default=None, help="then one more online fit where process 1 fails")
    args = parser.parse_args()
    fit_stores(args.out, args.devices)
    if args.crash_at is not None:
        try:
            fit_stores(os.path.join(args.out, "crashed"), args.devices, ["online"], args.crash_at)
        except Exception as err:  # the launcher re-raises the process's failure
            print(f"the crashed fit failed as planned: {type(err).__name__}", flush=True)
        else:
            raise SystemExit("the crashed fit did not fail")


if __name__ == "__main__":
    main()
