"""The exact target of a classifier: explicit damped-GGN influence at one trained model.

    score(q, b) = (1/n) ∇f_q(θ)ᵀ (G + λI)⁻¹ ∇ℓ_b(θ),    G = (1/n) Σ_i J_iᵀ H_i J_i

with ``f_q`` the query's cross-entropy, ``ℓ_b`` a training example's cross-entropy, ``J_i`` the
Jacobian of the logits in θ and ``H_i = diag(p_i) − p_i p_iᵀ`` the softmax Hessian. This is what a
response store approximates (``docs/propagation.md``), built here without the package's curvature
code: explicit Jacobians (``torch.func.jacrev``) and a dense ``[P, P]`` matrix, so it is only for
models whose ``P`` fits a dense matrix (``P = 15,000`` takes 1.8 GB in float64).

``G`` is accumulated in chunks of examples as ``Σ A_iᵀ A_i`` with ``A_i = B_i J_i``,
``B_i = (I − s_i s_iᵀ) diag(s_i)``, ``s_i = sqrt(p_i)`` (``B_iᵀ B_i = H_i``), so memory is
``P²`` plus one chunk of Jacobians. The damped system is solved for the queries by a Cholesky
factorization in float64; then each score is one dot product with a training gradient.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap
from torch.nn import functional as F


class ExactInfluence:
    """Explicit damped-GGN influence of a cross-entropy classifier at its current weights.

    Args:
        model: maps ``x: Tensor[B, ...]`` to logits ``Tensor[B, C]``; evaluated in eval mode, float64.
            Parameters only (no buffers that change); it is copied, the caller's model is untouched.
        x_train, y_train: the training set the curvature is averaged over (``n`` examples).
        chunk_size: examples per Jacobian chunk (memory: ``chunk_size x C x P`` float64).
        ggn: an already computed ``Tensor[P, P]`` for the same model and data (e.g. from a cache).
    """

    def __init__(self, model: nn.Module, x_train: Tensor, y_train: Tensor, chunk_size: int = 256, ggn: Tensor | None = None) -> None:
        self._model = copy.deepcopy(model).eval().double()
        self._names = [name for name, _ in self._model.named_parameters()]
        self._theta = {name: p.detach() for name, p in self._model.named_parameters()}
        self.num_parameters = sum(p.numel() for p in self._theta.values())
        self._x, self._y = x_train.double(), y_train.long()
        self._chunk = chunk_size
        if ggn is not None and ggn.shape != (self.num_parameters, self.num_parameters):
            raise ValueError(f"ggn must be Tensor[P, P] with P = {self.num_parameters}, got {tuple(ggn.shape)}.")
        self._ggn = None if ggn is None else ggn.double()
        self._train_grads: Tensor | None = None

    # -- building blocks
    def _logits(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(self._model, params, (x.unsqueeze(0),)).squeeze(0)

    def _flat_jacobian(self, x: Tensor) -> Tensor:
        """``Tensor[B, C, P]``: Jacobians of the logits of each example of ``x``."""
        jac = vmap(jacrev(self._logits), in_dims=(None, 0))(self._theta, x)
        return torch.cat([jac[name].flatten(2) for name in self._names], dim=2)

    def gradients(self, x: Tensor, y: Tensor) -> Tensor:
        """``Tensor[B, P]`` float64: per-example gradients of the cross-entropy."""

        def loss(params: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
            return F.cross_entropy(self._logits(params, xi).unsqueeze(0), yi.unsqueeze(0))

        out = []
        for start in range(0, len(x), self._chunk):
            g = vmap(grad(loss), in_dims=(None, 0, 0))(self._theta, x[start : start + self._chunk].double(), y[start : start + self._chunk].long())
            out.append(torch.cat([g[name].flatten(1) for name in self._names], dim=1))
        return torch.cat(out)

    @property
    def ggn(self) -> Tensor:
        """``Tensor[P, P]`` float64: the full-data cross-entropy GGN ``(1/n) Σ J_iᵀ H_i J_i`` (built once, kept)."""
        if self._ggn is None:
            self._ggn = self.build_ggn()
        return self._ggn

    def build_ggn(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """``Tensor[P, P]`` in ``dtype``: the GGN as :attr:`ggn`, summed over chunks in ``dtype`` and not kept (float32:
        half the memory, for a large ``P``)."""
        n, p_dim = len(self._x), self.num_parameters
        ggn = torch.zeros(p_dim, p_dim, dtype=dtype)
        with torch.no_grad():
            for start in range(0, n, self._chunk):
                x = self._x[start : start + self._chunk]
                jac = self._flat_jacobian(x)  # [B, C, P]
                s = torch.softmax(self._model(x), dim=1).sqrt()  # [B, C]
                # A = (I - s sᵀ) diag(s) J = s * J - s (sᵀ (s * J))
                sj = s.unsqueeze(2) * jac
                a = sj - s.unsqueeze(2) * (s.unsqueeze(1) @ sj)
                a = a.reshape(-1, p_dim).float()  # the product in float32 (3x faster), summed in `dtype`
                if dtype == a.dtype:
                    ggn.addmm_(a.T, a)
                else:
                    ggn += (a.T @ a).to(dtype)
        return ggn.div_(n)

    def scores(self, x_query: Tensor, y_query: Tensor, damping: float) -> Tensor:
        """``Tensor[Q, n]``: ``(1/n) ∇f_qᵀ (G + damping·I)⁻¹ ∇ℓ_b`` for every query and training example."""
        if not damping > 0:
            raise ValueError(f"damping must be > 0 (the GGN is singular), got {damping}.")
        if self._train_grads is None:
            self._train_grads = self.gradients(self._x, self._y).float()
        g_query = self.gradients(x_query, y_query)  # [Q, P]
        damped = self.ggn.clone()
        damped.diagonal().add_(damping)
        factor = torch.linalg.cholesky(damped)
        del damped
        solved = torch.cholesky_solve(g_query.T, factor).T.float()  # [Q, P]
        return solved @ self._train_grads.T / len(self._x)
