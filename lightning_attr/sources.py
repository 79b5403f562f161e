"""Which training source each example belongs to, and how the source index travels with a batch."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

SourceSpec = Union[None, Tensor, Sequence[Any], Callable[[Tensor], Any]]


class IndexedDataset(Dataset):
    """Wraps a map-style dataset so that item ``i`` carries its example index ``i``.

    The index is how :class:`~lightning_attr.AttributionCallback` knows which training examples are in a
    batch. A tuple item ``(x, y)`` becomes ``(x, y, i)``, a dict item ``{"x": ..}`` becomes
    ``{"x": .., index_key: i}``, any other item ``x`` becomes ``(x, i)``. A ``Subset`` of it (e.g. from
    ``random_split``) keeps the indices of this dataset.

    Args:
        dataset: map-style dataset with ``__len__``.
        index_key: the key of the index in dict items (the callback's ``index_key``).
    """

    def __init__(self, dataset: Dataset, index_key: str = "index") -> None:
        if not hasattr(dataset, "__len__"):
            raise TypeError("IndexedDataset needs a map-style dataset with __len__ and __getitem__.")
        self.dataset = dataset
        self.index_key = index_key

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        if isinstance(item, Mapping):
            if self.index_key in item:
                raise KeyError(
                    f"Dataset items already hold the key {self.index_key!r}; pass IndexedDataset(dataset, "
                    "index_key=...) and AttributionCallback(index_key=...) with a free key."
                )
            return {**item, self.index_key: index}
        if isinstance(item, (tuple, list)):
            return (*item, index)
        return (item, index)


def indexed_base(dataset: Any) -> tuple[IndexedDataset, Tensor] | None:
    """``(IndexedDataset, LongTensor[m] indices into it)`` when ``dataset`` is an :class:`IndexedDataset` or a
    (nested) ``Subset`` of one, as ``random_split`` makes; else ``None``. Batches of it carry indices into
    the base dataset, so the training set is the base dataset's ``m`` selected examples."""
    indices = None
    while isinstance(dataset, Subset):
        picked = torch.as_tensor(list(dataset.indices), dtype=torch.long)
        indices = picked if indices is None else picked[indices]
        dataset = dataset.dataset
    if not isinstance(dataset, IndexedDataset):
        return None
    return dataset, torch.arange(len(dataset)) if indices is None else indices


def split_batch(batch: Any, index_key: str = "index") -> tuple[Any, Tensor]:
    """A training batch -> ``(data, index)`` where ``index: LongTensor[B]`` are example indices.

    ``(*data, index)`` gives ``data`` as a tuple (a lone dict ``(dict, index)`` gives the dict); a dict
    batch gives the dict without ``index_key``. ``data`` is the batch as ``attribution_outputs`` receives it,
    in training and at query time alike.

    Raises:
        ValueError: no 1-D integer tensor of per-example indices where the index should be.
    """
    hint = (
        "AttributionCallback needs each training batch to carry the example indices: wrap the training "
        "dataset as IndexedDataset(dataset) so that items are (*item, index), or {**item, index_key: index} "
        "for dict items."
    )
    if isinstance(batch, Mapping):
        if index_key not in batch:
            raise ValueError(
                f"The training batch is a dict with keys {sorted(batch)} and no {index_key!r} key for the example "
                f"indices. {hint} If the index is under another key, pass index_key=."
            )
        index, where = batch[index_key], f"batch[{index_key!r}]"
        data: Any = {k: v for k, v in batch.items() if k != index_key}
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        index, where = batch[-1], "The last element of the training batch"
        data = tuple(batch[:-1])
        if len(data) == 1 and isinstance(data[0], Mapping):
            data = data[0]
    else:
        raise ValueError(f"Training batch is a {type(batch).__name__}, not a tuple (*data, index) or a dict. {hint}")
    if not isinstance(index, Tensor) or index.dim() != 1 or index.is_floating_point() or index.is_complex():
        found = f"Tensor{list(index.shape)} of {index.dtype}" if isinstance(index, Tensor) else type(index).__name__
        raise ValueError(f"{where} is {found}, not a 1-D integer index tensor. {hint}")
    return data, index.long()


@dataclass(frozen=True)
class SourceMap:
    """Maps the ``n`` examples that batch indices address to ``S`` sources.

    Attributes:
        example_to_source: ``LongTensor[n]`` with values in ``[0, S)``, or ``-1`` for an example outside the
            training set (the rest of a dataset whose ``Subset`` is trained on).
        source_ids: the user's id of each source, ``len == S`` (ints or strings).
    """

    example_to_source: Tensor
    source_ids: tuple

    @property
    def num_sources(self) -> int:
        return len(self.source_ids)

    @property
    def num_examples(self) -> int:
        """``n``: the range of example indices (the training set, or the dataset a subset of it was drawn from)."""
        return int(self.example_to_source.numel())

    @property
    def training_set_size(self) -> int:
        """The number of training examples (the ``n`` of the ``1/n`` in a response)."""
        return int(self.in_training_set.sum())

    @property
    def in_training_set(self) -> Tensor:
        """``BoolTensor[n]``: the examples that belong to a source."""
        return self.example_to_source >= 0

    @property
    def is_per_example(self) -> bool:
        return self.num_sources == self.num_examples and bool(
            torch.equal(self.example_to_source, torch.arange(self.num_examples))
        )

    def sizes(self) -> Tensor:
        """``LongTensor[S]``: examples per source."""
        return torch.bincount(self.example_to_source[self.in_training_set], minlength=self.num_sources)

    @classmethod
    def build(cls, sources: SourceSpec, num_examples: int, members: Tensor | None = None) -> SourceMap:
        """From the callback's ``sources`` argument.

        Args:
            sources: ``None`` (one source per example, its id the example index); a ``Tensor[n]`` or sequence
                of ``n`` ids (ints or strings) giving each example's source; or a callable
                ``ids = f(LongTensor[n] example indices)``.
            num_examples: ``n``, the range of example indices.
            members: ``LongTensor[m]``, the examples in the training set when it is a subset of the ``n``
                (``random_split``); the others belong to no source. ``None``: all ``n``.
        """
        inside = torch.ones(num_examples, dtype=torch.bool)
        if members is not None:
            inside = torch.zeros(num_examples, dtype=torch.bool)
            inside[members] = True
        if sources is None:
            ids: list = list(range(num_examples))
        else:
            ids = sources(torch.arange(num_examples)) if callable(sources) else sources
            if isinstance(ids, Tensor):
                if ids.is_floating_point():
                    raise ValueError(f"sources must hold integer or string ids, got a {ids.dtype} tensor.")
                ids = ids.reshape(-1).tolist()
            ids = list(ids)
            if len(ids) != num_examples:
                raise ValueError(
                    f"sources gives {len(ids)} ids but the example indices are [0, {num_examples}): pass one source "
                    "id per training example, by index (or a callable of the example indices)."
                )
        kept = [sid for sid, keep in zip(ids, inside.tolist()) if keep]
        try:
            unique = sorted(set(kept))
        except TypeError as err:
            raise ValueError("source ids must be all ints or all strings (they are sorted).") from err
        position = {sid: s for s, sid in enumerate(unique)}
        mapping = torch.tensor(
            [position[sid] if keep else -1 for sid, keep in zip(ids, inside.tolist())], dtype=torch.long
        )
        return cls(mapping, tuple(unique))
