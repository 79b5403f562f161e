"""Curvature scales of each setting's attributed model: candidate units for the automatic damping.

    OMP_NUM_THREADS=1 python benchmarks/curvature_scales.py digits-mlp digits-mlp-wide ... \\
        --cache-dir /work/cache/bench --out benchmarks/results/curvature-scales.json

``damping="auto"`` is ``damping_scale * trace(G)/P``. Adding parameters the loss barely curves along (a wider
network) lowers ``trace(G)/P`` without changing the directions that matter. Per setting (the bench's attributed model
from ``--cache-dir``, the full-data GGN over the training set) this prints and records, from ``--probes`` Rademacher
probes (Hutchinson) and 30 power iterations:

- ``trace_over_P``: ``trace(G)/P`` (today's unit; per parameter);
- ``trace``: ``trace(G)`` (the sum of the eigenvalues: unchanged by flat directions);
- ``tr2_over_tr``: ``trace(G^2)/trace(G)`` (= sum s^2 / sum s, an eigenvalue-weighted mean eigenvalue: unchanged by
  flat directions);
- ``lambda_max``: the top eigenvalue.

Dividing the best damping of a setting (``results/damping.md``, ``results/heldout-extra.md``) by each unit says which
unit would make one ``damping_scale`` fit every setting. Results accumulate in ``--out`` (one entry per setting).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import SettingBench, current_commit  # noqa: E402
from convergence import HERE  # noqa: E402

from lightning_attr._io import atomic_write_json  # noqa: E402
from lightning_attr.curvature import curvature_operator  # noqa: E402
from lightning_attr.functional import functional_view  # noqa: E402
from lightning_attr.models import Classifier  # noqa: E402


def scales(name: str, cache_dir: str, probes: int, batch: int = 700, chunk: int = 16) -> dict:
    """The curvature scales of setting ``name``'s attributed model (see the module docstring)."""
    args = SimpleNamespace(quick=False, quick_queries=0, quick_subsets=0, cache_dir=cache_dir, plain_fits=0)
    bench = SettingBench(HERE[name], args)
    data, start = bench.data, time.perf_counter()
    with functional_view(Classifier(bench.model()).eval()) as (fm, theta):
        batches = [(data.x_train[i : i + batch], data.y_train[i : i + batch]) for i in range(0, len(data.x_train), batch)]
        ggn = curvature_operator("ggn", fm, theta, batches, chunk_size=chunk)
        p, gen = theta.numel(), torch.Generator().manual_seed(0)
        v = torch.randint(0, 2, (probes, p), generator=gen).float() * 2 - 1  # [probes, P] Rademacher
        gv = torch.cat([ggn(v[i : i + chunk]) for i in range(0, probes, chunk)])
        trace, trace_sq = float((v * gv).sum(1).mean()), float((gv * gv).sum(1).mean())
        x = torch.randn(1, p, generator=gen)
        for _ in range(30):
            y = ggn(x)
            top = float(y.norm())
            x = y / top
    return {
        "P": p, "n": len(data.x_train), "trace": round(trace, 5), "trace_over_P": float(f"{trace / p:.5g}"),
        "tr2_over_tr": float(f"{trace_sq / trace:.5g}"), "lambda_max": float(f"{top:.5g}"), "probes": probes,
        "seconds": round(time.perf_counter() - start, 1), "commit": current_commit(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("settings", nargs="+", choices=sorted(HERE))
    p.add_argument("--cache-dir", default="benchmarks/results/cache")
    p.add_argument("--probes", type=int, default=64)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/curvature-scales.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    for name in args.settings:
        results[name] = scales(name, args.cache_dir, args.probes)
        print(name, json.dumps(results[name]), flush=True)
        atomic_write_json(args.out, results)


if __name__ == "__main__":
    main()
