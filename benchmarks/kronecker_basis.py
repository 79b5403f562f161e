"""Issue 8's Kronecker route, measured: k coordinates per source in an EK-FAC eigenbasis, against dense responses.

    OMP_NUM_THREADS=1 python benchmarks/kronecker_basis.py --settings digits-mlp mnist1d-mlp digits01-mlp \\
        --cache-dir /work/cache/bench --store-dir /work/cache/readout-stores \\
        --out benchmarks/results/kronecker-basis.json

Per setting (the bench's attributed model, its reported queries and 100 half-data retrains, ``--cache-dir``) and per
member of the default trajectory ensemble (the dense store that ``benchmarks/readout.py`` fits and keeps under
``--store-dir``, one fit of the callback's defaults: checkpoints after 10% and 20% of the epochs and the final one,
each with its parameters; a store that is missing is fitted there; its final parameters must equal the bench model's):

- the Kronecker-factored eigenbasis of each Linear layer at the member's parameters over the whole training set
  (:func:`lightning_attr.kronecker.fit_basis`: K-FAC factors of the cross-entropy GGN, their eigenvectors, and the
  eigenvalues ``--eigenvalues``: ``ekfac`` the GGN's diagonal in the basis, ``ekfac-empirical`` the second moments of
  the per-example loss gradients' coordinates, ``kfac`` K-FAC's products);
- every source's loss gradient and every query's in that basis, ``k`` coordinates kept by a mask shared by all sources
  (``--masks``: ``eigenvalue``, the largest EK-FAC eigenvalues over all layers; ``weight``, the largest ``m_ij /
  (lambda_ij + damping)`` with ``m_ij`` the training gradients' second moment: the coordinates that move the scores
  most), scored at the member's damping (the store's, the project's rule) by ``--scorers``: ``ekfac`` / ``kfac`` /
  ``ekfac-empirical``, ``(1/n) sum_j c_qj c_sj / (lambda_j + damping)`` with those eigenvalues (``ekfac-empirical``:
  ``m_ij``, the empirical Fisher's diagonal); ``projected``, ``(1/n) c_q (D G D^T + damping)^-1 c_s`` with ``D`` the
  mask's ``k`` basis vectors and ``D G D^T`` the exact GGN within them (:func:`~lightning_attr.kronecker.projected_ggn`:
  ``k`` forward-mode tangents over the training set, kept up to ``--projected-max-k``; a store would keep each source's
  ``(D G D^T + damping)^-1 c_s``, ``k`` numbers, so a query costs the same as the others);
- against, at the same model: the exact damped-GGN target (the final member; the bench's cached explicit GGN), the dense
  default's responses of that member (``g_q . r_s``), and the LDS of all three; for the ensemble, the members combined as
  ``attribute()`` combines them (:func:`~lightning_attr.attributor.ensemble_mean`).

Cost model per query (multiply-adds, members summed; nothing timed): forward-mode passes for each layer's output
derivative ``J`` (the layer-bases readout's output tangents: ``out_l`` tangents through the layers after ``l``, plus
one forward pass), the rotation ``Q_G^T J`` and ``Q_A^T x'`` restricted to the basis vectors the mask uses, ``k``
products, and ``k S`` for the scores; TRAK-1: a forward and backward pass (``3 P``), the ``512 x P`` projection and
``512 S`` for the scores. Storage: ``k`` float32 per source per member, plus per member the basis vectors the mask
uses and ``2k`` numbers (eigenvalues and indices); TRAK-1: 512 float32 per source. ``k`` runs over ``--ks`` (per
member) and the storage-parity point (the largest ``k`` whose store fits TRAK-1's bytes, one member and the ensemble).
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

from bench import CODE_COMMIT  # noqa: E402
from heldout import SettingRun  # noqa: E402
from readout import fitted  # noqa: E402

from lightning_attr import ResponseStore  # noqa: E402
from lightning_attr._io import atomic_write_json, atomic_write_text  # noqa: E402
from lightning_attr.attributor import ensemble_mean  # noqa: E402
from lightning_attr.evaluation.exact import ExactInfluence  # noqa: E402
from lightning_attr.kronecker import KroneckerBasis, fit_basis, kronecker_scores, loss_factors, projected_ggn, subspace_scores  # noqa: E402
from lightning_attr.parameters import ParameterSpace  # noqa: E402
from lightning_attr.spectral import top_eigenspace  # noqa: E402

TRAK_DIM = 512  # TRAK-1's projection: floats per source, and per parameter at query time
LDS_MARGIN = 0.01  # issue 8: the compressed default's LDS within this of the dense responses'
_DETAILED = {("projected", "eigenvalue"), ("ekfac", "eigenvalue"), ("eigen", "eigenvalue")}  # variants whose every k the .md lists (all: the JSON)
SCORERS = ("projected", "ekfac", "ekfac-empirical", "kfac", "eigen")
MASKS = ("eigenvalue", "weight")


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1]), 4)


class Member:
    """One checkpoint of the dense store at its own parameters: its basis, coordinates and dense scores."""

    def __init__(self, run: SettingRun, store: ResponseStore, name: str) -> None:
        b = run.bench
        self.name = name
        self.damping = float(store.checkpoint_info(name)["step_rule"]["damping"])
        net = b.make(0)
        torch.nn.utils.vector_to_parameters(store.theta(name), net.parameters())
        self.net = net.eval().double()
        x, y = b.data.x_train.double(), b.data.y_train
        t = time.perf_counter()
        self.basis: KroneckerBasis = fit_basis(self.net, x)
        self.basis_s = round(time.perf_counter() - t, 2)
        self.sources = self.basis.coordinates(loss_factors(self.net, x, y)).float()  # [n, P]
        self.queries = self.basis.coordinates(loss_factors(self.net, b.x_rep.double(), b.y_rep)).float()  # [Q, P]
        exact = ExactInfluence(self.net, x, y)
        self.g_query = exact.gradients(b.x_rep, b.y_rep).float()  # [Q, P], parameter order
        self.dense = self.g_query @ store.responses(name).T  # [Q, S]: the linear readout of the dense responses
        self._exact = exact
        self.n = len(x)
        self.moments = self.sources.double().square().mean(dim=0)  # [P]: the loss gradients' second moments
        self._projected: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # mask rule -> (its largest mask, D G D^T there)
        self.projected_s: dict[str, float] = {}
        self.x = x

    def eigenvalues(self, kind: str) -> torch.Tensor:
        """``Tensor[P]``: the eigenvalues of ``kind`` (``projected`` ranks its directions by EK-FAC's)."""
        return self.moments if kind == "ekfac-empirical" else self.basis.eigenvalues(corrected=kind != "kfac")

    def prepare_projected(self, k: int, rule: str) -> None:
        """The GGN within the ``k`` directions of ``rule``'s mask (``k`` tangents over the training set), kept: the masks
        of every smaller ``k`` are inside it (one ranking)."""
        if rule in self._projected and len(self._projected[rule][0]) >= k:
            return
        mask = self.mask(k, "projected", rule)
        t = time.perf_counter()
        curvature = projected_ggn(self.net, self.x, self.basis.directions(mask, ParameterSpace.of(self.net)), chunk_size=max(1, 2**22 // (k * 128)))
        self.projected_s[rule] = round(time.perf_counter() - t, 1)
        self._projected[rule] = mask, curvature.float()

    def mask(self, k: int, kind: str, rule: str) -> torch.Tensor:
        lam = self.eigenvalues(kind)
        weights = None if rule == "eigenvalue" else self.moments / (lam + self.damping)
        return self.basis.top_coordinates(k, lam if weights is None else weights)

    def scores(self, mask: torch.Tensor, kind: str, rule: str) -> torch.Tensor:
        if kind == "projected":
            largest, curvature = self._projected[rule]
            at = torch.searchsorted(largest, mask)
            if not torch.equal(largest[at.clamp_max(len(largest) - 1)], mask):
                raise RuntimeError("a projected mask outside the prepared one (masks of one ranking are nested)")
            return subspace_scores(self.queries[:, mask], self.sources[:, mask], curvature[at][:, at], self.damping, self.n)
        lam = self.eigenvalues(kind)[mask].float()
        return kronecker_scores(self.queries[:, mask], self.sources[:, mask], lam, self.damping, self.n)


def eigen_rows(run: SettingRun, member: Member, ks: list[int], peer: dict) -> list[dict]:
    """Codec ``"eigen"``'s directions at the same ``k`` (the reference the Kronecker directions are cheaper than): the
    top-``k`` eigenvectors ``V`` of the member's explicit GGN (the bench's cache; the finder the callback runs,
    :func:`~lightning_attr.spectral.top_eigenspace`, on it), scored ``(1/n) sum_j (V g_q)_j (V g_s)_j / (sigma_j +
    damping)`` (the codec's default filter, no complement). Storage ``k (P + S) + k`` numbers (the basis is ``k x P``),
    a query ``P + k P + k S`` multiply-adds (``k`` tangents along ``V``)."""
    b = run.bench
    ggn = b.explicit_ggn().float()
    n, dim = member.sources.shape
    space = top_eigenspace(lambda v: v @ ggn, dim, max(ks), generator=torch.Generator().manual_seed(0))
    del ggn
    g_train = member._exact.gradients(b.data.x_train, b.data.y_train).float()
    exact = b.exact_scores(member.damping)[0]
    rows = []
    for k in ks:
        v, sigma = space.vectors[:k], space.eigenvalues[:k]
        scores = kronecker_scores(member.g_query @ v.T, g_train @ v.T, sigma, member.damping, n)
        storage, macs = 4 * (k * (dim + n) + k), dim + k * dim + k * n
        lds, ci = run.lds(scores)
        rows.append({
            "scope": "final", "scorer": "eigen", "mask": "eigenvalue", "k": k, "k_total": k, "lds": lds, "lds_ci95": ci,
            "pearson_dense": _pearson(scores, member.dense), "pearson_exact": _pearson(scores, exact), "storage_bytes": storage,
            "storage_vs_trak1": round(storage / peer["storage_bytes"], 3), "macs_per_query": macs,
            "macs": {"passes": dim + k * dim, "rotation": 0, "scores": k * n}, "macs_vs_trak1": round(macs / peer["macs"], 3),
        })  # fmt: skip
        print(json.dumps({key: rows[-1][key] for key in ("scope", "scorer", "k", "lds", "pearson_dense", "pearson_exact", "storage_vs_trak1", "macs_vs_trak1")}), flush=True)
    return rows


def _layer_shapes(basis: KroneckerBasis) -> list[tuple[int, int]]:
    return [layer.shape for layer in basis.layers]


def storage_numbers(basis: KroneckerBasis, mask: torch.Tensor, sources: int) -> int:
    """Numbers a store of one member holds: ``k`` per source, the basis columns the mask uses, ``k`` eigenvalues and
    ``k`` indices."""
    k = len(mask)
    return k * sources + _basis_numbers(basis, mask) + 2 * k


def _basis_numbers(basis: KroneckerBasis, mask: torch.Tensor) -> int:
    """``sum_l out_l |I_l| + in'_l |J_l|``: the columns of ``Q_G`` and ``Q_A`` that the mask's coordinates ``(i, j)`` use."""
    total, start = 0, 0
    for out, width in _layer_shapes(basis):
        inside = mask[(mask >= start) & (mask < start + out * width)] - start
        total += out * len(torch.unique(inside // width)) + width * len(torch.unique(inside % width))
        start += out * width
    return total


def query_macs(basis: KroneckerBasis, mask: torch.Tensor, sources: int) -> dict[str, int]:
    """Multiply-adds per query of one member (module docstring): passes, rotation, scores."""
    shapes = _layer_shapes(basis)
    weights = [out * (width - 1) for out, width in shapes]  # a layer's matrix product (bias column left out)
    passes = sum(weights) + sum(out * sum(weights[m] for m in range(l + 1, len(shapes))) for l, (out, _) in enumerate(shapes))
    return {"passes": passes, "rotation": _basis_numbers(basis, mask) + len(mask), "scores": len(mask) * sources}


def trak1(num_parameters: int, sources: int) -> dict[str, int]:
    return {"storage_bytes": 4 * TRAK_DIM * sources, "macs": 3 * num_parameters + TRAK_DIM * (num_parameters + sources)}


def parity_k(members: list[Member], kind: str, rule: str, budget_bytes: int) -> int:
    """The largest ``k`` per member whose store of ``members`` holds at most ``budget_bytes`` (bisection on ``k``)."""
    low, high = 1, members[0].basis.num_coordinates
    sources = members[0].sources.shape[0]
    fits = lambda k: 4 * sum(storage_numbers(m.basis, m.mask(k, kind, rule), sources) for m in members) <= budget_bytes  # noqa: E731
    if not fits(low):
        return 0
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def measure(name: str, args: argparse.Namespace) -> dict:
    run = SettingRun(name, SimpleNamespace(cache_dir=args.cache_dir, slow_peers=[], slow_queries=0, single_repeats=1, batched_repeats=1,
                                           paired_rounds=0, build_ggn=False))  # fmt: skip
    b = run.bench
    _, path, _ = fitted(name, b.data, Path(args.store_dir))
    store = ResponseStore.load(path)
    final = torch.nn.utils.parameters_to_vector(b.model().parameters()).detach()
    if not torch.equal(store.theta(store.checkpoints[-1]), final):
        raise SystemExit(f"[{name}] {path}'s final parameters are not the bench model's: remove {path.parent} to refit it.")
    t = time.perf_counter()
    members = [Member(run, store, c) for c in store.checkpoints]
    print(f"[{name}] {len(members)} members' bases and coordinates in {time.perf_counter() - t:.0f}s", flush=True)
    last = members[-1]
    n, dim = last.sources.shape
    peer = trak1(dim, n)
    exact = b.exact_scores(last.damping)[0] if run.has_exact() else None
    head = {
        "setting": name, "P": dim, "n": n, "queries": len(last.queries), "members": [m.name for m in members],
        "damping": {m.name: m.damping for m in members}, "basis_s": {m.name: m.basis_s for m in members}, "trak1": peer,
        "dense": {"lds_final": run.lds(last.dense)[0], "lds_ensemble": run.lds(ensemble_mean([m.dense for m in members]))[0]},
        "commit": CODE_COMMIT, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }  # fmt: skip
    if exact is not None:
        head["exact"] = {"damping": last.damping, "lds": run.lds(exact)[0], "pearson_dense_final": _pearson(last.dense, exact)}
    print(json.dumps(head), flush=True)
    rows = []
    if "eigen" in args.scorers and exact is not None:
        parity = (peer["storage_bytes"] // 4) // (dim + n + 1)  # k (P + S) + k numbers within TRAK-1's bytes
        rows += eigen_rows(run, last, sorted({k for k in args.ks if k <= args.eigen_max_k} | {parity}), peer)
    for kind in (kind for kind in args.scorers if kind != "eigen"):
        for rule in args.masks:
            for scope, group in (("final", [last]), ("ensemble", members)):
                if scope == "ensemble" and (rule != args.masks[0] or kind not in args.ensemble_scorers):
                    continue  # the ensemble for the first mask rule and --ensemble-scorers only
                largest = args.projected_max_k if kind == "projected" else dim
                ks = sorted({k for k in args.ks if k <= min(dim, largest)} | {parity_k(group, kind, rule, peer["storage_bytes"])} - {0})
                if kind != "projected":
                    ks = sorted(set(ks) | {dim})
                for m in group if kind == "projected" else ():
                    m.prepare_projected(max(ks), rule)
                for k in ks:
                    rows.append(_row(run, group, kind, rule, scope, k, exact, peer))
                    print(json.dumps({key: rows[-1][key] for key in ("scope", "scorer", "mask", "k", "lds", "pearson_dense",
                                                                   "pearson_exact", "storage_vs_trak1", "macs_vs_trak1")}), flush=True)  # fmt: skip
    head["projected_s"] = {m.name: m.projected_s for m in members}
    return {**head, "rows": rows}


def _row(run: SettingRun, group: list[Member], kind: str, rule: str, scope: str, k: int, exact, peer: dict) -> dict:
    masks = [m.mask(k, kind, rule) for m in group]
    per_member = [m.scores(mask, kind, rule) for m, mask in zip(group, masks)]
    scores = per_member[0] if len(group) == 1 else ensemble_mean(per_member)
    dense = group[0].dense if len(group) == 1 else ensemble_mean([m.dense for m in group])
    n = group[0].sources.shape[0]
    storage = 4 * sum(storage_numbers(m.basis, mask, n) for m, mask in zip(group, masks))
    macs = [query_macs(m.basis, mask, n) for m, mask in zip(group, masks)]
    total = sum(sum(c.values()) for c in macs)
    lds, ci = run.lds(scores)
    row = {
        "scope": scope, "scorer": kind, "mask": rule, "k": k, "k_total": k * len(group), "lds": lds, "lds_ci95": ci,
        "pearson_dense": _pearson(scores, dense), "pearson_exact": None if exact is None else _pearson(per_member[-1], exact),
        "storage_bytes": storage, "storage_vs_trak1": round(storage / peer["storage_bytes"], 3),
        "macs_per_query": total, "macs": {key: sum(c[key] for c in macs) for key in macs[0]},
        "macs_vs_trak1": round(total / peer["macs"], 3),
    }  # fmt: skip
    return row


def _parity(rows: list[dict]) -> dict | None:
    """The row with the largest storage at most TRAK-1's (the storage-parity point), or None."""
    fitting = [row for row in rows if row["storage_vs_trak1"] <= 1.0]
    return max(fitting, key=lambda row: row["k"]) if fitting else None


def summary(results: list[dict]) -> list[str]:
    """Issue 8's test per setting, scope (final member / ensemble) and variant: LDS against dense at TRAK-1's storage,
    and the least storage at which the LDS comes within 0.01 of dense (among the ``k`` measured)."""
    lines = [
        "Issue 8's targets: LDS within 0.01 of the dense default's responses at storage <= TRAK-1's, batched cost <= 1/3 of "
        "TRAK-1's (here: multiply-adds per query, a model, not a timing).", "",
        "| setting | scope | scorer | mask | dense LDS | at TRAK-1's storage: k per member, LDS (− dense), multiply-adds x TRAK-1 "
        "| LDS within 0.01 of dense from: k per member (storage x TRAK-1) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    for r in results:
        for scope in ("final", "ensemble"):
            dense = r["dense"]["lds_final" if scope == "final" else "lds_ensemble"]
            variants = dict.fromkeys((row["scorer"], row["mask"]) for row in r["rows"] if row["scope"] == scope)
            for scorer, mask in variants:
                rows = sorted((row for row in r["rows"] if (row["scope"], row["scorer"], row["mask"]) == (scope, scorer, mask)), key=lambda row: row["k"])
                at = _parity(rows)
                close = next((row for row in rows if row["lds"] >= dense - LDS_MARGIN), None)
                parity = "–" if at is None else f"{at['k']:,}: {at['lds']:.3f} ({at['lds'] - dense:+.3f}), {at['macs_vs_trak1']:.2f}x"
                reached = f"not within the k measured (up to {rows[-1]['k']:,}: {rows[-1]['lds']:.3f})" if close is None else f"{close['k']:,} ({close['storage_vs_trak1']:.2f}x)"
                lines.append(f"| {r['setting']} | {scope} | {scorer} | {mask} | {dense:.3f} | {parity} | {reached} |")
    return lines + [""]


def markdown(results: list[dict]) -> str:
    lines = ["<!-- generated by benchmarks/kronecker_basis.py from kronecker-basis.json; do not edit -->", "", *summary(results)]
    for r in results:
        exact = r.get("exact") or {}
        lines += [
            f"### {r['setting']} (P = {r['P']:,}, {r['n']:,} sources, {r['queries']} queries, members {', '.join(r['members'])})", "",
            f"Dense default responses: LDS {r['dense']['lds_final']:.3f} (final member), {r['dense']['lds_ensemble']:.3f} (ensemble); "
            f"exact damped-GGN target at the final member's λ = {exact.get('damping', float('nan')):.3g}: LDS {exact.get('lds', float('nan')):.3f} "
            f"(dense's Pearson to it {exact.get('pearson_dense_final', float('nan')):.3f}). TRAK-1: {r['trak1']['storage_bytes'] / 1e6:.2f} MB, "
            f"{r['trak1']['macs'] / 1e6:.2f} M multiply-adds per query. Every k of the projected and EK-FAC scores (masks by "
            "eigenvalue); the other variants' rows are in the JSON.", "",
            "| scope | scorer | mask | k per member | LDS (95% CI) | LDS − dense | Pearson to dense | Pearson to exact (final) "
            "| storage MB (x TRAK-1) | M multiply-adds / query (x TRAK-1) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]  # fmt: skip
        for row in (row for row in r["rows"] if (row["scorer"], row["mask"]) in _DETAILED):
            dense = r["dense"]["lds_final" if row["scope"] == "final" else "lds_ensemble"]
            pe = "–" if row["pearson_exact"] is None else f"{row['pearson_exact']:.3f}"
            lines.append(
                f"| {row['scope']} | {row['scorer']} | {row['mask']} | {row['k']:,} | {row['lds']:.3f} ({row['lds_ci95'][0]:.3f}–{row['lds_ci95'][1]:.3f}) "
                f"| {row['lds'] - dense:+.3f} | {row['pearson_dense']:.3f} | {pe} | {row['storage_bytes'] / 1e6:.2f} ({row['storage_vs_trak1']:.2f}x) "
                f"| {row['macs_per_query'] / 1e6:.2f} ({row['macs_vs_trak1']:.2f}x) |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=["digits-mlp", "mnist1d-mlp", "digits01-mlp"])
    p.add_argument("--cache-dir", required=True, help="the bench's cache (model, ground truth, explicit GGN / exact targets)")
    p.add_argument("--store-dir", required=True, help="benchmarks/readout.py's stores (fitted there where missing)")
    p.add_argument("--ks", nargs="+", type=int, default=[64, 128, 256, 512, 1024, 2048, 4096])
    p.add_argument("--scorers", nargs="+", default=list(SCORERS), choices=SCORERS)
    p.add_argument("--ensemble-scorers", nargs="+", default=["projected", "ekfac"], choices=SCORERS, help="scorers also measured on the ensemble")
    p.add_argument("--projected-max-k", type=int, default=2048, help="largest k of the projected scorer (k tangents over the training set)")
    p.add_argument("--masks", nargs="+", default=list(MASKS), choices=MASKS)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "kronecker-basis.json"))
    p.add_argument("--eigen-max-k", type=int, default=512, help="largest k of the eigen reference (its finder's Rayleigh-Ritz grows as k^3)")
    p.add_argument("--report-only", action="store_true", help="rewrite the .md from --out's JSON")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.report_only:
        atomic_write_text(out.with_suffix(".md"), markdown(json.loads(out.read_text())))
        return
    results = [r for r in (json.loads(out.read_text()) if out.exists() else []) if r["setting"] not in args.settings]
    for name in args.settings:
        results.append(measure(name, args))
        atomic_write_json(out, results)
        atomic_write_text(out.with_suffix(".md"), markdown(results))


if __name__ == "__main__":
    main()
