"""A Kronecker-factored eigenbasis per Linear layer (EK-FAC's) for a cross-entropy classifier's GGN.

For a Linear layer ``z = W x + c`` (``W: out x in``) the bias is folded into the weight, ``x' = [x, 1]``
(``in' = in + 1``), and the layer's parameters are the matrix ``M = [W | c]: out x in'``. One example's gradient of a
scalar through one call of the layer is rank one, ``delta x'^T`` (``delta``: the scalar's derivative at the layer's
output). The layer's block of the GGN ``G = (1/n) sum_i J_i^T H_i J_i`` is, with ``H_i = B_i^T B_i``
(``B_i = (I - s s^T) diag(s)``, ``s = sqrt(softmax)``, as :mod:`lightning_attr.evaluation.exact`),

    G_l = (1/n) sum_i sum_c vec(delta_ic x'_i^T) vec(delta_ic x'_i^T)^T,     delta_ic = J_{z,i}^T B_i[c]

(``C`` pseudo-gradients per example, the exact expectation over the softmax, no sampled labels). K-FAC approximates
it by ``A (x) G`` with ``A = (1/n) sum x' x'^T`` (``in' x in'``) and ``G = (1/n) sum_ic delta delta^T`` (``out x out``);
their eigenvectors ``Q_A``, ``Q_G`` give the layer's **Kronecker-factored eigenbasis**, in which a gradient ``M`` has
the coordinates ``Q_G^T M Q_A`` (``out x in'``; for ``delta x'^T``: the outer product ``(Q_G^T delta)(Q_A^T x')^T``,
``out^2 + in'^2`` multiply-adds). EK-FAC's eigenvalue correction replaces K-FAC's ``s_i t_j`` by the GGN's own diagonal
in that basis, ``lambda_ij = (1/n) sum_ic ((Q_G^T delta_ic)_i (Q_A^T x'_i)_j)^2`` (George et al. 2018), so that

    score(q, b) = (1/n) sum_l sum_ij c^q_ij c^b_ij / (lambda_ij + damping)

is ``(1/n) g_q^T K diag(1/(lambda + damping)) K^T g_b`` for the block-diagonal orthogonal ``K = blockdiag(Q_G (x) Q_A)``
(:meth:`KroneckerBasis.explicit_inverse`, tested). Keeping ``k`` of the ``P`` coordinates per source (a mask shared by
every source, :meth:`KroneckerBasis.top_coordinates`) makes a score a ``[Q, k] x [k, S]`` product.

Scope: networks whose every trainable parameter is the weight or bias of an ``nn.Linear`` called once per forward on
a ``[B, in]`` input (MLPs); anything else is refused, naming what is not covered.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_attr.parameters import ParameterSpace

_CHUNK = 512  # examples per pass when fitting the basis (memory: chunk x C x sum(out) pseudo-gradients)


@dataclass(frozen=True)
class KroneckerLayer:
    """One Linear layer's Kronecker-factored eigenbasis.

    Attributes:
        weight, bias: the parameter names (``bias`` None for a layer without one; then ``in' = in``).
        out_basis: ``Q_G: Tensor[out, out]``, orthonormal eigenvectors (columns) of the output-gradient factor ``G``.
        in_basis: ``Q_A: Tensor[in', in']``, orthonormal eigenvectors (columns) of the input factor ``A``.
        eigenvalues: ``Tensor[out, in']``, the GGN's diagonal in the basis (EK-FAC), in the loss's units per parameter².
        kfac_eigenvalues: ``Tensor[out, in']``, K-FAC's ``s_i t_j`` (the eigenvalues of ``G`` times those of ``A``).
    """

    weight: str
    bias: str | None
    out_basis: Tensor
    in_basis: Tensor
    eigenvalues: Tensor
    kfac_eigenvalues: Tensor

    @property
    def shape(self) -> tuple[int, int]:
        """``(out, in')``."""
        return self.eigenvalues.shape[0], self.eigenvalues.shape[1]

    def coordinates(self, out_grads: Tensor, inputs: Tensor) -> Tensor:
        """``Tensor[B, out * in']``: the coordinates of the rank-one gradients ``delta_b x'_b^T`` (``out_grads:
        Tensor[B, out]``, ``inputs: Tensor[B, in']``), row-major."""
        return torch.einsum("bi,bj->bij", out_grads @ self.out_basis, inputs @ self.in_basis).flatten(1)

    def rotate(self, gradients: Tensor) -> Tensor:
        """``Tensor[B, out * in']``: the coordinates of any gradients ``Tensor[B, out, in']`` (``[W | c]``)."""
        return (self.out_basis.T @ gradients @ self.in_basis).flatten(1)


@dataclass(frozen=True)
class KroneckerBasis:
    """The Kronecker-factored eigenbasis of every Linear layer of a network, in the network's layer order. The ``P``
    coordinates are the layers' ``out x in'`` blocks, row-major, one after the other."""

    layers: tuple[KroneckerLayer, ...]

    @property
    def num_coordinates(self) -> int:
        return sum(a * b for a, b in (layer.shape for layer in self.layers))

    def eigenvalues(self, corrected: bool = True) -> Tensor:
        """``Tensor[P]``: EK-FAC's eigenvalues (``corrected``) or K-FAC's, in coordinate order."""
        return torch.cat([(layer.eigenvalues if corrected else layer.kfac_eigenvalues).flatten() for layer in self.layers])

    def coordinates(self, factors: dict[str, tuple[Tensor, Tensor]]) -> Tensor:
        """``Tensor[B, P]``: coordinates of rank-one gradients given per layer as ``{weight name: (delta: Tensor[B, out],
        x': Tensor[B, in'])}`` (:func:`loss_factors`)."""
        return torch.cat([layer.coordinates(*factors[layer.weight]) for layer in self.layers], dim=1)

    def gradient_coordinates(self, gradients: Tensor, space: ParameterSpace) -> Tensor:
        """``Tensor[B, P]``: coordinates of flat gradients ``Tensor[B, P]`` laid out as ``space`` (the module's
        :class:`~lightning_attr.parameters.ParameterSpace`)."""
        blocks = space.unflatten(gradients)
        parts = []
        for layer in self.layers:
            out = layer.shape[0]
            w = blocks[layer.weight].reshape(len(gradients), out, -1)
            matrix = w if layer.bias is None else torch.cat([w, blocks[layer.bias].reshape(len(gradients), out, 1)], dim=2)
            parts.append(layer.rotate(matrix))
        return torch.cat(parts, dim=1)

    def top_coordinates(self, k: int, weights: Tensor | None = None) -> Tensor:
        """``LongTensor[k]``: the ``k`` coordinates with the largest EK-FAC eigenvalues (or the largest ``weights:
        Tensor[P]``), in coordinate order: the mask every source shares."""
        if not 0 < k <= self.num_coordinates:
            raise ValueError(f"k must be in [1, {self.num_coordinates}] (the coordinates), got {k}.")
        ranking = self.eigenvalues() if weights is None else weights
        return ranking.topk(k).indices.sort().values

    def directions(self, mask: Tensor, space: ParameterSpace) -> Tensor:
        """``Tensor[k, P]``: the basis vectors of the coordinates ``mask: LongTensor[k]`` in the parameter layout
        ``space`` (orthonormal rows: ``K[:, mask]^T``)."""
        dtype = self.layers[0].out_basis.dtype
        spans = space.spans
        out = torch.zeros(len(mask), space.size, dtype=dtype)
        start = 0
        for layer in self.layers:
            rows, width = layer.shape
            picked = ((mask >= start) & (mask < start + rows * width)).nonzero().squeeze(1)
            i, j = (mask[picked] - start) // width, (mask[picked] - start) % width
            vectors = layer.out_basis.T[i].unsqueeze(2) * layer.in_basis.T[j].unsqueeze(1)  # [k_l, out, in']
            cols = width - (layer.bias is not None)
            out[picked, slice(*spans[layer.weight])] = vectors[:, :, :cols].flatten(1)
            if layer.bias is not None:
                out[picked, slice(*spans[layer.bias])] = vectors[:, :, cols]
            start += rows * width
        return out

    def explicit_inverse(self, damping: float, space: ParameterSpace) -> Tensor:
        """``Tensor[P, P]``: ``K diag(1/(lambda + damping)) K^T`` in the parameter layout ``space`` (``P x P`` numbers:
        for tests on tiny networks)."""
        eye = torch.eye(space.size, dtype=self.layers[0].out_basis.dtype)
        rotated = self.gradient_coordinates(eye, space)  # row p: the coordinates of unit vector p = K^T e_p
        return rotated @ (rotated / (self.eigenvalues() + damping)).T


def kronecker_scores(query: Tensor, sources: Tensor, eigenvalues: Tensor, damping: float, num_examples: int) -> Tensor:
    """``Tensor[Q, S]``: ``(1/n) sum_j query[:, j] sources[:, j] / (eigenvalues[j] + damping)``, the predicted rise of
    each query's loss if the source were removed, from coordinates on the same ``k`` basis directions (``query:
    Tensor[Q, k]``, ``sources: Tensor[S, k]``, ``eigenvalues: Tensor[k]``)."""
    if not damping > 0:
        raise ValueError(f"damping must be > 0 (the GGN is singular), got {damping}.")
    return (query / (eigenvalues + damping)) @ sources.T / num_examples


def subspace_scores(query: Tensor, sources: Tensor, curvature: Tensor, damping: float, num_examples: int) -> Tensor:
    """``Tensor[Q, S]``: ``(1/n) query (curvature + damping I)^-1 sources^T`` from coordinates on ``k`` orthonormal
    directions (``query: Tensor[Q, k]``, ``sources: Tensor[S, k]``) and the GGN restricted to them (``curvature:
    Tensor[k, k]``, :func:`projected_ggn`): the damped GGN's inverse within their span. A store keeps each source's
    ``(curvature + damping I)^-1 c_s`` (``k`` numbers), so a query costs one ``[Q, k] x [k, S]`` product."""
    if not damping > 0:
        raise ValueError(f"damping must be > 0 (the GGN is singular), got {damping}.")
    damped = curvature.double() + damping * torch.eye(len(curvature), dtype=torch.float64)
    solved = torch.cholesky_solve(sources.double().T, torch.linalg.cholesky(damped)).T.to(sources.dtype)  # [S, k]
    return query @ solved.T / num_examples


def projected_ggn(model: nn.Module, x: Tensor, directions: Tensor, chunk_size: int = 256) -> Tensor:
    """``Tensor[k, k]``: ``D G D^T``, the cross-entropy GGN of ``model`` over the examples ``x`` restricted to the rows of
    ``directions: Tensor[k, P]`` (parameter order of ``model.named_parameters()``): ``k`` forward-mode tangents of the
    logits per chunk of examples (``torch.func.jvp``, vmapped), ``(1/n) sum_i (B_i J_i D^T)^T (B_i J_i D^T)``. With
    ``D`` orthonormal, ``(D G D^T + damping I)^-1`` is the damped GGN's inverse within their span (Rayleigh-Ritz)."""
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    tangents = dict(zip(names, [t.reshape(len(directions), *p.shape) for t, p in zip(torch.split(directions, [p.numel() for p in params.values()], dim=1), params.values())]))
    out = directions.new_zeros(len(directions), len(directions))
    for start in range(0, len(x), chunk_size):
        chunk = x[start : start + chunk_size]
        logits_of = lambda p: torch.func.functional_call(model, p, (chunk,))  # noqa: E731
        logits, jd = torch.func.vmap(lambda t: torch.func.jvp(logits_of, (params,), (t,)), out_dims=(None, 0))(tangents)  # jd: [k, B, C]
        s = torch.softmax(logits.detach(), dim=1).sqrt()  # [B, C]
        u = s * jd  # diag(s) J_i d, per direction
        a = u - s * (s * u).sum(dim=2, keepdim=True)  # B_i J_i d = (I - s s^T) diag(s) J_i d
        out += torch.einsum("kbc,lbc->kl", a, a)
    return out / len(x)


# ------------------------------------------------------------------------------------------ factors of a network
def _linear_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The network's Linear layers; an error naming every trainable parameter they do not hold."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    held = {id(p) for _, m in layers for p in m.parameters()}
    other = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in held]
    if other or not layers:
        raise ValueError(
            f"a Kronecker-factored eigenbasis needs every trainable parameter in an nn.Linear; not covered: {other or 'no Linear layer'}. "
            "Use another codec for this network (e.g. 'factored' or 'eigen')."
        )
    return layers


@contextlib.contextmanager
def _capturing(model: nn.Module) -> Iterator[dict[str, list[Tensor]]]:
    """Records each Linear layer's input and output (``{prefix: [x, z]}``) during one forward pass."""
    seen: dict[str, list[Tensor]] = {}
    layers = _linear_layers(model)

    def hook(name):
        def record(_module, args, output):
            if name in seen:
                raise ValueError(f"Linear layer {name!r} is called more than once per forward; the Kronecker basis needs one call per layer.")
            if args[0].dim() != 2:
                raise ValueError(f"Linear layer {name!r} got an input of shape {tuple(args[0].shape)}; the Kronecker basis needs [B, in].")
            seen[name] = [args[0], output]

        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in layers]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def _weight_names(model: nn.Module) -> dict[str, tuple[str, str | None]]:
    """``{layer prefix: (weight name, bias name or None)}`` in layer order."""
    return {name: (f"{name}.weight" if name else "weight", None if m.bias is None else (f"{name}.bias" if name else "bias")) for name, m in _linear_layers(model)}


def _augmented(layer: nn.Linear, x: Tensor) -> Tensor:
    return torch.cat([x, x.new_ones(len(x), 1)], dim=1) if layer.bias is not None else x


def _forward(model: nn.Module, x: Tensor) -> tuple[Tensor, dict[str, list[Tensor]]]:
    with _capturing(model) as seen:
        logits = model(x)
    for name, m in _linear_layers(model):
        if name not in seen:
            raise ValueError(f"Linear layer {name!r} was not called in the forward pass; the Kronecker basis needs one call per layer.")
    return logits, seen


def loss_factors(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """Per example, each Linear layer's gradient of its cross-entropy as factors: ``{weight name: (delta: Tensor[B, out],
    x': Tensor[B, in'])}`` (the weight-and-bias gradient is ``delta x'^T``). What a query's forward-mode passes
    (:func:`~lightning_attr.basis_readout.query_factors`) give, here by one backward pass."""
    modules = dict(_linear_layers(model))
    with torch.enable_grad():
        logits, seen = _forward(model, x)
        outputs = [z for _, z in seen.values()]
        deltas = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), outputs)
    names = _weight_names(model)
    return {names[p][0]: (d.detach(), _augmented(modules[p], seen[p][0].detach())) for p, d in zip(seen, deltas)}


def fit_basis(model: nn.Module, x: Tensor, chunk_size: int = _CHUNK) -> KroneckerBasis:
    """The Kronecker-factored eigenbasis of ``model``'s cross-entropy GGN over the examples ``x: Tensor[n, ...]`` (module
    docstring): the factors ``A``, ``G`` in one pass of chunks, their eigenbases, then EK-FAC's eigenvalues in a second
    pass. Everything in ``x``'s dtype (float64 for tests against explicit matrices)."""
    modules = dict(_linear_layers(model))
    names = _weight_names(model)
    n = len(x)

    def pseudo_gradients(chunk: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``{prefix: Tensor[B, C, out]}`` the pseudo-gradients ``delta_ic``, ``{prefix: Tensor[B, in']}`` the inputs."""
        with torch.enable_grad():
            logits, seen = _forward(model, chunk)
            s = torch.softmax(logits.detach(), dim=1).sqrt()  # [B, C]
            outputs = [z for _, z in seen.values()]
            eye = torch.eye(s.shape[1], dtype=s.dtype)
            # row c of B_i = (I - s s^T) diag(s): (I - s s^T)[c, :] * s
            cot = (eye.unsqueeze(0) - s.unsqueeze(2) * s.unsqueeze(1)) * s.unsqueeze(1)  # [B, C, C]: row c is B_i[c]
            grads = torch.autograd.grad(logits, outputs, cot.transpose(0, 1), is_grads_batched=True)  # each [C, B, out]
        deltas = {p: g.detach().transpose(0, 1) for p, g in zip(seen, grads)}
        inputs = {p: _augmented(modules[p], seen[p][0].detach()) for p in seen}
        return deltas, inputs

    chunks = [x[i : i + chunk_size] for i in range(0, n, chunk_size)]
    a_factor: dict[str, Tensor] = {}
    g_factor: dict[str, Tensor] = {}
    for chunk in chunks:
        deltas, inputs = pseudo_gradients(chunk)
        for p in deltas:
            d = deltas[p].flatten(0, 1)
            a_factor[p] = a_factor.get(p, 0) + inputs[p].T @ inputs[p] / n
            g_factor[p] = g_factor.get(p, 0) + d.T @ d / n
    bases = {}
    for p in a_factor:
        s_a, q_a = torch.linalg.eigh(a_factor[p])
        s_g, q_g = torch.linalg.eigh(g_factor[p])
        bases[p] = (q_g, q_a, torch.outer(s_g.clamp_min(0), s_a.clamp_min(0)))
    corrected = {p: 0 for p in bases}
    for chunk in chunks:
        deltas, inputs = pseudo_gradients(chunk)
        for p, (q_g, q_a, _) in bases.items():
            rotated_d = deltas[p] @ q_g  # [B, C, out]
            rotated_x = inputs[p] @ q_a  # [B, in']
            corrected[p] = corrected[p] + torch.einsum("bci,bj->ij", rotated_d.square(), rotated_x.square()) / n
    return KroneckerBasis(tuple(KroneckerLayer(names[p][0], names[p][1], q_g, q_a, corrected[p], kfac) for p, (q_g, q_a, kfac) in bases.items()))
