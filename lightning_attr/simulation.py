"""Short-horizon perturbation propagation: per-source parameter responses without retraining.

For a source ``b`` the response is the truncated Neumann series

    u_0 = grad l_b(theta);   u_{k+1} = u_k - eta (G_k u_k + lam u_k);   r_b = (eta / n) sum_{k=0..K} u_k

which approaches ``(1/n) (G + lam I)^{-1} grad l_b``, the predicted parameter change if ``b`` were
removed (METHOD.md). Pure ``torch`` / ``torch.func``: no Lightning in this module.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Union

import torch
from torch import Tensor
from torch.func import vjp, vmap
from torch.utils._pytree import tree_map

from lightning_attr.curvature import CurvatureOperator, Spectrum, estimate_spectrum
from lightning_attr.functional import FunctionalModel

Damping = Union[str, float]
STEP_SAFETY = 2.0  # eta = 1 / (STEP_SAFETY * lambda_max + lam), see resolve_step_rule


@dataclass(frozen=True)
class StepRule:
    """Damping ``lam`` and step size ``eta`` of the propagation, and where they came from."""

    damping: float
    step_size: float
    lambda_max: float
    mean_eigenvalue: float

    def to_json(self) -> dict:
        return asdict(self)


def resolve_step_rule(
    spectrum: Spectrum, damping: Damping = "auto", step_size: Damping = "auto", damping_scale: float = 1.0
) -> StepRule:
    """``damping="auto"``: ``lam = damping_scale * trace(G)/P`` (the mean eigenvalue, METHOD.md).
    ``step_size="auto"``: ``eta = 1 / (2 lambda_max + lam)``, half the largest step that keeps the series
    monotone on the estimation batch: other minibatches' curvature exceeds the one measured (and power
    iteration under-estimates). Measured on digits (online, K=100, batch 64): eta = 1/(lambda_max + lam)
    gave LDS 0.40, the half step 0.66, steps between 0.3x and 0.8x of it 0.65-0.67."""
    lam = damping_scale * spectrum.mean_eigenvalue if damping == "auto" else float(damping)
    if not math.isfinite(lam) or lam < 0:
        raise ValueError(f"damping resolved to {lam}; it must be finite and >= 0.")
    eta = 1.0 / (STEP_SAFETY * spectrum.lambda_max + lam) if step_size == "auto" else float(step_size)
    if not math.isfinite(eta) or eta <= 0:
        raise ValueError(
            f"step size resolved to {eta} (lambda_max={spectrum.lambda_max}, damping={lam}); "
            "the curvature estimate is degenerate: pass damping>0 or an explicit step_size."
        )
    return StepRule(lam, eta, spectrum.lambda_max, spectrum.mean_eigenvalue)


def estimate_step_rule(
    operator: CurvatureOperator,
    dim: int,
    damping: Damping,
    step_size: Damping,
    damping_scale: float,
    generator: torch.Generator,
    device: torch.device,
) -> StepRule:
    """Spectrum estimate (only when something is ``"auto"``) followed by :func:`resolve_step_rule`."""
    if damping == "auto" or step_size == "auto":
        spectrum = estimate_spectrum(operator, dim, generator=generator, device=device)
    else:
        spectrum = Spectrum(float("nan"), float("nan"))
    return resolve_step_rule(spectrum, damping, step_size, damping_scale)


def source_gradients(
    model: FunctionalModel, theta: Tensor, batch: Any, rows: Tensor, num_rows: int
) -> Tensor:
    """Summed per-example loss gradients by group, from one forward and ``num_rows`` vmapped vjps.

    Args:
        rows: ``LongTensor[B]``, the output row of each example of ``batch``.
        num_rows: ``R``.

    Returns:
        ``Tensor[R, P]`` with row ``r`` = ``sum_{i: rows[i] = r} grad l_i(theta)``.
    """
    _, pullback = vjp(lambda th: model.losses(th, batch), theta)
    selector = torch.zeros(num_rows, rows.numel(), device=theta.device)
    selector[rows, torch.arange(rows.numel(), device=theta.device)] = 1.0
    return vmap(pullback)(selector)[0]


def select_examples(batch: Any, rows: Tensor) -> Any:
    """The examples ``rows`` of every tensor in a batch (leading dimension)."""
    return tree_map(lambda t: t[rows.to(t.device)] if isinstance(t, Tensor) and t.dim() > 0 else t, batch)


def finite_loss_mask(model: FunctionalModel, theta: Tensor, batch: Any) -> Tensor:
    """``BoolTensor[B]``: examples whose loss is finite at ``theta`` (one forward pass)."""
    with torch.no_grad():
        return torch.isfinite(model.losses(theta, batch))


def finite_examples(model: FunctionalModel, theta: Tensor, batch: Any) -> tuple[Any, int]:
    """The batch without examples whose loss is non-finite (they would poison every product and gradient
    they share a backward pass with). Returns ``(batch, number of examples dropped)``."""
    keep = finite_loss_mask(model, theta, batch)
    dropped = int((~keep).sum())
    return (batch if dropped == 0 else select_examples(batch, keep.nonzero().squeeze(1))), dropped


def propagate(
    initial: Tensor, operators: Sequence[CurvatureOperator], rule: StepRule
) -> Tensor:
    """``eta * sum_{k=0..K} u_k`` for a block ``u_0 = initial: Tensor[C, P]``, ``K = len(operators)``.

    Divide by ``n`` to get responses.
    """
    u = initial.clone()
    total = u.clone()
    for op in operators:
        u.sub_(op(u).add_(u, alpha=rule.damping), alpha=rule.step_size)
        total += u
    return rule.step_size * total


class OnlineSimulation:
    """Live propagation alongside training: sources are injected when their examples are in the batch.

    Every step: new examples' gradients are added to their source's live perturbation (which then
    lives ``horizon`` more steps), every live perturbation is accumulated, then moved one damped
    step on the current batch's curvature. State is kept on ``device`` in float32.

    Args:
        num_sources: ``S``. example_to_source: ``LongTensor[n]``. dim: ``P``.
        horizon: ``K`` propagation steps after a source's last injection.
    """

    def __init__(
        self, example_to_source: Tensor, num_sources: int, dim: int, horizon: int, rule: StepRule, device: torch.device
    ) -> None:
        self.example_to_source = example_to_source.to(device)
        self.num_sources, self.dim, self.horizon, self.rule = num_sources, dim, horizon, rule
        self.total = torch.zeros(num_sources, dim, device=device)  # sum_k u_k per source
        self.injected = torch.zeros(example_to_source.numel(), dtype=torch.bool, device=device)
        self.valid = torch.ones(num_sources, dtype=torch.bool, device=device)
        self.live_sources = torch.zeros(0, dtype=torch.long, device=device)
        self.live = torch.zeros(0, dim, device=device)
        self.remaining = torch.zeros(0, dtype=torch.long, device=device)
        self.shortfall = torch.zeros(num_sources, dtype=torch.long, device=device)
        self.products = 0

    def inject(self, model: FunctionalModel, theta: Tensor, batch: Any, index: Tensor) -> None:
        """Adds ``grad l_i(theta)`` of every not-yet-injected example ``i`` in the batch to its source."""
        index = index.to(self.injected.device)
        fresh = ~self.injected[index]
        # An index can repeat inside one batch (samplers with replacement): inject it once.
        first = torch.zeros_like(fresh)
        seen: set[int] = set()
        for pos, i in enumerate(index.tolist()):
            if fresh[pos] and i not in seen:
                first[pos] = True
                seen.add(i)
        if not bool(first.any()):
            return
        positions = first.nonzero().squeeze(1)
        self.injected[index[positions]] = True
        sub_batch = select_examples(batch, positions)
        finite_loss = finite_loss_mask(model, theta, sub_batch)
        self.valid[self.example_to_source[index[positions[~finite_loss]]]] = False
        positions, sub_batch = positions[finite_loss], select_examples(sub_batch, finite_loss.nonzero().squeeze(1))
        if positions.numel() == 0:
            return
        sources = self.example_to_source[index[positions]]
        unique, rows = torch.unique(sources, return_inverse=True)
        grads = source_gradients(model, theta, sub_batch, rows, unique.numel())
        finite = torch.isfinite(grads).all(dim=1) & self.valid[unique]
        self.valid[unique[~finite]] = False
        unique, grads = unique[finite], grads[finite]
        is_live = torch.isin(unique, self.live_sources)
        if bool(is_live.any()):
            where = (self.live_sources.unsqueeze(0) == unique[is_live].unsqueeze(1)).float().argmax(dim=1)
            self.live[where] += grads[is_live]
            self.remaining[where] = self.horizon
        new = ~is_live
        self.live_sources = torch.cat([self.live_sources, unique[new]])
        self.live = torch.cat([self.live, grads[new]])
        self.remaining = torch.cat(
            [self.remaining, torch.full((int(new.sum()),), self.horizon, dtype=torch.long, device=self.live.device)]
        )

    def step(self, operator: CurvatureOperator) -> None:
        """Accumulates every live perturbation, retires the finished ones, moves the rest one step."""
        if self.live.shape[0] == 0:
            return
        self.total.index_add_(0, self.live_sources, self.live)
        keep = self.remaining > 0
        self.live_sources, self.live, self.remaining = self.live_sources[keep], self.live[keep], self.remaining[keep]
        if self.live.shape[0] == 0:
            return
        step = operator(self.live).add_(self.live, alpha=self.rule.damping)
        self.live = self.live.sub_(step, alpha=self.rule.step_size)
        self.products += self.live.shape[0]
        self.remaining -= 1
        finite = torch.isfinite(self.live).all(dim=1)
        if not bool(finite.all()):
            self.valid[self.live_sources[~finite]] = False
            self.total[self.live_sources[~finite]] = 0.0
            self.live_sources, self.live, self.remaining = (
                self.live_sources[finite], self.live[finite], self.remaining[finite]
            )

    @property
    def num_live(self) -> int:
        return int(self.live.shape[0])

    def finish(self, num_examples: int) -> Tensor:
        """Responses ``Tensor[S, P]`` = ``eta/n * sum_k u_k``; records the steps still owed per source."""
        self.shortfall.zero_()
        self.shortfall[self.live_sources] = self.remaining
        self.live_sources, self.live, self.remaining = (
            self.live_sources[:0], self.live[:0], self.remaining[:0]
        )
        responses = self.total * (self.rule.step_size / num_examples)
        responses[~self.valid] = 0.0
        return responses

    def state_dict(self) -> dict[str, Any]:
        keys = ("total", "injected", "valid", "live_sources", "live", "remaining", "shortfall")
        return {**{k: getattr(self, k).cpu() for k in keys}, "products": self.products, "rule": self.rule.to_json()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.total.device
        for key in ("total", "injected", "valid", "live_sources", "live", "remaining", "shortfall"):
            setattr(self, key, state[key].to(device))
        self.products = int(state["products"])
        self.rule = StepRule(**state["rule"])


def initial_perturbations(
    model: FunctionalModel,
    theta: Tensor,
    batches: Iterable[tuple[Any, Tensor]],
    example_to_source: Tensor,
    num_sources: int,
) -> tuple[Tensor, Tensor]:
    """``u_0`` of every source at ``theta``: ``Tensor[S, P]`` of summed member gradients.

    Args:
        batches: ``(data, example index LongTensor[B])`` covering the training set once.

    Returns:
        ``(u0, finite)``: the gradients and a ``BoolTensor[S]``, False where a gradient was non-finite
        (those rows are zero).
    """
    u0 = torch.zeros(num_sources, theta.numel(), device=theta.device)
    finite = torch.ones(num_sources, dtype=torch.bool, device=theta.device)
    e2s = example_to_source.to(theta.device)
    for data, index in batches:
        index = index.to(theta.device)
        finite_loss = finite_loss_mask(model, theta, data)
        finite[e2s[index[~finite_loss]]] = False
        keep = finite_loss.nonzero().squeeze(1)
        data, index = select_examples(data, keep), index[keep]
        unique, rows = torch.unique(e2s[index], return_inverse=True)
        grads = source_gradients(model, theta, data, rows, unique.numel())
        ok = torch.isfinite(grads).all(dim=1)
        finite[unique[~ok]] = False
        u0.index_add_(0, unique[ok], grads[ok])
    u0[~finite] = 0.0
    return u0, finite


def simulate_responses(
    u0: Tensor, operators: Sequence[CurvatureOperator], rule: StepRule, num_examples: int, chunk_size: int
) -> Tensor:
    """End-of-training responses ``Tensor[S, P]`` = ``(eta/n) sum_k u_k``, in chunks of sources."""
    out = torch.empty_like(u0)
    for start in range(0, u0.shape[0], chunk_size):
        out[start : start + chunk_size] = propagate(u0[start : start + chunk_size], operators, rule) / num_examples
    return out
