"""A classification LightningModule with the attribution contract filled in."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_attr.mixin import AttributionMixin


def mlp(in_features: int, hidden: Sequence[int], num_classes: int, dropout: float = 0.0) -> nn.Sequential:
    """``Linear -> Tanh (-> Dropout)`` blocks, then a linear head. Input ``[B, in_features]`` or ``[B, *shape]``."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.Tanh()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class Classifier(AttributionMixin, L.LightningModule):
    """Cross-entropy classifier over any ``net``; batches are ``(x, y)`` or ``(x, y, source_index)``.

    Args:
        net: maps ``x: Tensor[B, ...]`` to logits ``Tensor[B, num_classes]``.
        lr, momentum, weight_decay: optimizer settings (``momentum`` is SGD's; Adam keeps its default betas).
        optimizer: ``"sgd"`` or ``"adam"`` (``torch.optim.Adam`` with L2 ``weight_decay``).
    """

    def __init__(
        self, net: nn.Module, lr: float = 0.05, momentum: float = 0.9, weight_decay: float = 1e-3, optimizer: str = "sgd"
    ) -> None:
        super().__init__()
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}.")
        self.net = net
        self.lr, self.momentum, self.weight_decay, self.optimizer = lr, momentum, weight_decay, optimizer

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    # -- attribution contract: batches here never carry the source index
    def attribution_outputs(self, batch: Sequence[Tensor]) -> Tensor:
        return self(batch[0])

    def attribution_output_loss(self, outputs: Tensor, batch: Sequence[Tensor]) -> Tensor:
        return F.cross_entropy(outputs, batch[1], reduction="none")

    # -- training
    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        x, y = batch[0], batch[1]
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        x, y = batch[0], batch[1]
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y), prog_bar=True)
        self.log("val/acc", (logits.argmax(-1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
