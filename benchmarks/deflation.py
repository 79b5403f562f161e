"""How many eigenpairs ``propagation="spectral"`` needs: the deflated inverse against the exact target.

    python benchmarks/deflation.py --settings digits-mlp digits01-mlp digits-cnn-adam mnist1d-cnn1d \
        --cache-dir /work/cache/bench --out benchmarks/results/deflation.json

Per setting, on the bench's attributed model and its cached explicit full-data GGN ``G`` (``bench.py``'s
cache; settings without one are skipped), with the EXACT eigenpairs of ``G`` (``torch.linalg.eigh``), at
``lam = s trace(G)/P`` for each ``s`` of ``--scales`` and each ``k`` of ``--ranks``:

- ``deflated``: :class:`lightning_attr.deflated.DeflatedInverse` (top-k exact, ``1/(mu + lam)`` outside,
  ``mu`` the mean eigenvalue left there), as the callback computes it;
- ``dropped``: the top-k part alone (codec ``"eigen"``'s damped inverse: 0 outside the eigenspace);

each as Pearson to the exact target ``(1/n) grad f_q^T (G + lam)^{-1} grad l_b`` and LDS on the bench's
ground truth, with ``sigma_k / lam``. Isolates the eigenspace truncation from the eigenpairs' accuracy
(which ``top_eigenspace`` adds) and from the callback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from damping import EXACT_SCALES, DampingStudy, _pearson  # noqa: E402

from lightning_attr._io import atomic_write_json  # noqa: E402
from lightning_attr.deflated import DeflatedInverse  # noqa: E402
from lightning_attr.spectral import Eigenspace  # noqa: E402


def measure(name: str, cache_dir: str, scales: list[float], ranks: list[int]) -> dict | None:
    study = DampingStudy(name, argparse.Namespace(cache_dir=cache_dir, build_ggn=False, exact_scales=EXACT_SCALES), {})
    bench = study.bench
    if not study.has_exact:
        print(f"[{name}] no cached explicit GGN: skipped (bench.py builds it)", flush=True)
        return None
    ggn = bench.explicit_ggn().double()
    exact = bench._exact
    g_query = exact.gradients(bench.x_rep, bench.y_rep).double()  # [Q, P]
    g_train = exact.gradients(bench.data.x_train, bench.data.y_train).double()  # [n, P]
    n, dim = g_train.shape
    sigma, vectors = torch.linalg.eigh(ggn)
    sigma, vectors = sigma.flip(0).clamp_min(0), vectors.flip(1).T.contiguous()  # descending, rows
    trace = float(ggn.diagonal().sum())
    q_coords, t_coords = g_query @ vectors.T, g_train @ vectors.T
    record = {"P": dim, "n": n, "mean_eigenvalue": trace / dim, "by_scale": {}}
    for scale in scales:
        lam = scale * trace / dim
        target = (q_coords / (sigma + lam)) @ t_coords.T / n
        row = {"damping": lam, "exact_lds": study.lds(target.float()), "by_rank": {}}
        for k in ranks:
            space = Eigenspace(sigma[:k].float(), vectors[:k].float(), products=0)
            inverse = DeflatedInverse.from_trace(space, lam, trace, dim)
            deflated = g_query.float() @ inverse.apply(g_train.float()).T / n
            dropped = (q_coords[:, :k] / (sigma[:k] + lam)) @ t_coords[:, :k].T / n
            row["by_rank"][str(k)] = {
                "sigma_k_over_damping": round(inverse.complement_ratio, 3),
                "complement_over_damping": round(inverse.complement / lam, 4),
                "deflated": {"pearson": round(_pearson(deflated, target), 4), "lds": study.lds(deflated)},
                "dropped": {"pearson": round(_pearson(dropped, target), 4), "lds": study.lds(dropped.float())},
            }  # fmt: skip
        print(f"[{name}] scale {scale}: {json.dumps(row)}", flush=True)
        record["by_scale"][str(scale)] = row
    return record


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=["digits-mlp", "digits01-mlp", "digits-cnn-adam", "mnist1d-cnn1d"])
    p.add_argument("--cache-dir", required=True)
    p.add_argument("--scales", nargs="+", type=float, default=[1.0, 3.0, 10.0])
    p.add_argument("--ranks", nargs="+", type=int, default=[32, 64, 128, 256, 512])
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "deflation.json"))
    args = p.parse_args(argv)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    for name in args.settings:
        if name in results:
            continue
        record = measure(name, args.cache_dir, args.scales, args.ranks)
        if record is not None:
            results[name] = record
            atomic_write_json(out, results)


if __name__ == "__main__":
    main()
