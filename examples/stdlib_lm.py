"""Which standard-library modules taught a small language model this continuation?

A byte-level causal transformer (stock ``nn.TransformerEncoder`` with a causal mask) is trained on
windows of text read from the running Python's standard-library sources (offline on every machine).
Each module is one source: ``AttributionCallback(sources=...)`` gets each window's module name, so
the simulation propagates one response per module. Queries are held-out continuations: a line of code
from the part of a module that no training window covers, scored by the model's loss on that line
given the text before it. ``attribute()`` then says, for each continuation, how much its loss would
rise if each module were removed from training.

Checks (asserted): the module a continuation was held out from is among the top 10 of the modules
for at least a quarter of the continuations (chance: 10 / n_modules), and its mean rank beats
chance. Writes ``stdlib_lm/attributions.json`` (every continuation's top modules and scores) and
``stdlib_lm/top_modules.png``.

    python examples/stdlib_lm.py --fast      # 2 min of CPU time (make examples runs it; wall time: see README)
    python examples/stdlib_lm.py             # the larger setting of benchmarks/stdlib_lm.py
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_attr import AttributionCallback, IndexedDataset, ResponseStore
from lightning_attr.app.io import atomic_write, write_json
from lightning_attr.data.stdlib_text import VOCAB_SIZE, StdlibText, load_stdlib_text
from lightning_attr.models import CausalLM


@dataclass(frozen=True)
class Setting:
    """Data, model and training recipe of one run (``--fast`` or the full one)."""

    n_modules: int
    windows_per_module: int
    context: int
    dim: int
    depth: int
    epochs: int
    batch_size: int = 16
    heads: int = 4
    lr: float = 0.1
    horizon: int = 20

    def data(self) -> StdlibText:
        return load_stdlib_text(self.n_modules, self.windows_per_module, self.context, queries_per_module=1)

    def model(self) -> CausalLM:
        return CausalLM(VOCAB_SIZE, self.context, dim=self.dim, heads=self.heads, depth=self.depth, ff=2 * self.dim, lr=self.lr)

    def callback(self, dirpath: str | Path, text: StdlibText) -> AttributionCallback:
        """One source per module (ids: module names), simulated after the fit (``mode="end"``: each module is
        propagated ``horizon`` steps, ``n_modules x horizon`` curvature products; online, a module stays live
        from its first window in the last epoch to its last plus ``horizon`` steps); curvature batches of one
        training batch, since each window already holds ``context`` predictions: the heavy-ball step rule
        (``propagation="spectral"``, end mode's default, would find its eigenspace over every window). One
        checkpoint (``checkpoint_epochs=None``): the trajectory ensemble of the default triples the simulation,
        and issue 8 bounds it at 3x the plain fit here."""
        modules = [text.modules[m] for m in text.module_of_window.tolist()]
        return AttributionCallback(
            dirpath, sources=modules, mode="end", propagation="heavy_ball", horizon=self.horizon,
            curvature_batch_size=self.batch_size, checkpoint_epochs=None, overwrite=True,
        )

    def fit(self, text: StdlibText, callbacks: list, seed: int = 0, sampler=None) -> tuple[CausalLM, float]:
        """Train with ``callbacks``; returns the model and the fit's wall time in seconds. ``sampler`` replaces
        the shuffled order (leave-out retrains use :class:`lightning_attr.evaluation.FixedOrderSampler`)."""
        L.seed_everything(seed, verbose=False)
        model = self.model()
        data = IndexedDataset(TensorDataset(text.x_train, text.y_train))
        loader = DataLoader(data, batch_size=self.batch_size, shuffle=sampler is None, sampler=sampler)
        trainer = L.Trainer(max_epochs=self.epochs, callbacks=callbacks, logger=False, enable_checkpointing=False,
                            enable_model_summary=False, enable_progress_bar=False)
        start = time.perf_counter()
        trainer.fit(model, loader)
        return model, time.perf_counter() - start


SETTINGS = {
    "fast": Setting(n_modules=120, windows_per_module=24, context=48, dim=48, depth=2, epochs=12),
    "full": Setting(n_modules=120, windows_per_module=32, context=64, dim=64, depth=2, epochs=10),
}


def in_module_order(scores: torch.Tensor, source_ids: list, modules: list[str]) -> torch.Tensor:
    """``scores: Tensor[Q, S]`` (columns in the store's source order) with columns in the order of ``modules``."""
    position = {sid: j for j, sid in enumerate(source_ids)}
    return scores[:, [position[m] for m in modules]]


def own_module_ranks(scores: torch.Tensor, module_of_query: torch.Tensor) -> torch.Tensor:
    """``LongTensor[Q]`` 1-based rank of each query's own module among all modules (NaN scores rank last)."""
    finite = scores.nan_to_num(float("-inf"))
    own = finite.gather(1, module_of_query.unsqueeze(1))
    return (finite > own).sum(1) + 1


def _figure(path: Path, text: StdlibText, scores: torch.Tensor, queries: list[int], top: int = 8) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(queries), 1, figsize=(8, 2.1 * len(queries)))
    for ax, q in zip(axes, queries):
        order = scores[q].nan_to_num(float("-inf")).argsort(descending=True)[:top].tolist()
        own = int(text.module_of_query[q])
        ax.barh(range(len(order)), [float(scores[q, j]) for j in order],
                color=["#1b7837" if j == own else "#92c5de" for j in order])
        ax.set_yticks(range(len(order)), [text.modules[j] for j in order], fontsize=7)
        ax.invert_yaxis()
        _, continuation = text.continuation(q)
        rank = int(own_module_ranks(scores[q : q + 1], text.module_of_query[q : q + 1]))
        ax.set_title(f"{continuation.strip()!r}  (held out from {text.modules[own]}: rank {rank}, dark when shown)", fontsize=8)
    axes[-1].set_xlabel("score: predicted rise of the continuation's loss (nats/byte) if the module were removed", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="the small setting (2 min of CPU time; make examples runs it)")
    parser.add_argument("--out", default="stdlib_lm", help="folder for the responses, attributions.json and the figure")
    args = parser.parse_args()
    setting = SETTINGS["fast" if args.fast else "full"]
    out = Path(args.out)
    text = setting.data()
    print(f"{len(text.modules)} modules, {len(text.x_train)} training windows of {setting.context} bytes, "
          f"{len(text.x_query)} held-out continuations")

    callback = setting.callback(out / "responses", text)
    model, fit_s = setting.fit(text, [callback])
    start = time.perf_counter()
    scores = model.attribute((text.x_query, text.y_query), responses=callback.dirpath)  # [Q, S]
    attribute_s = time.perf_counter() - start
    scores = in_module_order(scores, ResponseStore.load(callback.dirpath).source_ids, text.modules)
    ranks = own_module_ranks(scores, text.module_of_query)

    rows = []
    for q in range(len(scores)):
        context, continuation = text.continuation(q)
        order = scores[q].nan_to_num(float("-inf")).argsort(descending=True)[:5].tolist()
        rows.append({"query": q, "held_out_from": text.modules[int(text.module_of_query[q])],
                     "context_tail": context[-60:], "continuation": continuation, "own_module_rank": int(ranks[q]),
                     "top_modules": [{"module": text.modules[j], "score": float(scores[q, j])} for j in order]})
    for row in rows[:: max(1, len(rows) // 6)][:6]:
        print(f"\n... {row['context_tail'][-40:]!r}\n  -> {row['continuation']!r}   (held out from {row['held_out_from']}, "
              f"its rank {row['own_module_rank']})")
        for top in row["top_modules"]:
            print(f"     {top['module']:<24s} {top['score']:+.3e}")

    n_modules = len(text.modules)
    in_top10 = float((ranks <= 10).float().mean())
    summary = {"setting": asdict(setting), "n_queries": len(scores), "fit_s": fit_s, "attribute_s": attribute_s,
               "own_module_in_top10": in_top10, "own_module_top1": float((ranks == 1).float().mean()),
               "own_module_mean_rank": float(ranks.float().mean()), "chance_top10": 10 / n_modules,
               "chance_mean_rank": (n_modules + 1) / 2, "rows": rows}
    write_json(out / "attributions.json", summary)
    _figure(out / "top_modules.png", text, scores, [row["query"] for row in rows[:: max(1, len(rows) // 4)][:4]])
    print(f"\nown module in the top 10 of {n_modules}: {in_top10:.0%} of {len(scores)} continuations "
          f"(chance {10 / n_modules:.0%}); top 1: {summary['own_module_top1']:.0%}; mean rank "
          f"{summary['own_module_mean_rank']:.1f} (chance {(n_modules + 1) / 2:.1f})")
    print(f"fit with the callback {fit_s:.1f} s, attribution of {len(scores)} continuations {attribute_s:.1f} s; "
          f"wrote {out / 'attributions.json'} and {out / 'top_modules.png'}")
    assert in_top10 >= 0.25, f"own module in the top 10 for only {in_top10:.0%} of continuations"
    assert summary["own_module_mean_rank"] < (n_modules + 1) / 2, "own module ranks no better than chance"


if __name__ == "__main__":
    main()
