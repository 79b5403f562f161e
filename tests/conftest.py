"""Shared fixtures: tiny classification problems, models with the attribution contract, exact influence."""

from __future__ import annotations

import json
import shutil

import lightning as L
import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, TensorDataset

from lightning_attr import IndexedDataset
from lightning_attr.half_precision import SCALE, decode
from lightning_attr.models import Classifier, mlp


def blobs(n: int = 160, d: int = 6, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs: ``x: [n, d]``, ``y: [n]``, overlapping enough that influence is non-trivial."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, d, generator=g) * 1.5
    y = torch.randint(0, classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, d, generator=g)
    return x, y


def fit(model: L.LightningModule, x, y, callbacks=(), *, epochs=10, batch_size=32, seed=0, **trainer_kwargs):
    """Seeds everything, fits ``model`` on ``IndexedDataset((x, y))`` and returns the Trainer."""
    L.seed_everything(seed, verbose=False)
    loader = DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=batch_size, shuffle=True)
    trainer = L.Trainer(
        max_epochs=epochs, callbacks=list(callbacks), logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", **trainer_kwargs,
    )  # fmt: skip
    trainer.fit(model, loader)
    return trainer


def logistic(d: int, classes: int) -> Classifier:
    return Classifier(nn.Sequential(nn.Linear(d, classes)), lr=0.1, momentum=0.9, weight_decay=1e-3)


def small_mlp(d: int, classes: int, hidden: int = 16) -> Classifier:
    return Classifier(mlp(d, [hidden], classes), lr=0.1, momentum=0.9, weight_decay=1e-3)


class SkipsNonFiniteInputs(Classifier):
    """Trains only on finite inputs, so the model stays finite while one example's gradient is NaN."""

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        keep = x.isfinite().all(dim=1)
        return nn.functional.cross_entropy(self(x[keep]), y[keep])


def flat_functions(model: nn.Module):
    """``(theta, logits(vec, x), losses(vec, x, y))`` of a float64 copy of ``model`` over its flat parameters."""
    import copy

    model = copy.deepcopy(model).eval().double()
    names = [n for n, p in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()

    def unflat(vec):
        out, i = {}, 0
        for name, shape in zip(names, shapes):
            k = int(torch.Size(shape).numel())
            out[name] = vec[i : i + k].reshape(shape)
            i += k
        return out

    def logits(vec, x):
        return functional_call(model, unflat(vec), (x.double(),))

    def losses(vec, x, y):
        return nn.functional.cross_entropy(logits(vec, x), y, reduction="none")

    return theta, logits, losses


def explicit_ggn(model: nn.Module, x_train) -> torch.Tensor:
    """``Tensor[P, P]`` float64: the full-data cross-entropy GGN from explicit Jacobians (jacrev), ``H_out = diag(p) - p p^T``."""
    theta, logits, _ = flat_functions(model)
    n = x_train.shape[0]
    # [n, C, P], in blocks of examples: jacrev over all n at once peaks at several GB on digits
    jac = torch.cat([jacrev(logits)(theta, x_train[i : i + 200]) for i in range(0, n, 200)])
    p = torch.softmax(logits(theta, x_train), dim=1)
    h_out = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)  # [n, C, C]
    return torch.einsum("ncp,ncd,ndq->pq", jac, h_out, jac) / n


def exact_influence(model: nn.Module, x_train, y_train, x_query, y_query, damping: float) -> torch.Tensor:
    """Dense ``(1/n) grad f_q^T (G + damping I)^{-1} grad l_b`` with the full-data cross-entropy GGN.

    Independent of the package's own machinery: explicit Jacobians (jacrev), ``H_out = diag(p) - p p^T``.
    Returns ``Tensor[Q, n]``.
    """
    theta, _, losses = flat_functions(model)
    n = x_train.shape[0]
    ggn = explicit_ggn(model, x_train)
    g_train = jacrev(losses)(theta, x_train.double(), y_train)  # [n, P]
    g_query = jacrev(losses)(theta, x_query.double(), y_query)  # [Q, P]
    solved = torch.linalg.solve(ggn + damping * torch.eye(ggn.shape[0], dtype=ggn.dtype), g_train.T)
    return (g_query @ solved / n).float()


def written_plain(store_path, path, dtype: str, version: int = 5):
    """A copy at ``path`` of the store at ``store_path`` as a version without scales wrote it: every float tensor of its
    shards and basis cast to ``dtype`` (format 4's half stores, and format 5's dense and lorif ones before they were
    scaled), no "encoding" field, manifest format ``version``."""
    shutil.copytree(store_path, path)
    manifest = json.loads((path / "manifest.json").read_text())
    for entry in manifest["checkpoints"]:
        for item in [*([{"file": entry["basis_file"]}] if "basis_file" in entry else []), *entry["shards"]]:
            tensors = load_file(str(path / item["file"]))
            index = {k: t for k, t in tensors.items() if not t.is_floating_point()}  # a dense shard's source index
            floats = {k: t for k, t in tensors.items() if t.is_floating_point()}
            floats = decode(floats) if any(k.endswith(SCALE) for k in floats) else floats  # scaled shards (not a basis)
            save_file({**{k: t.to(getattr(torch, dtype)) for k, t in floats.items()}, **index}, str(path / item["file"]))
            item["bytes"] = (path / item["file"]).stat().st_size
        if "basis_file" in entry:
            entry["basis_bytes"] = (path / entry["basis_file"]).stat().st_size
        entry.pop("encoding", None)
        entry.update(dtype=dtype)
    manifest.update(format_version=version)
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


@pytest.fixture
def data():
    return blobs()


def require_peer(module: str):
    """Import a peer library (dattri, trak, kronfluence): skipped where it is not installed (`make test`),
    a failure under LIGHTNING_ATTR_REQUIRE_PEERS=1 (`make test-peers`, which CI runs: no silent skips)."""
    import importlib
    import os

    if os.environ.get("LIGHTNING_ATTR_REQUIRE_PEERS") == "1":
        return importlib.import_module(module)
    return pytest.importorskip(module)
