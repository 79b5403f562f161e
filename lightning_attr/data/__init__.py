"""Embedded datasets (no download): sklearn digits, MNIST-1D, and MNIST from files already on disk."""

from lightning_attr.data.embedded import TensorSplit, load_digits, load_mnist1d
from lightning_attr.data.disk import load_mnist
from lightning_attr.data.corruption import backdoor_group, flip_labels, stamp_trigger
from lightning_attr.data.datamodule import ClassificationDataModule
from lightning_attr.data.groupings import ByColumn, PerExample

__all__ = [
    "ByColumn",
    "ClassificationDataModule",
    "PerExample",
    "TensorSplit",
    "backdoor_group",
    "flip_labels",
    "load_digits",
    "load_mnist",
    "load_mnist1d",
    "stamp_trigger",
]
