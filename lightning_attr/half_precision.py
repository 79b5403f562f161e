"""Half-precision shards of codec ``"factored"``: float16 numbers with a float32 scale per source and factor column.

A factored response is ``r_s = gamma g_s + V^T c_s`` with ``c_s = diag(1/(sigma + lam) - gamma) V g_s`` derived from the
stored ``gamma g_s`` when the store is read (:mod:`factored`). Where ``g_s`` lies mostly in the top eigenspace (it
does: gradients live where the curvature is), the two terms nearly cancel: on the digits MLP each is 17-20 times the
score they leave, on a 24-unit test MLP 28 times. A relative rounding ``u`` of the stored factors then moves the scores
by about ``u`` times that ratio, where a dense store's rounding moves them by ``u``: bfloat16 (``u = 2^-8``) factors
moved the test MLP's scores by 1.2e-2 of the largest (a bfloat16 dense store: 2.2e-3). float16 carries three more bits
(``u = 2^-11``), but not bfloat16's range (its smallest normal is 6.1e-5; the factors ``U = gamma delta / n`` reach
1e-12). So a half-precision factored checkpoint keeps each source's factor columns (and each source's dense rows) as
float16 after dividing them by a float32 scale, their largest magnitude over ``2^15``: every column then spans
float16's normal range down to ``2^-29`` of its largest entry, whatever its magnitude. The scales cost one float32 per
source and factor column (per source for a dense parameter): 4 of the digits MLP's 202 numbers per source.

:func:`encode` writes, :func:`decode` reads; :func:`scale_shape` is the shape the store checks for a scale tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_attr.lowrank import FACTOR_KEYS

SCALE = "@scale"  # shard key suffix of a tensor's scales: f"{key}@scale", float32
ENCODING = "float16-scaled"  # the manifest's "encoding" of a factored checkpoint written this way
_TOP_EXPONENT = 15  # a column's largest magnitude is stored in [2^14, 2^15) (float16's largest finite number is 65504)
_LEAST_EXPONENT = -126  # scales stay normal numbers of bfloat16 (and float32)


def _is_factor(key: str) -> bool:
    return key.endswith(FACTOR_KEYS)


def scale_shape(key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of the scales of shard tensor ``key`` of ``shape``: ``[S, c]`` for a factor ``[S, out | in, c]`` (one per
    source and column), ``[S]`` for anything else ``[S, ...]`` (one per source)."""
    return (shape[0], shape[2]) if _is_factor(key) else (shape[0],)


def encode(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """``{key: Tensor[S, ...]}`` (float32; NaN rows: invalid sources) -> ``{key: float16 Tensor[S, ...], key@scale:
    float32 Tensor[scale_shape]}``. Each column (factor) or row (dense) is divided by its largest magnitude over
    ``2^15`` (a zero or NaN column by 1: zeros and NaN stay what they are)."""
    out = {}
    for key, t in tensors.items():
        t = t.float()
        top = t.abs().amax(dim=1, keepdim=True) if _is_factor(key) else t.abs().reshape(t.shape[0], -1).amax(dim=1)
        exponent = (torch.frexp(top).exponent - _TOP_EXPONENT).clamp_min(_LEAST_EXPONENT)  # top / scale in [2^14, 2^15)
        scale = torch.where(torch.isfinite(top) & (top > 0), torch.ldexp(torch.ones_like(top), exponent), torch.ones_like(top))
        view = scale if _is_factor(key) else scale.reshape(-1, *([1] * (t.dim() - 1)))
        out[key] = (t / view).to(torch.float16)  # a division by a power of two: exact, the float16 cast rounds once
        out[key + SCALE] = scale.reshape(scale_shape(key, tuple(t.shape))).to(torch.bfloat16)  # powers of two: exact
    return out


def decode(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of :func:`encode` up to float16 rounding: ``{key: Tensor[S, ...]}`` float32, the scales consumed."""
    out = {}
    for key, t in tensors.items():
        if key.endswith(SCALE):
            continue
        scale = tensors[key + SCALE].float()
        view = scale.unsqueeze(1) if _is_factor(key) else scale.reshape(-1, *([1] * (t.dim() - 1)))
        out[key] = t.float() * view
    return out


__all__ = ["ENCODING", "SCALE", "decode", "encode", "scale_shape"]
