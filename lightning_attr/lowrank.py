"""Responses with rank-c factored weight matrices (codec ``"lorif"``, LoRIF: arXiv 2601.21929).

Each source's response ``r_b`` is kept per layer:

- the weight of a ``Linear`` / ``Conv`` layer (``groups=1``; a conv weight ``[out, in, *kernel]`` seen as
  ``out x (in * prod(kernel))``) as rank-``c`` factors ``U_b: Tensor[out, c]``, ``V_b: Tensor[in, c]`` with
  ``delta W_b ~ U_b V_b^T``: the truncated SVD (``U`` carries the singular values), the best rank-``c``
  approximation in Frobenius norm. ``c >= min(out, in)`` keeps the matrix exactly (up to float rounding);
- every other parameter (biases, norms, embeddings, ...) dense.

Storage per source: ``sum_layers c (out + in)`` plus the dense rest, instead of ``P`` numbers.

The readout never builds ``delta W``: a forward hook adds ``e U_b (V_b^T x)`` to the layer's output
(``(W + e U V^T) x = W x + e U (V^T x)``; conv: ``V^T`` as ``c`` filters, then ``U`` as a 1x1 map) while the
dense rest moves as ``theta + e r_b``; ``linear`` is the ``torch.func.jvp`` of that in ``e`` at 0, ``central``
and ``step`` evaluate it at ``e = +-epsilon`` / ``1`` (:func:`lightning_attr.readout.readout_along`). Sources are
vmapped in chunks. Cost per source and query: ``c (out + in)`` per layer instead of ``out * in``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.func import vmap

from lightning_attr.curvature import batch_size_of
from lightning_attr.functional import FunctionalModel, has_recurrent_layer
from lightning_attr.parameters import ParameterSpace
from lightning_attr.readout import check_readout, loop_over, readout_along
from lightning_attr.simulation import select_examples

FACTOR_KEYS = ("@U", "@V")  # shard keys of a factored weight: f"{name}@U" [C, out, c], f"{name}@V" [C, in, c]
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def factored_layers(module: nn.Module, space: ParameterSpace) -> dict[str, tuple[int, int]]:
    """``{weight name: (out, in)}`` of every ``Linear`` / ``Conv`` layer (``groups=1``) whose weight is trainable:
    the matrices codec ``"lorif"`` factors (conv: ``in`` = input channels times the kernel's size)."""
    names = set(space.names)
    out = {}
    for prefix, layer in module.named_modules():
        name = f"{prefix}.weight" if prefix else "weight"
        if isinstance(layer, _LAYERS) and name in names and getattr(layer, "groups", 1) == 1:
            shape = space.shapes[space.names.index(name)]
            out[name] = (int(shape[0]), int(torch.Size(shape[1:]).numel()))
    return out


def encode_lowrank(rows: Tensor, space: ParameterSpace, layers: dict[str, tuple[int, int]], rank: int) -> dict[str, Tensor]:
    """``rows: Tensor[C, P]`` float32 responses -> the shard tensors of codec ``"lorif"``: ``{name@U: [C, out, c],
    name@V: [C, in, c]}`` per factored weight (``c = min(rank, out, in)``) and ``{name: [C, *shape]}`` for the rest.
    A non-finite row (a source whose gradient was not finite) gives NaN factors: no reader takes it for zero."""
    parts = space.unflatten(rows)
    bad = ~torch.isfinite(rows).all(dim=1)
    out = {}
    for name, tensor in parts.items():
        if name not in layers:
            out[name] = tensor
            continue
        rows_out, rows_in = layers[name]
        matrices = tensor.reshape(-1, rows_out, rows_in).masked_fill(bad.view(-1, 1, 1), 0.0)
        u, s, vh = torch.linalg.svd(matrices, full_matrices=False)
        c = min(rank, rows_out, rows_in)
        u, v = u[..., :c] * s[:, None, :c], vh[:, :c, :].transpose(1, 2)
        out[name + FACTOR_KEYS[0]] = u.masked_fill(bad.view(-1, 1, 1), float("nan")).contiguous()
        out[name + FACTOR_KEYS[1]] = v.contiguous()
    return out


def lowrank_entry(layers: dict[str, tuple[int, int]], rank: int) -> dict[str, Any]:
    """The manifest fields of a ``"lorif"`` checkpoint: ``rank`` and ``factored: {weight name: [out, in, c]}``."""
    return {"codec": "lorif", "rank": rank, "factored": {n: [o, i, min(rank, o, i)] for n, (o, i) in layers.items()}}


@dataclass(frozen=True)
class LowRankResponses:
    """Codec ``"lorif"``: per source, rank-``c`` factors of every Linear / Conv weight response, the rest dense.

    Attributes:
        space: the parameter space (``P``).
        factors: ``{weight name: (U: Tensor[S, out, c], V: Tensor[S, in, c])}`` float32, ``delta W_b = U_b V_b^T``.
        rest: ``{name: Tensor[S, *shape]}`` float32, every parameter that is not factored.
    """

    space: ParameterSpace
    factors: dict[str, tuple[Tensor, Tensor]]
    rest: dict[str, Tensor]
    codec: ClassVar[str] = "lorif"

    @classmethod
    def from_tensors(cls, space: ParameterSpace, tensors: dict[str, Tensor]) -> LowRankResponses:
        """From shard tensors (:func:`encode_lowrank`)."""
        factors = {n: (tensors[n + FACTOR_KEYS[0]], tensors[n + FACTOR_KEYS[1]]) for n in space.names if n + FACTOR_KEYS[0] in tensors}
        return cls(space, factors, {n: tensors[n] for n in space.names if n not in factors})

    @property
    def num_sources(self) -> int:
        first = next(iter(self.factors.values()))[0] if self.factors else next(iter(self.rest.values()))
        return int(first.shape[0])

    @property
    def ranks(self) -> dict[str, int]:
        """``{weight name: c}``."""
        return {n: int(u.shape[2]) for n, (u, _) in self.factors.items()}

    def entry(self) -> dict[str, Any]:
        """Its manifest fields (:func:`lowrank_entry`)."""
        layers = {n: (int(u.shape[1]), int(v.shape[1])) for n, (u, v) in self.factors.items()}
        return {"codec": "lorif", "rank": max(self.ranks.values(), default=0), "factored": {n: [*layers[n], c] for n, c in self.ranks.items()}}

    def tensors(self) -> dict[str, Tensor]:
        """The shard tensors (:func:`encode_lowrank`'s keys), ``Tensor[S, ...]`` each."""
        out = dict(self.rest)
        for name, (u, v) in self.factors.items():
            out[name + FACTOR_KEYS[0]], out[name + FACTOR_KEYS[1]] = u, v
        return out

    def numel(self) -> int:
        """Numbers stored for all sources."""
        return sum(u.numel() + v.numel() for u, v in self.factors.values()) + sum(t.numel() for t in self.rest.values())

    def to(self, device: torch.device | str) -> LowRankResponses:
        factors = {n: (u.to(device), v.to(device)) for n, (u, v) in self.factors.items()}
        return LowRankResponses(self.space, factors, {n: t.to(device) for n, t in self.rest.items()})

    def select(self, sources: Tensor) -> LowRankResponses:
        """The responses of ``sources: LongTensor[C]`` (in that order)."""
        factors = {n: (u[sources], v[sources]) for n, (u, v) in self.factors.items()}
        return LowRankResponses(self.space, factors, {n: t[sources] for n, t in self.rest.items()})

    def to_dense(self) -> Tensor:
        """The same responses as ``Tensor[S, P]`` (``S x P`` floats: for tests and small stores)."""
        parts = dict(self.rest)
        for name, (u, v) in self.factors.items():
            parts[name] = (u @ v.transpose(1, 2)).reshape(u.shape[0], *self.space.shapes[self.space.names.index(name)])
        return self.space.flatten(parts, batch_dims=1)

    def scores(
        self, model: FunctionalModel, theta: Tensor, batch: Any, readout: str, chunk_size: int, epsilon: float = 1.0
    ) -> Tensor:
        """``Tensor[B, S]``, as :func:`lightning_attr.readout.score_sources` scores the dense responses."""
        check_readout(readout)
        with _factored_forward(model.module, self.factors) as shift:
            one = readout_along(_shifted_measurement(model, theta, batch, shift), readout, epsilon, theta.device)
            batched = vmap(one) if readout == "linear" or not has_recurrent_layer(model.module) else loop_over(one)
            chunks = []
            for start in range(0, self.num_sources, chunk_size):
                part = self.select(torch.arange(start, min(start + chunk_size, self.num_sources), device=theta.device))
                chunks.append(batched((part.factors, part.rest)))
        return torch.cat(chunks).T

    def paired(self, model: FunctionalModel, theta: Tensor, batch: Any, sources: Tensor, readout: str, block: int = 32) -> Tensor:
        """``Tensor[B]``: query ``i`` against source ``sources[i]``: diagonals of :meth:`scores` on blocks of queries."""
        return paired_diagonals(self, model, theta, batch, sources, readout, block)


def paired_diagonals(responses: Any, model: FunctionalModel, theta: Tensor, batch: Any, sources: Tensor, readout: str, block: int) -> Tensor:
    """``Tensor[B]``: query ``i`` of ``batch`` against source ``sources[i]`` of ``responses`` (a block with ``select`` and
    ``scores``): the diagonals of its scores on ``block`` queries against their ``block`` sources at a time."""
    n, out = batch_size_of(batch), []
    for start in range(0, n, block):
        rows = torch.arange(start, min(start + block, n), device=sources.device)
        part = responses.select(sources[rows])
        out.append(part.scores(model, theta, select_examples(batch, rows), readout, block).diagonal())
    return torch.cat(out)


def _shifted_measurement(model: FunctionalModel, theta: Tensor, batch: Any, shift: dict[str, Any]):
    """``(e, (factors, rest)) -> Tensor[B]``: the measurement with every factored layer's output moved by
    ``e U (V^T x)`` (the hooks of :func:`_factored_forward` read ``shift``) and the rest by ``e r``."""
    params = model.space.unflatten(theta)

    def measure(e: Tensor, response: tuple[dict, dict]) -> Tensor:
        factors, rest = response
        shift["e"], shift["factors"] = e, factors
        try:
            moved = {n: p + e * rest[n] if n in rest else p for n, p in params.items()}
            return model.measurement(moved, batch)
        finally:
            shift.clear()

    return measure


@contextlib.contextmanager
def _factored_forward(module: nn.Module, factors: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Forward hooks on the layers of ``factors`` (``{weight name: ...}``) that add ``e U (V^T x)`` to their output
    while the yielded dict holds ``e`` and the factors of the source being read out; removed on exit."""
    shift: dict[str, Any] = {}
    modules = dict(module.named_modules())
    handles = []

    def hook(name: str, layer: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        if not shift:
            return output
        u, v = shift["factors"][name]
        x = inputs[0]
        if isinstance(layer, nn.Linear):
            return output + shift["e"] * ((x @ v) @ u.T)
        filters = v.T.reshape(v.shape[1], *layer.weight.shape[1:])  # [c, in, *kernel]
        hidden = layer._conv_forward(x, filters, None)  # [B, c, *spatial], the layer's stride / padding / dilation
        return output + shift["e"] * torch.einsum("oc,bc...->bo...", u, hidden)

    try:
        for name in factors:
            prefix = name.removesuffix("weight").removesuffix(".")
            layer = modules[prefix]
            handles.append(layer.register_forward_hook(lambda m, i, o, name=name: hook(name, m, i, o)))
        yield shift
    finally:
        for handle in handles:
            handle.remove()


__all__ = ["FACTOR_KEYS", "LowRankResponses", "encode_lowrank", "factored_layers", "lowrank_entry", "paired_diagonals"]
