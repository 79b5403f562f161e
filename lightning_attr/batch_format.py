"""The format of a training batch (without its index), recorded at fit time and checked at query time.

A query batch that does not match the format the model was trained on (a missing label, a missing
batch dimension, another feature size) would otherwise fail deep inside torch. The callback records
the format of the training batches in the store; ``attribute()`` and ``self_influence()`` compare a
query batch with it before any forward pass and name both formats when they differ.

A format is JSON: ``{"tensor": kind, "shape": [None, d1, ...]}`` for a tensor (``kind`` is ``"float"``,
``"int"`` or ``"bool"``; the leading ``None`` is the batch dimension, a later ``None`` a size that varied
between training batches), ``{"sequence": [...]}`` for a tuple or list that holds tensors or containers, ``{"mapping": {key: ...}}``
for a dict, and ``{"other": type name}`` for anything else (not checked: e.g. a collated list of strings).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

Format = dict[str, Any]


def describe(batch: Any) -> Format:
    """The format of one batch (its first dimension is the batch dimension)."""
    if isinstance(batch, Tensor):
        kind = "float" if batch.is_floating_point() or batch.is_complex() else "bool" if batch.dtype == torch.bool else "int"
        return {"tensor": kind, "shape": [None, *batch.shape[1:]] if batch.dim() else []}
    if isinstance(batch, Mapping):
        return {"mapping": {str(k): describe(v) for k, v in batch.items()}}
    if isinstance(batch, (tuple, list)) and any(isinstance(v, (Tensor, Mapping, tuple, list)) for v in batch):
        return {"sequence": [describe(v) for v in batch]}
    return {"other": type(batch).__name__}  # not checked: strings, numbers, lists of them (e.g. collated ids)


def merge(seen: Format | None, new: Format) -> Format:
    """The format of both batches: sizes that differ become ``None`` (e.g. padded sequence lengths)."""
    if seen is None:
        return new
    if "tensor" in seen and "tensor" in new and seen["tensor"] == new["tensor"]:
        if len(seen["shape"]) != len(new["shape"]):
            return seen
        return {"tensor": seen["tensor"], "shape": [a if a == b else None for a, b in zip(seen["shape"], new["shape"])]}
    if "sequence" in seen and "sequence" in new and len(seen["sequence"]) == len(new["sequence"]):
        return {"sequence": [merge(a, b) for a, b in zip(seen["sequence"], new["sequence"])]}
    if "mapping" in seen and "mapping" in new and seen["mapping"].keys() == new["mapping"].keys():
        return {"mapping": {k: merge(v, new["mapping"][k]) for k, v in seen["mapping"].items()}}
    return seen


def render(fmt: Format) -> str:
    """``(Tensor[B, 64] float, Tensor[B] int)``-style text of a format."""
    if "tensor" in fmt:
        dims = ["B" if i == 0 and d is None else "*" if d is None else str(d) for i, d in enumerate(fmt["shape"])]
        return f"Tensor[{', '.join(dims)}] {fmt['tensor']}"
    if "sequence" in fmt:
        return "(" + ", ".join(render(f) for f in fmt["sequence"]) + ")"
    if "mapping" in fmt:
        return "{" + ", ".join(f"{k!r}: {render(v)}" for k, v in fmt["mapping"].items()) + "}"
    return fmt["other"]


def mismatch(expected: Format, got: Format, where: str = "batch") -> str | None:
    """The first difference between a query batch's format and the training format, or ``None``."""
    if "tensor" in expected:
        if "tensor" not in got:
            return f"{where} should be a tensor, got {render(got)}"
        if got["tensor"] != expected["tensor"]:
            return f"{where} holds {got['tensor']} values, training batches held {expected['tensor']} values"
        if len(got["shape"]) != len(expected["shape"]):
            hint = " (a single example needs its batch dimension: x.unsqueeze(0))" if len(got["shape"]) + 1 == len(
                expected["shape"]
            ) else ""
            return f"{where} has {len(got['shape'])} dimensions, training batches had {len(expected['shape'])}{hint}"
        for i, (e, g) in enumerate(zip(expected["shape"], got["shape"])):
            if i > 0 and e is not None and e != g:
                return f"{where} has size {g} in dimension {i}, training batches had {e}"
        return None
    if "sequence" in expected:
        if "sequence" not in got or len(got["sequence"]) != len(expected["sequence"]):
            return f"{where} should be a tuple of {len(expected['sequence'])}, got {render(got)}"
        for i, (e, g) in enumerate(zip(expected["sequence"], got["sequence"])):
            found = mismatch(e, g, f"{where}[{i}]")
            if found:
                return found
        return None
    if "mapping" in expected:
        if "mapping" not in got:
            return f"{where} should be a dict with keys {sorted(expected['mapping'])}, got {render(got)}"
        absent = sorted(set(expected["mapping"]) - set(got["mapping"]))
        if absent:
            return f"{where} lacks the keys {absent}"
        for key, e in expected["mapping"].items():
            found = mismatch(e, got["mapping"][key], f"{where}[{key!r}]")
            if found:
                return found
    return None


def check_batch(batch: Any, expected: Format | None, *, what: str = "The query batch", hint: str = "") -> None:
    """Raises ``ValueError`` naming both formats when ``batch`` does not match ``expected`` (the training
    batches' format without the index; ``None``: nothing recorded, nothing checked), or when its tensors
    disagree on the batch size."""
    got = describe(batch)
    if expected is not None:
        found = mismatch(expected, got)
        if found:
            raise ValueError(
                f"{what} does not match the training batches: {found}. It is {render(got)}; the model was "
                f"trained on batches {render(expected)} (without the example index). {hint}".rstrip()
            )
    sizes = {int(t.shape[0]) for t in torch.utils._pytree.tree_leaves(batch) if isinstance(t, Tensor) and t.dim() > 0}
    if len(sizes) > 1:
        raise ValueError(f"{what}'s tensors disagree on the batch size ({sorted(sizes)}); it is {render(got)}.")
