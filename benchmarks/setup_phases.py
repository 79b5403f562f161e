"""Where the simulation's time goes, per phase, in one default fit, and the same against a reference source tree.

    python benchmarks/setup_phases.py --settings digits-mlp-wide --rounds 3 --cache-dir /work/cache/bench
    git archive <commit> | tar -x -C /tmp/ref            # the code to compare with
    python benchmarks/setup_phases.py --settings digits-mlp-wide --rounds 3 --reference /tmp/ref --out /tmp/phases.json

One fit per (round, code) of the bench setting's model (``bench.fit``, the model cached under ``--cache-dir``) with
``AttributionCallback(**options)``, each in its own process (``OMP_NUM_THREADS`` as given), the reference's and this
tree's alternated (and which goes first, round by round) so that both see the same machine load. Per fit: the simulation's wall and CPU
seconds (the store's ``simulation_seconds`` / ``simulation_cpu_seconds``, every checkpoint), the training seconds of
the same fit (fit minus simulation) and their ratio (the bench's ``setup_ratio``), curvature products, and the CPU
seconds per phase (``process_costs``). Printed per code: the medians; with ``--reference``: the median of the paired
ratios of simulation CPU seconds (this tree / reference), which a loaded machine moves less than wall seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _fit(setting: str, options: dict, cache_dir: str) -> dict:
    """One default fit of ``setting`` with the code on ``sys.path`` (this process's): its costs as JSON."""
    from types import SimpleNamespace

    from bench import SettingBench, fit
    from convergence import HERE as SETTINGS

    from lightning_attr import AttributionCallback, ResponseStore

    args = SimpleNamespace(
        quick=False, quick_queries=0, quick_subsets=0, cache_dir=cache_dir, plain_fits=0, single_repeats=1, batched_repeats=1,
        paired_rounds=0,
    )  # fmt: skip
    bench = SettingBench(SETTINGS[setting], args)
    bench.model()
    with tempfile.TemporaryDirectory(prefix="setup-phases-") as work:
        callback = AttributionCallback(dirpath=str(Path(work) / "r"), **options)
        _, fit_s = fit(bench.setting, bench.data, [callback])
        store = ResponseStore.load(callback.dirpath)
        info = store.checkpoint_info(store.checkpoints[-1])
    sim, cpu = float(info["simulation_seconds"]), float(info["simulation_cpu_seconds"])
    phases = {name: round(p["cpu_seconds"], 3) for name, p in info["process_costs"][0]["phases"].items()}
    return {
        "simulation_s": sim, "simulation_cpu_s": cpu, "training_s": round(fit_s - sim, 3), "setup_ratio": round(sim / (fit_s - sim), 2),
        "curvature_products": info.get("curvature_products"), "phases_cpu_s": phases, "load_average": os.getloadavg()[0],
    }  # fmt: skip


def _run(code: Path, setting: str, options: dict, cache_dir: str) -> dict:
    """:func:`_fit` in a fresh process whose ``lightning_attr`` and bench modules come from the tree ``code``."""
    env = {**os.environ, "PYTHONPATH": f"{code}{os.pathsep}{code / 'benchmarks'}"}
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", setting, json.dumps(options), cache_dir]
    done = subprocess.run(command, env=env, cwd=code, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"the fit of {setting} with the code in {code} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def source_trees(reference: str | None, script: str) -> dict[str, Path]:
    """``{"reference": tree, "this": tree}``: this source tree, after the ``reference`` one where it is given (checked to
    be a tree of this project, with ``lightning_attr/`` and ``benchmarks/<script>``)."""
    trees = {"this": HERE.parent}
    if reference is None:
        return trees
    tree = Path(reference).resolve()
    if not (tree / "lightning_attr").is_dir() or not (tree / "benchmarks" / script).is_file():
        raise SystemExit(f"--reference {tree} is not a source tree of this project (no lightning_attr/ or benchmarks/{script}).")
    return {"reference": tree, **trees}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=["digits-mlp-wide"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--options", default="{}", help="callback options over its defaults, as JSON")
    p.add_argument("--reference", default=None, help="another source tree (e.g. a git archive of a commit) to alternate with")
    p.add_argument("--cache-dir", default="/work/cache/bench")
    p.add_argument("--out", default=None, help="JSON of every fit (none by default)")
    args = p.parse_args(argv)
    options = json.loads(args.options)
    codes = source_trees(args.reference, "bench.py")
    fits: list[dict] = []
    for setting in args.settings:
        for round_ in range(args.rounds):
            for label, code in list(codes.items())[:: 1 if round_ % 2 == 0 else -1]:  # who goes first alternates too
                row = {"setting": setting, "round": round_, "code": label, **_run(code, setting, options, args.cache_dir)}
                fits.append(row)
                print(json.dumps(row), flush=True)
        for label in codes:
            mine = [f for f in fits if f["setting"] == setting and f["code"] == label]
            medians = {k: statistics.median(f[k] for f in mine) for k in ("simulation_s", "simulation_cpu_s", "training_s", "setup_ratio")}
            print(f"[{setting}] {label}: medians of {len(mine)} fits {medians}", flush=True)
        if args.reference is not None:
            pairs = [(a, b) for a, b in zip(*([f for f in fits if f["setting"] == setting and f["code"] == c] for c in ("reference", "this")))]
            ratio = statistics.median(b["simulation_cpu_s"] / a["simulation_cpu_s"] for a, b in pairs)
            print(f"[{setting}] simulation CPU seconds, this / reference, median of {len(pairs)} paired fits: {ratio:.3f}", flush=True)
    if args.out:
        sys.path.insert(0, str(HERE.parent))
        from lightning_attr._io import atomic_write_json

        atomic_write_json(Path(args.out), {"options": options, "reference": args.reference, "fits": fits})


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":  # the modules come from PYTHONPATH (the tree being measured)
        del sys.path[0]  # this script's directory: PYTHONPATH names the benchmarks to import
        print(json.dumps(_fit(sys.argv[2], json.loads(sys.argv[3]), sys.argv[4])), flush=True)
    else:
        main()
