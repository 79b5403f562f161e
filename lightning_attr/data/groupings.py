"""How training examples are grouped into sources, as Hydra-instantiable objects.

A grouping is called with the set-up datamodule and returns what
:class:`lightning_attr.AttributionCallback` takes as ``sources``: ``None`` (one source per example)
or a list with one source id per training example (examples sharing an id form one source).
"""

from __future__ import annotations

from typing import Protocol

from lightning_attr.data.datamodule import ClassificationDataModule


class Grouping(Protocol):
    def __call__(self, datamodule: ClassificationDataModule) -> list[str] | None: ...


class PerExample:
    """Every training example is its own source (``sources=None``)."""

    def __call__(self, datamodule: ClassificationDataModule) -> None:
        return None

    def __repr__(self) -> str:
        return "PerExample()"


class ByColumn:
    """One source per distinct value of a metadata column (``label``, ``true_label``, ``group``, ``module``, ...).

    A datamodule with ``column_names[column]`` (a list: value -> name) gives named ids (``module`` of
    :class:`lightning_attr.data.StdlibTextDataModule`: the module's name).

    Args:
        column: the column of ``datamodule.metadata``.
        prefix: source ids are ``f"{prefix}{value}"`` (default ``f"{column}="``), so they read well in
            the report (``group=3``, ``label=7``); ``""`` for the bare value or name.
    """

    def __init__(self, column: str = "group", prefix: str | None = None) -> None:
        self.column = column
        self.prefix = f"{column}=" if prefix is None else prefix

    def __call__(self, datamodule: ClassificationDataModule) -> list[str]:
        if datamodule.split is None:
            datamodule.setup("fit")
        if self.column not in datamodule.metadata:
            hint = " (set data.n_groups to create random groups)" if self.column == "group" else ""
            raise ValueError(
                f"sources grouped by column {self.column!r}, but the datamodule has columns "
                f"{sorted(datamodule.metadata)}{hint}."
            )
        names = getattr(datamodule, "column_names", {}).get(self.column)  # value -> name, where the data has names
        values = datamodule.metadata[self.column].tolist()
        return [f"{self.prefix}{names[int(v)] if names is not None else int(v)}" for v in values]

    def __repr__(self) -> str:
        return f"ByColumn(column={self.column!r})"
