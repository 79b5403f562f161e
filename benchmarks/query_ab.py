"""Single-query cost of ``attribute()`` in two source trees, alternated query by query (an in-process A/B per tree).

    git worktree add --detach /tmp/ref <commit>            # the code to compare with
    OMP_NUM_THREADS=1 python benchmarks/query_ab.py --reference /tmp/ref --settings digits-mlp mnist1d-mlp \\
        --store-dir /tmp/readout-stores --rounds 200 --out benchmarks/results/readout-q1-passes.json

Per setting, one worker process per tree (``PYTHONPATH`` at that tree, so its ``lightning_attr`` and bench modules are
the tree's) loads the fitted network and its codec ``"factored"`` store as ``benchmarks/readout.py --factored`` left them
under ``--store-dir`` (a missing one is fitted there first, by the reference's code), and warms ``attribute()`` up. Then,
in each round ``k``, every worker in turn (the order alternates round by round) writes ``--flush-mb`` of memory (so the
query reads its store from memory, not from the cache, as it does in the bench when dattri's TRAK-1 runs between two of
our queries) and times ``model.attribute((x_k, y_k), responses=store)`` on test query ``k``: the trajectory ensemble
(``checkpoints="all"``, the default) at Q=1 (``--queries Q``: test queries ``k .. k + Q - 1`` in one call). Reported per tree: the medians of wall and thread milliseconds, and per
round the ratio of this tree's to the reference's (its median: the paired ratio, which the machine's load moves less
than either time). The workers' scores of the first 20 queries are compared (largest absolute difference).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCORED = 20  # queries whose scores the two trees must agree on


def _worker(tree: str, setting: str, store_dir: str, flush_mb: int, scores_path: str, per_call: int = 1) -> None:
    """Serves timed single queries on stdin (a query index per line; ``scores`` writes the first :data:`SCORED` queries'
    scores to ``scores_path``), ``per_call`` test queries a call from that index on, one JSON line per request on stdout,
    with the code of ``tree``: its ``benchmarks`` and
    root first on ``sys.path`` (this script's folder, ``sys.path[0]``, would otherwise give every tree this tree's bench
    modules, which put this tree's root first)."""
    sys.path[:] = [str(Path(tree) / "benchmarks"), tree, *(p for p in sys.path if Path(p or ".").resolve() != HERE)]
    import torch
    from convergence import HERE as SETTINGS
    from readout import factored_store, fitted
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = SETTINGS[setting].load()
    import lightning_attr

    if Path(lightning_attr.__file__).resolve().parents[1] != Path(tree).resolve():
        raise SystemExit(f"the worker for {tree} imported lightning_attr from {lightning_attr.__file__}.")
    model, path, _ = fitted(setting, data, Path(store_dir), factored=True)
    store = str(factored_store(path))
    x, y = data.x_test, data.y_test
    scratch = torch.empty(flush_mb * 2**20 // 4)
    for k in range(5):
        model.attribute((x[k : k + 1], y[k : k + 1]), responses=store)
    print(json.dumps({"ready": True, "queries": len(x)}), flush=True)
    for line in sys.stdin:
        request = line.strip()
        if request == "scores":
            scores = torch.cat([model.attribute((x[k : k + 1], y[k : k + 1]), responses=store) for k in range(SCORED)])
            save_file({"scores": scores.contiguous()}, scores_path)
            print(json.dumps({"scores": scores_path}), flush=True)
            continue
        k = int(request) % (len(x) - per_call + 1)
        scratch.add_(1.0)  # evicts the store's tensors from the cache
        wall, thread = time.perf_counter(), time.thread_time()
        model.attribute((x[k : k + per_call], y[k : k + per_call]), responses=store)
        thread, wall = time.thread_time() - thread, time.perf_counter() - wall
        print(json.dumps({"wall_ms": 1e3 * wall, "thread_ms": 1e3 * thread}), flush=True)


class _Worker:
    """A worker process (:func:`_worker`) running the code of ``tree``."""

    def __init__(self, tree: Path, setting: str, args: argparse.Namespace, scores_path: Path) -> None:
        env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{tree / 'benchmarks'}", "OMP_NUM_THREADS": "1"}
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(tree), setting, args.store_dir, str(args.flush_mb),
                   str(scores_path), str(args.queries)]  # fmt: skip
        self.tree, self.process = tree, subprocess.Popen(command, env=env, cwd=tree, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.reply()  # ready

    def ask(self, request: str) -> dict:
        self.process.stdin.write(request + "\n")
        self.process.stdin.flush()
        return self.reply()

    def reply(self) -> dict:
        while True:
            line = self.process.stdout.readline()
            if not line:
                raise SystemExit(f"the worker of {self.tree} exited (code {self.process.wait()}); its error is above.")
            if line.startswith("{"):
                return json.loads(line)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def compare(setting: str, trees: dict[str, Path], args: argparse.Namespace) -> dict:
    """Alternated single queries of ``setting`` in every tree (module docstring); the record of the comparison."""
    from safetensors.torch import load_file

    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    workers = {name: _Worker(tree, setting, args, scratch / f"{setting}-{name}.safetensors") for name, tree in trees.items()}
    try:
        names = list(workers)
        times: dict[str, dict[str, list[float]]] = {n: {"wall_ms": [], "thread_ms": []} for n in names}
        loads = [os.getloadavg()[0]]
        for k in range(args.rounds):
            for name in names[k % len(names) :] + names[: k % len(names)]:
                reply = workers[name].ask(str(k))
                for key in ("wall_ms", "thread_ms"):
                    times[name][key].append(reply[key])
        loads.append(os.getloadavg()[0])
        scores = {n: load_file(workers[n].ask("scores")["scores"])["scores"] for n in names}
    finally:
        for worker in workers.values():
            worker.close()
    record = {"setting": setting, "queries_per_call": args.queries, "rounds": args.rounds, "flush_mb": args.flush_mb, "load_average": [round(x, 2) for x in loads]}
    for name in names:
        record[name] = {key: round(statistics.median(values), 3) for key, values in times[name].items()}
    if "reference" in names:
        for name in names:
            if name != "reference":
                record[f"{name} / reference"] = {
                    key: round(statistics.median(a / b for a, b in zip(times[name][key], times["reference"][key])), 4)
                    for key in ("wall_ms", "thread_ms")
                }
                a, b = scores[name], scores["reference"]
                record[f"{name} scores against reference"] = {"max_abs_diff": float((a - b).abs().max()), "max_abs_score": float(b.abs().max())}
    return record


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=["digits-mlp"])
    p.add_argument("--reference", default=None, help="another source tree (e.g. a git worktree of a commit) to alternate with")
    p.add_argument("--store-dir", default="benchmarks/results/cache/readout", help="benchmarks/readout.py --factored's fits and stores")
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--queries", type=int, default=1, help="test queries per timed call (1: the single query)")
    p.add_argument("--flush-mb", type=int, default=64, help="memory written before each query (evicts the cache)")
    p.add_argument("--scratch", default="/tmp/query_ab", help="where the workers write their scores")
    p.add_argument("--label", default="q1", help="names this comparison in --out (records are kept per setting and label)")
    p.add_argument("--out", default=None, help="JSON: one record per setting and label (a rerun replaces its own)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from bench import current_commit
    from setup_phases import source_trees

    trees = source_trees(args.reference, "readout.py")
    from lightning_attr._io import atomic_write_json

    out = Path(args.out) if args.out else None
    kept = json.loads(out.read_text())["records"] if out is not None and out.is_file() else []
    for setting in args.settings:
        record = compare(setting, trees, args)
        record.update(label=args.label, commit=current_commit(), reference_tree=args.reference, command=" ".join(sys.argv),
                      measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))  # fmt: skip
        print(json.dumps(record, indent=1), flush=True)
        if out is not None:
            kept = [r for r in kept if (r["setting"], r.get("label")) != (setting, args.label)] + [record]
            atomic_write_json(out, {"records": kept}, sort_keys=False)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6], int(sys.argv[7]))
    else:
        main()
