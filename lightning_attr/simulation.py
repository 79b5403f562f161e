"""Short-horizon perturbation propagation: per-source parameter responses without retraining.

For a source ``b`` the response approaches ``(1/n) (G + lam I)^{-1} grad l_b``, the predicted
parameter change if ``b`` were removed (METHOD.md). Every propagation rule is the same recurrence on
the solution ``x``, the residual ``r`` and the increment ``d``, one curvature product per step:

    x_0 = 0;  r_0 = grad l_b;  d_0 = gamma_0 r_0
    x_{k+1} = x_k + d_k;   r_{k+1} = r_k - (G_k + lam I) d_k;   d_{k+1} = alpha_{k+1} d_k + gamma_{k+1} r_{k+1}

and after ``K`` products the estimate is ``x_K + d_K`` (the last increment needs no product).

- ``"neumann"``: ``alpha = 0, gamma = eta``: the truncated Neumann series ``eta sum_{k<=K} u_k`` with
  ``u_{k+1} = u_k - eta (G_k + lam) u_k`` (``r_k = u_k``).
- ``"chebyshev"``: Chebyshev semi-iteration on ``[lam, 1/eta]`` (Golub & Varga): the residual polynomial
  of degree ``k`` with the smallest maximum on that interval, at every ``k``.
- ``"heavy_ball"``: Polyak's momentum, ``gamma = eta``, ``alpha = momentum`` (a constant ``beta``): on
  curvature below ``(1 - beta)/eta`` it moves like Neumann with step ``eta / (1 - beta)``, and stays stable
  up to ``2 (1 + beta) / eta``.

``G_k`` is the curvature of the ``k``-th minibatch; ``1/eta = 2 lambda_max + lam`` leaves a factor-2
margin for minibatches that curve more than the one measured. With exact curvature, Chebyshev needs
``O(sqrt(kappa))`` products where Neumann needs ``O(kappa)``, ``kappa = (1/eta) / lam``; with minibatch
curvature its large steps amplify the sampling noise (``docs/propagation.md``), and moderate momentum on
curvature batches of a few hundred examples is what measured best. Pure ``torch`` / ``torch.func``: no
Lightning in this module.
"""

from __future__ import annotations

import math
from functools import partial
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import grad_and_value, vjp, vmap
from torch.utils._pytree import tree_map

from lightning_attr.curvature import CurvatureOperator, Spectrum, estimate_spectrum
from lightning_attr.damping import Damping, resolve_damping
from lightning_attr.functional import FunctionalModel

STEP_SAFETY = 2.0  # eta = 1 / (STEP_SAFETY * lambda_max + lam), see resolve_step_rule
PROPAGATIONS = ("neumann", "chebyshev", "heavy_ball")
DEFAULT_MOMENTUM = 0.8  # heavy-ball beta; measured in docs/propagation.md


@dataclass(frozen=True)
class StepRule:
    """Damping ``lam``, step size ``eta`` and propagation rule, and where they came from.

    Attributes:
        damping: ``lam``, the lower end of the spectrum of ``G + lam I`` the accelerated rules assume.
        step_size: ``eta``; ``1/eta`` is the upper end of that spectrum.
        lambda_max, mean_eigenvalue: the spectrum estimate (NaN when nothing was estimated).
        propagation: one of :data:`PROPAGATIONS`.
        momentum: ``beta`` of ``"heavy_ball"`` (unused by the other rules).
    """

    damping: float
    step_size: float
    lambda_max: float
    mean_eigenvalue: float
    propagation: str = "neumann"
    momentum: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)

    def coefficients(self, length: int) -> tuple[Tensor, Tensor]:
        """``(alpha, gamma)``: ``Tensor[length]`` float64 each, the coefficients of steps ``0..length-1``
        (``alpha[0]`` is unused: ``d_0 = gamma_0 r_0``). Units: ``gamma`` in 1/curvature, ``alpha`` none."""
        alpha = torch.zeros(length, dtype=torch.float64)
        gamma = torch.full((length,), self.step_size, dtype=torch.float64)
        lower, upper = self.damping, 1.0 / self.step_size
        if self.propagation == "heavy_ball":
            alpha.fill_(self.momentum)
            alpha[0] = 0.0
        elif self.propagation == "chebyshev":
            center, half_width = (upper + lower) / 2, (upper - lower) / 2
            sigma = center / half_width
            rho = 1.0 / sigma
            gamma[0] = 1.0 / center
            for k in range(1, length):
                rho_next = 1.0 / (2 * sigma - rho)
                alpha[k], gamma[k] = rho_next * rho, 2 * rho_next / half_width
                rho = rho_next
        return alpha, gamma


def resolve_step_rule(
    spectrum: Spectrum,
    damping: Damping = "auto",
    step_size: Damping = "auto",
    damping_scale: float = 1.0,
    propagation: str = "neumann",
    momentum: float = DEFAULT_MOMENTUM,
) -> StepRule:
    """``damping="auto"``: ``lam = damping_scale * 3 trace(G)/P`` (the mean rule of :mod:`lightning_attr.damping`).
    ``step_size="auto"``: ``eta = 1 / (2 lambda_max + lam)``, half the largest step that keeps the series
    monotone on the estimation batch: other minibatches' curvature exceeds the one measured (and power
    iteration under-estimates). Measured on digits (online, K=100, batch 64): eta = 1/(lambda_max + lam)
    gave LDS 0.40, the half step 0.66, steps between 0.3x and 0.8x of it 0.65-0.67. Chebyshev takes
    ``[lam, 1/eta]`` as the spectrum of ``G + lam I`` and needs ``lam > 0``; heavy-ball's ``momentum`` is in
    ``[0, 1)``."""
    if propagation not in PROPAGATIONS:
        raise ValueError(f"propagation must be one of {PROPAGATIONS}, got {propagation!r}.")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}.")
    lam = resolve_damping(damping, damping_scale, spectrum.mean_eigenvalue)
    scale = STEP_SAFETY * spectrum.lambda_max + lam
    eta = (1.0 / scale if scale > 0 else math.inf) if step_size == "auto" else float(step_size)
    if not math.isfinite(eta) or eta <= 0:
        raise ValueError(
            f"step size resolved to {eta} (lambda_max={spectrum.lambda_max}, damping={lam}); "
            "the curvature estimate is degenerate (zero curvature: the outputs saturated, as after a diverged "
            "fit, or the loss does not depend on the parameters): pass damping>0 or an explicit step_size."
        )
    if propagation == "chebyshev" and not 0 < lam < 1.0 / eta:
        raise ValueError(
            f"propagation={propagation!r} needs 0 < damping < 1/step_size (the spectrum interval of G + damping), "
            f"got damping={lam}, 1/step_size={1.0 / eta}; pass a positive damping or propagation='neumann'."
        )
    return StepRule(lam, eta, spectrum.lambda_max, spectrum.mean_eigenvalue, propagation, momentum if propagation == "heavy_ball" else 0.0)


def estimate_step_rule(
    operator: CurvatureOperator,
    dim: int,
    damping: Damping,
    step_size: Damping,
    damping_scale: float,
    generator: torch.Generator,
    device: torch.device,
    propagation: str = "neumann",
    momentum: float = DEFAULT_MOMENTUM,
) -> StepRule:
    """Spectrum estimate (only when something is ``"auto"``) followed by :func:`resolve_step_rule`."""
    if damping == "auto" or step_size == "auto":
        spectrum = estimate_spectrum(operator, dim, generator=generator, device=device)
    else:
        spectrum = Spectrum(float("nan"), float("nan"))
    return resolve_step_rule(spectrum, damping, step_size, damping_scale, propagation, momentum)


# Rows up to which the whole batch's vjps are cheaper than per-example gradients: a vmap over batches of one costs a
# few backward passes of the batch (measured in the bench's default fits: 10 source groups per batch, MNIST-1D CNN
# 52 s whole-batch vs 80 s per example; 4,000 single-example sources, 109 s vs 79 s).
WHOLE_BATCH_MAX_ROWS = 16


def source_gradients(
    model: FunctionalModel, theta: Tensor, batch: Any, rows: Tensor, num_rows: int, losses: Tensor | None = None
) -> Tensor:
    """Summed per-example loss gradients by group.

    Up to :data:`WHOLE_BATCH_MAX_ROWS` rows (sources made of many examples), one forward and ``num_rows`` vmapped
    vjps of the whole batch (``O(R B P)`` for the weight gradients of ``R`` rows). Beyond, each example's gradient
    comes from a ``vmap`` of ``grad`` over the examples, a batch of one each (``O(B P)``;
    :func:`_per_example_gradients`), summed into its row; where that does not hold, the whole-batch vjps. On the digits
    64-128-128 MLP (1,400 single-example sources) the gradients phase of one default fit took 3.55 s the whole-batch
    way and 1.90 s per example. Both differentiate with respect to the parameters as a dict, flattened once: through
    slices of the flat ``theta`` the backward zero-fills and adds a ``[B, P]`` per parameter (that MLP's per-example
    gradients of a batch of 256: 112 ms of CPU that way, 29 ms by the dict).

    Args:
        rows: ``LongTensor[B]``, the output row of each example of ``batch``.
        num_rows: ``R``.
        losses: ``Tensor[B]``, the batch's per-example losses at ``theta`` where the caller has them
            (:func:`batch_losses`): the per-example path is checked against them (else it runs that forward itself).

    Returns:
        ``Tensor[R, P]`` with row ``r`` = ``sum_{i: rows[i] = r} grad l_i(theta)``.
    """
    per_example = _per_example_gradients(model, theta, batch, losses) if num_rows > WHOLE_BATCH_MAX_ROWS else None
    if per_example is None:
        _, pullback = vjp(lambda params: model.losses(params, batch), model.space.unflatten(theta))
        selector = torch.zeros(num_rows, rows.numel(), device=theta.device)
        selector[rows, torch.arange(rows.numel(), device=theta.device)] = 1.0
        return model.space.flatten(vmap(pullback)(selector)[0], batch_dims=1)
    if num_rows == rows.numel() and bool((rows == torch.arange(num_rows, device=rows.device)).all()):
        return per_example
    return per_example.new_zeros(num_rows, per_example.shape[1]).index_add_(0, rows.to(per_example.device), per_example)


def _per_example_gradients(model: FunctionalModel, theta: Tensor, batch: Any, reference: Tensor | None = None) -> Tensor | None:
    """``Tensor[B, P]``: each example's loss gradient, by ``vmap`` over batches of one; ``None`` where the model's
    forward cannot be vmapped per example (Python control flow on values, an op without a batching rule) or its losses
    on batches of one differ from its per-example losses on the whole batch (a forward that squeezes the batch
    dimension, or couples the examples): the caller then differentiates the whole batch. ``reference``: those batch
    losses (:func:`batch_losses`) if already computed."""
    try:
        grads, losses = vmap(grad_and_value(partial(_example_loss, model)), in_dims=(None, 0))(model.space.unflatten(theta), batch)
    except Exception:  # noqa: BLE001 -- whatever the per-example vmap refuses, the whole-batch vjps handle
        return None
    reference = batch_losses(model, theta, batch) if reference is None else reference
    if losses.shape != reference.shape or not bool(torch.allclose(losses, reference, rtol=1e-4, atol=1e-6)):
        return None
    return model.space.flatten(grads, batch_dims=1)


def _example_loss(model: FunctionalModel, params: dict[str, Tensor], example: Any) -> Tensor:
    """The loss of one example (no batch dimension) as a scalar, through a batch of one."""
    return model.losses(params, tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, example)).sum()


def select_examples(batch: Any, rows: Tensor) -> Any:
    """The examples ``rows`` of every tensor in a batch (leading dimension)."""
    return tree_map(lambda t: t[rows.to(t.device)] if isinstance(t, Tensor) and t.dim() > 0 else t, batch)


def batch_losses(model: FunctionalModel, theta: Tensor, batch: Any) -> Tensor:
    """``Tensor[B]``: the per-example losses of ``batch`` at ``theta`` (one forward pass, no graph)."""
    with torch.no_grad():
        return model.losses(theta, batch)


def finite_rows(rows: Tensor) -> Tensor:
    """``BoolTensor[C]``: the rows of ``rows: Tensor[C, P]`` with no NaN or infinite entry. Read from each row's sum (a NaN
    or infinity makes it non-finite), the rows whose sum is not finite checked entry by entry (a sum of finite entries can
    overflow): one reduction instead of a ``[C, P]`` mask (18 -> 1 ms for 256 x 26,122 floats here)."""
    finite = torch.isfinite(rows.sum(dim=1))
    if not bool(finite.all()):
        suspect = (~finite).nonzero().squeeze(1)
        finite[suspect] = torch.isfinite(rows[suspect]).all(dim=1)
    return finite


def finite_loss_mask(model: FunctionalModel, theta: Tensor, batch: Any) -> Tensor:
    """``BoolTensor[B]``: examples whose loss is finite at ``theta`` (one forward pass)."""
    return torch.isfinite(batch_losses(model, theta, batch))


def finite_examples(model: FunctionalModel, theta: Tensor, batch: Any) -> tuple[Any, int]:
    """The batch without examples whose loss is non-finite (they would poison every product and gradient
    they share a backward pass with). Returns ``(batch, number of examples dropped)``."""
    keep = finite_loss_mask(model, theta, batch)
    dropped = int((~keep).sum())
    return (batch if dropped == 0 else select_examples(batch, keep.nonzero().squeeze(1))), dropped


def propagate(
    initial: Tensor,
    operators: Sequence[CurvatureOperator],
    rule: StepRule,
    on_step: Callable[[int, Tensor], None] | None = None,
) -> Tensor:
    """``x_K + d_K`` (module docstring) for a block ``r_0 = initial: Tensor[C, P]``, ``K = len(operators)``:
    an estimate of ``(G + lam I)^{-1} initial``. Divide by ``n`` to get responses. Holds three ``[C, P]``
    blocks (``x``, ``r``, ``d``) besides the product's own.

    Args:
        on_step: called as ``on_step(k, x_k + d_k)`` after every product ``k = 1..K`` (convergence curves).
    """
    alpha, gamma = rule.coefficients(len(operators) + 1)
    x = torch.zeros_like(initial)
    r = initial.clone()
    d = r * float(gamma[0])
    for k, op in enumerate(operators, start=1):
        x += d
        r.sub_(op(d).add_(d, alpha=rule.damping))
        d.mul_(float(alpha[k])).add_(r, alpha=float(gamma[k]))
        if on_step is not None:
            on_step(k, x + d)
    return x.add_(d)


Sink = Callable[[Tensor, Tensor], None]  # (sources LongTensor[C], responses Tensor[C, P]) -> None


class OnlineSimulation:
    """Live propagation alongside training: sources are injected when their examples are in the batch.

    :meth:`inject` adds new examples' gradients to their source's live residual (the source then lives
    ``horizon`` more steps and its propagation rule restarts from its current solution); :meth:`step`
    moves every live source one step of the rule (module docstring) on one curvature operator, each at
    its own iteration index. A source's first increment is formed at its first step, so the rule may be
    set (``self.rule = ...``) after injections and before the first step. State is kept on ``device``
    in float32.

    Only live sources are held (``solution``, ``residual``, ``increment``: ``Tensor[L, P]`` each, ``L`` the
    live count): a source whose horizon is spent is **retired**: its response ``(x_K + d_K) / n`` goes to
    ``sink`` at once, if no member of it can still be injected (a per-example source always; a group once
    all its members were injected). A group whose horizon ran out while members are still to come is
    **parked** (its solution kept, ``Tensor[1, P]``, until a member re-injects it or :meth:`finish`).
    :meth:`finish` hands every other owned source to ``sink``: complete ones with their response,
    incomplete ones (never injected, propagated short, parked with members never injected, non-finite)
    as NaN rows.

    Args:
        example_to_source: ``LongTensor[n]`` (``-1``: no source). num_sources: ``S``. dim: ``P``.
        horizon: ``K`` propagation steps after a source's last injection.
        rule: the step rule, or None until it is known (then set it before the first step).
        sink: receives ``(sources, responses)`` as sources are retired (required by :meth:`step` and
            :meth:`finish`).
        num_examples: ``n`` of the ``1/n`` (default: the examples that have a source).
        owned: ``BoolTensor[S]``, the sources this process simulates (default: all). Examples of other
            sources are marked injected but not propagated (another process does that).
    """

    _STATE = (
        "solution", "injected", "valid", "live_sources", "residual", "increment", "iteration", "remaining", "shortfall",
        "pending_members", "parked_sources", "parked", "emitted",
    )  # fmt: skip

    def __init__(
        self,
        example_to_source: Tensor,
        num_sources: int,
        dim: int,
        horizon: int,
        rule: StepRule | None,
        device: torch.device,
        *,
        sink: Sink | None = None,
        num_examples: int | None = None,
        owned: Tensor | None = None,
    ) -> None:
        self.example_to_source = example_to_source.to(device)
        self.num_sources, self.dim, self.horizon = num_sources, dim, horizon
        inside = self.example_to_source >= 0
        self.num_examples = int(inside.sum()) if num_examples is None else num_examples
        self.owned = torch.ones(num_sources, dtype=torch.bool, device=device) if owned is None else owned.to(device)
        self.sink = sink
        self.injected = torch.zeros(example_to_source.numel(), dtype=torch.bool, device=device)
        self.pending_members = torch.bincount(self.example_to_source[inside], minlength=num_sources)
        self.valid = torch.ones(num_sources, dtype=torch.bool, device=device)
        self.emitted = torch.zeros(num_sources, dtype=torch.bool, device=device)
        self.live_sources = torch.zeros(0, dtype=torch.long, device=device)
        self.solution = torch.zeros(0, dim, device=device)  # x per live source, all but the last increment
        self.residual = torch.zeros(0, dim, device=device)  # r per live source
        self.increment = torch.zeros(0, dim, device=device)  # d per live source (formed at its first step)
        self.iteration = torch.zeros(0, dtype=torch.long, device=device)  # k per live source (0 = just (re)started)
        self.remaining = torch.zeros(0, dtype=torch.long, device=device)
        self.parked_sources = torch.zeros(0, dtype=torch.long, device=device)
        self.parked = torch.zeros(0, dim, device=device)  # x of groups whose horizon ran out before their last member
        self.shortfall = torch.zeros(num_sources, dtype=torch.long, device=device)
        self.products = 0
        self.rule = rule

    @property
    def rule(self) -> StepRule | None:
        return self._rule

    @rule.setter
    def rule(self, rule: StepRule | None) -> None:
        self._rule = rule
        if rule is not None:  # an iteration index never exceeds the horizon: re-injection restarts it
            alpha, gamma = rule.coefficients(self.horizon + 1)
            self._alpha, self._gamma = (c.to(device=self.solution.device, dtype=torch.float32) for c in (alpha, gamma))

    def inject(self, model: FunctionalModel, theta: Tensor, batch: Any, index: Tensor) -> bool:
        """Adds ``grad l_i(theta)`` of every not-yet-injected example ``i`` in the batch to its source (owned
        sources only). Returns whether the batch held any example not injected before (of any source)."""
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
            return False
        positions = first.nonzero().squeeze(1)
        self.injected[index[positions]] = True
        arriving = self.example_to_source[index[positions]]
        arriving = arriving[arriving >= 0]
        self.pending_members -= torch.bincount(arriving, minlength=self.num_sources)
        source_of = self.example_to_source[index[positions]]
        positions = positions[(source_of >= 0) & self.owned[source_of.clamp_min(0)]]
        if positions.numel() == 0:
            return True
        sub_batch = select_examples(batch, positions)
        losses = batch_losses(model, theta, sub_batch)
        finite_loss = torch.isfinite(losses)
        self.valid[self.example_to_source[index[positions[~finite_loss]]]] = False
        positions, sub_batch, losses = positions[finite_loss], select_examples(sub_batch, finite_loss.nonzero().squeeze(1)), losses[finite_loss]
        if positions.numel() == 0:
            return True
        sources = self.example_to_source[index[positions]]
        unique, rows = torch.unique(sources, return_inverse=True)
        grads = source_gradients(model, theta, sub_batch, rows, unique.numel(), losses)
        finite = finite_rows(grads) & self.valid[unique]
        self.valid[unique[~finite]] = False
        unique, grads = unique[finite], grads[finite]
        is_live = torch.isin(unique, self.live_sources)
        if bool(is_live.any()):
            # a live source (a group whose members arrive in several batches): the right-hand side grows by
            # the new gradients, so does the residual; the rule restarts from the current solution
            where = (self.live_sources.unsqueeze(0) == unique[is_live].unsqueeze(1)).float().argmax(dim=1)
            self.solution[where] += self.increment[where]  # zero if it has not stepped yet
            self.residual[where] += grads[is_live]
            self.increment[where] = 0.0
            self.iteration[where] = 0
            self.remaining[where] = self.horizon
        new = ~is_live
        count = int(new.sum())
        self.live_sources = torch.cat([self.live_sources, unique[new]])
        self.solution = torch.cat([self.solution, self._unpark(unique[new])])
        self.residual = torch.cat([self.residual, grads[new]])
        self.increment = torch.cat([self.increment, torch.zeros_like(grads[new])])
        self.iteration = torch.cat([self.iteration, self.iteration.new_zeros(count)])
        self.remaining = torch.cat([self.remaining, self.remaining.new_full((count,), self.horizon)])
        return True

    def _unpark(self, sources: Tensor) -> Tensor:
        """``Tensor[len(sources), P]``: the solution each source carries in (a parked group's, else zero);
        the parked rows taken out."""
        start = torch.zeros(sources.numel(), self.dim, device=self.solution.device)
        if self.parked_sources.numel():
            match = self.parked_sources.unsqueeze(0) == sources.unsqueeze(1)  # [new, parked]
            has, where = match.any(dim=1), match.float().argmax(dim=1)
            start[has] = self.parked[where[has]]
            keep = ~match.any(dim=0)
            self.parked_sources, self.parked = self.parked_sources[keep], self.parked[keep]
        return start

    def step(self, operator: CurvatureOperator) -> None:
        """Retires the sources whose horizon is spent, moves every other live source one step."""
        if self.live_sources.numel() == 0:
            return
        done = self.remaining <= 0
        if bool(done.any()):
            self._retire(self.live_sources[done], self.solution[done] + self.increment[done])  # the free last increment
            self._keep(~done)
        if self.live_sources.numel() == 0:
            return
        if self.rule is None:
            raise RuntimeError("OnlineSimulation.step needs a step rule: set simulation.rule first.")
        self._start_fresh_rows()
        d = self.increment
        self.solution += d
        self.residual.sub_(operator(d).add_(d, alpha=self.rule.damping))
        self.products += self.live_sources.numel()
        self.iteration += 1
        self.remaining -= 1
        d.mul_(self._alpha[self.iteration].unsqueeze(1)).add_(self.residual * self._gamma[self.iteration].unsqueeze(1))
        finite = finite_rows(self.residual) & finite_rows(d)
        if not bool(finite.all()):
            self.valid[self.live_sources[~finite]] = False
            self._keep(finite)

    def _retire(self, sources: Tensor, solution: Tensor) -> None:
        """Sources whose horizon is spent: to the sink if final, else parked (members still to come)."""
        final = self.pending_members[sources] <= 0
        if bool(final.any()):
            self._emit(sources[final], solution[final] / self.num_examples)
        if not bool(final.all()):
            self.parked_sources = torch.cat([self.parked_sources, sources[~final]])
            self.parked = torch.cat([self.parked, solution[~final]])

    def _emit(self, sources: Tensor, responses: Tensor) -> None:
        if self.sink is None:
            raise RuntimeError("OnlineSimulation needs a sink to hand retired responses to (sink=...).")
        self.emitted[sources] = True
        self.sink(sources, responses)

    def _start_fresh_rows(self) -> None:
        """``d_0 = gamma_0 r_0`` for the rows injected (or re-injected) since the last step."""
        fresh = self.iteration == 0
        if bool(fresh.any()):
            self.increment[fresh] = self.residual[fresh] * self._gamma[0]

    def _keep(self, rows: Tensor) -> None:
        self.live_sources, self.solution = self.live_sources[rows], self.solution[rows]
        self.residual, self.increment = self.residual[rows], self.increment[rows]
        self.iteration, self.remaining = self.iteration[rows], self.remaining[rows]

    @property
    def num_live(self) -> int:
        return int(self.live_sources.numel())

    def finish(self, block: int = 1024) -> None:
        """Hands every owned source not retired yet to the sink: live sources with ``(x_k + d_k) / n`` if their
        horizon is spent, everything else (propagated short, parked, never injected, non-finite) as NaN rows,
        ``block`` rows at a time. Records the steps still owed per source in ``shortfall``."""
        self.shortfall.zero_()
        self.shortfall[self.live_sources] = self.remaining
        if self.rule is not None:
            self._start_fresh_rows()
            self.solution += self.increment
        complete = (self.remaining <= 0) & self.valid[self.live_sources]
        if bool(complete.any()):
            self._emit(self.live_sources[complete], self.solution[complete] / self.num_examples)
        self._keep(self.live_sources[:0])
        self.parked_sources, self.parked = self.parked_sources[:0], self.parked[:0]
        rest = (self.owned & ~self.emitted).nonzero().squeeze(1)
        for start in range(0, rest.numel(), block):
            sources = rest[start : start + block]
            self._emit(sources, torch.full((sources.numel(), self.dim), float("nan"), device=self.solution.device))

    def state_dict(self) -> dict[str, Any]:
        rule = None if self.rule is None else self.rule.to_json()
        return {**{k: getattr(self, k).cpu() for k in self._STATE}, "products": self.products, "rule": rule}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.solution.device
        for key in self._STATE:
            setattr(self, key, state[key].to(device))
        self.products = int(state["products"])
        self.rule = None if state["rule"] is None else StepRule(**state["rule"])


def initial_perturbations(
    model: FunctionalModel,
    theta: Tensor,
    batches: Iterable[tuple[Any, Tensor]],
    example_to_source: Tensor,
    num_sources: int,
    basis: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``u_0`` of every source at ``theta``: ``Tensor[S, P]`` of summed member gradients.

    Args:
        batches: ``(data, example index LongTensor[B])`` covering the training set once.
        basis: ``Tensor[k, P]``: return the gradients' coordinates ``basis @ g_b``, ``Tensor[S, k]``, instead
            (``[S, P]`` is then never held).

    Returns:
        ``(u0, finite)``: the gradients and a ``BoolTensor[S]``, False where a gradient was non-finite
        (those rows are zero).
    """
    u0 = torch.zeros(num_sources, theta.numel() if basis is None else basis.shape[0], device=theta.device)
    finite = torch.ones(num_sources, dtype=torch.bool, device=theta.device)
    e2s = example_to_source.to(theta.device)
    for data, index in batches:
        index = index.to(theta.device)
        losses = batch_losses(model, theta, data)
        finite_loss = torch.isfinite(losses)
        finite[e2s[index[~finite_loss]]] = False
        keep = finite_loss.nonzero().squeeze(1)
        data, index = select_examples(data, keep), index[keep]
        unique, rows = torch.unique(e2s[index], return_inverse=True)
        grads = source_gradients(model, theta, data, rows, unique.numel(), losses[keep])
        ok = finite_rows(grads)
        finite[unique[~ok]] = False
        grads = grads[ok] if basis is None else grads[ok] @ basis.T
        u0.index_add_(0, unique[ok], grads)
    u0[~finite] = 0.0
    return u0, finite
