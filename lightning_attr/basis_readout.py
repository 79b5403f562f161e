"""The linear readout along layer bases: ``S`` sources for the price of a few hundred tangents, by forward mode.

The linear readout (:mod:`readout`) of a response ``r_s`` is ``d/de m_q(theta + e r_s) = <g_q, r_s>`` with ``g_q`` the
query's gradient. For a network whose every trainable parameter is the weight or bias of a Linear / Conv1d / Conv2d
layer (an MLP, a CNN), ``g_q`` is built here by **forward mode only**, layer by layer, with one of two bases:

- **the layer's output**: ``J_l = d m_q / d z_l`` for its output ``z_l = W_l x_l + c_l`` (Conv: ``W_l * x_l + c_l``),
  ``A_l`` numbers per query, from one ``vmap(jvp)`` over the ``A_l`` unit tangents of ``z_l`` (the output replaced by
  itself carrying them, :func:`~lightning_attr.layer_readout.adding_to_outputs`); then the weight's gradient is
  ``J_l^T x_l`` (Conv: ``J_l`` times the unfolded patches of ``x_l``, :func:`~lightning_attr.layer_readout.conv_patches`)
  and the bias's ``J_l`` summed over positions: no backward pass, a contraction of the captured input;
- **the layer's parameters**: one ``vmap(jvp)`` over the ``P_l`` unit tangents of its weight and bias gives that part
  of ``g_q`` directly.

Per layer the smaller basis is taken (the MNIST-1D MLP 40-100-100-10: 100 + 100 + 10 output tangents; its CNN:
96 parameter tangents for the first convolution, 320 + 10 output tangents after it), and each pass carries its
tangents from that layer on only. So the scores cost ``sum_l min(A_l, P_l)`` tangents instead of ``S``, and one matrix
product of the query gradients with the responses (``[Q, P] x [P, S]``: each response read once). Nothing here runs
reverse mode: jvps along layer bases, then matrix products.

Taken by :func:`readout.score_sources` when every trainable parameter is covered, no covered parameter is used outside
its layer's forward (the capture pass's check), and the tangents are at most ``S``; else the layer readout /
``vmap(jvp)`` over the sources. Several queries: each query is read on its own (``vmap`` over the queries, one example
each), so the layers' inputs and outputs must have the batch as their first dimension (checked: another layout, or a
kernel that cannot be vmapped per example, sends the batch back to the other paths).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import jvp, vmap
from torch.utils._pytree import tree_map

from lightning_attr.curvature import batch_size_of
from lightning_attr.functional import FunctionalModel
from lightning_attr.layer_readout import _Layer, adding_to_outputs, capture_layers, conv_patches, handled_layers
from lightning_attr.parameters import ParameterSpace

_BASIS_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)  # layers whose weight gradient is built from J and their input
# What one more vmapped jvp pass costs beyond its tangents, in activation numbers carried. Set from the digits MLP
# 64-64-10 (S = 1,400; 74 tangents in 2 passes, about 200 activation numbers per query; one thread, paired ad hoc
# timings on the loaded machine): at one query the bases took 4.2 ms against the layer readout's 6.8 (one pass of
# 1,400 source tangents), so PASS_FLOATS < 2.7e5; at two queries (each read on its own: vmap over the queries) 9.9
# against 8.7, at four 10.1 against 12.5.
PASS_FLOATS = 1e5


def basis_layers(module: nn.Module, space: ParameterSpace) -> tuple[_Layer, ...] | None:
    """The handled Linear / Conv1d / Conv2d layers (:func:`~lightning_attr.layer_readout.handled_layers`) when their
    weights and biases are every trainable parameter of ``space``; else ``None`` (the basis path does not apply)."""
    layers = tuple(layer for layer in handled_layers(module, space) if type(layer.module) in _BASIS_TYPES)
    covered = {name for layer in layers for name in layer.names()}
    return layers if layers and covered >= set(space.names) else None


@dataclass(frozen=True)
class QueryFactors:
    """Each query's gradient of its measurement at ``theta``, per layer, as the layer-bases readout builds it.

    Attributes:
        factors: ``{weight name: (J: Tensor[Q, R, out], X: Tensor[Q, R, in])}`` for every Linear layer read along its
            output basis: ``J`` the measurement's derivative along each of the ``R`` rows of its output (its calls' rows
            concatenated; ``R = 1`` for one call on a ``[Q, in]`` input), ``X`` those rows' inputs; the weight's gradient
            is ``J^T X`` (``Tensor[Q, out, in]``), rank ``R``.
        dense: ``{name: Tensor[Q, *shape]}``, every other covered parameter's gradient (biases, convolutions, layers
            read along their parameters).
    """

    factors: dict[str, tuple[Tensor, Tensor]]
    dense: dict[str, Tensor]

    def gradients(self, space: ParameterSpace, queries: int, like: Tensor) -> Tensor:
        """``Tensor[Q, P]`` float32: the query gradients laid out as ``space`` (zeros for a parameter not covered)."""
        parts = dict(self.dense)
        for name, (j, x) in self.factors.items():
            parts[name] = j.transpose(1, 2) @ x
        shapes = dict(zip(space.names, space.shapes))
        full = {n: parts[n].reshape(queries, *shapes[n]) if n in parts else like.new_zeros(queries, *shapes[n]) for n in space.names}
        return space.flatten(full, batch_dims=1)


def basis_gradients(
    model: FunctionalModel, theta: Tensor, batch: Any, layers: Sequence[_Layer], *, num_sources: int, chunk_size: int
) -> Tensor | None:
    """``Tensor[Q, P]`` float32: each query's gradient of its measurement at ``theta``, by forward mode along the bases
    of ``layers``' outputs or parameters (module docstring). ``None`` when the basis path does not apply to this batch:
    a covered parameter used outside its layer, a cost above that of the ``num_sources`` source tangents it replaces
    (:func:`_cheaper_than_sources`), or (``Q > 1``) a layer input or output without the batch as first dimension.

    Args:
        layers: :func:`basis_layers` of the model (they cover every parameter of ``model.space``).
        num_sources: ``S``, the tangents the other paths carry.
        chunk_size: basis tangents per vmapped call (each carries one pass's activations per query).
    """
    parts = query_factors(model, theta, batch, layers, chunk_size=chunk_size, num_sources=num_sources)
    return None if parts is None else parts.gradients(model.space, batch_size_of(batch), theta)


def query_factors(
    model: FunctionalModel, theta: Tensor, batch: Any, layers: Sequence[_Layer], *, chunk_size: int, num_sources: int | None = None
) -> QueryFactors | None:
    """The query gradients of :func:`basis_gradients` per layer, a Linear layer's weight kept as its factors ``(J, X)``
    (:class:`QueryFactors`): ``R (out + in)`` numbers per query instead of ``out x in``. ``None`` where
    :func:`basis_gradients` gives ``None``; ``num_sources=None`` skips its cost rule (the caller reads the factors, not
    ``S`` source tangents)."""
    params = model.space.unflatten(theta)
    captured = capture_layers(model, params, batch, layers, owned=("weight", "bias"))
    if captured is None:
        return None
    inputs, outputs = captured
    queries = batch_size_of(batch)
    if queries > 1 and any(t.dim() == 0 or t.shape[0] != queries for ts in [*inputs, *outputs] for t in ts):
        return None  # the batch is not the first dimension of every layer input and output
    owned = [[n for n in layer.names() if n in params] for layer in layers]
    weights = [sum(params[n].numel() for n in names) for names in owned]
    numbers = [sum(z.numel() // queries for z in zs) for zs in outputs]
    passes = sum(1 if w <= a else len(zs) for w, a, zs in zip(weights, numbers, outputs))
    floats = sum(t.numel() for ts in [*inputs, *outputs] for t in ts)  # about the activations of the batch
    if num_sources is not None and not _cheaper_than_sources(sum(map(min, weights, numbers)), passes, floats // queries, queries, num_sources):
        return None
    dense: dict[str, Tensor] = {}
    factors: dict[str, list[tuple[Tensor, Tensor]]] = {}

    def accumulate(name: str, g: Tensor) -> None:
        dense[name] = dense[name] + g if name in dense else g

    try:
        for i, layer in enumerate(layers):
            if weights[i] <= numbers[i]:  # the parameters' basis: the jvps give the gradient itself
                flat = _along_parameters(model, params, batch, layers, owned[i], chunk_size)
                for name, g in zip(owned[i], flat.split([params[n].numel() for n in owned[i]], dim=1)):
                    accumulate(name, g.view(queries, *params[name].shape))
                continue
            for k, (x, z) in enumerate(zip(inputs[i], outputs[i])):  # the output's basis: J, then the layer's rule
                j = _along_output(model, params, batch, layers, outputs, (i, k), chunk_size).reshape(z.shape)
                weight, bias = layer.names()
                if isinstance(layer.module, nn.Linear):  # dW = J^T X, kept as its factors; dc = J summed over rows
                    rows, js = x.reshape(queries, -1, x.shape[-1]), j.reshape(queries, -1, j.shape[-1])
                    if weight in params:
                        factors.setdefault(weight, []).append((js, rows))
                    if bias in params:
                        accumulate(bias, js.sum(dim=1))
                    continue
                for name, g in zip((weight, bias), _layer_gradients(layer.module, x, j, queries)):
                    if name in params:
                        accumulate(name, g)
    except RuntimeError:  # a kernel without a batching rule for one vmapped example, or another layout per example
        if queries == 1:
            raise
        return None
    joined = {n: (torch.cat([j for j, _ in calls], dim=1), torch.cat([x for _, x in calls], dim=1)) for n, calls in factors.items()}
    return QueryFactors(joined, dense)


def _cheaper_than_sources(tangents: int, passes: int, floats: int, queries: int, num_sources: int) -> bool:
    """Whether ``tangents`` basis tangents per query in ``passes`` vmapped passes cost less than ``num_sources`` source
    tangents in one, for queries of ``floats`` activation numbers each: ``tangents + (passes - 1) * PASS / (Q * floats)
    < S``, with a pass's own cost ``PASS`` counted as :data:`PASS_FLOATS` activation numbers carried."""
    return tangents + (passes - 1) * PASS_FLOATS / max(1, queries * floats) < num_sources


def _along_output(
    model: FunctionalModel, params: dict[str, Tensor], batch: Any, layers: Sequence[_Layer], outputs: list[list[Tensor]],
    call: tuple[int, int], chunk_size: int,
) -> Tensor:  # fmt: skip
    """``Tensor[Q, A]``: ``d m_q / d z`` for the output ``z = outputs[i][k]`` (``[Q, ...]``) of call ``k`` of ``layers[i]``
    (``call = (i, k)``), by jvps in which that output is replaced by itself carrying unit tangents. No other tangent
    enters, so a tangent is carried from that layer on, not through the whole network."""
    queries, output = batch_size_of(batch), outputs[call[0]][call[1]]
    shape = output.shape if queries == 1 else (1, *output.shape[1:])

    def measure(u: Tensor, biases: dict[str, Tensor], example: Any) -> Tensor:
        added: list[list[Tensor | None]] = [[None] * len(calls) for calls in outputs]
        added[call[0]][call[1]] = u.view(shape).clone()  # a copy: an in-place op on the output must not reach u
        with adding_to_outputs(layers, added, replace=True):
            return model.measurement({**params, **biases}, example)

    return _forward_jacobian(measure, output.reshape(queries, -1), batch, chunk_size, _biases(params, layers))


def _along_parameters(
    model: FunctionalModel, params: dict[str, Tensor], batch: Any, layers: Sequence[_Layer], names: Sequence[str], chunk_size: int
) -> Tensor:  # fmt: skip
    """``Tensor[Q, n]``: ``d m_q / d theta_names`` (the parameters ``names`` flattened in that order), by jvps along the
    unit tangents of those parameters."""
    shapes = [params[n].shape for n in names]

    def measure(u: Tensor, biases: dict[str, Tensor], example: Any) -> Tensor:
        moved = {**params, **biases}
        moved.update({n: v.view(s) for n, v, s in zip(names, u.split([math.prod(s) for s in shapes]), shapes)})
        return model.measurement(moved, example)

    others = {n: b for n, b in _biases(params, layers).items() if n not in names}
    return _forward_jacobian(measure, torch.cat([params[n].reshape(-1) for n in names]), batch, chunk_size, others)


def _biases(params: dict[str, Tensor], layers: Sequence[_Layer]) -> dict[str, Tensor]:
    """The layers' trainable biases. The passes carry them with zero tangents: an output plus a bias without a tangent
    goes through a decomposition in Python under ``vmap(jvp)`` (a zero tensor's ``add``), one with a zero tangent
    does not (an ad hoc timing of a Linear 64 -> 10 with 64 tangents: 0.37 vs 0.19 ms)."""
    return {n: params[n] for layer in layers for n in layer.names(("bias",)) if n in params}


def _forward_jacobian(
    measure: Callable[[Tensor, dict[str, Tensor], Any], Tensor], values: Tensor, batch: Any, chunk_size: int,
    biases: dict[str, Tensor],
) -> Tensor:  # fmt: skip
    """``Tensor[Q, n]``: ``d measure(u, biases, query q) / d u`` at ``u = values[q]`` (``values: Tensor[Q, n]``) or
    ``u = values`` (``Tensor[n]``, the same for every query), by ``jvp`` along the ``n`` unit vectors, ``chunk_size`` per
    ``vmap``, ``biases`` carried with zero tangents (:func:`_biases`). ``measure(u, biases, example) -> Tensor[Q']`` for a
    batch ``example`` of ``Q'`` queries. Several queries: each on its own (``vmap`` over the batch, one example at a
    time), so a query never sees the others' tangents."""
    queries, n = batch_size_of(batch), values.shape[-1]
    step = max(1, chunk_size)
    starts = range(0, n, step)  # the basis one chunk of unit vectors at a time, never n x n
    still = {name: torch.zeros_like(b) for name, b in biases.items()}

    def along(example: Any, value: Tensor) -> Tensor:  # [n, Q'] for a batch of Q' queries
        one = vmap(lambda e: jvp(lambda u, b: measure(u, b, example), (value, biases), (e, still))[1])
        return torch.cat([one(_unit_rows(start, min(step, n - start), n, values.device)) for start in starts])

    shared = values.dim() == 1
    if queries == 1:
        return along(batch, values if shared else values[0]).T
    unbatched = lambda example: tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, example)  # noqa: E731
    in_dims = (tree_map(lambda t: 0 if isinstance(t, Tensor) else None, batch), None if shared else 0)
    return vmap(lambda example, value: along(unbatched(example), value)[:, 0], in_dims=in_dims)(batch, values)


def _unit_rows(start: int, count: int, n: int, device: torch.device) -> Tensor:
    """``Tensor[count, n]``: the unit vectors ``start .. start + count - 1`` of ``R^n`` (rows of the identity)."""
    rows = torch.zeros(count, n, device=device)
    rows[torch.arange(count, device=device), torch.arange(start, start + count, device=device)] = 1.0
    return rows


def _layer_gradients(module: nn.Module, x: Tensor, j: Tensor, queries: int) -> tuple[Tensor, Tensor]:
    """``(d m / d W: Tensor[Q, *W.shape], d m / d c: Tensor[Q, out])`` of one call of a Linear / Conv1d / Conv2d layer
    from its input ``x`` and ``j = d m / d z`` (the shape of its output ``z``), for ``Q`` queries (the first dimension
    of ``x`` and ``j``; ``Q = 1``: any layout the layer takes)."""
    if isinstance(module, nn.Linear):
        rows, js = x.reshape(queries, -1, x.shape[-1]), j.reshape(queries, -1, j.shape[-1])  # [Q, R, in], [Q, R, out]
        return js.transpose(1, 2) @ rows, js.sum(dim=1)
    batched = x.dim() == module.weight.dim()
    patches, _ = conv_patches(module, x if batched else x.unsqueeze(0))  # [Q, C_in * k, L']
    js = j.reshape(queries, module.out_channels, -1)  # [Q, out, L']
    return (js @ patches.transpose(1, 2)).view(queries, *module.weight.shape), js.sum(dim=2)

