"""Forward-only readouts: score a query batch against sources from their parameter responses.

``score(q, b)`` is the change of the query measurement ``f_q`` when the parameters move by the
response ``r_b`` (METHOD.md):

- ``"linear"``:  ``d/de f_q(theta + e r_b)`` at ``e = 0`` by forward mode (exact first order). What runs depends on
  the network, never reverse mode: when every trainable parameter belongs to a Linear / Conv1d / Conv2d layer (MLPs,
  CNNs) and their outputs hold at most ``S`` numbers per query, jvps along the bases of the layers' outputs
  give each query's gradient, then one matrix product with the responses (:mod:`basis_readout`); else ``jvp`` along
  every source's response, vmapped, with the weight tangents of Linear / Conv layers applied as one matrix product
  per layer for all sources (:mod:`layer_readout`)
- ``"central"``: ``[f_q(theta + e r_b) - f_q(theta - e r_b)] / (2e)``, two forward passes
- ``"step"``:    ``f_q(theta + r_b) - f_q(theta)``, the counterfactual itself

None of them runs a backward pass. ``"gradient"`` computes the linear readout's scores another way:
``grad f_q(theta)^T r_b`` with the query gradients (reverse mode, one backward pass per query, ``Tensor[B, P]``)
and one matrix product with the responses. Equal to ``"linear"`` up to float rounding; it reads each response
once in a matrix product instead of carrying it through the network, as ``"linear"``'s layer-output bases do for
MLPs and CNNs by forward mode, but it is not forward-only (dense responses only). Sources are batched with ``vmap`` in chunks of ``chunk_size``; by default
(:func:`auto_chunk_size`) as many as keep the chunk's activations near ``CHUNK_ACTIVATION_MB``: every source in
one call for a single query on an MLP or small CNN (the per-call overhead of vmap and forward-mode AD then
comes once), a few hundred per call for a batch of hundreds of queries (larger chunks leave the cache).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor
from torch.func import jacrev, jvp, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_map
from lightning_attr.basis_readout import basis_gradients, basis_layers, member_gradients
from lightning_attr.curvature import batch_size_of
from lightning_attr.functional import FunctionalModel, has_recurrent_layer
from lightning_attr.layer_readout import SplitResponses, handled_layers, layer_parameters, linear_scores, source_count, source_rows
from lightning_attr.simulation import select_examples

READOUTS = ("linear", "central", "step", "gradient")
# Activations of one vmapped chunk, MB: sources per call = this / (queries x activation bytes per example).
# Measured on the digits MLP (64-64-10, S = 1,400, 300 queries, one thread): 128-256 sources per call (17-34 MB)
# were the fastest, 700 took 2.2x as long; for one query, one call over all 1,400 sources took half the time of 256.
CHUNK_ACTIVATION_MB = 32.0


def check_readout(kind: str) -> None:
    if kind not in READOUTS:
        raise ValueError(f"readout must be one of {READOUTS}, got {kind!r}.")


def _per_source(model: FunctionalModel, theta: Tensor, batch: Any, kind: str, epsilon: float):
    """``r: Tensor[P] -> Tensor[B]`` for one response; vmap it over sources."""
    f = lambda th: model.measurement(th, batch)  # noqa: E731
    if kind == "linear":
        return lambda r: jvp(f, (theta,), (r,))[1]
    if kind == "central":
        return lambda r: (f(theta + epsilon * r) - f(theta - epsilon * r)) / (2 * epsilon)
    base = f(theta)
    return lambda r: f(theta + r) - base


def query_gradients(model: FunctionalModel, theta: Tensor, batch: Any) -> Tensor:
    """``Tensor[B, P]``: the gradient of each query's measurement at ``theta`` (reverse mode: ``jacrev``, or one
    vector-Jacobian product per query for kernels without a batching rule, e.g. recurrent ones)."""
    f = lambda th: model.measurement(th, batch)  # noqa: E731
    if not has_recurrent_layer(model.module):
        try:
            return jacrev(f)(theta)
        except RuntimeError:  # a kernel without a batching rule: one pullback per query below
            pass
    out, pullback = vjp(f, theta)
    return torch.stack([pullback(row)[0] for row in torch.eye(out.numel(), device=theta.device, dtype=out.dtype)])


def _gradient_scores(
    model: FunctionalModel, theta: Tensor, responses: Tensor | SplitResponses, batch: Any, gradients: Callable = query_gradients
) -> Tensor | None:
    """``Tensor[B, S]``: ``gradients(model, theta, queries) @ responses.T`` (``Tensor[chunk, P]`` query gradients), the
    queries taken in chunks whose gradients (float32) stay under ``CHUNK_ACTIVATION_MB``. ``None`` when ``gradients``
    gives ``None`` (its path does not apply)."""
    times = responses.times if isinstance(responses, SplitResponses) else lambda g: g @ responses.T
    parts = []
    for rows in query_chunks(batch, theta):
        g = gradients(model, theta, select_examples(batch, rows))
        if g is None:
            return None
        parts.append(times(g))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def query_chunks(batch: Any, theta: Tensor) -> tuple[Tensor, ...]:
    """The query rows in chunks of as many as keep their gradients (``[chunk, P]`` float32) under ``CHUNK_ACTIVATION_MB``."""
    return torch.arange(batch_size_of(batch)).split(query_chunk_rows(theta))


def query_chunk_rows(theta: Tensor) -> int:
    """Query rows per chunk of :func:`query_chunks`: as many gradients ``Tensor[P]`` (``P = theta.numel()``) float32 as
    fit ``CHUNK_ACTIVATION_MB``, at least 1."""
    return max(1, int(CHUNK_ACTIVATION_MB * 2**20 // (4 * theta.numel())))


def loop_over(one: Any) -> Any:
    """``vmap(one)`` as a Python loop. Recurrent kernels (``aten::gru.input``, ...) have a batching rule
    only under forward-mode AD (the linear readout), so the central and step readouts loop over sources."""
    return lambda responses: torch.stack([one(r) for r in responses])


def readout_along(
    measure: Callable[[Tensor, Any], Tensor], kind: str, epsilon: float = 1.0, device: torch.device | str = "cpu"
) -> Callable[[Any], Tensor]:
    """The readout ``kind`` for responses that are not flat vectors (codec ``"lorif"``: factors per layer).

    ``measure(e, r) -> Tensor[B]``: the query measurement with the parameters moved by ``e`` times the response
    ``r`` (``e``: a 0-dim float32 tensor). Returns ``r -> Tensor[B]``: ``d/de measure`` at 0 (``"linear"``, by
    ``torch.func.jvp``), ``[measure(epsilon) - measure(-epsilon)] / (2 epsilon)`` (``"central"``) or
    ``measure(1) - measure(0)`` (``"step"``): what :func:`score_sources` computes for a flat ``r``.
    """
    check_readout(kind)
    if kind == "gradient":
        raise ValueError(
            "readout='gradient' needs each response as one flat vector (codec 'dense'); these responses are factored "
            "(codec 'lorif'). Use readout='linear', which gives the same scores with forward passes."
        )
    zero, one = torch.zeros((), device=device), torch.ones((), device=device)
    if kind == "linear":
        return lambda r: jvp(lambda e: measure(e, r), (zero,), (one,))[1]
    if kind == "central":
        return lambda r: (measure(epsilon * one, r) - measure(-epsilon * one, r)) / (2 * epsilon)
    return lambda r: measure(one, r) - measure(zero, r)


def activation_floats(model: FunctionalModel, theta: Tensor, batch: Any) -> int:
    """Numbers (floats) the module's leaf modules and its outputs produce for ``batch`` in one forward pass at
    ``theta``: what one source's tangent carries through the network, per vmapped source. Counted with forward
    hooks (removed afterwards) on one pass without gradients."""
    leaves = [m for m in model.module.modules() if next(m.children(), None) is None]
    counted = [0]

    def count(_module: Any, _inputs: Any, output: Any) -> None:
        counted[0] += sum(t.numel() for t in tree_flatten(output)[0] if isinstance(t, Tensor))

    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            out = model.outputs(theta, batch) if model.has_outputs else model.measurement(theta, batch)
    finally:
        for handle in handles:
            handle.remove()
    return counted[0] + sum(t.numel() for t in tree_flatten(out)[0] if isinstance(t, Tensor))


def auto_chunk_size(
    model: FunctionalModel, theta: Tensor, batch: Any, num_sources: int, activation_mb: float = CHUNK_ACTIVATION_MB
) -> int:
    """Sources per vmapped call: as many as keep ``chunk x`` (the batch's activation floats, :func:`activation_floats`)
    ``x 4`` bytes under ``activation_mb``, at least 1 and at most ``num_sources`` (all of them in one call when
    that fits)."""
    return _chunk_for(activation_floats(model, theta, batch), num_sources, activation_mb)


def _chunk_for(floats: int, num_sources: int, activation_mb: float = CHUNK_ACTIVATION_MB) -> int:
    return max(1, min(num_sources, int(activation_mb * 2**20 // (4 * max(1, floats)))))


def score_sources(
    model: FunctionalModel,
    theta: Tensor,
    responses: Tensor | SplitResponses,
    batch: Any,
    kind: str = "linear",
    *,
    chunk_size: int | None = None,
    epsilon: float = 1.0,
    layers: bool = True,
    basis: bool = True,
) -> Tensor:
    """Scores of every query against every source.

    The linear readout of a network whose every parameter belongs to a Linear / Conv1d / Conv2d layer (an MLP, a CNN)
    runs along layer bases (per layer its outputs or its parameters, the fewer) when their tangents cost less than
    ``S`` source tangents (:mod:`basis_readout`: jvps along those bases give the query gradients, then one matrix product with the
    responses; the same scores up to float32 rounding). Otherwise the linear readout applies the weight tangents of the module's Linear / Conv layers as one matrix product per
    layer (:mod:`layer_readout`; the same scores up to float32 rounding), and vmaps ``jvp`` over the rest, when one
    source's tangents of those weights hold at least as many numbers as its activation tangents for the batch
    (:func:`activation_floats`): it reads the weight tangents in one memory-bound pass but adds passes over the
    activation tangents, so it pays for a few queries and loses to ``vmap(jvp)``'s batched products for many
    (measured on the digits MLP and CNN: 0.45-0.97x its time up to 4 queries, 1.05-1.29x from 16 on; the rule's
    crossover there is about 22 and 6 queries).

    Args:
        theta: ``Tensor[P]`` float32 parameters to read out at.
        responses: ``Tensor[S, P]`` float32, or the same split per parameter (:class:`SplitResponses`, laid out
            once when a member is loaded; a flat tensor is split at every call for the linear readout).
        batch: query batch (as ``attribution_outputs`` expects it), ``B`` queries.
        chunk_size: sources (or layer-output basis tangents) per vmapped call; peak memory grows with
            ``chunk_size * B``. ``None``:
            :func:`auto_chunk_size` (all ``S`` at once for a single query on small networks).
        epsilon: relative step of the central readout (1 = the full response).
        layers: the linear readout applies the handled layers' weight tangents as matrix products (or runs along
            layer bases); ``False``: ``vmap(jvp)`` over flat responses for every parameter (the reference).
        basis: the linear readout may run along layer bases (:mod:`basis_readout`); ``False``: never.

    Returns:
        ``Tensor[B, S]``: predicted rise of each query's measurement if the source were removed.
    """
    check_readout(kind)
    if kind == "gradient":
        return _gradient_scores(model, theta, responses, batch)
    num_sources = source_count(responses)
    floats = activation_floats(model, theta, batch) if chunk_size is None else None  # one forward pass, done once
    if chunk_size is None:
        chunk_size = _chunk_for(floats, num_sources)
    gradients = _basis_path(model, num_sources, chunk_size) if kind == "linear" and layers and basis else None
    if gradients is not None:
        scores = _gradient_scores(model, theta, responses, batch, gradients)
        if scores is not None:
            return scores
    handled = handled_layers(model.module, model.space) if kind == "linear" and layers else ()
    if handled and floats is None:
        floats = activation_floats(model, theta, batch)
    if handled and floats <= sum(model.space.numels[model.space.names.index(layer.weight)] for layer in handled):
        scores = linear_scores(model, theta, split_for(responses, model, handled), batch, handled, chunk_size)
        if scores is not None:
            return scores
    one = _per_source(model, theta, batch, kind, epsilon)
    batched = vmap(one) if kind == "linear" or not has_recurrent_layer(model.module) else loop_over(one)
    chunks = [batched(source_rows(responses, slice(s, s + chunk_size))) for s in range(0, num_sources, chunk_size)]
    return torch.cat(chunks, dim=0).T


def _basis_path(model: FunctionalModel, num_sources: int, chunk_size: int) -> Callable | None:
    """``(model, theta, queries) -> Tensor[Q', P] | None``: the query gradients along layer bases
    (:func:`~lightning_attr.basis_readout.basis_gradients`) for a model they cover, else ``None``."""
    covered = basis_layers(model.module, model.space)
    if covered is None:
        return None
    return partial(basis_gradients, layers=covered, num_sources=num_sources, chunk_size=chunk_size)


def linear_query_gradients(model: FunctionalModel, thetas: Tensor, batch: Any, num_sources: int, chunk_size: int | None) -> Tensor | None:
    """The query gradients the linear readout multiplies ``num_sources`` responses with, by forward mode along layer
    bases: ``Tensor[Q, P]`` at ``thetas: Tensor[P]``, or ``Tensor[E, Q, P]`` at each of ``E`` members' parameters
    ``thetas: Tensor[E, P]`` (read in the same vmapped passes, :func:`~lightning_attr.basis_readout.member_gradients`),
    when :func:`score_sources` would take that path and the ``E x Q x P`` float32 numbers fit in one query chunk
    (``CHUNK_ACTIVATION_MB``); else ``None``. Computed once, they serve every shard of a streamed member."""
    covered = basis_layers(model.module, model.space)
    if covered is None or len(query_chunks(batch, thetas)) > 1:
        return None
    if chunk_size is None:
        chunk_size = _chunk_for(activation_floats(model, thetas.view(-1, thetas.shape[-1])[0], batch), num_sources)
    members = thetas.view(-1, thetas.shape[-1])
    gradients = member_gradients(model, members, batch, covered, num_sources=num_sources, chunk_size=chunk_size)
    return None if gradients is None else gradients.view(*thetas.shape[:-1], *gradients.shape[1:])


def split_for(responses: Tensor | SplitResponses, model: FunctionalModel, layers: Any = None) -> SplitResponses:
    """``responses`` split at the parameters of ``model``'s handled layers (:func:`handled_layers`, or ``layers``): as
    they are when they already are, else laid out again (a copy of ``S x P``)."""
    names = layer_parameters(handled_layers(model.module, model.space) if layers is None else layers)
    if isinstance(responses, SplitResponses):
        if set(responses.blocks) == set(names):
            return responses
        responses = responses.flat()
    return SplitResponses.from_flat(responses, model.space, names)


def paired_readout(
    model: FunctionalModel,
    theta: Tensor,
    responses: Tensor,
    batch: Any,
    kind: str = "linear",
    *,
    block_size: int | None = None,
    epsilon: float = 1.0,
) -> Tensor:
    """Score of query ``i`` against response ``i`` only: ``Tensor[B]`` from ``responses: Tensor[B, P]``.

    Used for self-influence (each training example against its own source). By default every example is
    vmapped on its own: one forward(-mode) pass per example. Modules that cannot run one vmapped example at
    a time (recurrent layers write into hidden states without the vmapped dimension) are read out as the
    diagonal of :func:`score_sources` on blocks of ``block_size`` examples (32 if not given): only the
    parameters are vmapped, at ``block_size`` passes per example. A ``block_size`` forces that path.
    """
    check_readout(kind)
    n = batch_size_of(batch)
    if responses.shape[0] != n:
        raise ValueError(f"paired_readout needs one response per example: {responses.shape[0]} responses, {n} examples.")
    if kind == "gradient":
        return torch.cat([
            (query_gradients(model, theta, select_examples(batch, rows)) * responses[rows]).sum(dim=1)
            for rows in query_chunks(batch, theta)
        ])  # fmt: skip
    if block_size is None and not has_recurrent_layer(model.module):
        try:
            return _paired_per_example(model, theta, responses, batch, kind, epsilon)
        except RuntimeError:  # a kernel without a batching rule for one vmapped example: the block path below
            pass
    return _paired_blocks(model, theta, responses, batch, kind, epsilon, block_size or 32)


def _paired_per_example(
    model: FunctionalModel, theta: Tensor, responses: Tensor, batch: Any, kind: str, epsilon: float
) -> Tensor:
    def one(example: Any, r: Tensor) -> Tensor:
        single = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, example)
        return _per_source(model, theta, single, kind, epsilon)(r)[0]

    in_dims = (tree_map(lambda t: 0 if isinstance(t, Tensor) else None, batch), 0)
    return vmap(one, in_dims=in_dims)(batch, responses)


def _paired_blocks(
    model: FunctionalModel, theta: Tensor, responses: Tensor, batch: Any, kind: str, epsilon: float, block_size: int
) -> Tensor:
    n, diagonals = responses.shape[0], []
    for start in range(0, n, block_size):
        rows = torch.arange(start, min(start + block_size, n))
        block = score_sources(
            model, theta, responses[start : start + block_size], select_examples(batch, rows), kind,
            chunk_size=block_size, epsilon=epsilon,
        )  # fmt: skip
        diagonals.append(block.diagonal())
    return torch.cat(diagonals)
