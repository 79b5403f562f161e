"""A LightningDataModule over the embedded datasets, with the bookkeeping attribution needs.

Training batches are ``(x, y, index)`` (the index of the example in the training set, from
:class:`lightning_attr.IndexedDataset`); validation / query batches are ``(x, y)``. Per-example
metadata columns (``label``, ``true_label``, ``flipped``, ``group``, ``poisoned``) are kept in
:attr:`ClassificationDataModule.metadata` so sources can be grouped by any of them and corruptions
can be evaluated against the truth.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_attr.data.corruption import backdoor_group, flip_labels, stamp_trigger
from lightning_attr.data.disk import load_mnist
from lightning_attr.data.embedded import TensorSplit, load_digits, load_mnist1d

#: dataset name -> (loader, shape to draw an example with; None = a 1D signal)
DATASETS: dict[str, tuple[Any, tuple[int, ...] | None]] = {
    "mnist1d": (load_mnist1d, None),
    "digits": (load_digits, (8, 8)),
    "mnist": (load_mnist, (28, 28)),
}


class SplitDataModule(L.LightningDataModule):
    """What the app needs of a datamodule whose :meth:`setup` loads ``split`` (anything with ``x_train`` and
    ``y_train``): training batches ``(x, y, index)``, validation batches from :meth:`query_dataset` ``("test")``.

    Subclasses set ``batch_size``, ``eval_batch_size``, ``num_workers`` and ``split`` (``None`` until set up),
    and define ``query_dataset(kind)`` and ``display_queries(kind)``.
    """

    split: Any = None
    batch_size: int
    eval_batch_size: int
    num_workers: int

    def _require_setup(self):
        if self.split is None:
            raise RuntimeError("call datamodule.setup() first (the Trainer does it in fit).")
        return self.split

    @property
    def n_train(self) -> int:
        return len(self._require_setup().y_train)

    def train_dataset(self):
        from lightning_attr import IndexedDataset

        s = self._require_setup()
        return IndexedDataset(TensorDataset(s.x_train, s.y_train))

    def query_dataset(self, kind: str = "test") -> TensorDataset:
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_dataset(), batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.query_dataset("test"), batch_size=self.eval_batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


class ClassificationDataModule(SplitDataModule):
    """Train / query splits of ``mnist1d``, ``digits`` or ``mnist`` (from disk), optionally corrupted.

    Args:
        dataset: ``"mnist1d"``, ``"digits"`` or ``"mnist"``.
        input_shape: the shape one example must have (checked in :meth:`setup`; model configs read it).
        num_classes: the number of classes (checked in :meth:`setup`; model configs read it).
        loader_kwargs: passed to the loader (``n_train``, ``n_test``, ``seed``; ``root`` for mnist).
        batch_size: training batch size. eval_batch_size: validation / query batch size.
        num_workers: DataLoader workers.
        label_noise: fraction of training labels flipped to another class (``metadata["flipped"]``).
        noise_seed: seed of the label flips.
        n_groups: when set, every training example gets a random group in ``[0, n_groups)``
            (balanced: a seeded permutation modulo ``n_groups``), stored as ``metadata["group"]``.
        group_seed: seed of that assignment.
        poison: when set, ``{"group": g, "target": c, "size": 4, "value": 3.0}``: every example of
            group ``g`` gets a trigger (first ``size`` features set to ``value``) and label ``c``;
            needs ``n_groups``. :meth:`query_dataset` ``("triggered")`` gives the test split with the
            trigger stamped and labels set to ``c``.
    """

    def __init__(
        self,
        dataset: str = "mnist1d",
        input_shape: Sequence[int] = (40,),
        num_classes: int = 10,
        loader_kwargs: Mapping[str, Any] | None = None,
        batch_size: int = 64,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        label_noise: float = 0.0,
        noise_seed: int = 0,
        n_groups: int | None = None,
        group_seed: int = 0,
        poison: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(DATASETS)}.")
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError(f"batch sizes must be >= 1, got batch_size={batch_size}, eval_batch_size={eval_batch_size}.")
        if n_groups is not None and n_groups < 1:
            raise ValueError(f"n_groups must be >= 1 or null, got {n_groups}.")
        if poison is not None:
            unknown = set(poison) - {"group", "target", "size", "value"}
            if unknown or "group" not in poison or "target" not in poison:
                raise ValueError(
                    f"poison must be {{group, target[, size, value]}}, got keys {sorted(poison)}."
                )
            if n_groups is None:
                raise ValueError("poison needs n_groups (the poisoned examples are one group of a random grouping).")
            if not 0 <= int(poison["group"]) < n_groups:
                raise ValueError(f"poison.group must be in [0, {n_groups}), got {poison['group']}.")
        self.dataset = dataset
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = int(num_classes)
        self.loader_kwargs = dict(loader_kwargs or {})
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.label_noise, self.noise_seed = float(label_noise), noise_seed
        self.n_groups, self.group_seed = n_groups, group_seed
        self.poison = dict(poison) if poison is not None else None
        self.display_shape = DATASETS[dataset][1]
        self.split: TensorSplit | None = None
        self.metadata: dict[str, Tensor] = {}
        #: inputs as a person should see them (raw pixels for digits), ``[n_train, ...]`` / ``[n_test, ...]``
        self.display_train: Tensor | None = None
        self.display_test: Tensor | None = None

    # ------------------------------------------------------------------ data
    def setup(self, stage: str | None = None) -> None:
        if self.split is not None:
            return
        loader = DATASETS[self.dataset][0]
        split = loader(**self.loader_kwargs)
        if split.input_shape != self.input_shape:
            raise ValueError(
                f"data.input_shape is {list(self.input_shape)} but {self.dataset} examples have shape "
                f"{list(split.input_shape)}; fix data.input_shape (model configs read it)."
            )
        if split.num_classes != self.num_classes:
            raise ValueError(f"data.num_classes is {self.num_classes} but {self.dataset} has {split.num_classes} classes.")
        n = len(split.y_train)
        x, y = split.x_train, split.y_train
        display_train, display_test = _display_inputs(self.dataset, self.loader_kwargs, split)
        meta: dict[str, Tensor] = {"true_label": y.clone()}
        if self.n_groups is not None:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.group_seed))
            group = torch.empty(n, dtype=torch.int64)
            group[perm] = torch.arange(n) % self.n_groups
            meta["group"] = group
            if self.poison is not None:
                x, y, meta["poisoned"] = backdoor_group(
                    x, y, group, int(self.poison["group"]), int(self.poison["target"]),
                    int(self.poison.get("size", 4)), float(self.poison.get("value", 3.0)),
                )
                size, high = int(self.poison.get("size", 4)), float(display_train.max())
                display_train = display_train.clone()
                display_train[meta["poisoned"]] = stamp_trigger(display_train[meta["poisoned"]], size, high)
        y, meta["flipped"] = flip_labels(y, self.label_noise, self.num_classes, self.noise_seed)
        meta["label"] = y
        self.split = TensorSplit(x, y, split.x_test, split.y_test, split.num_classes, split.name)
        self.metadata = meta
        self.display_train, self.display_test = display_train, display_test

    def display_queries(self, kind: str = "test") -> Tensor:
        """Inputs of :meth:`query_dataset` ``(kind)`` as a person should see them."""
        self._require_setup()
        if kind == "train":
            return self.display_train
        if kind == "triggered":
            size = int(self.poison.get("size", 4)) if self.poison else 1
            return stamp_trigger(self.display_test, size, float(self.display_train.max()))
        return self.display_test

    def query_dataset(self, kind: str = "test") -> TensorDataset:
        """Queries: ``"test"`` (the test split), ``"train"`` (training examples, without index) or
        ``"triggered"`` (test split with the poison trigger, labelled with the poison target)."""
        s = self._require_setup()
        if kind == "test":
            return TensorDataset(s.x_test, s.y_test)
        if kind == "train":
            return TensorDataset(s.x_train, s.y_train)
        if kind == "triggered":
            if self.poison is None:
                raise ValueError("query kind 'triggered' needs a poisoned datamodule (data.poison is null).")
            x = stamp_trigger(s.x_test, int(self.poison.get("size", 4)), float(self.poison.get("value", 3.0)))
            return TensorDataset(x, torch.full_like(s.y_test, int(self.poison["target"])))
        raise ValueError(f"unknown query kind {kind!r}; expected 'test', 'train' or 'triggered'.")


def _display_inputs(dataset: str, loader_kwargs: Mapping[str, Any], split: TensorSplit) -> tuple[Tensor, Tensor]:
    """Raw pixel values for digits (per-pixel standardization makes images hard to read).

    The raw split is rebuilt with the loader's own permutation and checked against the standardized
    split; on any mismatch (or for other datasets) the model's inputs themselves are displayed.
    """
    if dataset == "digits":
        import inspect

        import numpy as np
        from sklearn.datasets import load_digits as sk_load_digits

        defaults = {k: p.default for k, p in inspect.signature(load_digits).parameters.items()}
        kw = {**defaults, **loader_kwargs}
        raw = sk_load_digits().data.astype(np.float32)
        perm = np.random.default_rng(kw["seed"]).permutation(len(raw))
        tr, te = raw[perm[: kw["n_train"]]], raw[perm[kw["n_train"] :]]
        mean, std = tr.mean(axis=0, keepdims=True), tr.std(axis=0, keepdims=True) + 1e-6
        if tr.shape == tuple(split.x_train.shape) and np.allclose((tr - mean) / std, split.x_train.numpy(), atol=1e-4):
            return torch.as_tensor(tr), torch.as_tensor(te)
    return split.x_train, split.x_test
