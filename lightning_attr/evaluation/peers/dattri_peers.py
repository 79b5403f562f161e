"""dattri's attributors (TRAK, influence functions with CG / LiSSA, TracIn and gradient dot).

Conventions handled here, each verified against dattri 0.3 sources:
- dattri returns ``Tensor[n_train, n_test]``; the adapters transpose to ``Tensor[Q, n_train]``.
  All these scores are positive for proponents (gradient alignment), as in this package.
- TRAK uses its own output function (the margin ``log p / (1 - p)``) for train and test
  gradients, as TRAK's paper and dattri's examples do; the influence functions and TracIn use the
  training loss (cross-entropy) for both.
- dattri's ``DEFAULT_PROJECTOR_KWARGS`` is a module-level dict that each attributor UPDATES in
  place; the adapters always pass a full copy so one run's settings never leak into the next.
- ``attribute`` runs under ``torch.no_grad()`` (dattri's own advice: memory explodes otherwise),
  and LiSSA's collate casts labels to float, so the loss casts them back with ``.long()``.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_attr.evaluation.peers.base import Peer, require


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _ce_task(model: nn.Module, checkpoints: list[dict[str, Tensor]], unbatched: bool = False):
    """Cross-entropy task; ``unbatched``: the loss receives ONE example (TracIn vmaps over examples itself)."""
    task_mod = require("dattri.task")
    base = copy.deepcopy(model)

    def loss(params, data):
        x, y = data
        if unbatched:
            x, y = x.unsqueeze(0), y.unsqueeze(0)
        return F.cross_entropy(torch.func.functional_call(base, params, x), y.long())

    return task_mod.AttributionTask(loss_func=loss, model=base, checkpoints=checkpoints)


def _loader(x: Tensor, y: Tensor, batch_size: int) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=max(1, batch_size), shuffle=False)


class DattriTRAK(Peer):
    """TRAK (dattri's ``TRAKAttributor``) over ``n_models`` independently trained models.

    Args:
        n_models: ensemble size (1 = the attributed model only).
        proj_dim: random projection dimension (dattri's default 512).
        regularization: ``lambda`` added to the projected kernel's diagonal (dattri's default 0).
        device: where dattri computes (``"cpu"`` or ``"cuda"``).
    """

    def __init__(self, n_models: int = 1, proj_dim: int = 512, regularization: float = 0.0, proj_seed: int = 0, device: str = "cpu") -> None:
        self._n_models, self._device = n_models, device
        self.config = {"package": "dattri", "n_models": n_models, "proj_dim": proj_dim, "regularization": regularization, "proj_seed": proj_seed}
        self.name = f"TRAK-{n_models} (dattri)"

    def setup(self, models: list[nn.Module], x_train: Tensor, y_train: Tensor) -> None:
        models = self._ensemble(models)
        task_mod = require("dattri.task")
        algo = require("dattri.algorithm.trak")
        base = copy.deepcopy(models[0])

        def margin(params, data):
            x, y = data
            logp = -F.cross_entropy(torch.func.functional_call(base, params, x.unsqueeze(0)), y.long().unsqueeze(0))
            return logp - torch.log1p(-torch.exp(logp).clamp(max=1 - 1e-7))

        def prob(params, data):
            x, y = data
            return torch.exp(-F.cross_entropy(torch.func.functional_call(base, params, x.unsqueeze(0)), y.long().unsqueeze(0)))

        task = task_mod.AttributionTask(loss_func=margin, model=base, checkpoints=[_state(m) for m in models])
        projector = {"proj_dim": self.config["proj_dim"], "proj_max_batch_size": 32, "proj_seed": self.config["proj_seed"], "device": self._device}
        self._attributor = algo.TRAKAttributor(
            task=task, correct_probability_func=prob, projector_kwargs=projector, device=self._device, regularization=self.config["regularization"]
        )
        with torch.no_grad():
            self._attributor.cache(_loader(x_train, y_train, 256))

    def storage_bytes(self) -> int:
        a = self._attributor
        return sum(t.numel() * t.element_size() for t in a.inv_XTX_XT_list) + a.Q.numel() * a.Q.element_size()

    def score(self, x_query: Tensor, y_query: Tensor) -> Tensor:
        with torch.no_grad():
            return self._attributor.attribute(_loader(x_query, y_query, len(x_query))).T.contiguous()


class _DattriInnerProduct(Peer):
    """Shared part of dattri's inner-product attributors (IF-CG, IF-LiSSA)."""

    def _make(self, task):  # pragma: no cover - abstract
        raise NotImplementedError

    def setup(self, models: list[nn.Module], x_train: Tensor, y_train: Tensor) -> None:
        task = _ce_task(models[0], [_state(models[0])])
        self._attributor = self._make(task)
        self._x_train, self._y_train = x_train, y_train
        with torch.no_grad():
            # the curvature is estimated on the whole training set as ONE batch (dattri's advice)
            self._attributor.cache(_loader(x_train, y_train, len(x_train)))

    def score(self, x_query: Tensor, y_query: Tensor) -> Tensor:
        with torch.no_grad():
            out = self._attributor.attribute(
                _loader(self._x_train, self._y_train, len(self._x_train)), _loader(x_query, y_query, len(x_query))
            )
        return out.T.contiguous()


class DattriIFCG(_DattriInnerProduct):
    """Influence functions with conjugate-gradient inverse-HVPs (``IFAttributorCG``; dattri defaults: 10 iterations, no damping)."""

    def __init__(self, regularization: float = 0.0, max_iter: int = 10) -> None:
        self.config = {"package": "dattri", "regularization": regularization, "max_iter": max_iter}
        self.name = "IF-CG (dattri)"

    def _make(self, task):
        algo = require("dattri.algorithm.influence_function")
        return algo.IFAttributorCG(task=task, device="cpu", max_iter=self.config["max_iter"], regularization=self.config["regularization"])


class DattriIFLiSSA(_DattriInnerProduct):
    """Influence functions with LiSSA inverse-HVPs (``IFAttributorLiSSA``)."""

    def __init__(self, damping: float = 0.0, recursion_depth: int = 5000, batch_size: int = 1, scaling: float = 50.0) -> None:
        self.config = {"package": "dattri", "damping": damping, "recursion_depth": recursion_depth, "batch_size": batch_size, "scaling": scaling}
        self.name = "IF-LiSSA (dattri)"

    def _make(self, task):
        algo = require("dattri.algorithm.influence_function")
        c = self.config
        return algo.IFAttributorLiSSA(
            task=task, device="cpu", damping=c["damping"], recursion_depth=c["recursion_depth"], batch_size=c["batch_size"], scaling=c["scaling"]
        )


class DattriTracIn(Peer):
    """TracIn over checkpoints (``TracInAttributor``); one checkpoint with weight 1 is gradient dot.

    Args:
        weights: per-checkpoint weights (TracIn: the learning rate at each checkpoint). ``setup``
            receives the checkpoints as ``models`` in the same order.
        proj_dim: dattri always projects TracIn's gradients (its default: 512 dimensions).
    """

    def __init__(self, weights: list[float] | None = None, normalized_grad: bool = False, proj_dim: int = 512) -> None:
        self.weights = [1.0] if weights is None else list(weights)
        self.config = {"package": "dattri", "weights": self.weights, "normalized_grad": normalized_grad, "proj_dim": proj_dim}
        self.name = "grad-dot (dattri)" if len(self.weights) == 1 else f"TracIn-{len(self.weights)}ckpt (dattri)"

    @property
    def n_models(self) -> int:
        return len(self.weights)

    def setup(self, models: list[nn.Module], x_train: Tensor, y_train: Tensor) -> None:
        if len(models) != len(self.weights):
            raise ValueError(f"{self.name} needs {len(self.weights)} checkpoints, got {len(models)}.")
        algo = require("dattri.algorithm.tracin")
        task = _ce_task(models[0], [_state(m) for m in models], unbatched=True)
        self._attributor = algo.TracInAttributor(
            task=task, weight_list=torch.tensor(self.weights), normalized_grad=self.config["normalized_grad"],
            projector_kwargs={"proj_dim": self.config["proj_dim"], "proj_max_batch_size": 32, "proj_seed": 0, "device": "cpu"},
            device="cpu",
        )
        self._x_train, self._y_train = x_train, y_train

    def score(self, x_query: Tensor, y_query: Tensor) -> Tensor:
        with torch.no_grad():
            out = self._attributor.attribute(_loader(self._x_train, self._y_train, 256), _loader(x_query, y_query, len(x_query)))
        return out.T.contiguous()
