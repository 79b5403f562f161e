"""The flat parameter space of a module: one ``Tensor[P]`` <-> a dict of named parameters."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class ParameterSpace:
    """Names, shapes and dtypes of the trainable parameters, in ``named_parameters`` order.

    ``P = sum(numel)``; a flat vector ``Tensor[..., P]`` concatenates the parameters in this order.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    @classmethod
    def of(cls, module: nn.Module) -> ParameterSpace:
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError(f"{type(module).__name__} has no trainable parameters to attribute through.")
        return cls(
            tuple(n for n, _ in named),
            tuple(tuple(p.shape) for _, p in named),
            tuple(str(p.dtype).removeprefix("torch.") for _, p in named),
        )

    @cached_property
    def numels(self) -> tuple[int, ...]:
        """Each parameter's number of scalars (computed once: the read path asks at every query)."""
        return tuple(int(torch.Size(s).numel()) for s in self.shapes)

    @cached_property
    def spans(self) -> dict[str, tuple[int, int]]:
        """``{name: (start, stop)}``: each parameter's positions in a flat ``Tensor[..., P]``."""
        stops = torch.tensor(self.numels).cumsum(0).tolist()
        return {name: (stop - numel, stop) for name, numel, stop in zip(self.names, self.numels, stops)}

    @cached_property
    def size(self) -> int:
        """P, the number of trainable scalars."""
        return sum(self.numels)

    def fingerprint(self) -> str:
        """sha256 of the architecture (names, shapes, dtypes): responses only fit this space."""
        text = json.dumps([self.names, self.shapes, self.dtypes])
        return hashlib.sha256(text.encode()).hexdigest()

    def to_json(self) -> list[dict]:
        return [{"name": n, "shape": list(s), "dtype": d} for n, s, d in zip(self.names, self.shapes, self.dtypes)]

    def flatten(self, tensors: dict[str, Tensor], batch_dims: int = 0) -> Tensor:
        """``{name: Tensor[*batch, *shape]}`` -> ``Tensor[*batch, P]`` (float32)."""
        parts = []
        for name in self.names:
            t = tensors[name]
            parts.append(t.reshape(*t.shape[:batch_dims], -1).float())
        return torch.cat(parts, dim=-1)

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """``Tensor[*batch, P]`` -> ``{name: Tensor[*batch, *shape]}`` (views, no copy)."""
        batch = flat.shape[:-1]
        return {
            name: flat[..., start:stop].reshape(*batch, *shape) for (name, (start, stop)), shape in zip(self.spans.items(), self.shapes)
        }

    def current(self, module: nn.Module) -> Tensor:
        """The module's parameters now, as a detached float32 ``Tensor[P]``."""
        params = dict(module.named_parameters())
        return torch.cat([params[n].detach().reshape(-1) for n in self.names]).float()  # flatten's values, one cast

    def digest(self, flat: Tensor) -> str:
        """sha256 of a parameter vector's float32 bytes: identifies the weights responses belong to."""
        data = flat.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
        return hashlib.sha256(data).hexdigest()
