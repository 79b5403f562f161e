"""Matrix-free curvature-vector products and spectrum estimates.

A *curvature operator* maps a block of vectors ``V: Tensor[C, P]`` to ``G V: Tensor[C, P]`` where
``G`` is the curvature of the mean per-example loss over one batch. Nothing here forms a matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp, vmap

from lightning_attr.functional import FunctionalModel

CurvatureOperator = Callable[[Tensor], Tensor]


def batch_size_of(batch: Any) -> int:
    """Leading dimension of the first tensor in a batch."""
    for leaf in torch.utils._pytree.tree_leaves(batch):
        if isinstance(leaf, Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    raise ValueError("Cannot find a batch dimension: the batch holds no tensor.")


def ggn_operator(model: FunctionalModel, theta: Tensor, batch: Any) -> CurvatureOperator:
    """Generalized Gauss-Newton ``J^T H_out J`` of the batch-mean loss: one jvp and one vjp per vector.

    ``J`` is the Jacobian of ``attribution_outputs`` w.r.t. ``theta`` and ``H_out`` the Hessian of the
    loss w.r.t. the outputs (PSD for convex losses such as cross-entropy and squared error).
    """
    if not model.has_outputs:
        raise ValueError(
            "curvature='ggn' needs attribution_outputs() and attribution_output_loss() on the module; "
            "define them, or use curvature='hessian' with attribution_loss()."
        )
    scale = 1.0 / batch_size_of(batch)
    space = model.space
    params = space.unflatten(theta)  # a dict: the pullback then builds one [P] row, not one per parameter
    outputs_of = lambda p: model.outputs(p, batch)  # noqa: E731
    outputs, pullback = vjp(outputs_of, params)
    outputs = outputs.detach()
    loss_grad = grad(lambda out: model.output_loss(out, batch).sum() * scale)

    def product(v: Tensor) -> Tensor:
        jv = jvp(outputs_of, (params,), (space.unflatten(v),))[1]
        hjv = jvp(loss_grad, (outputs,), (jv,))[1]
        return space.flatten(pullback(hjv)[0])

    return vmap(product)


def hessian_operator(model: FunctionalModel, theta: Tensor, batch: Any) -> CurvatureOperator:
    """Hessian of the batch-mean loss, forward-over-reverse (``jvp(grad(L))``)."""
    mean_loss_grad = grad(lambda th: model.losses(th, batch).mean())

    def product(v: Tensor) -> Tensor:
        return jvp(mean_loss_grad, (theta,), (v,))[1]

    return vmap(product)


_OPERATORS = {"ggn": ggn_operator, "hessian": hessian_operator}


def curvature_operator(
    kind: str, model: FunctionalModel, theta: Tensor, batches: Sequence[Any], chunk_size: int | None = None
) -> CurvatureOperator:
    """Curvature of the loss averaged over the examples of several (micro-)batches.

    Args:
        kind: ``"ggn"`` or ``"hessian"``.
        batches: batches without source indices; each contributes in proportion to its size.
        chunk_size: at most this many vectors go through one vmapped product (bounds memory).
    """
    if kind not in _OPERATORS:
        raise ValueError(f"curvature must be one of {sorted(_OPERATORS)}, got {kind!r}.")
    sizes = [batch_size_of(b) for b in batches]
    total = float(sum(sizes))
    parts = [(_OPERATORS[kind](model, theta, b), s / total) for b, s in zip(batches, sizes)]

    def combined(chunk: Tensor) -> Tensor:
        total = None
        for op, weight in parts:
            product = op(chunk)
            if weight != 1.0:
                product.mul_(weight)
            total = product if total is None else total.add_(product)
        return total

    def apply(block: Tensor) -> Tensor:
        step = chunk_size or block.shape[0]
        if block.shape[0] <= step:
            return combined(block)
        return torch.cat([combined(block[start : start + step]) for start in range(0, block.shape[0], step)])

    return apply


def shared_operator(
    local: CurvatureOperator | None, count: int, total: int, reduce_sum: Callable[[Tensor], Tensor]
) -> CurvatureOperator:
    """The curvature of the mean loss over a training set split across processes.

    Every process calls it with the same block, in the same order (it is a collective).

    Args:
        local: the curvature over this process's ``count`` examples (None when it holds none).
        total: the examples of all processes together.
        reduce_sum: sums a tensor over the processes and returns the sum on every process.
    """

    def apply(block: Tensor) -> Tensor:
        part = local(block).mul_(count / total) if local is not None else torch.zeros_like(block)
        return reduce_sum(part)

    return apply


@dataclass(frozen=True)
class Spectrum:
    """Estimates of the curvature spectrum. Units: loss per squared parameter unit.

    Attributes:
        lambda_max: largest eigenvalue (power iteration).
        mean_eigenvalue: ``trace(G) / P`` (Hutchinson).
    """

    lambda_max: float
    mean_eigenvalue: float


def estimate_spectrum(
    operator: CurvatureOperator,
    dim: int,
    *,
    probes: int = 32,
    power_iterations: int = 20,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Spectrum:
    """Hutchinson trace with ``probes`` Rademacher vectors and power iteration for ``lambda_max``.

    Draws only from ``generator`` (never from the global RNG, so training is not perturbed).
    """
    z = torch.randint(0, 2, (probes, dim), generator=generator).to(device=device, dtype=torch.float32) * 2 - 1
    trace = (z * operator(z)).sum(dim=1).mean().item()
    v = torch.randn(1, dim, generator=generator).to(device=device, dtype=torch.float32)
    v = v / v.norm()
    top = 0.0
    for _ in range(power_iterations):
        gv = operator(v)
        top = float((v * gv).sum())
        norm = gv.norm()
        if not torch.isfinite(norm) or norm == 0:
            break
        v = gv / norm
    return Spectrum(lambda_max=max(top, 0.0), mean_eigenvalue=max(trace / dim, 0.0))
