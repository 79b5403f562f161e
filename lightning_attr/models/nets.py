"""Networks for the ready-made runs, built from ``input_shape`` and ``num_classes``.

All of them are plain compositions of Linear / Conv / LayerNorm / elementwise ops (no BatchNorm, no
fused attention kernels), so ``torch.func`` (``functional_call``, ``vmap``, ``jvp``) runs through them
as the attribution simulation and the forward readout need.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_attr.models.classifier import mlp


def _numel(input_shape: Sequence[int]) -> int:
    return int(math.prod(int(s) for s in input_shape))


def build_mlp(input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (64,), dropout: float = 0.0) -> nn.Module:
    """:func:`lightning_attr.models.mlp` sized from ``input_shape`` (any shape; flattened)."""
    return mlp(_numel(input_shape), list(hidden), num_classes, dropout)


class CNN1d(nn.Module):
    """1D CNN for signals ``[B, L]`` or ``[B, C, L]``: strided conv blocks, then a linear head.

    Args:
        input_shape: ``[L]`` or ``[C, L]``.
        num_classes: outputs.
        channels: channels of each conv block (each halves the length).
        kernel_size: odd kernel size.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, channels: Sequence[int] = (16, 32), kernel_size: int = 5) -> None:
        super().__init__()
        shape = tuple(int(s) for s in input_shape)
        if len(shape) not in (1, 2):
            raise ValueError(f"CNN1d takes signals of shape [L] or [C, L], got input_shape={list(shape)}.")
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}.")
        self.add_channel = len(shape) == 1
        c_in, length = (1, shape[0]) if self.add_channel else shape
        blocks: list[nn.Module] = []
        for c in channels:
            blocks += [nn.Conv1d(c_in, c, kernel_size, stride=2, padding=kernel_size // 2), nn.ReLU()]
            c_in, length = c, (length + 1) // 2
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(c_in * length, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if self.add_channel:
            x = x.unsqueeze(-2)
        return self.head(self.features(x).flatten(-2))


class CNN(nn.Module):
    """2D CNN for images ``[B, C, H, W]``, ``[B, H, W]`` or flattened square images ``[B, H*W]``.

    Args:
        input_shape: ``[C, H, W]``, ``[H, W]``, or ``[N]`` with ``N`` a perfect square (one channel).
        num_classes: outputs.
        channels: channels of each conv block (3x3, stride 2).
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, channels: Sequence[int] = (16, 32)) -> None:
        super().__init__()
        shape = tuple(int(s) for s in input_shape)
        self.input_shape = shape
        if len(shape) == 1:
            side = math.isqrt(shape[0])
            if side * side != shape[0]:
                raise ValueError(
                    f"CNN got flat inputs of {shape[0]} features, which is not a square image; give "
                    f"input_shape as [C, H, W] or [H, W], or use model=mlp."
                )
            self.image_shape = (1, side, side)
        elif len(shape) == 2:
            self.image_shape = (1, *shape)
        elif len(shape) == 3:
            self.image_shape = shape
        else:
            raise ValueError(f"CNN takes input_shape [C, H, W], [H, W] or [H*W], got {list(shape)}.")
        c_in, h, w = self.image_shape
        blocks: list[nn.Module] = []
        for c in channels:
            blocks += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.ReLU()]
            c_in, h, w = c, (h + 1) // 2, (w + 1) // 2
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(c_in * h * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[: x.dim() - len(self.input_shape)]  # [B] or [] (unbatched, e.g. under vmap)
        x = x.reshape(*lead, *self.image_shape)
        return self.head(self.features(x).flatten(-3))


class TinyTransformer(nn.Module):
    """A small pre-norm transformer encoder for sequences, mean-pooled into a linear head.

    A 1D signal ``[B, L]`` is cut into ``L / patch`` tokens of ``patch`` samples; a sequence of
    feature vectors ``[B, T, F]`` is used as is. Attention is written out with matmuls (no fused
    kernel), so ``torch.func`` transforms work through it.

    Args:
        input_shape: ``[L]`` (with ``L`` divisible by ``patch``) or ``[T, F]``.
        num_classes: outputs.
        dim: token width. heads: attention heads (divide ``dim``). depth: blocks. patch: samples per token.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, dim: int = 32, heads: int = 4, depth: int = 2, patch: int = 4) -> None:
        super().__init__()
        shape = tuple(int(s) for s in input_shape)
        if len(shape) == 1:
            if shape[0] % patch:
                raise ValueError(f"signal length {shape[0]} is not divisible by patch={patch}.")
            self.tokens, feat = shape[0] // patch, patch
            self.patch: int | None = patch
        elif len(shape) == 2:
            self.tokens, feat = shape
            self.patch = None
        else:
            raise ValueError(f"TinyTransformer takes input_shape [L] or [T, F], got {list(shape)}.")
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}.")
        self.heads = heads
        self.embed = nn.Linear(feat, dim)
        self.pos = nn.Parameter(torch.randn(self.tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if self.patch is not None:
            x = x.reshape(*x.shape[:-1], self.tokens, self.patch)
        h = self.embed(x) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(-2))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, h: Tensor) -> Tensor:
        *lead, t, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).reshape(*lead, t, 3, self.heads, d // self.heads).unbind(-3)
        q, k, v = (z.transpose(-2, -3) for z in (q, k, v))  # [..., heads, t, d_h]
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1)
        h = h + self.proj((att @ v).transpose(-2, -3).reshape(*lead, t, d))
        return h + self.mlp(self.norm2(h))
