"""The common shape of a peer method: set up once on a trained model, then score queries.

Every adapter returns scores in this package's convention: ``Tensor[Q, n_train]``, the predicted
rise of each query's measurement if the training example were removed (positive = proponent).
Per-source scores of a peer are the sums of its per-example scores over each source's examples
(:func:`sum_over_sources`).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor, nn


def require(module: str, extra: str = "bench") -> Any:
    """Import an optional peer package, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"this peer needs the optional package {module!r}, which is not importable ({err}). "
            f"Install the [{extra}] extra: `pip install -e '.[{extra}]'` (kronfluence with `pip install --no-deps kronfluence`, "
            "see the Makefile's bench target)."
        ) from err


def sum_over_sources(scores: Tensor, source_ids: Tensor, n_sources: int | None = None) -> Tensor:
    """``Tensor[Q, n]`` per-example scores -> ``Tensor[Q, S]`` per-source sums."""
    source_ids = source_ids.long().to(scores.device)
    if scores.dim() != 2 or source_ids.shape != (scores.shape[1],):
        raise ValueError(f"expected scores Tensor[Q, n] and source_ids Tensor[n]; got {tuple(scores.shape)}, {tuple(source_ids.shape)}.")
    s = int(source_ids.max()) + 1 if n_sources is None else n_sources
    out = torch.zeros(scores.shape[0], s, dtype=scores.dtype, device=scores.device)
    return out.index_add_(1, source_ids, scores)


class Peer(ABC):
    """A peer attribution method run through its own package.

    Attributes:
        name: short label used in tables (e.g. ``"TRAK-10 (dattri)"``).
        config: JSON-able settings that reproduce the run (written next to the results).
    """

    name: str
    config: dict

    @abstractmethod
    def setup(self, models: list[nn.Module], x_train: Tensor, y_train: Tensor) -> None:
        """All per-model work before the first query (gradients, projections, factors...).

        ``models[0]`` is the attributed model; further entries are extra independently trained
        models, used only by ensemble methods (``n_models`` says how many a method wants).
        """

    @abstractmethod
    def score(self, x_query: Tensor, y_query: Tensor) -> Tensor:
        """``Tensor[Q, n_train]`` scores of the queries against every training example."""

    _n_models: int = 1

    @property
    def n_models(self) -> int:
        return self._n_models

    def _ensemble(self, models: list[nn.Module]) -> list[nn.Module]:
        """The first ``n_models`` models; an error if fewer were trained."""
        if len(models) < self.n_models:
            raise ValueError(f"{self.name} needs {self.n_models} trained models, got {len(models)}.")
        return models[: self.n_models]

    def storage_bytes(self) -> int:
        """Bytes kept between setup and queries (features, factors); 0 for methods that recompute all per query."""
        return 0


def dir_bytes(path) -> int:
    """Total size of the files under ``path``."""
    from pathlib import Path

    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
