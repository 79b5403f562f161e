"""Query cost of the default readout (issue 7): ours against dattri's TRAK-1 on the same model, same process.

    OMP_NUM_THREADS=1 python benchmarks/readout.py --settings digits-mlp mnist1d-mlp mnist1d-cnn1d \\
        --store-dir /tmp/readout-stores --out benchmarks/results/readout.json

Per setting (the bench's and the held-out ones, :data:`convergence.HERE`, e.g. ``digits-cnn-adam``): one fit with ``AttributionCallback(mode="end",
checkpoint_epochs="auto")`` (the default trajectory ensemble: 30 epochs give checkpoints after epochs 3 and 6 and the
final one; kept under ``--store-dir`` with the fitted weights, reused by a rerun), then these query functions on its
first ``--queries`` test points:

- ``ours, 1 member``: ``model.attribute(batch, responses=dir, checkpoints="last")`` (the final checkpoint);
- ``ours, ensemble``: ``model.attribute(batch, responses=dir)``: the trajectory ensemble (``checkpoints="all"``);
- the same two with ``chunk_size=256``, the readout's previous default (the reference for this work's speed-up;
  their scores must equal the default's, which is checked and recorded);
- the same two with ``readout="gradient"`` (query gradients times the responses: the linear readout's scores by
  one backward pass per query; the largest difference to the default is recorded), and ``ensemble="collapsed"``
  (the checkpoints folded into one response per source) with either readout (``--variants all`` only; ``default``:
  the two default queries, TRAK-1, the memory floor and the layer readout below; ``queries``: the two default queries,
  TRAK-1 and the memory floor, for before / after runs of the default's query cost: the layer readout's batched calls
  take most of a ``default`` run's time);
- ``ours factored, 1 member / ensemble`` (``--factored``): the same fit writes its first store with ``codec="dense"``
  (``"auto"`` picks ``"factored"`` on the MLPs) and a second with ``codec="factored"`` (the dense responses kept as
  eigen coordinates plus per-example gradient factors, :mod:`lightning_attr.factored`), read out the same way; its
  scores against the dense store's and every store's bytes (``storage_bytes``, beside TRAK-1's) are recorded;
- ``TRAK-1 (dattri)``: :class:`~lightning_attr.evaluation.peers.DattriTRAK` (1 model, projection 512) set up on
  the same fitted network and training set;
- ``memory floor (ensemble)``: one matrix-vector product over each checkpoint's ``[S, P]`` responses, what any
  readout that reads every response once costs at least;
- ``layer readout (before), 1 member / ensemble``: the same queries as ``attribute()`` computed them before the
  layer-output bases (``score_sources(basis=False)`` over each checkpoint's responses split per handled layer, then the
  ensemble's normalization): the before / after pair of this work, in the same rounds (their scores against the
  default's are recorded); ``vmap(jvp) reference, 1 member / ensemble`` (``--variants all``): the same with
  ``layers=False``, ``vmap(jvp)`` over flat responses, as before the layer readout.

Timing: Q=1 in ``--rounds`` alternating rounds (each round scores query ``k`` with every function in turn, in a
rotated order; round 0 only warms up), and the whole batch in ``--batched-rounds`` alternating rounds. Reported:
medians (ms per query) and the median over rounds of each function's time divided by TRAK-1's in the same
round (the paired ratio: the machine's load changes between rounds, not within one). ``breakdown``: the
readout kernels alone (the members' query gradients, or with codec ``"factored"`` their layer factors, in the same
passes times each member's responses, no store checks, no ensemble step) against the whole ``attribute()`` call, per Q
and store (the default's, and with ``--factored`` the factored one) (``--profile``: and torch.profiler's operators with
the most self CPU time in the default store's ensemble query). One JSON record per setting and ``--label`` in ``--out``, written after each setting (a rerun
replaces the records of the settings and label it runs and keeps the others). Before / after a change of the
library: run this script with ``PYTHONPATH`` pointing at each version and another ``--label``; each record's
ratios to TRAK-1 are paired within its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import current_commit, dir_bytes, fit, machine, make_net  # noqa: E402
from convergence import HERE as SETTINGS  # noqa: E402  (the bench's settings and the held-out ones)

from lightning_attr import AttributionCallback, ResponseStore  # noqa: E402
from lightning_attr._io import atomic_save_tensors, atomic_write_json  # noqa: E402
from lightning_attr.evaluation.peers import DattriTRAK  # noqa: E402
from lightning_attr.functional import functional_view  # noqa: E402
from lightning_attr.models import Classifier  # noqa: E402
from lightning_attr.attributor import ensemble_mean  # noqa: E402
from lightning_attr.layer_readout import handled_layers, layer_parameters  # noqa: E402
from lightning_attr.basis_readout import basis_layers, member_query_factors  # noqa: E402
from lightning_attr.readout import auto_chunk_size, linear_query_gradients, score_sources  # noqa: E402

CHECKPOINT_EPOCHS = "auto"  # the default: after 10% and 20% of the epochs, and the final checkpoint
PREVIOUS_CHUNK = 256  # the readout's default chunk_size before it was chosen from the activations


def fitted(setting_name: str, data, store_dir: Path, factored: bool = False) -> tuple[Classifier, Path, float | None]:
    """The fitted classifier and its store: read from ``store_dir`` when an earlier run left them, else fitted.
    ``factored``: the same fit also writes a codec ``"factored"`` store (a second callback, :func:`factored_store`).
    Returns (model in eval mode, store path, fit seconds or None when reused)."""
    s = SETTINGS[setting_name]
    root = store_dir / setting_name
    responses, weights = root / "responses", root / "weights.safetensors"
    r = s.recipe

    def classifier() -> Classifier:
        return Classifier(make_net(s, data, 0), lr=r.lr, momentum=r.momentum, weight_decay=r.weight_decay, optimizer=r.optimizer)

    wanted = [responses, factored_store(responses)] if factored else [responses]
    cached = weights.is_file() and all((path / "manifest.json").is_file() for path in wanted)
    if cached and factored:  # the pair is dense against factored (codec "auto" picks "factored" on the MLPs)
        cached = ResponseStore.load(responses).codec(ResponseStore.load(responses).checkpoints[-1]) == "dense"
    if cached:
        model = classifier()
        model.load_state_dict(load_file(str(weights)))
        return model.eval(), responses, None
    pinned = {"codec": "dense"} if factored else {}
    cb = AttributionCallback(dirpath=str(responses), mode="end", checkpoint_epochs=CHECKPOINT_EPOCHS, overwrite=True, **pinned)
    also = [AttributionCallback(dirpath=str(factored_store(responses)), codec="factored", checkpoint_epochs=CHECKPOINT_EPOCHS, overwrite=True)]
    model, seconds = fit(s, data, [cb, *(also if factored else [])])
    atomic_save_tensors(weights, {k: v.detach().contiguous() for k, v in model.state_dict().items()})
    return model.eval(), responses, seconds


def factored_store(responses: Path) -> Path:
    """Where ``--factored`` keeps the codec ``"factored"`` store of the same fit, beside the default's."""
    return responses.with_name(responses.name + "-factored")


def _memory_floor(store: ResponseStore):
    """The query cost's floor for a memory-bound readout of the ensemble: one matrix-vector product per checkpoint
    over its flat ``[S, P]`` responses (each number read once; no forward pass, no query dependence)."""
    members = [(store.responses(name), store.theta(name)) for name in store.checkpoints]
    return lambda x, y: [responses @ theta for responses, theta in members]


def _reference(model: Classifier, store: ResponseStore, names: list[str], *, layers: bool):
    """The query as ``attribute()`` computed it before, in this process: per checkpoint ``score_sources`` at its
    parameters with ``basis=False`` (no layer-output bases), the automatic chunk, over the checkpoint's responses split
    per handled layer (``layers``: the layer readout, as ``attribute()`` held them) or flat (``vmap(jvp)``, before the
    layer readout), the checkpoints' scores combined by :func:`~lightning_attr.attributor.ensemble_mean` (no store or
    batch checks)."""
    split = layer_parameters(handled_layers(model, store.space)) if layers else ()
    members = [(store.block(name, split=split).responses if layers else store.responses(name), store.theta(name)) for name in names]

    def query(x, y):
        with functional_view(model) as (fm, _):
            batch = (x.clone(), y.clone())
            per = [score_sources(fm, theta, responses, batch, layers=layers, basis=False) for responses, theta in members]
        return per[0] if len(per) == 1 else ensemble_mean(per, len(per) - 1)

    return query


def paired_rounds(functions: dict, batches: list, reference: str) -> dict:
    """Each round ``k`` calls every function on ``batches[k]``, in an order rotated by ``k``; round 0 warms up.
    Returns per function: median ms and the median over rounds of (its ms / the reference's ms)."""
    names = list(functions)
    ms: dict[str, list[float]] = {n: [] for n in names}
    for k, batch in enumerate(batches):
        for name in names[k % len(names) :] + names[: k % len(names)]:
            start = time.perf_counter()
            functions[name](*batch)
            if k:
                ms[name].append(1e3 * (time.perf_counter() - start))
    return {
        n: {
            "ms": round(statistics.median(ms[n]), 3),
            "ratio_to_reference": round(statistics.median(a / b for a, b in zip(ms[n], ms[reference])), 4),
        }
        for n in names
    }


def breakdown(model: Classifier, path: Path, batch: tuple, repeats: int) -> dict:
    """Milliseconds of ``attribute()`` (every checkpoint: the ensemble) against its readout kernels alone, with the
    chunk ``attribute()`` chooses: the members' query gradients along the layer bases in the same passes
    (:func:`~lightning_attr.readout.linear_query_gradients`; a codec ``"factored"`` store: their layer factors,
    :func:`~lightning_attr.basis_readout.member_query_factors`) times each checkpoint's responses, held as the
    attributor holds them (a block that declines: its own readout at its parameter snapshot); no store checks, no
    ensemble step."""
    store = ResponseStore.load(path)
    layers = basis_layers(model, store.space)
    split = None if layers is not None else layer_parameters(handled_layers(model, store.space))
    members = [(store.block(name, split=split), store.theta(name)) for name in store.checkpoints]
    thetas = torch.stack([at for _, at in members])
    factored = layers is not None and all(hasattr(block, "factor_scores") for block, _ in members)
    with functional_view(model) as (fm, theta):
        batch = tuple(t.clone() for t in batch)
        chunk = auto_chunk_size(fm, theta, batch, store.n_sources)

        def kernels() -> list:
            if factored:
                queries = member_query_factors(fm, thetas, batch, layers, chunk_size=chunk, laid_out=True)
                if queries is not None:
                    return [block.factor_scores(fm.space, q, at) for (block, at), q in zip(members, queries)]
            gradients = None if factored else linear_query_gradients(fm, thetas, batch, store.n_sources, chunk)
            if gradients is None:
                return [block.scores(fm, at, batch, "linear", chunk) for block, at in members]
            return [block.gradient_scores(g) for (block, _), g in zip(members, gradients)]

        kernel_ms = _median_ms(kernels, repeats)
    total_ms = _median_ms(lambda: model.attribute(batch, responses=str(path)), repeats)
    return {"store": store.codec(store.checkpoints[-1]), "queries": len(batch[0]), "chunk_size": chunk, "attribute_ms": round(total_ms, 3),
            "readout_kernels_ms": round(kernel_ms, 3), "rest_ms": round(total_ms - kernel_ms, 3)}  # fmt: skip


def top_ops(model: Classifier, path: Path, batch: tuple, repeats: int, rows: int = 8) -> list[dict]:
    """torch.profiler's operators with the most self CPU time over ``repeats`` ensemble queries (``attribute()``,
    every checkpoint), as ``{"op", "share", "ms_per_query_call"}``."""
    from torch.profiler import ProfilerActivity, profile

    model.attribute(batch, responses=str(path))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            model.attribute(batch, responses=str(path))
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [{"op": e.key, "share": round(e.self_cpu_time_total / total, 3), "ms_per_call": round(e.self_cpu_time_total / 1e3 / repeats, 3)}
            for e in events[:rows]]  # fmt: skip


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def run_setting(name: str, args) -> dict:
    torch.manual_seed(0)
    data = SETTINGS[name].load()
    model, path, fit_s = fitted(name, data, Path(args.store_dir), args.factored)
    store = ResponseStore.load(path)
    xq, yq = data.x_test[: args.queries], data.y_test[: args.queries]
    trak = DattriTRAK(1, proj_dim=512, regularization=0.1)  # the query cost does not depend on the ridge
    start = time.perf_counter()
    trak.setup([model.net], data.x_train, data.y_train)
    trak_setup_s = time.perf_counter() - start

    def ours(checkpoints: str, chunk_size: int | None, **options):
        return lambda x, y: model.attribute((x, y), responses=str(path), checkpoints=checkpoints, chunk_size=chunk_size, **options)

    functions = {
        "ours, 1 member": ours("last", None),
        "ours, ensemble": ours("all", None),
        "TRAK-1 (dattri)": trak.score,
        "memory floor (ensemble)": _memory_floor(store),
    }
    if args.variants != "queries":
        functions["layer readout (before), 1 member"] = _reference(model, store, store.checkpoints[-1:], layers=True)
        functions["layer readout (before), ensemble"] = _reference(model, store, store.checkpoints, layers=True)
    storage = {f"ours ({store.codec(store.checkpoints[-1])})": dir_bytes(path), "TRAK-1 (dattri)": trak.storage_bytes()}
    if args.factored:  # the same fit's codec "factored" store: its scores against the default's are recorded below
        def ours_factored(checkpoints: str):
            return lambda x, y: model.attribute((x, y), responses=str(factored_store(path)), checkpoints=checkpoints)

        functions = {**functions, "ours factored, 1 member": ours_factored("last"), "ours factored, ensemble": ours_factored("all")}
        storage["ours factored"] = dir_bytes(factored_store(path))
    if args.variants == "all":
        functions = {
            **functions,
            "vmap(jvp) reference, 1 member": _reference(model, store, store.checkpoints[-1:], layers=False),
            "vmap(jvp) reference, ensemble": _reference(model, store, store.checkpoints, layers=False),
            f"ours, 1 member, chunk {PREVIOUS_CHUNK}": ours("last", PREVIOUS_CHUNK),
            f"ours, ensemble, chunk {PREVIOUS_CHUNK}": ours("all", PREVIOUS_CHUNK),
            "ours, 1 member, gradient": ours("last", None, readout="gradient"),
            "ours, ensemble, gradient": ours("all", None, readout="gradient"),
            "ours, collapsed": ours("all", None, ensemble="collapsed"),
            "ours, collapsed, gradient": ours("all", None, ensemble="collapsed", readout="gradient"),
        }
    same = {}
    references = [(checkpoints, before, f"{before}, {members}") for checkpoints, members in (("last", "1 member"), ("all", "ensemble"))
                  for before in ("layer readout (before)", "vmap(jvp) reference") if f"{before}, {members}" in functions]  # fmt: skip
    for checkpoints, before, reference in references:
        singles = range(min(20, len(xq)))  # one query at a time
        a = torch.cat([ours(checkpoints, None)(xq[k : k + 1], yq[k : k + 1]) for k in singles])
        b = torch.cat([functions[reference](xq[k : k + 1], yq[k : k + 1]) for k in singles])
        same[f"{checkpoints}, {before}, Q=1"] = {"bitwise": bool(torch.equal(a, b)), "max_abs_diff": float((a - b).abs().max()),
                                                 "max_abs_score": float(a.abs().max())}  # fmt: skip
    for checkpoints in ("last", "all") if args.variants == "all" else ():
        a = ours(checkpoints, None)(xq, yq)
        for other, b in ((f"chunk {PREVIOUS_CHUNK}", ours(checkpoints, PREVIOUS_CHUNK)(xq, yq)),
                         ("gradient", ours(checkpoints, None, readout="gradient")(xq, yq))):  # fmt: skip
            same[f"{checkpoints}, {other}"] = {"bitwise": bool(torch.equal(a, b)), "max_abs_diff": float((a - b).abs().max()),
                                              "max_abs_score": float(a.abs().max())}  # fmt: skip
    for checkpoints, members in (("last", "1 member"), ("all", "ensemble")) if args.factored else ():
        a, b = ours(checkpoints, None)(xq, yq), functions[f"ours factored, {members}"](xq, yq)
        same[f"{checkpoints}, factored"] = {"bitwise": bool(torch.equal(a, b)), "max_abs_diff": float((a - b).abs().max()),
                                           "max_abs_score": float(a.abs().max())}  # fmt: skip
    if args.save_scores:  # the ensemble's and the last member's scores of 20 queries, to compare library versions
        atomic_save_tensors(Path(args.save_scores) / f"{name}-{args.label}.safetensors", {
            "ensemble": ours("all", None)(xq[:20], yq[:20]).contiguous(), "last": ours("last", None)(xq[:20], yq[:20]).contiguous()
        })  # fmt: skip
    load_before = os.getloadavg()[0]
    singles = [(xq[k : k + 1], yq[k : k + 1]) for k in range(args.rounds + 1)]
    q1 = paired_rounds(functions, singles, "TRAK-1 (dattri)")
    batched = paired_rounds(functions, [(xq, yq)] * (args.batched_rounds + 1), "TRAK-1 (dattri)")
    for row in batched.values():
        row["ms_per_query"] = round(row.pop("ms") / len(xq), 4)
    stores = [path, factored_store(path)] if args.factored else [path]
    split = [breakdown(model, p, (xq[:q], yq[:q]), r) for p in stores for q, r in ((1, 20), (len(xq), 2))]
    if args.profile:
        for part, (q, r) in zip(split, ((1, 10), (len(xq), 1))):
            part["top_ops"] = top_ops(model, path, (xq[:q], yq[:q]), r)
    info = store.checkpoint_info(store.checkpoints[-1])
    record = {
        "setting": name, "label": args.label, "members": len(store.checkpoints), "n_sources": store.n_sources, "n_parameters": store.space.size, "queries": len(xq),
        "checkpoints": store.checkpoints, "propagation": info.get("propagation"), "fit_s": fit_s,
        "trak1_setup_s": round(trak_setup_s, 2), "storage_bytes": storage, "q1": q1, "batched": batched, "scores_against_the_default": same,
        "breakdown": split, "rounds": {"q1": args.rounds, "batched": args.batched_rounds},
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)], "torch": torch.__version__,
        "machine": machine(), "commit": current_commit(), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }  # fmt: skip
    _print(record)
    return record


def _print(r: dict) -> None:
    print(f"\n[{r['setting']}, {r['label']}] S = {r['n_sources']}, P = {r['n_parameters']}, {r['queries']} queries, load {r['load_average']}")
    print(f"  {'':32} {'Q=1 ms':>9} {'/ TRAK-1':>9} {'batched ms/q':>13} {'/ TRAK-1':>9}")
    for name, row in r["q1"].items():
        b = r["batched"][name]
        print(f"  {name:32} {row['ms']:9.2f} {row['ratio_to_reference']:9.3f} {b['ms_per_query']:13.3f} {b['ratio_to_reference']:9.3f}")
    for split in r["breakdown"]:
        print(f"  {split.get('store', 'dense')} store, Q={split['queries']}: attribute {split['attribute_ms']:.1f} ms, readout kernels {split['readout_kernels_ms']:.1f} ms "
              f"(chunk {split['chunk_size']})")  # fmt: skip
        for op in split.get("top_ops", []):
            print(f"    {op['op']:36} {100 * op['share']:5.1f}%  {op['ms_per_call']:9.3f} ms per call")
    print(f"  storage bytes: {r['storage_bytes']}")
    print(f"  scores against the default readout: {r['scores_against_the_default']}", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=["digits-mlp"], choices=sorted(SETTINGS))
    p.add_argument("--store-dir", default="benchmarks/results/cache/readout", help="fits and stores, reused by a rerun")
    p.add_argument("--out", default="benchmarks/results/readout.json")
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--rounds", type=int, default=30, help="paired Q=1 rounds")
    p.add_argument("--batched-rounds", type=int, default=3, help="paired rounds scoring all queries at once")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--profile", action="store_true", help="record torch.profiler's top operators of the ensemble query")
    p.add_argument("--save-scores", default=None, help="folder: write each setting's scores of 20 queries there")
    p.add_argument("--label", default="default", help="names the library version measured (records are kept per setting and label)")
    p.add_argument("--factored", action="store_true", help="the same fit also writes a codec 'factored' store, read out beside the default")
    p.add_argument("--variants", choices=("queries", "default", "all"), default="all",
                   help="queries: the two default queries, TRAK-1 and the memory floor; default: and the layer readout (module docstring)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    kept = json.loads(out.read_text())["records"] if out.is_file() else []  # other settings' earlier records stay
    for name in args.settings:
        record = run_setting(name, args)
        record["command"] = " ".join(sys.argv)
        kept = [r for r in kept if (r["setting"], r.get("label", "default")) != (name, args.label)] + [record]
        atomic_write_json(out, {"records": kept}, sort_keys=False)
        print(f"written {out}", flush=True)


if __name__ == "__main__":
    main()
