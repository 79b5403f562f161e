"""MNIST read from files already on disk (torchvision's layout); nothing is downloaded.

torchvision's ``datasets.MNIST(root, download=True)`` leaves ``<root>/MNIST/raw/`` holding the four
IDX files below (optionally gzipped). This reader parses them with numpy, so torchvision is not a
dependency, and raises a clear error when they are missing.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from lightning_attr.data.embedded import TensorSplit

MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {data[:4]!r}); is it a real MNIST file?")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {body.size} bytes; the file is truncated.")
    return body.reshape(shape)


def _find(root: Path, stem: str) -> Path | None:
    for folder in (root / "MNIST" / "raw", root / "raw", root):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def load_mnist(root: str | Path, n_train: int | None = None, n_test: int | None = None) -> TensorSplit:
    """MNIST from the IDX files torchvision downloads, flattened to ``[784]`` and standardized.

    Args:
        root: the folder passed to ``torchvision.datasets.MNIST(root=...)``; the files are looked up in
            ``root/MNIST/raw``, ``root/raw`` and ``root`` (plain or ``.gz``).
        n_train: first ``n_train`` training images (all 60,000 when ``None``).
        n_test: first ``n_test`` test images (all 10,000 when ``None``).

    Raises:
        FileNotFoundError: when a file is missing, with the paths searched and how to get them.
    """
    root = Path(root).expanduser()
    found = {key: _find(root, stem) for key, stem in MNIST_FILES.items()}
    missing = [MNIST_FILES[k] for k, p in found.items() if p is None]
    if missing:
        raise FileNotFoundError(
            f"MNIST files not found under {root} (searched {root}/MNIST/raw, {root}/raw, {root}): missing "
            f"{', '.join(missing)} (plain or .gz). lightning_attr never downloads; fetch them once with "
            f"`python -c \"import torchvision; torchvision.datasets.MNIST('{root}', download=True)\"` on a machine "
            f"with network access, or set data.root to where they already are, or use data=digits / data=mnist1d."
        )
    arrays = {key: _read_idx(path) for key, path in found.items()}
    x_train = arrays["x_train"][:n_train].reshape(-1, 28 * 28).astype(np.float32) / 255.0
    x_test = arrays["x_test"][:n_test].reshape(-1, 28 * 28).astype(np.float32) / 255.0
    mean, std = float(x_train.mean()), float(x_train.std()) + 1e-6  # one scalar: blank border pixels stay blank
    return TensorSplit(
        torch.as_tensor((x_train - mean) / std),
        torch.as_tensor(arrays["y_train"][:n_train].astype(np.int64)),
        torch.as_tensor((x_test - mean) / std),
        torch.as_tensor(arrays["y_test"][:n_test].astype(np.int64)),
        10,
        "mnist",
    )
