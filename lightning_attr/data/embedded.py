"""Small datasets that ship with installed packages, as standardized float tensors.

Nothing here touches the network: sklearn's ``load_digits`` reads a file inside sklearn, and
``mnist1d.data.make_dataset`` generates MNIST-1D procedurally (its ``get_dataset`` downloads and is
never called).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class TensorSplit:
    """A train/test split of a classification dataset.

    Attributes:
        x_train: ``Tensor[n_train, *input_shape]`` float32, standardized with train statistics.
        y_train: ``Tensor[n_train]`` int64 class labels.
        x_test: ``Tensor[n_test, *input_shape]`` float32.
        y_test: ``Tensor[n_test]`` int64.
        num_classes: number of classes.
        name: dataset name.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    name: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def _standardize(x_train: np.ndarray, x_test: np.ndarray) -> tuple[Tensor, Tensor]:
    mean = x_train.mean(axis=0, keepdims=True)
    std = x_train.std(axis=0, keepdims=True) + 1e-6
    as_tensor = lambda a: torch.as_tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    return as_tensor(x_train), as_tensor(x_test)


def load_digits(n_train: int = 1400, seed: int = 0) -> TensorSplit:
    """sklearn's 8x8 digits (1,797 images), flattened to 64 features.

    Args:
        n_train: examples in the train split; the remaining ``1797 - n_train`` form the test split.
        seed: seed of the random permutation that splits the data.
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    data = _sk_load_digits()
    x, y = data.data.astype(np.float32), data.target.astype(np.int64)
    if not 0 < n_train < len(x):
        raise ValueError(f"n_train must be in (0, {len(x)}), got {n_train}.")
    perm = np.random.default_rng(seed).permutation(len(x))
    tr, te = perm[:n_train], perm[n_train:]
    x_train, x_test = _standardize(x[tr], x[te])
    return TensorSplit(x_train, torch.as_tensor(y[tr]), x_test, torch.as_tensor(y[te]), 10, "digits")


def load_mnist1d(n_train: int = 4000, n_test: int = 1000, seed: int = 42) -> TensorSplit:
    """MNIST-1D (40-sample 1D signals, 10 classes), generated offline by ``mnist1d.make_dataset``.

    Args:
        n_train: examples in the train split (taken from the generator's 4,000 train signals).
        n_test: examples in the test split (from its 1,000 test signals).
        seed: the generator's seed (``42`` is the published dataset).
    """
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed
    data = make_dataset(args)
    if n_train > len(data["x"]) or n_test > len(data["x_test"]):
        raise ValueError(
            f"MNIST-1D has {len(data['x'])} train / {len(data['x_test'])} test signals; "
            f"asked for {n_train} / {n_test}."
        )
    x_train, x_test = _standardize(
        data["x"][:n_train].astype(np.float32), data["x_test"][:n_test].astype(np.float32)
    )
    y_train = torch.as_tensor(data["y"][:n_train], dtype=torch.int64)
    y_test = torch.as_tensor(data["y_test"][:n_test], dtype=torch.int64)
    return TensorSplit(x_train, y_train, x_test, y_test, 10, "mnist1d")
