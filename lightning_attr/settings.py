"""AttributionSettings: every option of :class:`AttributionCallback`, with its default, in one dataclass.

One place for the options: the callback's constructor takes exactly these (same names, same defaults), the
Hydra group ``conf/callbacks/attribution.yaml`` lists them with the same defaults, a store's manifest records
:meth:`AttributionSettings.to_manifest`, and README's options table has one row per option with its default;
``tests/test_settings.py`` checks all four against this class. The simulation engine reads them (no Lightning
here). Invalid values raise ``ValueError`` naming the option and what it takes (the callback re-raises it as
Lightning's ``MisconfigurationException``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from lightning_attr.codecs import CODECS, auto_codec
from lightning_attr.curvature_average import DEFAULT_AVERAGED_RANK
from lightning_attr.simulation import DEFAULT_MOMENTUM, PROPAGATIONS, Damping
from lightning_attr.spectral import DEFAULT_RANK

MODES = ("online", "end")
_BYTES_PER_SOURCE_AND_PARAMETER = 28  # end mode: 6 float32 [C, P] blocks in flight + the shard buffer (4 bytes each)
_NOT_IN_MANIFEST = ("dirpath", "sources", "overwrite")  # a path, the source map (stored apart), a write flag


def _is_int(value: Any) -> bool:
    """An ``int`` that is not a ``bool`` (``True`` would pass for 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class AttributionSettings:
    """The options of :class:`AttributionCallback` (documented there and in README's options table)."""

    dirpath: str | None = None
    horizon: int = 20
    damping: Damping = "auto"
    curvature: str = "ggn"
    mode: str = "end"
    sources: Any = None
    checkpoint_epochs: Sequence[int] | str | None = "auto"
    curvature_batch_size: int = 256
    step_size: Damping = "auto"
    propagation: str = "auto"
    momentum: float = DEFAULT_MOMENTUM
    averaged_rank: int = DEFAULT_AVERAGED_RANK
    damping_scale: float = 1.0
    chunk_size: int = 2048
    store_dtype: str = "float32"
    num_examples: int | None = None
    index_key: str = "index"
    seed: int = 0
    overwrite: bool = False
    codec: str = "auto"
    rank: int | str = "auto"
    sketch: int = 0
    memory_budget_mb: float = 1024.0

    def __post_init__(self) -> None:
        horizon, damping, step_size, propagation = self.horizon, self.damping, self.step_size, self.propagation
        momentum, curvature, mode, codec, rank = self.momentum, self.curvature, self.mode, self.codec, self.rank
        memory_budget_mb, store_dtype, checkpoint_epochs = self.memory_budget_mb, self.store_dtype, self.checkpoint_epochs
        curvature_batch_size, chunk_size, index_key = self.curvature_batch_size, self.chunk_size, self.index_key
        if not isinstance(horizon, int) or horizon < 1:
            raise ValueError(f"horizon must be a positive int, got {horizon!r}.")
        if not (damping == "auto" or (isinstance(damping, (int, float)) and damping >= 0)):
            raise ValueError(f"damping must be 'auto' or a float >= 0, got {damping!r}.")
        if not (step_size == "auto" or (isinstance(step_size, (int, float)) and step_size > 0)):
            raise ValueError(f"step_size must be 'auto' or a float > 0, got {step_size!r}.")
        if propagation != "auto" and propagation not in PROPAGATIONS + ("spectral",):
            raise ValueError(f"propagation must be 'auto', 'spectral' or one of {PROPAGATIONS}, got {propagation!r}.")
        if propagation == "spectral" and (mode != "end" or curvature != "ggn"):
            raise ValueError(
                f"propagation='spectral' inverts the full-data GGN at fixed weights: it needs mode='end' and "
                f"curvature='ggn', got mode={mode!r}, curvature={curvature!r}; use propagation='auto' (heavy-ball online)."
            )
        if propagation in ("chebyshev", "spectral", "auto") and damping != "auto" and damping <= 0:
            raise ValueError(
                f"propagation={propagation!r} needs damping > 0 (the lower end of the spectrum it accelerates "
                f"over), got {damping!r}; pass damping='auto', a positive float, or propagation='neumann'."
            )
        if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
            raise ValueError(f"momentum must be a float in [0, 1), got {momentum!r}.")
        if curvature not in ("ggn", "hessian"):
            raise ValueError(f"curvature must be 'ggn' or 'hessian', got {curvature!r}.")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        if codec != "auto" and codec not in CODECS:
            raise ValueError(f"codec must be 'auto' or one of {CODECS}, got {codec!r}.")
        if codec == "eigen" and curvature != "ggn":
            raise ValueError(
                "codec='eigen' keeps the top eigenspace of the GGN (positive semi-definite); it needs curvature='ggn'."
            )
        if codec == "factored" and (mode != "end" or curvature != "ggn" or propagation not in ("auto", "spectral")):
            raise ValueError(
                f"codec='factored' stores the responses of propagation='spectral' (the damped inverse in the top eigenspace "
                f"of the full-data GGN, at fixed weights): it needs mode='end', curvature='ggn' and propagation 'auto' or "
                f"'spectral', got mode={mode!r}, curvature={curvature!r}, propagation={propagation!r}. Change those, or "
                "use codec='dense' (any mode and rule) or 'lorif'."
            )
        for name, value, zero in (("averaged_rank", self.averaged_rank, " (0: no averaging)"), ("sketch", self.sketch, "")):
            if not _is_int(value) or value < 0:
                raise ValueError(f"{name} must be an int >= 0{zero}, got {value!r}.")
        if not (rank == "auto" or (_is_int(rank) and rank >= 1)):
            raise ValueError(f"rank must be 'auto' or a positive int, got {rank!r}.")
        if self.sketch and codec != "eigen":
            raise ValueError(
                f"sketch={self.sketch} keeps the part of each response outside the eigenspace of codec='eigen'; with "
                f"codec={codec!r} nothing is dropped there. Set codec='eigen' or sketch=0."
            )
        if not (isinstance(memory_budget_mb, (int, float)) and memory_budget_mb > 0):
            raise ValueError(f"memory_budget_mb must be a number > 0, got {memory_budget_mb!r}.")
        if store_dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"store_dtype must be float32, float16 or bfloat16, got {store_dtype!r}.")
        for name, value in (("curvature_batch_size", curvature_batch_size), ("chunk_size", chunk_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        epochs = checkpoint_epochs if checkpoint_epochs == "auto" else sorted(set(checkpoint_epochs or ()))
        if epochs != "auto" and (isinstance(checkpoint_epochs, str) or any(not isinstance(e, int) or e < 1 for e in epochs)):
            raise ValueError(
                f"checkpoint_epochs must be 'auto' or a list of positive ints, got {checkpoint_epochs!r}."
            )
        if not isinstance(index_key, str) or not index_key:
            raise ValueError(f"index_key must be a non-empty str, got {index_key!r}.")
        normalized = {
            "checkpoint_epochs": epochs,
            "momentum": float(momentum), "memory_budget_mb": float(memory_budget_mb),
            "dirpath": os.fspath(self.dirpath) if self.dirpath is not None else None,
        }  # fmt: skip
        for name, value in normalized.items():
            object.__setattr__(self, name, value)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """``{option: default}`` in declaration order."""
        return {f.name: f.default for f in fields(cls)}

    def to_manifest(self) -> dict[str, Any]:
        """The options a store records in its manifest's ``"settings"`` (all but the path, the source map, which
        the store keeps apart, and ``overwrite``)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _NOT_IN_MANIFEST}

    def for_size(self, num_sources: int, num_parameters: int, factored_numbers: int | None = None) -> AttributionSettings:
        """These settings with ``codec="auto"`` resolved for ``num_sources`` sources of ``num_parameters``
        parameters and ``factored_numbers`` per source in codec ``"factored"`` (``None``: not available;
        :func:`lightning_attr.codecs.auto_codec`); unchanged for any other codec."""
        if self.codec != "auto":
            return self
        codec = auto_codec(
            num_sources, num_parameters, self.mode, self.curvature, propagation=self.propagation, factored_numbers=factored_numbers
        )
        return replace(self, codec=codec)

    def fixed_rank(self) -> int:
        """``rank`` as a number of eigenpairs or factors: ``"auto"`` grows only ``propagation="spectral"``'s eigenspace
        (:func:`lightning_attr.spectral.adaptive_eigenspace`); codec ``"eigen"`` and ``"lorif"`` keep ``DEFAULT_RANK`` (256) then."""
        return DEFAULT_RANK if self.rank == "auto" else self.rank

    def block_size(self, dim: int) -> int:
        """Sources simulated (and written per shard) at a time: ``floor(memory_budget_mb / (28 P bytes))``, >= 1."""
        return max(1, int(self.memory_budget_mb * 2**20) // (_BYTES_PER_SOURCE_AND_PARAMETER * dim))
