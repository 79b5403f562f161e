"""Which training source each example belongs to, and how the source index travels with a batch."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor
from torch.utils.data import Dataset

SourceSpec = Union[None, Tensor, Sequence[Any], Callable[[Tensor], Any]]


class IndexedDataset(Dataset):
    """Wraps a map-style dataset so that item ``i`` is ``(*dataset[i], i)``.

    The trailing index is how :class:`~lightning_attr.AttributionCallback` knows which training
    examples are in a batch. A non-tuple item ``x`` becomes ``(x, i)``.
    """

    def __init__(self, dataset: Dataset) -> None:
        if not hasattr(dataset, "__len__"):
            raise TypeError("IndexedDataset needs a map-style dataset with __len__ and __getitem__.")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple:
        item = self.dataset[index]
        if isinstance(item, (tuple, list)):
            return (*item, index)
        return (item, index)


def split_batch(batch: Any) -> tuple[tuple, Tensor]:
    """``(*data, index)`` -> ``(data, index)`` where ``index: LongTensor[B]`` are example indices.

    Raises:
        ValueError: the batch does not end with a 1-D integer tensor of per-example indices.
    """
    hint = (
        "AttributionCallback needs each training batch to end with the example indices: wrap the "
        "training dataset as IndexedDataset(dataset) so that items are (*item, index)."
    )
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise ValueError(f"Training batch is a {type(batch).__name__}, not a tuple (*data, index). {hint}")
    index = batch[-1]
    if not isinstance(index, Tensor) or index.dim() != 1 or index.is_floating_point() or index.is_complex():
        found = f"Tensor{list(index.shape)} of {index.dtype}" if isinstance(index, Tensor) else type(index).__name__
        raise ValueError(f"The last element of the training batch is {found}, not a 1-D integer index tensor. {hint}")
    return tuple(batch[:-1]), index.long()


@dataclass(frozen=True)
class SourceMap:
    """Maps the ``n`` training examples to ``S`` sources.

    Attributes:
        example_to_source: ``LongTensor[n]`` with values in ``[0, S)``.
        source_ids: the user's id of each source, ``len == S`` (ints or strings).
    """

    example_to_source: Tensor
    source_ids: tuple

    @property
    def num_sources(self) -> int:
        return len(self.source_ids)

    @property
    def num_examples(self) -> int:
        return int(self.example_to_source.numel())

    @property
    def is_per_example(self) -> bool:
        return self.num_sources == self.num_examples and bool(
            torch.equal(self.example_to_source, torch.arange(self.num_examples))
        )

    def sizes(self) -> Tensor:
        """``LongTensor[S]``: examples per source."""
        return torch.bincount(self.example_to_source, minlength=self.num_sources)

    @classmethod
    def build(cls, sources: SourceSpec, num_examples: int) -> SourceMap:
        """From the callback's ``sources`` argument.

        Args:
            sources: ``None`` (one source per example); a ``Tensor[n]`` or sequence of ``n`` ids (ints or
                strings) giving each example's source; or a callable ``ids = f(LongTensor[n] example indices)``.
            num_examples: ``n``, the size of the training set.
        """
        if sources is None:
            return cls(torch.arange(num_examples), tuple(range(num_examples)))
        ids = sources(torch.arange(num_examples)) if callable(sources) else sources
        if isinstance(ids, Tensor):
            if ids.is_floating_point():
                raise ValueError(f"sources must hold integer or string ids, got a {ids.dtype} tensor.")
            ids = ids.reshape(-1).tolist()
        ids = list(ids)
        if len(ids) != num_examples:
            raise ValueError(
                f"sources gives {len(ids)} ids but the training set has {num_examples} examples: "
                "pass one source id per training example (or a callable of the example indices)."
            )
        try:
            unique = sorted(set(ids))
        except TypeError as err:
            raise ValueError("source ids must be all ints or all strings (they are sorted).") from err
        position = {sid: s for s, sid in enumerate(unique)}
        mapping = torch.tensor([position[sid] for sid in ids], dtype=torch.long)
        return cls(mapping, tuple(unique))
