"""The linear readout along layer bases: ``S`` sources for the price of a few hundred tangents, by forward mode.

The linear readout (:mod:`readout`) of a response ``r_s`` is ``d/de m_q(theta + e r_s) = <g_q, r_s>`` with ``g_q`` the
query's gradient. For a network whose every trainable parameter is the weight or bias of a Linear / Conv1d / Conv2d
layer (an MLP, a CNN), ``g_q`` is built here by **forward mode only**, layer by layer, with one of two bases:

- **the layer's output**: ``J_l = d m_q / d z_l`` for its output ``z_l = W_l x_l + c_l`` (Conv: ``W_l * x_l + c_l``),
  ``A_l`` numbers per query, from jvps along the ``A_l`` unit tangents of ``z_l`` (added to the output by a forward
  hook, :func:`~lightning_attr.layer_readout.adding_to_outputs`); then the weight's gradient is ``J_l^T x_l`` (Conv:
  ``J_l`` times the unfolded patches of ``x_l``, :func:`~lightning_attr.layer_readout.conv_patches`) and the bias's
  ``J_l`` summed over positions: no backward pass, a contraction of the input captured by one plain forward pass;
- **the layer's parameters**: jvps along the ``P_l`` unit tangents of its weight and bias give that part of ``g_q``
  directly.

Per layer the smaller basis is taken (the MNIST-1D MLP 40-100-100-10: 100 + 100 + 10 output tangents; its CNN:
96 parameter tangents for the first convolution, 320 + 10 output tangents after it). The layers' tangents are carried
in a few ``vmap(jvp)`` **passes**, consecutive layers together (:func:`_plan_passes`): a pass carries all its
tangents from where its first layer's enter, so merging saves a pass's fixed cost (:data:`PASS_MACS`) and costs the
later layers' tangents the network between (the MNIST-1D CNN: 96, then 320 + 10; the digits CNN: one pass of
160 + 128 + 10). So the scores cost ``sum_l min(A_l, P_l)`` tangents instead of ``S``, and one matrix product of the
query gradients with the responses (``[Q, P] x [P, S]``: each response read once). Nothing here runs reverse mode:
jvps along layer bases, then matrix products.

The ``E`` members of an ensemble (one architecture, ``E`` parameter vectors) are read together: the capture pass and
every jvp pass are ``vmap``-ed over the members too (:func:`member_gradients`), so a query pays each pass's fixed cost
once, not ``E`` times; a forward that cannot be vmapped over members (its Python reads an activation's value) is read
one member at a time.

Taken by :func:`readout.score_sources` when every trainable parameter is covered, no covered parameter is used outside
its layer's forward (the capture pass's check), and the tangents are at most ``S``; else the layer readout /
``vmap(jvp)`` over the sources. Several queries: each query is read on its own (``vmap`` over the queries, one example
each), so the layers' inputs and outputs must have the batch as their first dimension (checked: another layout, or a
kernel that cannot be vmapped per example, sends the batch back to the other paths).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import jvp, vmap
from torch.utils._pytree import tree_flatten, tree_map

from lightning_attr.curvature import batch_size_of
from lightning_attr.functional import FunctionalModel
from lightning_attr.layer_readout import Captured, _Layer, adding_to_outputs, capture_layers, capturing, handled_layers, weight_rows
from lightning_attr.module_cache import module_cache
from lightning_attr.parameters import ParameterSpace

_BASIS_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)  # layers whose weight gradient is built from J and their input
# What one more vmapped jvp pass costs beyond its tangents, in activation numbers carried. Set from the digits MLP
# 64-64-10 (S = 1,400; 74 tangents in 2 passes, about 200 activation numbers per query; one thread, paired ad hoc
# timings on the loaded machine): at one query the bases took 4.2 ms against the layer readout's 6.8 (one pass of
# 1,400 source tangents), so PASS_FLOATS < 2.7e5; at two queries (each read on its own: vmap over the queries) 9.9
# against 8.7, at four 10.1 against 12.5.
PASS_FLOATS = 1e5
# What one more vmapped jvp pass costs beyond its tangents, in multiply-adds carried (all members and queries): the
# plan merges consecutive layers into one pass while their tangents' extra multiply-adds (through the network between)
# stay under it. Bracketed on the bench's CNNs (three members, one query, one thread, paired thread-time timings on the
# loaded machine): on the MNIST-1D CNN one pass of 96 + 320 + 10 tangents took 8.3 ms against 5.4 for two passes (96,
# then 330), merging would carry 2.8e7 more; on the digits CNN one pass of 160 + 128 + 10 took 5.7-6.1 ms against
# 6.3 for two, merging carries 8.7e6 more. 1.5e7 sits between (their geometric mean).
PASS_MACS = 1.5e7
# The members of an ensemble are vmapped together for at most this many queries, else read one at a time: vmapped over
# members, queries and tangents, torch's batching rules expand the members' weights over the other two. Measured on the
# bench's CNNs (three members, thread time, the attributor's chunk): MNIST-1D CNN 8.8 vs 13.1 ms one by one at 1 query,
# 10.4 vs 16.1 at 2, 16.0 vs 18.5 at 4, 27-31 vs 29 at 8, 100 vs 36 at 16, 2,190 vs 614 at 300; digits CNN 6.7 vs
# 10.1 at 1, 14 vs 16 at 4, 21-22 vs 23 at 8, 54 vs 31 at 16.
TOGETHER_MAX_QUERIES = 4
# Tangent numbers per vmapped call past which a pass of output tangents leaves the other layers' biases without a zero
# tangent (:func:`_tangents_spread`). Bracketed on the bench's MLPs (three members read one by one, paired in-process
# timings of the query factors against the zero tangents, one thread): digits 64-64-10 at 64 queries (3.0e5 numbers)
# 1.11x slower without them, at 128 (6.1e5) 0.89x, at 300 (1.4e6) 0.78x; MNIST-1D 40-100-100-10 at 64 (6.4e5) 1.02x, at
# 128 (1.3e6) 0.80x, at 300 (1.8e6) 0.98-1.01x; at 8 to 32 queries 1.15-1.18x.
SPREAD_NUMBERS = 5e5
_KEPT_PLANS = 16  # per module: the plans (:class:`_Plan`) of the last few networks, member counts and query layouts


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
        factors: ``{weight name: (J: Tensor[Q, R, out], X: Tensor[Q, R, in])}`` for every Linear / Conv layer read
            along its output basis: ``J`` the measurement's derivative along each of the ``R`` rows of its output (its
            calls' rows concatenated; ``R = 1`` for one call of a Linear layer on a ``[Q, in]`` input; a convolution's
            output positions), ``X`` those rows' inputs (a convolution's unfolded patches, ``in = C_in x`` the kernel's
            size: :func:`~lightning_attr.layer_readout.weight_rows`); the weight's gradient is ``J^T X``
            (``Tensor[Q, out, in]``, a convolution's ``W.view(out, C_in k)``), rank ``R``.
        dense: ``{name: Tensor[Q, *shape]}``, every other covered parameter's gradient (biases, layers read along their
            parameters).
        flat: ``None``, or :meth:`gradients` computed once (for several members' queries at a time, then cut by
            :meth:`split`: one product per layer for all of them).
    """

    factors: dict[str, tuple[Tensor, Tensor]]
    dense: dict[str, Tensor]
    flat: Tensor | None = None

    @staticmethod
    def concatenated(parts: Sequence[QueryFactors]) -> QueryFactors:
        """The queries of ``parts`` (of the same layers) one after the other."""
        cat = lambda tensors: torch.cat(list(tensors))  # noqa: E731
        factors = {n: (cat(p.factors[n][0] for p in parts), cat(p.factors[n][1] for p in parts)) for n in parts[0].factors}
        flat = cat(p.flat for p in parts) if all(p.flat is not None for p in parts) else None
        return QueryFactors(factors, {n: cat(p.dense[n] for p in parts) for n in parts[0].dense}, flat)

    @property
    def queries(self) -> int:
        """``Q``, the rows of these factors."""
        return next(iter(self.dense.values()), next(iter(self.factors.values()), (torch.empty(0),))[0]).shape[0]

    def split(self, size: int) -> list[QueryFactors]:
        """These factors cut into consecutive groups of ``size`` queries (every tensor's first dimension; e.g. one
        :class:`QueryFactors` per member of :func:`member_query_factors`): one ``split`` per tensor, not a slice per
        tensor and group."""
        pieces = {n: (j.split(size), x.split(size)) for n, (j, x) in self.factors.items()}
        dense = {n: g.split(size) for n, g in self.dense.items()}
        flat = None if self.flat is None else self.flat.split(size)
        return [
            QueryFactors({n: (j[e], x[e]) for n, (j, x) in pieces.items()}, {n: g[e] for n, g in dense.items()}, None if flat is None else flat[e])
            for e in range(-(-self.queries // size))
        ]  # fmt: skip

    def with_gradients(self, space: ParameterSpace, like: Tensor) -> QueryFactors:
        """The same factors holding :meth:`gradients` (``flat``), computed here for all their queries at once."""
        return replace(self, flat=self.gradients(space, self.queries, like))

    def gradients(self, space: ParameterSpace, queries: int, like: Tensor) -> Tensor:
        """``Tensor[Q, P]`` float32: the query gradients laid out as ``space`` (zeros for a parameter not covered)."""
        if self.flat is not None:
            return self.flat
        products = {name: j.transpose(1, 2) @ x for name, (j, x) in self.factors.items()}  # [Q, out, in]: W's layout
        parts = [products[n] if n in products else self.dense.get(n) for n in space.names]
        flat = [like.new_zeros(queries, k) if g is None else g.reshape(queries, k) for g, k in zip(parts, space.numels)]
        return torch.cat(flat, dim=1).float()  # the parameters side by side, as ParameterSpace.flatten lays them out


def basis_gradients(
    model: FunctionalModel, theta: Tensor, batch: Any, layers: Sequence[_Layer], *, num_sources: int, chunk_size: int
) -> Tensor | None:
    """``Tensor[Q, P]`` float32: each query's gradient of its measurement at ``theta: Tensor[P]``, by forward mode along
    the bases of ``layers``' outputs or parameters (module docstring); :func:`member_gradients` for one member."""
    gradients = member_gradients(model, theta.unsqueeze(0), batch, layers, num_sources=num_sources, chunk_size=chunk_size)
    return None if gradients is None else gradients[0]


def member_gradients(
    model: FunctionalModel, thetas: Tensor, batch: Any, layers: Sequence[_Layer], *, num_sources: int, chunk_size: int
) -> Tensor | None:
    """``Tensor[E, Q, P]`` float32: each query's gradient of its measurement at each of ``E`` parameter vectors
    ``thetas: Tensor[E, P]`` (the members of an ensemble: one architecture, other weights), by forward mode along the
    bases of ``layers``' outputs or parameters (module docstring), all members in the same vmapped passes. ``None`` when
    the basis path does not apply to this batch: a covered parameter used outside its layer, a cost above that of the
    ``num_sources`` source tangents it replaces (:func:`_cheaper_than_sources`), or (``Q > 1``) a layer input or output
    without the batch as first dimension.

    Args:
        layers: :func:`basis_layers` of the model (they cover every parameter of ``model.space``).
        num_sources: ``S``, the tangents the other paths carry.
        chunk_size: basis tangents per vmapped call (each carries one pass's activations per query), shared by the
            members read together.
    """
    members, queries = thetas.shape[0], batch_size_of(batch)
    parts = _member_factors(model, thetas, batch, layers, chunk_size, num_sources)
    return None if parts is None else parts.gradients(model.space, members * queries, thetas).view(members, queries, -1)


def query_factors(
    model: FunctionalModel, theta: Tensor, batch: Any, layers: Sequence[_Layer], *, chunk_size: int, num_sources: int | None = None
) -> QueryFactors | None:
    """The query gradients of :func:`basis_gradients` per layer, the weight of a Linear / Conv layer read along its
    outputs kept as its factors ``(J, X)`` (:class:`QueryFactors`): ``R (out + in)`` numbers per query instead of
    ``out x in``. ``None`` where
    :func:`basis_gradients` gives ``None``; ``num_sources=None`` skips its cost rule (the caller reads the factors, not
    ``S`` source tangents)."""
    return _member_factors(model, theta.unsqueeze(0), batch, layers, chunk_size, num_sources)


def member_query_factors(
    model: FunctionalModel, thetas: Tensor, batch: Any, layers: Sequence[_Layer], *, chunk_size: int, laid_out: bool = False
) -> list[QueryFactors] | None:
    """:func:`query_factors` at each of ``E`` members' parameters ``thetas: Tensor[E, P]``, all members in the same
    vmapped passes (as :func:`member_gradients`): one :class:`QueryFactors` per member, or ``None``. ``laid_out``: each
    holds its query gradients ``Tensor[Q, P]`` too (:attr:`QueryFactors.flat`), laid out for all members at once
    (``E Q P`` floats held together)."""
    parts = _member_factors(model, thetas, batch, layers, chunk_size, None)
    if parts is None:
        return None
    parts = parts.with_gradients(model.space, thetas) if laid_out else parts
    return parts.split(batch_size_of(batch))


def _member_factors(
    model: FunctionalModel, thetas: Tensor, batch: Any, layers: Sequence[_Layer], chunk_size: int, num_sources: int | None
) -> QueryFactors | None:
    """:class:`QueryFactors` of ``E`` members (``thetas: Tensor[E, P]``) and ``Q`` queries, member-major (``E x Q`` rows:
    member ``e``'s query ``q`` is row ``e Q + q``): one capture pass and the planned passes (:func:`_plan_passes`), each
    ``vmap``-ed over the members. ``None`` where :func:`member_gradients` gives ``None``; ``num_sources=None`` skips the
    cost rule. Where the members cannot be vmapped together (a forward whose Python reads its activations' values),
    each member is read on its own; so are more than :data:`TOGETHER_MAX_QUERIES` queries."""
    queries = batch_size_of(batch)
    if thetas.shape[0] == 1 or queries <= TOGETHER_MAX_QUERIES:
        try:
            return _factors(model, thetas, batch, layers, chunk_size, num_sources)
        except RuntimeError:  # a kernel without a batching rule, another layout per example, values read in Python
            if thetas.shape[0] == 1:
                if queries == 1:
                    raise
                return None
    parts = []
    for theta in thetas:
        parts.append(_member_factors(model, theta.unsqueeze(0), batch, layers, chunk_size, num_sources))
        if parts[-1] is None:
            return None
    return QueryFactors.concatenated(parts)


def _factors(
    model: FunctionalModel, thetas: Tensor, batch: Any, layers: Sequence[_Layer], chunk_size: int, num_sources: int | None
) -> QueryFactors | None:
    """:func:`_member_factors` with the members vmapped together (one member: not vmapped); raises what the passes
    raise. A single query whose layout (network, members, the batch's shapes) was planned before skips the capture pass:
    its first pass records the layers' inputs itself (:class:`_Plan`)."""
    members, queries = thetas.shape[0], batch_size_of(batch)
    params = _member_parameters(model, thetas)  # {name: Tensor[E, *shape]}
    step = max(1, chunk_size // members)  # the members share a call's activations
    plans = module_cache(model.module, "_basis_plans")
    key = (model.space, tuple(layers), members, _layout(batch), PASS_MACS) if queries == 1 else None
    plan, first = plans.get(key), None
    if plan is not None:
        if num_sources is not None and not _cheaper_than_sources(plan.tangents, len(plan.passes), plan.floats, 1, num_sources):
            return None
        try:
            first, inputs, seen = _pass_jacobian(model, params, batch, layers, plan.calls, plan.passes[0], step, record=True)
        except RuntimeError:  # e.g. a layer called more often than planned: planned again below, from a capture pass
            first, seen = None, None
        if seen is not None and seen.foreign:
            return None
        if seen is None or plan.outputs != tuple(tuple(tuple(z) for z in zs) for zs in seen.outputs):
            first = None  # this query's layer calls differ from the plan's (a forward that branches on its data)
    if first is None:
        captured = _captured(model, params, batch, layers, members)
        if captured is None:
            return None
        inputs, outputs = captured  # each [E, *shape of one member's]
        if queries > 1 and any(t.dim() == 1 or t.shape[1] != queries for ts in [*inputs, *outputs] for t in ts):
            return None  # the batch is not the first dimension of every layer input and output
        plan = _Plan.of(layers, params, outputs, inputs, queries, members)
        if key is not None:
            while len(plans) >= _KEPT_PLANS:
                plans.pop(next(iter(plans)))
            plans[key] = plan
        if num_sources is not None and not _cheaper_than_sources(plan.tangents, len(plan.passes), plan.floats, queries, num_sources):
            return None
    later = [_pass_jacobian(model, params, batch, layers, plan.calls, part, step) for part in plan.passes[first is not None :]]
    jacobians = [first, *later] if first is not None else later
    jacobians = jacobians[0] if len(jacobians) == 1 else torch.cat(jacobians, dim=2)
    passes, tangents = plan.passes, plan.tangents
    rows = members * queries
    dense: dict[str, Tensor] = {}
    factors: dict[str, list[tuple[Tensor, Tensor]]] = {}

    def accumulate(name: str, g: Tensor) -> None:
        dense[name] = dense[name] + g if name in dense else g

    ordered = [g for part in passes for g in part]
    for group, j in zip(ordered, jacobians.reshape(rows, tangents).split([g.size for g in ordered], dim=1)):
        if group.call is None:  # the parameters' basis: the jvps gave the gradient itself
            for name, g in zip(group.names, j.split([params[n][0].numel() for n in group.names], dim=1)):
                accumulate(name, g.reshape(rows, *params[name].shape[1:]))
            continue
        i, k = group.call  # the output's basis: J, then the layer's rule on every member's and query's input
        x, j = inputs[i][k], j.reshape(rows, *group.shape)  # [E, *x.shape], [E Q, *z.shape per query]
        weight, bias = layers[i].names()
        j, x = weight_rows(layers[i].module, j, x, rows)  # dW = J^T X, kept as its factors; dc = J summed over rows
        if weight in params:
            factors.setdefault(weight, []).append((j, x))
        if bias in params:
            accumulate(bias, j.sum(dim=1))
    joined = {n: calls[0] if len(calls) == 1 else (torch.cat([j for j, _ in calls], dim=1), torch.cat([x for _, x in calls], dim=1))
              for n, calls in factors.items()}  # fmt: skip
    return QueryFactors(joined, dense)


def _captured(
    model: FunctionalModel, params: dict[str, Tensor], batch: Any, layers: Sequence[_Layer], members: int
) -> tuple[list[list[Tensor]], list[list[Tensor]]] | None:
    """The capture pass of every member (:func:`~lightning_attr.layer_readout.capture_layers`): per layer and call, the
    input and output, ``Tensor[E, *shape of one member's]``; ``None`` when a covered parameter is used outside its
    layer."""
    foreign: list[bool] = []

    def capture(values: dict[str, Tensor]) -> tuple[list[list[Tensor]], list[list[Tensor]]]:
        captured = capture_layers(model, values, batch, layers, owned=("weight", "bias"))
        foreign.append(captured is None)
        return captured if captured is not None else ([], [])

    inputs, outputs = _over_members(capture, members)(params)
    return None if foreign[0] else (inputs, outputs)


def _member_parameters(model: FunctionalModel, thetas: Tensor) -> dict[str, Tensor]:
    """``{name: Tensor[E, *shape]}``: the members' parameters ``thetas: Tensor[E, P]`` per parameter, each a tensor of
    its own (not a view of ``thetas``: :func:`_pass_jacobian` moves them as they are). Kept for the last ``thetas`` of
    the module (the same object, not written to since: the attributor hands the same stacked snapshots to every query
    of a store, :meth:`~lightning_attr.attributor.Attributor._stacked`), so that a query does not lay them out again."""
    cache = module_cache(model.module, "_basis_member_parameters")
    last = cache.get("last")
    if last is not None and last[0] is thetas and last[1] == (thetas._version, model.space):
        return last[2]
    params = {name: p.clone() for name, p in model.space.unflatten(thetas).items()}
    cache["last"] = (thetas, (thetas._version, model.space), params)
    return params


def _layout(batch: Any) -> tuple:
    """What a plan depends on in a query batch: its tensors' shapes, dtypes and devices, and its other leaves."""
    return tuple((tuple(t.shape), t.dtype, t.device) if isinstance(t, Tensor) else repr(t) for t in tree_flatten(batch)[0])


@dataclass(frozen=True)
class _Plan:
    """The passes of one network for one layout of the query batch and number of members, from a capture pass.

    Kept per module (the last :data:`_KEPT_PLANS`, keyed by the parameter space, the layers, the members,
    :func:`_layout` and :data:`PASS_MACS`) for single queries: a later query of that layout runs no capture pass; its
    first pass records the layers' inputs (the primal values, :func:`~lightning_attr.layer_readout.capturing`) and
    checks what the capture would have: no covered parameter used outside its layer, and the layers called as planned,
    with these output shapes (else it is planned again). The capture pass it saves cost 0.56 ms of the digits MLP's
    2.0 ms query factors and 0.97 ms of the MNIST-1D CNN's 6.6 ms (three members, one query, one thread, thread time);
    whole ``attribute()`` calls, planned against captured in alternating rounds of one process (load 6): 0.92x on the
    factored digits MLP, 0.96x on the MNIST-1D CNN, 0.98x on the digits CNN.

    Attributes:
        passes: :func:`_plan_passes` of the layers' basis groups (:func:`_basis_groups`).
        calls: how many times each layer ran. outputs: per layer and call, one member's output shape.
        floats: activation numbers of one member and query (the layers' inputs and outputs), for the cost rule.
    """

    passes: tuple[tuple[_Group, ...], ...]
    calls: tuple[int, ...]
    outputs: tuple[tuple[tuple[int, ...], ...], ...]
    floats: int

    @property
    def tangents(self) -> int:
        return sum(g.size for part in self.passes for g in part)

    @classmethod
    def of(
        cls, layers: Sequence[_Layer], params: dict[str, Tensor], outputs: list[list[Tensor]], inputs: list[list[Tensor]],
        queries: int, members: int,
    ) -> _Plan:  # fmt: skip
        """From a capture pass's ``inputs`` and ``outputs`` (``Tensor[E, *shape of one member's]``)."""
        shapes = tuple(tuple(tuple(z.shape[1:]) for z in zs) for zs in outputs)
        groups = _basis_groups(layers, params, shapes, queries)
        floats = sum(t[0].numel() for ts in [*inputs, *outputs] for t in ts) // queries
        passes = tuple(tuple(part) for part in _plan_passes(groups, members * queries))
        return cls(passes, tuple(len(zs) for zs in outputs), shapes, floats)


def _over_members(fn: Callable, members: int) -> Callable:
    """``fn`` mapped over the leading (member) dimension of its tensor arguments and outputs: ``vmap(fn)``, or for one
    member ``fn`` on that member alone with its outputs given the dimension back (its activations then stay unbatched,
    as a plain forward's: a Python condition on their values still works)."""
    if members > 1:
        return vmap(fn)
    first = lambda tree: tree_map(lambda t: t[0] if isinstance(t, Tensor) else t, tree)  # noqa: E731
    return lambda *trees: tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, fn(*map(first, trees)))


@dataclass(frozen=True)
class _Group:
    """The basis tangents of one layer, or of one call of it: ``size`` unit tangents per query, of its parameters
    ``names`` (``call is None``) or of the output of call ``call = (i, k)`` (call ``k`` of ``layers[i]``; ``shape``:
    that output's shape per query); ``downstream``: what one tangent costs from where it enters (multiply-adds and
    activation numbers of the layer calls after it, :func:`_basis_groups`)."""

    size: int
    names: tuple[str, ...]
    call: tuple[int, int] | None
    shape: tuple[int, ...]
    downstream: float


def _basis_groups(
    layers: Sequence[_Layer], params: dict[str, Tensor], outputs: Sequence[Sequence[tuple[int, ...]]], queries: int
) -> list[_Group]:
    """Per layer (in ``layers``' order, taken as the forward order), the smaller basis: its trainable parameters (one
    group) or its outputs (a group per call; ``outputs``: per layer and call, one member's output shape). A group's
    ``downstream`` counts, per tangent, the multiply-adds (``numel(z) * fan_in``) and the output numbers of the layer
    calls it passes through: the layer's own calls for the parameters' basis, the later layers' for both."""
    def cost(i: int) -> float:
        fan_in = layers[i].module.weight[0].numel()
        return sum(math.prod(z) // queries * (fan_in + 1) for z in outputs[i])

    after = [sum(cost(j) for j in range(i + 1, len(layers))) for i in range(len(layers))]
    groups = []
    for i, layer in enumerate(layers):
        names = tuple(n for n in layer.names() if n in params)
        weights = sum(params[n][0].numel() for n in names)
        numbers = sum(math.prod(z) // queries for z in outputs[i])
        if weights <= numbers:
            groups.append(_Group(weights, names, None, (), after[i] + cost(i)))
        else:
            groups += [_Group(math.prod(z) // queries, names, (i, k), tuple(z[1:]) if queries > 1 else tuple(z), after[i])
                       for k, z in enumerate(outputs[i])]  # fmt: skip
    return groups


def _plan_passes(groups: list[_Group], readings: int) -> list[list[_Group]]:
    """``groups`` cut into consecutive passes (one vmapped call each) at the least cost: a pass carries all its
    tangents from where its first group enters, ``readings`` (members x queries) times, plus :data:`PASS_MACS` for the
    call itself (dynamic programming over the cut points)."""
    best = [0.0] + [math.inf] * len(groups)  # best[j]: the cost of the first j groups
    cut = [0] * (len(groups) + 1)
    for j in range(1, len(groups) + 1):
        for i in range(j):
            cost = best[i] + PASS_MACS + readings * groups[i].downstream * sum(g.size for g in groups[i:j])
            if cost < best[j]:
                best[j], cut[j] = cost, i
    passes, j = [], len(groups)
    while j:
        passes.append(groups[cut[j] : j])
        j = cut[j]
    return passes[::-1]


def _cheaper_than_sources(tangents: int, passes: int, floats: int, queries: int, num_sources: int) -> bool:
    """Whether ``tangents`` basis tangents per query in ``passes`` vmapped passes cost less than ``num_sources`` source
    tangents in one, for queries of ``floats`` activation numbers each: ``tangents + (passes - 1) * PASS / (Q * floats)
    < S``, with a pass's own cost ``PASS`` counted as :data:`PASS_FLOATS` activation numbers carried."""
    return tangents + (passes - 1) * PASS_FLOATS / max(1, queries * floats) < num_sources


def _pass_jacobian(
    model: FunctionalModel, params: dict[str, Tensor], batch: Any, layers: Sequence[_Layer], calls: Sequence[int],
    groups: Sequence[_Group], chunk_size: int, record: bool = False, bias_tangents: bool | None = None,
) -> Tensor | tuple[Tensor, list[list[Tensor]], Captured]:  # fmt: skip
    """``Tensor[E, Q, n]``: ``d m_q / d u`` of every member (``params``: ``{name: Tensor[E, *shape]}``) along the ``n``
    basis tangents of ``groups``, by jvps along unit vectors, ``vmap``-ed over the members, the queries (``Q > 1``: each
    example on its own, so a query never sees the others' tangents) and the tangents (``chunk_size`` per call). A
    parameter group's tangent moves its parameters; an output group's is added to that call's output (a zero that
    carries it; ``calls``: how many times each layer runs). The other layers' biases carry zero tangents: an output plus
    a bias without a tangent goes through a decomposition in Python under ``vmap(jvp)`` (a zero tensor's ``add``), one
    with a zero tangent does not (an ad hoc timing of a Linear 64 -> 10 with 64 tangents: 0.37 vs 0.19 ms); but where
    the tangents are many numbers per call (:func:`_tangents_spread`), the zero tangent is paid as a full add that spreads
    the output's tangents over every query, and the biases carry none (``bias_tangents=False``; tried first there, and
    the pass run again with them where vmap refuses it, e.g. an in-place activation on an output without a tangent: the
    refusal is kept per module, layers and groups, so a later call of that pass does not try again).

    ``record`` (one query): the pass also does the capture pass's work (:func:`~lightning_attr.layer_readout.capturing`
    in its first call): returns ``(jacobian, inputs, seen)``, ``inputs`` per layer and call ``Tensor[E, *shape of one
    member's]`` (the primal values, handed out of ``jvp`` and ``vmap`` as auxiliary outputs), ``seen`` with the
    outputs' shapes and whether a covered parameter was used outside its layer (its inputs emptied)."""
    queries, sizes = batch_size_of(batch), [g.size for g in groups]
    if bias_tangents is None:
        spread = _tangents_spread(groups, queries, chunk_size)  # False for one query: no key hashed below
        refused = module_cache(model.module, "_basis_spread_refused") if spread else {}  # {(layers, groups): True}
        if spread and (tuple(layers), tuple(groups)) not in refused:
            try:
                return _pass_jacobian(model, params, batch, layers, calls, groups, chunk_size, record, bias_tangents=False)
            except RuntimeError:  # e.g. an in-place activation on an output that carries no tangent: vmap refuses it
                refused[tuple(layers), tuple(groups)] = True  # not tried again for this network's pass
        bias_tangents = True
    moved = [n for g in groups if g.call is None for n in g.names]
    if bias_tangents:
        moved += [n for layer in layers for n in layer.names(("bias",)) if n in params and n not in moved]
    # fresh tensors: the tangent of a view would be allocated at its base's size (the members' whole [E, P])
    moving = {n: params[n] if params[n]._base is None else params[n].clone() for n in moved}
    fixed = {n: p for n, p in params.items() if n not in moving}
    entries = [g.call for g in groups if g.call is not None]
    moving_weights = any(g.call is None for g in groups)  # a parameter basis: _contiguous_inputs pays here
    repacked = [layer for layer in layers if isinstance(layer.module, nn.Linear)] if moving_weights else []
    seen: list[Captured] = []  # the record of the first call (record=True)

    def measure(values: dict[str, Tensor], added: list[Tensor], example: Any, capture: bool) -> tuple[Tensor, list[Tensor]]:
        per_call: list[list[Tensor | None]] = [[None] * count for count in calls]
        for (i, k), a in zip(entries, added):
            per_call[i][k] = a
        with contextlib.ExitStack() as stack:
            stack.enter_context(adding_to_outputs(layers, per_call))
            stack.enter_context(_contiguous_inputs(repacked))
            found = stack.enter_context(capturing(values, layers, ("weight", "bias"), shapes_only=True)) if capture else None
            out = model.measurement(values, example)
        if found is None:
            return out, []
        seen.append(found)
        inputs, found.inputs = [x for xs in found.inputs for x in xs], []  # out as auxiliary outputs: primal values
        return out, inputs

    def along(
        unit: Tensor, constant: dict[str, Tensor], values: dict[str, Tensor], zeros: list[Tensor], example: Any, capture: bool
    ) -> tuple[Tensor, list[Tensor]]:  # fmt: skip
        tangents = {n: torch.zeros_like(v) for n, v in values.items()}
        added = []
        for group, part in zip(groups, unit.split(sizes)):
            if group.call is None:
                shapes = [values[n].shape for n in group.names]
                tangents.update({n: t.view(s) for n, t, s in zip(group.names, part.split([math.prod(s) for s in shapes]), shapes)})
            else:
                added.append(part.view(zeros[len(added)].shape))
        _, out, inputs = jvp(lambda v, a: measure({**constant, **v}, a, example, capture), (values, zeros), (tangents, added), has_aux=True)
        return out, inputs

    n, step, device = sum(sizes), max(1, chunk_size), next(iter(params.values())).device

    def member(constant: dict[str, Tensor], values: dict[str, Tensor], example: Any) -> tuple[Tensor, list[Tensor]]:
        """``(Tensor[n, Q'], inputs)`` for ``Q'`` queries; the inputs (``record``) from the first call."""
        zeros = [torch.zeros(g.shape if queries == 1 else (1, *g.shape), device=device) for g in groups if g.call is not None]
        parts, inputs = [], []
        for start in range(0, n, step):
            capture = record and start == 0
            out, found = vmap(lambda u: along(u, constant, values, zeros, example, capture))(_unit_rows(start, min(step, n - start), n, device))
            parts.append(out)
            inputs = [x[0] for x in found] if capture else inputs  # not batched over the tangents: their first
        return torch.cat(parts), inputs

    members = len(next(iter(params.values())))
    if queries == 1:
        jacobian, inputs = _over_members(lambda c, v: (lambda j, x: (j.T, x))(*member(c, v, batch)), members)(fixed, moving)  # [E, 1, n]
    elif record:
        raise ValueError("record=True reads one query at a time.")
    else:
        unbatched = lambda example: tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, example)  # noqa: E731
        in_dims = tree_map(lambda t: 0 if isinstance(t, Tensor) else None, batch)
        per_query = lambda c, v: vmap(lambda example: member(c, v, unbatched(example))[0][:, 0], in_dims=(in_dims,))(batch)  # noqa: E731
        jacobian = _over_members(per_query, members)(fixed, moving)  # [E, Q, n]
    if not record:
        return jacobian
    flat = iter(inputs)
    return jacobian, [[next(flat) for _ in zs] for zs in seen[0].outputs], seen[0]


def _tangents_spread(groups: Sequence[_Group], queries: int, chunk_size: int) -> bool:
    """Whether a pass of output tangents only (``groups``) on ``queries > 1`` queries carries more than
    :data:`SPREAD_NUMBERS` tangent numbers per call at its first layer (queries x tangents per call x that output's
    numbers): then a zero tangent on the biases of the layers after it costs a full add per biased layer (it spreads the
    added tangents, the same for every query, over all the queries before anything needs them spread), more than
    :func:`_pass_jacobian`'s Python decomposition of a bias add without a tangent that it avoids."""
    if queries == 1 or any(g.call is None for g in groups):
        return False
    return queries * min(max(1, chunk_size), sum(g.size for g in groups)) * math.prod(groups[0].shape) > SPREAD_NUMBERS


@contextlib.contextmanager
def _contiguous_inputs(layers: Sequence[_Layer]) -> Iterator[None]:
    """Forward pre-hooks that hand ``layers`` a contiguous copy of their input (the same values). In a pass whose
    tangents move parameters, the tangents leave a convolution with the members' dimension inside the tangents' (its
    batching rule's layout), and a Linear layer after it then multiplies every (member, tangent) pair with its own copy
    of the weight (``torch.matmul`` does not fold the rows of that layout: on the MNIST-1D CNN a ``[3, 96, 320, 10]``
    copy of the head's weight, about 2 ms). A contiguous input is folded into one product per member. Measured in paired
    rounds (three members, one query, one thread, thread time): the MNIST-1D CNN's first pass (96 parameter tangents)
    3.40 -> 2.64 ms, the digits CNN's single pass 3.80 -> 2.96 ms; in a pass of output tangents only the copy costs
    more than it saves (MNIST-1D CNN 2.59 -> 2.74 ms), so :func:`_pass_jacobian` asks for it only where parameters
    move."""
    def contiguous(_module: nn.Module, args: tuple) -> tuple:
        return (args[0].clone(memory_format=torch.contiguous_format), *args[1:])

    with contextlib.ExitStack() as stack:
        for layer in layers:
            stack.callback(layer.module.register_forward_pre_hook(contiguous).remove)
        yield


@functools.lru_cache(maxsize=_KEPT_PLANS)
def _unit_rows(start: int, count: int, n: int, device: torch.device) -> Tensor:
    """``Tensor[count, n]``: the unit vectors ``start .. start + count - 1`` of ``R^n`` (rows of the identity), built once
    per chunk of a plan and kept (the last :data:`_KEPT_PLANS`; read only: the passes ``vmap`` over them). Building them
    took four small kernels per pass and query: 0.1 of the digits MLP's 2.4 ms planned pass (three members, one query,
    thread time)."""
    rows = torch.zeros(count, n, device=device)
    rows[torch.arange(count, device=device), torch.arange(start, start + count, device=device)] = 1.0
    return rows
