"""The default pipeline on a CUDA device: simulation cost against the plain fit, query cost against dattri's TRAK-1
on the same device, and the scores read on the GPU against the same store read on the CPU.

For each bench setting (``bench.SETTINGS``; the bench's data, network and training recipe):

- the plain fit on the device (a first fit warms CUDA up; the second is timed);
- the fit with ``AttributionCallback()``'s defaults on the device; ``simulation / plain fit`` is the callback's
  own wall time (``simulation_seconds`` of its last checkpoint, cumulative) over the plain fit;
- Q=1 milliseconds of ``attribute()`` and of dattri's TRAK-1 (proj_dim 512) on the same model and device,
  alternated query by query (medians, ``--rounds``), and the batched ms per query over ``--queries`` queries;
- the same store and model read on the CPU: Pearson and the largest difference relative to the largest score;
- the peak CUDA memory allocated (MiB) by the plain fit and by the fit with the callback.

Every timing synchronizes the device. Usage (on a machine with a GPU; TRAK-1 needs ``dattri``)::

    python benchmarks/gpu.py --settings digits-mlp mnist1d-mlp mnist1d-cnn1d --out benchmarks/results/gpu.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench import SETTINGS, current_commit, fit  # noqa: E402

from lightning_attr import AttributionCallback, ResponseStore  # noqa: E402
from lightning_attr._io import atomic_write_json  # noqa: E402
from lightning_attr.evaluation.peers import DattriTRAK  # noqa: E402


def _synced(fn, device: torch.device):
    """``fn`` timed in milliseconds, the device synchronized before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 1e3 * (time.perf_counter() - start), out


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device: torch.device) -> float | None:
    """The largest CUDA memory allocated since :func:`_reset_peak`, in MiB (None on the CPU)."""
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def measure(name: str, device: torch.device, args) -> dict:
    setting = SETTINGS[name]
    data = setting.load()
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    fit(setting, data, [], accelerator=accelerator)  # warm-up
    _reset_peak(device)
    _, plain_s = fit(setting, data, [], accelerator=accelerator)
    plain_peak = _peak_mb(device)
    workdir = Path(tempfile.mkdtemp(prefix=f"gpu-{name}-"))
    try:
        cb = AttributionCallback(dirpath=str(workdir / "responses"))
        _reset_peak(device)
        model, fit_s = fit(setting, data, [cb], accelerator=accelerator)
        callback_peak = _peak_mb(device)
        model = model.to(device).eval()
        store = ResponseStore.load(cb.dirpath)
        info = store.checkpoint_info(store.checkpoints[-1])
        sim_s = float(info["simulation_seconds"])
        xq, yq = data.x_test[: args.queries].to(device), data.y_test[: args.queries].to(device)

        def ours(x, y):
            return model.attribute((x, y), responses=cb.dirpath)

        trak = None
        try:
            trak = DattriTRAK(1, proj_dim=512, regularization=0.1, device=str(device))
            trak.setup([model.net], data.x_train.to(device), data.y_train.to(device))
        except ImportError as err:
            print(f"{name}: no TRAK-1 ({err})", flush=True)
            trak = None
        ours_q1, trak_q1 = [], []
        for k in range(args.rounds + 1):
            x, y = xq[k : k + 1], yq[k : k + 1]
            ms, _ = _synced(lambda: ours(x, y), device)
            if k:
                ours_q1.append(ms)
            if trak is not None:
                ms, _ = _synced(lambda: trak.score(x, y), device)
                if k:
                    trak_q1.append(ms)
        batched = []
        for _ in range(args.repeats + 1):
            ms, scores = _synced(lambda: ours(xq, yq), device)
            batched.append(ms / len(xq))
        trak_batched = None
        if trak is not None:
            runs = [_synced(lambda: trak.score(xq, yq), device)[0] / len(xq) for _ in range(args.repeats + 1)]
            trak_batched = statistics.median(runs[1:])
        cpu_model = model.to("cpu")
        n_check = min(50, len(xq))
        on_cpu = cpu_model.attribute((xq[:n_check].cpu(), yq[:n_check].cpu()), responses=cb.dirpath)
        on_gpu = scores[:n_check].cpu()
        row = {
            "setting": name, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "sources": store.n_sources, "parameters": store.space.size, "checkpoints": store.checkpoints, "codec": info.get("codec"),
            "plain_fit_s": round(plain_s, 3), "fit_with_callback_s": round(fit_s, 3), "simulation_s": round(sim_s, 3),
            "simulation_over_plain_fit": round(sim_s / plain_s, 2),
            "peak_device_mb_plain_fit": plain_peak, "peak_device_mb_fit_with_callback": callback_peak,
            "q1_ms_ours": round(statistics.median(ours_q1), 3),
            "q1_ms_trak1_dattri": round(statistics.median(trak_q1), 3) if trak_q1 else None,
            "batched_ms_per_query_ours": round(statistics.median(batched[1:]), 4),
            "batched_ms_per_query_trak1_dattri": None if trak_batched is None else round(trak_batched, 4),
            "queries": len(xq), "rounds": args.rounds,
            "gpu_vs_cpu_pearson": round(_pearson(on_gpu, on_cpu), 6),
            "gpu_vs_cpu_max_rel_diff": float((on_gpu - on_cpu).abs().max() / on_cpu.abs().max()),
        }  # fmt: skip
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if row["q1_ms_trak1_dattri"]:
        row["q1_ratio_to_trak1"] = round(row["q1_ms_ours"] / row["q1_ms_trak1_dattri"], 3)
    if row["batched_ms_per_query_trak1_dattri"]:
        row["batched_ratio_to_trak1"] = round(row["batched_ms_per_query_ours"] / row["batched_ms_per_query_trak1_dattri"], 3)
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=["digits-mlp", "mnist1d-mlp", "mnist1d-cnn1d"], choices=sorted(SETTINGS))
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (a dry run of this script)")
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--rounds", type=int, default=20, help="Q=1 queries alternated between ours and TRAK-1")
    p.add_argument("--repeats", type=int, default=3, help="batched timings after one warm-up")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py: no CUDA device here; pass --device cpu for a dry run.")
    rows = []
    for name in args.settings:
        row = measure(name, device, args)
        print(json.dumps(row), flush=True)
        rows.append(row)
        record = {"command": "python benchmarks/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  "commit": current_commit(), "torch": torch.__version__, "rows": rows}  # fmt: skip
        atomic_write_json(args.out, record)


if __name__ == "__main__":
    main()
