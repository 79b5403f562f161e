"""A small causal transformer language model with the attribution contract filled in.

Batches are ``(x, y)``: ``x: LongTensor[B, T]`` tokens and ``y: LongTensor[B, T]`` the next tokens,
``-100`` where a position is not scored (a query's context). The per-example loss is the mean
next-token cross-entropy over the scored positions (nats per token), so a training window and a
held-out continuation are scored the same way.

The body is the stock ``nn.TransformerEncoder`` (pre-norm layers, GELU) with a causal mask; the
attribution simulation and readout run it through ``torch.func`` (the functional view turns the
fused attention fast path off for its own passes).
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_attr.mixin import AttributionMixin

IGNORE_INDEX = -100


def token_losses(logits: Tensor, targets: Tensor) -> Tensor:
    """``Tensor[B]`` mean cross-entropy (nats per token) over the positions whose target is not ``-100``.

    Args:
        logits: ``Tensor[B, T, V]``. targets: ``LongTensor[B, T]``.
    """
    per_token = F.cross_entropy(logits.transpose(1, -1), targets, reduction="none", ignore_index=IGNORE_INDEX)
    scored = (targets != IGNORE_INDEX).to(per_token.dtype)
    return (per_token * scored).sum(-1) / scored.sum(-1).clamp_min(1.0)


class CausalLM(AttributionMixin, L.LightningModule):
    """Token embedding + learned positions -> causal ``nn.TransformerEncoder`` -> LayerNorm -> linear head.

    Args:
        vocab_size: ``V`` tokens. context: ``T``, the longest sequence (positions learned).
        dim: model width. heads: attention heads (divide ``dim``). depth: layers. ff: feed-forward width.
        lr, momentum, weight_decay: ``torch.optim.SGD`` settings.
    """

    def __init__(
        self,
        vocab_size: int,
        context: int,
        dim: int = 64,
        heads: int = 4,
        depth: int = 2,
        ff: int = 128,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}.")
        self.vocab_size, self.context = int(vocab_size), int(context)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.embed = nn.Embedding(vocab_size, dim)
        self.position = nn.Embedding(context, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, ff, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)
        self.register_buffer("causal_mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, tokens: Tensor) -> Tensor:
        """``LongTensor[B, T]`` (or ``[T]``) -> next-token logits ``Tensor[B, T, V]`` (or ``[T, V]``)."""
        t = tokens.shape[-1]
        if t > self.context:
            raise ValueError(f"sequence of {t} tokens is longer than the model's context={self.context}.")
        h = self.embed(tokens) + self.position.weight[:t]
        h = self.body(h, mask=self.causal_mask[:t, :t], is_causal=True)
        return self.head(self.norm(h))

    # -- attribution contract: batches here never carry the source index
    def attribution_outputs(self, batch: Sequence[Tensor]) -> Tensor:
        return self(batch[0])

    def attribution_output_loss(self, outputs: Tensor, batch: Sequence[Tensor]) -> Tensor:
        return token_losses(outputs, batch[1])

    # -- training
    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        loss = token_losses(self(batch[0]), batch[1]).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        logits = self(batch[0])
        scored = batch[1] != IGNORE_INDEX
        self.log("val/loss", token_losses(logits, batch[1]).mean(), prog_bar=True)
        self.log("val/acc", (logits.argmax(-1) == batch[1])[scored].float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
