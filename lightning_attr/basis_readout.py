"""The linear readout along layer-output bases: ``S`` sources for the price of ``A`` tangents, by forward mode.

The linear readout (:mod:`readout`) of a response ``r_s`` is ``d/de m_q(theta + e r_s)`` at ``e = 0``. For a network
whose every trainable parameter is the weight or bias of a Linear / Conv1d / Conv2d layer (an MLP, a CNN), it splits
over the layers' outputs ``z_l = W_l x_l + c_l`` (Conv: ``W_l * x_l + c_l``):

    score(q, s) = sum_l < J_l,  T_l(dW_{l,s}) + dc_{l,s} >,     J_l = d m_q / d z_l   (A_l numbers per query)

where ``T_l(dW) = dW x_l`` (Conv: ``dW * x_l``) is the output's tangent from a weight tangent. By associativity this is
``< M_l, dW_{l,s} > + < sum_positions J_l, dc_{l,s} >`` with ``M_l = J_l^T x_l`` (Conv: ``J_l`` times the unfolded
patches of ``x_l``, :func:`~lightning_attr.layer_readout.conv_patches`): the query's gradient with respect to the layer's
weight, built from ``J_l`` and the layer's input without any backward pass. So the scores are one matrix product of
those per-query vectors (``Tensor[Q, P]``) with the responses (``[Q, P] x [P, S]``, each response read once).

``J_l`` comes from forward mode along the **basis of the layer outputs**: one ``vmap(jvp)`` over ``A = sum_l A_l``
unit tangents injected at the outputs (forward hooks, :func:`~lightning_attr.layer_readout.adding_to_outputs`), all
layers in one call. ``A`` tangents instead of ``S``: 210 instead of 4,000 on the MNIST-1D MLP (40-100-100-10), 650
on its CNN. Nothing here runs reverse mode: the passes are jvps along layer-output bases, then matrix products.

Taken by :func:`readout.score_sources` when every trainable parameter is covered, no covered parameter is used outside
its layer's forward (the capture pass's check), and ``A <= S``; else the layer readout / ``vmap(jvp)`` over the
sources. Several queries: each query's ``J`` is taken on the query alone (``vmap`` over the queries, one example
each), so the layers' outputs must have the batch as their first dimension (checked: another layout, or a kernel that
cannot be vmapped per example, sends the batch back to the other paths).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import jvp, vmap
from torch.utils._pytree import tree_map

from lightning_attr.curvature import batch_size_of
from lightning_attr.functional import FunctionalModel
from lightning_attr.layer_readout import _Layer, adding_to_outputs, capture_layers, conv_patches, handled_layers
from lightning_attr.parameters import ParameterSpace

_BASIS_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)  # layers whose weight gradient is built from J and the input


def basis_layers(module: nn.Module, space: ParameterSpace) -> tuple[_Layer, ...] | None:
    """The handled Linear / Conv1d / Conv2d layers (:func:`~lightning_attr.layer_readout.handled_layers`) when their
    weights and biases are every trainable parameter of ``space``; else ``None`` (the basis path does not apply)."""
    layers = tuple(layer for layer in handled_layers(module, space) if type(layer.module) in _BASIS_TYPES)
    covered = {name for layer in layers for name in layer.names()}
    return layers if layers and covered >= set(space.names) else None


def basis_gradients(
    model: FunctionalModel, theta: Tensor, batch: Any, layers: Sequence[_Layer], *, max_tangents: int, chunk_size: int
) -> Tensor | None:
    """``Tensor[Q, P]`` float32: each query's gradient of its measurement at ``theta``, built by forward mode along the
    bases of ``layers``' outputs (module docstring). ``None`` when the basis path does not apply to this batch: a
    covered parameter used outside its layer, more than ``max_tangents`` basis tangents per query, or (``Q > 1``)
    a layer output without the batch as first dimension.

    Args:
        layers: :func:`basis_layers` of the model (they cover every parameter of ``model.space``).
        max_tangents: the most basis tangents worth carrying (the caller's alternative carries that many).
        chunk_size: basis tangents per vmapped call (each carries one pass's activations per query).
    """
    params = model.space.unflatten(theta)
    captured = capture_layers(model, params, batch, layers, owned=("weight", "bias"))
    if captured is None:
        return None
    inputs, outputs = captured
    queries = batch_size_of(batch)
    if queries > 1 and any(t.dim() == 0 or t.shape[0] != queries for ts in [*inputs, *outputs] for t in ts):
        return None  # the batch is not the first dimension of every layer input and output
    sizes = [[z.numel() // queries for z in zs] for zs in outputs]
    if sum(map(sum, sizes)) > max_tangents:
        return None
    try:
        sensitivity = _output_sensitivities(model, params, batch, layers, outputs, chunk_size)
    except RuntimeError:  # a kernel without a batching rule for one vmapped example, or another layout per example
        if queries == 1:
            raise
        return None
    per_call = iter(sensitivity.split([n for ns in sizes for n in ns], dim=1))
    gradients: dict[str, Tensor] = {}
    for layer, xs, zs in zip(layers, inputs, outputs):
        for x, z in zip(xs, zs):
            j = next(per_call).reshape(z.shape)
            for name, g in zip(layer.names(), _layer_gradients(layer.module, x, j, queries)):
                if name in params:
                    gradients[name] = gradients[name] + g if name in gradients else g
    return model.space.flatten({n: gradients.get(n, theta.new_zeros(queries, *params[n].shape)) for n in model.space.names}, batch_dims=1)


def _output_sensitivities(
    model: FunctionalModel,
    params: dict[str, Tensor],
    batch: Any,
    layers: Sequence[_Layer],
    outputs: list[list[Tensor]],
    chunk_size: int,
) -> Tensor:
    """``Tensor[Q, A]``: ``d m_q / d z`` for every number of every call's output ``z`` (``outputs[i][k]``, call ``k`` of
    ``layers[i]`` at ``params``) of query ``q``, calls in that order and each flattened, by ``jvp`` along unit tangents of
    the outputs. One vmapped call per layer call, in which that output is replaced by itself carrying the tangents (no
    other tangent enters, so nothing is cut): a tangent is carried from its layer on (``A_l`` tangents through the
    layers after ``l``), not through the whole network."""
    queries = batch_size_of(batch)
    calls = [(i, k) for i, zs in enumerate(outputs) for k in range(len(zs))]

    def measure(i: int, k: int, u: Tensor, example: Any) -> Tensor:  # u: the output of call k of layer i, flat
        value = u.view(outputs[i][k].shape[int(queries > 1) :])
        added = [[None] * len(zs) for zs in outputs]
        added[i][k] = value.unsqueeze(0) if queries > 1 else value
        with adding_to_outputs(layers, added, replace=True):
            return model.measurement(params, example)

    def along_bases(example: Any, values: list[Tensor]) -> Tensor:  # [A, Q'] for a batch of Q' queries
        parts = []
        for (i, k), value in zip(calls, values):
            basis = torch.eye(value.numel(), device=value.device)
            along = vmap(lambda e: jvp(lambda u: measure(i, k, u, example), (value,), (e,))[1])  # noqa: B023
            parts += [along(rows) for rows in basis.split(max(1, chunk_size))]
        return torch.cat(parts)

    flat = [outputs[i][k].reshape(queries, -1) for i, k in calls]  # per call [Q, A_call]
    if queries == 1:
        return along_bases(batch, [f[0] for f in flat]).T
    unbatched = lambda example: tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, example)  # noqa: E731
    one = lambda example, values: along_bases(unbatched(example), values)[:, 0]  # noqa: E731
    return vmap(one, in_dims=(tree_map(lambda t: 0 if isinstance(t, Tensor) else None, batch), 0))(batch, flat)


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

