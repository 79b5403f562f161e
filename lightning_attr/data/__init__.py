"""Embedded datasets (no download): sklearn digits, MNIST-1D, MNIST from files already on disk, and the
running Python's standard-library sources as byte-level text."""

from lightning_attr.data.embedded import TensorSplit, load_digits, load_mnist1d
from lightning_attr.data.disk import load_mnist
from lightning_attr.data.corruption import backdoor_group, flip_labels, stamp_trigger
from lightning_attr.data.datamodule import ClassificationDataModule
from lightning_attr.data.groupings import ByColumn, PerExample
from lightning_attr.data.stdlib_text import StdlibText, StdlibTextDataModule, load_stdlib_text

__all__ = [
    "ByColumn",
    "ClassificationDataModule",
    "PerExample",
    "StdlibText",
    "StdlibTextDataModule",
    "TensorSplit",
    "backdoor_group",
    "flip_labels",
    "load_digits",
    "load_mnist",
    "load_mnist1d",
    "load_stdlib_text",
    "stamp_trigger",
]
