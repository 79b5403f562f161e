"""Half-precision shards (codecs ``"dense"``, ``"lorif"``, ``"factored"``): float16 numbers with a power-of-two scale per
source and factor column.

A factored response is ``r_s = gamma g_s + V^T c_s`` with ``c_s = diag(1/(sigma + lam) - gamma) V g_s`` derived from the
stored factors of ``gamma g_s`` and the basis ``V`` when the store is read (:mod:`factored`). The gradients lie mostly
in the top eigenspace, where ``V^T c_s`` takes ``gamma g_s`` back out: the two terms' largest scores are 4-24 times the
largest score they leave (``benchmarks/half_precision.py``). A relative rounding ``u`` of the basis or the factors moves
the scores by about ``u`` times that, where a dense store's rounding of ``r_s`` moves them by ``u``: format 4's
bfloat16 basis and factors (``u = 2^-8``) moved the trajectory ensemble's scores by 3.2e-2 / 5.3e-3 / 1.6e-3 of the
largest on a 24-unit test MLP / the digits MLP / the MNIST-1D MLP, a bfloat16 dense store by 1.6e-3 / 3.9e-4 /
2.5e-4. float16 carries three more bits (``u = 2^-11``) but not bfloat16's range (its smallest normal is 6.1e-5; the
factors ``U = gamma delta / n`` reach 1e-23). So a half-precision factored checkpoint keeps its basis in float16
(orthonormal rows: entries in [-1, 1]) and each source's factor columns (and each source's dense rows) in float16
divided by a power-of-two scale that brings the column's largest magnitude into ``[2^14, 2^15)``: the division is exact,
the scale is exact in bfloat16 (2 bytes), and every column keeps float16's relative precision down to ``2^-28`` of its
largest entry, whatever its magnitude. Measured: 2.6e-3 / 6.6e-4 / 1.7e-4, for 0.4% more bytes than format 4's
bfloat16 store (9.29 and 35.67 MB on the digits and MNIST-1D MLPs).

Codecs ``"dense"`` and ``"lorif"`` store the response (or its SVD factors) itself, whose entries ``~ G^-1 g_b / n`` fall
below float16's 6e-8 for well-fit examples of a large training set: a plain float16 cast flushed them to zero (2,000
blobs: the worst source's scores 4.8 (dense) / 5.5 (lorif) of its largest score off; a source whose response lies
below 6e-8 stored as 0, scoring 0). Written the same way (one scale per source and parameter, per source and column of
a ``@U`` / ``@V`` factor): 4.9e-3 / 6.7e-3, for 1.6% / 6.7% more bytes. bfloat16 has the range but 3 fewer bits: a
bfloat16 half store of these codecs is scaled float16 too (digits MLP, dense: the worst source 9.8e-3 plain bfloat16,
1.2e-3 scaled; 40.58 -> 40.62 MB; ``benchmarks/results/half-precision-dense.md``). Codec ``"eigen"`` casts as before.

:func:`encode` writes, :func:`decode` reads; :func:`scale_shape` is the shape the store checks for a scale tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_attr.lowrank import FACTOR_KEYS

SCALE = "@scale"  # shard key suffix of a tensor's scales: f"{key}@scale", bfloat16 powers of two
ENCODING = "float16-scaled"  # the manifest's "encoding" of a checkpoint written this way
SCALED_CODECS = ("dense", "lorif", "factored")  # the codecs whose half-precision shards are written scaled (not "eigen")
_TOP_EXPONENT = 15  # a column's largest magnitude is stored in [2^14, 2^15) (float16's largest finite number is 65504)
_LEAST_EXPONENT = -126  # scales stay normal numbers of bfloat16 (and float32)


def _is_factor(key: str) -> bool:
    return key.endswith(FACTOR_KEYS)


def scaled(codec: str, dtype: str | None) -> bool:
    """Whether a checkpoint of ``codec`` in store dtype ``dtype`` is written as scaled float16 (:data:`ENCODING`): codecs
    ``"dense"``, ``"lorif"`` and ``"factored"`` in either half dtype. Plain float16 flushes a response entry below 6e-8
    to zero (dense responses of 2,000 blobs: 8.7% of the entries, the worst source's scores 4.8 of its largest off), and
    scaled float16 keeps 3 more bits than bfloat16 for the same 2 bytes (README, "Half precision")."""
    return dtype in ("float16", "bfloat16") and codec in SCALED_CODECS


def entry(codec: str, dtype: str | None) -> dict[str, str]:
    """The manifest field of a checkpoint of ``codec`` in store dtype ``dtype``: ``{"encoding": ENCODING}`` where it is
    written scaled (:func:`scaled`), else ``{}``."""
    return {"encoding": ENCODING} if scaled(codec, dtype) else {}


def scale_shape(key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of the scales of shard tensor ``key`` of ``shape``: ``[S, c]`` for a factor ``[S, out | in, c]`` (one per
    source and column), ``[S]`` for anything else ``[S, ...]`` (one per source)."""
    return (shape[0], shape[2]) if _is_factor(key) else (shape[0],)


def encode(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """``{key: Tensor[S, ...]}`` (float32; NaN rows: invalid sources) -> ``{key: float16 Tensor[S, ...], key@scale:
    bfloat16 Tensor[scale_shape]}``. Each column (factor) or source's row (dense) is divided by the power of two that
    brings its largest magnitude into ``[2^14, 2^15)`` (a zero or non-finite one by 1: zeros and NaN stay what they
    are)."""
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


__all__ = ["ENCODING", "SCALE", "SCALED_CODECS", "decode", "encode", "entry", "scale_shape", "scaled"]
