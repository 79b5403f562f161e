"""Ground truth by retraining: many small models at once, subsets / leave-out, cached on disk.

The training recipe is plain minibatch SGD with momentum and weight decay (``torch.optim.SGD``'s
update, written functionally) on the mean cross-entropy of each batch, the same as
:class:`lightning_attr.models.Classifier` fitted by Lightning on a loader whose sampler is
:class:`FixedOrderSampler` with the same seed. Models are stacked with
``torch.func.stack_module_state`` and stepped together under ``torch.func.vmap``: every model in
one call keeps the same number of examples, so all of them see batches of the same shape.

Seeds: training seed ``s`` fixes both the initialization (``make_model(s)``) and the example order
(:func:`training_orders`: a permutation of ALL ``n`` training examples per epoch, from which a model
trained on a subset keeps its members in the same relative order). A leave-out retrain with seed
``s`` therefore sees the same batches as the full-data run with seed ``s``, minus one example.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.func import functional_call, grad, stack_module_state, vmap
from torch.nn import functional as F
from torch.utils.data import Sampler

from lightning_attr._io import atomic_save_tensors, atomic_write_json

ModelFactory = Callable[[int], nn.Module]


@dataclass(frozen=True)
class TrainingRecipe:
    """Recipe of the fit that the retrains stand in for (defaults: the digits benchmark).

    ``optimizer="sgd"``: ``torch.optim.SGD(lr, momentum, weight_decay)``; ``"adam"``:
    ``torch.optim.Adam(lr, betas=(0.9, 0.999), eps=1e-8, weight_decay)`` (``momentum`` unused).
    """

    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-3
    optimizer: str = "sgd"

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}.")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs} and {self.batch_size}.")
        if self.lr <= 0 or not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise ValueError(f"need lr > 0, 0 <= momentum < 1, weight_decay >= 0; got {self}.")


def training_orders(n: int, epochs: int, seed: int) -> Tensor:
    """``Tensor[epochs, n]`` int64: the example order of each epoch for training seed ``seed``."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.stack([torch.randperm(n, generator=gen) for _ in range(epochs)])


class FixedOrderSampler(Sampler[int]):
    """Yields :func:`training_orders` epoch by epoch, so a Lightning fit replays a harness seed.

    Lightning re-iterates the sampler each epoch; the sampler counts epochs itself and raises if
    asked for more than it was built for.
    """

    def __init__(self, n: int, epochs: int, seed: int) -> None:
        self.orders = training_orders(n, epochs, seed)
        self.epoch = 0

    def __len__(self) -> int:
        return self.orders.shape[1]

    def __iter__(self) -> Iterator[int]:
        if self.epoch >= len(self.orders):
            raise RuntimeError(f"FixedOrderSampler was built for {len(self.orders)} epochs; a further epoch was requested.")
        order = self.orders[self.epoch]
        self.epoch += 1
        return iter(order.tolist())


def _kept_orders(masks: Tensor, seeds: Tensor, epochs: int) -> Tensor:
    """``Tensor[M, epochs, k]``: each model's epoch orders restricted to its kept examples."""
    n = masks.shape[1]
    out = []
    for mask, seed in zip(masks, seeds.tolist()):
        orders = training_orders(n, epochs, seed)
        out.append(torch.stack([o[mask[o]] for o in orders]))
    return torch.stack(out)


def train_many(
    make_model: ModelFactory,
    x: Tensor,
    y: Tensor,
    masks: Tensor,
    seeds: Tensor,
    recipe: TrainingRecipe = TrainingRecipe(),
    chunk_size: int = 128,
) -> dict[str, Tensor]:
    """Train one model per row of ``masks`` at once (vmap over stacked parameters).

    Args:
        make_model: ``seed -> nn.Module`` with freshly initialized parameters (deterministic in seed).
            Parameters only: buffers are not updated (no BatchNorm) and the model must be deterministic.
        x, y: the full training set, ``Tensor[n, ...]`` inputs and ``Tensor[n]`` class labels.
        masks: ``Tensor[M, n]`` bool, the examples each model trains on; every row keeps the same count.
        seeds: ``Tensor[M]`` int, each model's training seed (initialization and order).
        recipe: the SGD recipe.
        chunk_size: models stepped together at most (bounds memory).

    Returns:
        ``{name: Tensor[M, *shape]}`` the trained parameters, stacked.
    """
    masks = masks.bool().cpu()
    if masks.dim() != 2 or masks.shape[1] != len(x) or len(y) != len(x):
        raise ValueError(f"masks must be Tensor[M, n={len(x)}] and y Tensor[n]; got {tuple(masks.shape)}, {tuple(y.shape)}.")
    if seeds.shape != (masks.shape[0],):
        raise ValueError(f"seeds must be Tensor[M={masks.shape[0]}], got {tuple(seeds.shape)}.")
    counts = masks.sum(1)
    if (counts != counts[0]).any() or int(counts[0]) == 0:
        raise ValueError(
            f"every model in one train_many call must keep the same, non-zero number of examples; got counts {counts.unique().tolist()}. "
            "Group the masks by count (RetrainingHarness does)."
        )
    results: list[dict[str, Tensor]] = []
    for start in range(0, len(masks), chunk_size):
        results.append(_train_chunk(make_model, x, y, masks[start : start + chunk_size], seeds[start : start + chunk_size], recipe))
    return {name: torch.cat([r[name] for r in results]) for name in results[0]}


def _train_chunk(make_model: ModelFactory, x: Tensor, y: Tensor, masks: Tensor, seeds: Tensor, recipe: TrainingRecipe) -> dict[str, Tensor]:
    models = [make_model(int(s)) for s in seeds.tolist()]
    params, buffers = stack_module_state(models)
    names = [n for n, p in models[0].named_parameters() if p.requires_grad]
    params = {n: params[n].detach().clone() for n in names}
    base = copy.deepcopy(models[0]).to("meta")

    def loss_fn(p: dict[str, Tensor], b: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(base, (p, b), (xb,)), yb)

    grad_fn = vmap(grad(loss_fn), in_dims=(0, 0, 0, 0))
    orders = _kept_orders(masks, seeds, recipe.epochs)  # [M, epochs, k]
    k = orders.shape[2]
    momentum_buf: dict[str, Tensor] | None = None
    adam = _Adam(params, recipe) if recipe.optimizer == "adam" else None
    with torch.no_grad():
        for epoch in range(recipe.epochs):
            for start in range(0, k, recipe.batch_size):
                idx = orders[:, epoch, start : start + recipe.batch_size]  # [M, B]
                with torch.enable_grad():
                    grads = grad_fn(params, buffers, x[idx], y[idx])
                if adam is not None:
                    params = adam.step(params, grads)
                    continue
                # torch.optim.SGD (dampening 0, no nesterov): d = g + wd p; buf = mu buf + d (buf = d first); p -= lr buf
                d = {n: grads[n] + recipe.weight_decay * params[n] for n in names}
                if momentum_buf is None:
                    momentum_buf = {n: d[n].clone() for n in names}
                else:
                    for n in names:
                        momentum_buf[n].mul_(recipe.momentum).add_(d[n])
                step = momentum_buf if recipe.momentum > 0 else d
                params = {n: params[n] - recipe.lr * step[n] for n in names}
    return {n: params[n].detach().clone() for n in names}


class _Adam:
    """``torch.optim.Adam``'s update (no amsgrad, L2 weight decay added to the gradient), written functionally."""

    def __init__(self, params: dict[str, Tensor], recipe: TrainingRecipe, betas=(0.9, 0.999), eps: float = 1e-8) -> None:
        self.recipe, self.betas, self.eps, self.t = recipe, betas, eps, 0
        self.m = {n: torch.zeros_like(p) for n, p in params.items()}
        self.v = {n: torch.zeros_like(p) for n, p in params.items()}

    def step(self, params: dict[str, Tensor], grads: dict[str, Tensor]) -> dict[str, Tensor]:
        (b1, b2), lr, wd = self.betas, self.recipe.lr, self.recipe.weight_decay
        self.t += 1
        correction1, correction2 = 1 - b1**self.t, 1 - b2**self.t
        out = {}
        for n, p in params.items():
            g = grads[n] + wd * p if wd else grads[n]
            self.m[n].lerp_(g, 1 - b1)
            self.v[n].mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (self.v[n].sqrt() / correction2**0.5).add_(self.eps)
            out[n] = p.addcdiv(self.m[n], denom, value=-lr / correction1)
        return out


def measure_loss(make_model: ModelFactory, params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    """Per-example cross-entropy of each stacked model on ``(x, y)``: ``Tensor[M, Q]``."""
    model = make_model(0)
    base = copy.deepcopy(model).to("meta")
    buffers = {n: b for n, b in model.named_buffers()}

    def losses(p: dict[str, Tensor]) -> Tensor:
        return F.cross_entropy(functional_call(base, (p, buffers), (x,)), y, reduction="none")

    with torch.no_grad():
        return vmap(losses)(params)


# ---------------------------------------------------------------------------------------------------
# the cache: one safetensors file of tensors + one JSON of settings per ground truth, keyed by settings


def tensor_digest(*tensors: Tensor) -> str:
    """SHA-256 of the tensors' shapes, dtypes and bytes (cache keys)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class GroundTruth:
    """Retraining results.

    Attributes:
        kind: ``"subsets"`` (LDS) or ``"leave_out"`` (LOO / leave-one-source-out).
        masks: ``Tensor[M, S]`` bool over SOURCES: for ``"subsets"`` the kept sources of each subset;
            for ``"leave_out"`` row ``k`` removes exactly the source ``removed[k]``.
        values: ``"subsets"``: ``Tensor[M, Q]`` query measurement per subset, averaged over seeds;
            ``"leave_out"``: ``Tensor[K, Q]`` measurement without the source minus with it, same seed,
            averaged over seeds.
        per_seed: ``Tensor[n_seeds, M, Q]`` the same before averaging.
        removed: ``Tensor[K]`` left-out source ids (``"leave_out"`` only, else empty).
        settings: JSON-able description (the cache key is its hash).
        train_seconds: wall time of the retraining that produced it (0 if it was not timed here).
    """

    kind: str
    masks: Tensor
    values: Tensor
    per_seed: Tensor
    removed: Tensor
    settings: dict
    train_seconds: float


class RetrainingHarness:
    """Retrain a model factory on subsets / leave-outs of a training set; cache the measurements.

    Args:
        make_model: ``seed -> nn.Module`` freshly initialized (e.g. ``lambda s: (torch.manual_seed(s), mlp(64, [64], 10))[1]``).
        model_key: a string that identifies the architecture in the cache key (e.g. ``"mlp-64-64-10"``).
        x_train, y_train: the training set; ``x_query, y_query``: the queries measured (their loss).
        source_ids: ``Tensor[n]`` example -> source id in ``[0, S)``; None = one source per example.
        recipe: the SGD recipe of the fit the retrains stand in for.
        cache_dir: where results are kept (None = no cache). A rerun with equal settings loads them.
        chunk_size: models trained at once.
    """

    def __init__(
        self,
        make_model: ModelFactory,
        model_key: str,
        x_train: Tensor,
        y_train: Tensor,
        x_query: Tensor,
        y_query: Tensor,
        source_ids: Tensor | None = None,
        recipe: TrainingRecipe = TrainingRecipe(),
        cache_dir: str | os.PathLike | None = None,
        chunk_size: int = 128,
    ) -> None:
        n = len(x_train)
        if source_ids is None:
            source_ids = torch.arange(n)
        source_ids = torch.as_tensor(source_ids).long().cpu()
        if source_ids.shape != (n,) or source_ids.min() < 0:
            raise ValueError(f"source_ids must be Tensor[n={n}] of ids >= 0, got shape {tuple(source_ids.shape)}.")
        self.n_sources = int(source_ids.max()) + 1
        if len(source_ids.unique()) != self.n_sources:
            raise ValueError(f"source ids must cover 0..{self.n_sources - 1} without gaps.")
        self.make_model, self.model_key = make_model, model_key
        self.x_train, self.y_train, self.x_query, self.y_query = x_train, y_train, x_query, y_query
        self.source_ids, self.recipe = source_ids, recipe
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.chunk_size = chunk_size
        self._data_digest = tensor_digest(x_train, y_train, x_query, y_query, source_ids)

    # -- public
    def subsets(self, n_subsets: int = 100, alpha: float = 0.5, n_seeds: int = 1, seed: int = 0) -> GroundTruth:
        """LDS ground truth: ``n_subsets`` random subsets of ``round(alpha * S)`` sources.

        Subset ``m`` is drawn with ``numpy.random.default_rng(seed + m)`` and trained with seeds
        ``1000 + seed + m * n_seeds + j`` (distinct from the leave-out seeds ``0..``), as dattri's
        ``retrain_lds`` does.
        """
        import numpy as np

        if not 0 < alpha < 1 or n_subsets < 2 or n_seeds < 1:
            raise ValueError(f"need 0 < alpha < 1, n_subsets >= 2, n_seeds >= 1; got {alpha}, {n_subsets}, {n_seeds}.")
        size = round(alpha * self.n_sources)
        if not 0 < size < self.n_sources:
            raise ValueError(f"alpha={alpha} keeps {size} of {self.n_sources} sources; need between 1 and S-1.")
        masks = torch.zeros(n_subsets, self.n_sources, dtype=torch.bool)
        for m in range(n_subsets):
            masks[m, torch.as_tensor(np.random.default_rng(seed + m).choice(self.n_sources, size, replace=False))] = True
        train_seeds = torch.tensor([[1000 + seed + m * n_seeds + j for m in range(n_subsets)] for j in range(n_seeds)])
        settings = {"kind": "subsets", "n_subsets": n_subsets, "alpha": alpha, "n_seeds": n_seeds, "seed": seed}
        return self._run("subsets", masks, train_seeds, torch.zeros(0, dtype=torch.long), settings)

    def leave_out(self, sources: Tensor | list[int], n_seeds: int = 3) -> GroundTruth:
        """Leave-one-source-out ground truth for ``sources``, seeds ``0..n_seeds-1`` held fixed.

        For each seed the full-data model and each leave-out model share initialization and order;
        the value is (measurement without the source) - (measurement with it), averaged over seeds.
        """
        removed = torch.as_tensor(sources).long().cpu().reshape(-1)
        if len(removed) == 0 or removed.min() < 0 or removed.max() >= self.n_sources or len(removed.unique()) != len(removed):
            raise ValueError(f"sources must be distinct ids in [0, {self.n_sources}), got {removed.tolist()[:10]}...")
        if n_seeds < 1:
            raise ValueError(f"n_seeds must be >= 1, got {n_seeds}.")
        masks = torch.ones(len(removed), self.n_sources, dtype=torch.bool)
        masks[torch.arange(len(removed)), removed] = False
        settings = {"kind": "leave_out", "removed_digest": tensor_digest(removed), "n_seeds": n_seeds}
        train_seeds = torch.arange(n_seeds).unsqueeze(1).expand(n_seeds, len(removed))
        return self._run("leave_out", masks, train_seeds, removed, settings)

    def full(self, seeds: list[int]) -> dict[str, Tensor]:
        """Parameters of full-data models for ``seeds`` (e.g. a TRAK ensemble), stacked ``Tensor[len(seeds), ...]``."""
        masks = torch.ones(len(seeds), len(self.x_train), dtype=torch.bool)
        return train_many(self.make_model, self.x_train, self.y_train, masks, torch.as_tensor(seeds), self.recipe, self.chunk_size)

    # -- internals
    def _key_settings(self, settings: dict) -> dict:
        return {
            **settings,
            "model": self.model_key,
            # SGD recipes keep the cache keys they had before the optimizer field existed
            "recipe": {k: v for k, v in asdict(self.recipe).items() if (k, v) != ("optimizer", "sgd")},
            "data": self._data_digest,
            "measurement": "cross_entropy",
            "format": 1,
        }

    def _run(self, kind: str, masks: Tensor, train_seeds: Tensor, removed: Tensor, settings: dict) -> GroundTruth:
        full_settings = self._key_settings(settings)
        key = hashlib.sha256(json.dumps(full_settings, sort_keys=True).encode()).hexdigest()[:20]
        cached = self._load(kind, key, full_settings)
        if cached is not None:
            return cached
        start = time.perf_counter()
        example_masks = masks[:, self.source_ids]  # [M, n]
        per_seed = []
        for seeds_j in train_seeds:
            measured = self._measure(example_masks, seeds_j)
            if kind == "leave_out":
                full_mask = torch.ones(1, len(self.x_train), dtype=torch.bool)
                # every leave-out row of seed j shares that seed; the full run is trained once per seed
                base = self._measure(full_mask, seeds_j[:1])
                measured = measured - base
            per_seed.append(measured)
        per_seed_t = torch.stack(per_seed)
        gt = GroundTruth(kind, masks, per_seed_t.mean(0), per_seed_t, removed, full_settings, time.perf_counter() - start)
        self._save(kind, key, gt)
        return gt

    def _measure(self, example_masks: Tensor, seeds: Tensor) -> Tensor:
        """Train every row (grouped by kept count) and return the query losses ``Tensor[M, Q]``."""
        out = torch.empty(len(example_masks), len(self.x_query))
        counts = example_masks.sum(1)
        for count in counts.unique().tolist():
            rows = (counts == count).nonzero().squeeze(1)
            params = train_many(self.make_model, self.x_train, self.y_train, example_masks[rows], seeds[rows], self.recipe, self.chunk_size)
            out[rows] = measure_loss(self.make_model, params, self.x_query, self.y_query)
        return out

    def _paths(self, kind: str, key: str) -> tuple[Path, Path]:
        assert self.cache_dir is not None
        return self.cache_dir / f"{kind}-{key}.safetensors", self.cache_dir / f"{kind}-{key}.json"

    def _load(self, kind: str, key: str, settings: dict) -> GroundTruth | None:
        if self.cache_dir is None:
            return None
        tensors_path, meta_path = self._paths(kind, key)
        if not (tensors_path.exists() and meta_path.exists()):
            return None
        meta = json.loads(meta_path.read_text())
        if meta.get("settings") != json.loads(json.dumps(settings)):
            raise RuntimeError(f"cache entry {meta_path} has settings that do not match its key; delete it and rerun.")
        t = load_file(str(tensors_path))
        return GroundTruth(kind, t["masks"].bool(), t["values"], t["per_seed"], t["removed"], meta["settings"], float(meta["train_seconds"]))

    def _save(self, kind: str, key: str, gt: GroundTruth) -> None:
        if self.cache_dir is None:
            return
        tensors_path, meta_path = self._paths(kind, key)
        tensors = {
            "masks": gt.masks.to(torch.uint8).contiguous(),
            "values": gt.values.contiguous(),
            "per_seed": gt.per_seed.contiguous(),
            "removed": gt.removed.contiguous(),
        }
        atomic_save_tensors(tensors_path, tensors)
        # the JSON is written last: an entry counts as present only when both files exist
        atomic_write_json(meta_path, {"settings": gt.settings, "train_seconds": gt.train_seconds, "torch": torch.__version__})
