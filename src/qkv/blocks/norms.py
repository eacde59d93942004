"""Normalisation layers: keep each token's vector at a steady scale between sublayers.

    LayerNorm(x) = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias
    RMSNorm(x)   =  x / sqrt(mean(x^2) + eps) * weight

Ba, Kiros and Hinton, "Layer Normalization", 2016 (arXiv:1607.06450).
Zhang and Sennrich, "Root Mean Square Layer Normalization", 2019 (arXiv:1910.07467).

Both act on the last dimension, one token at a time, so a token's result never depends on the
rest of the batch or the sequence. LayerNorm centres the vector and divides by its standard
deviation; RMSNorm skips the centring and divides by the root mean square, which is cheaper and
works as well in practice (LLaMA, T5 and most recent decoders use it). Both then rescale each
feature with a learned ``weight`` (gain); LayerNorm also adds a learned ``bias`` (shift).

qkv uses PyTorch's own ``torch.nn.LayerNorm`` (re-exported here as ``LayerNorm``);
``layer_norm_reference`` spells out its math for reading, and a test proves the two agree.

Shape legend: B batch · T query positions · D model width. Here "..." stands for any leading
dimensions, usually (B, T).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import LayerNorm

__all__ = ["LayerNorm", "NormKind", "RMSNorm", "layer_norm_reference", "make_norm", "rms_norm"]

NormKind = Literal["layer", "rms"]


# --8<-- [start:layer_norm_reference]
def layer_norm_reference(
    x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5
) -> Tensor:
    """LayerNorm written out step by step: the math of ``torch.nn.LayerNorm``, to read.

    Args:
        x: (..., D).
        weight: gain (D,); None means 1.
        bias: shift (D,); None means 0.
        eps: added to the variance so that a constant vector does not divide by zero.

    Returns:
        (..., D), in the dtype of ``x``.
    """
    # 1. The mean of each token's D features.
    mean = x.mean(dim=-1, keepdim=True)  # (..., 1)
    # 2. Their variance, biased (divided by D, not D - 1), as in the paper and in PyTorch.
    var = (x - mean).pow(2).mean(dim=-1, keepdim=True)  # (..., 1)
    # 3. Normalise: zero mean and unit variance per token.
    y = (x - mean) / torch.sqrt(var + eps)  # (..., D)
    # 4. Scale and shift each feature with the learned gain and bias.
    if weight is not None:
        y = y * weight  # (..., D)
    if bias is not None:
        y = y + bias  # (..., D)
    return y


# --8<-- [end:layer_norm_reference]


# --8<-- [start:rms_norm]
def rms_norm(x: Tensor, weight: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """RMSNorm: divide each token by its root mean square, then rescale.

    The sum of squares is computed in float32 (or float64 for float64 input): in float16 it
    overflows for features around 256 and loses precision long before that.

    Args:
        x: (..., D).
        weight: gain (D,); None means 1.
        eps: added to the mean square so that a zero vector does not divide by zero.

    Returns:
        (..., D), in the dtype of ``x``.

    Example:
        >>> import torch
        >>> rms_norm(torch.tensor([[3.0, -4.0]]), eps=0.0)  # rms = sqrt((9 + 16) / 2)
        tensor([[ 0.8485, -1.1314]])
    """
    h = x.to(torch.promote_types(x.dtype, torch.float32))  # (..., D), at least float32
    # 1/sqrt(mean_i(x_i^2) + eps): one number per token.
    inv_rms = torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + eps)  # (..., 1)
    h = h * inv_rms  # (..., D)
    if weight is not None:
        h = h * weight  # (..., D)
    return h.to(x.dtype)  # (..., D)


# --8<-- [end:rms_norm]


class RMSNorm(nn.Module):
    """Root mean square layer normalisation with a learned gain, ``weight`` (D,).

    Args:
        d_model: D, the width of the normalised last dimension.
        eps: added to the mean square before the square root.

    Example:
        >>> import torch
        >>> norm = RMSNorm(8)
        >>> y = norm(torch.randn(2, 3, 8))
        >>> bool(torch.allclose(y.pow(2).mean(-1), torch.ones(2, 3), atol=1e-4))
        True
    """

    def __init__(self, d_model: int, *, eps: float = 1e-6) -> None:
        super().__init__()
        self.d_model, self.eps = d_model, eps
        self.weight = nn.Parameter(torch.ones(d_model))  # (D,)

    def forward(self, x: Tensor) -> Tensor:
        """Normalise ``x`` (..., D); the result has the dtype of ``x``."""
        return rms_norm(x, self.weight, self.eps)  # (..., D)

    def extra_repr(self) -> str:
        return f"{self.d_model}, eps={self.eps}"


def make_norm(kind: NormKind, d_model: int, *, eps: float = 1e-5, bias: bool = True) -> nn.Module:
    """Build the norm named ``kind``: ``"layer"`` (LayerNorm) or ``"rms"`` (RMSNorm).

    Args:
        kind: ``"layer"`` or ``"rms"``.
        d_model: D.
        eps: the norm's epsilon.
        bias: whether LayerNorm has its learned shift; RMSNorm never has one.
    """
    if kind == "layer":
        return LayerNorm(d_model, eps=eps, bias=bias)
    if kind == "rms":
        return RMSNorm(d_model, eps=eps)
    raise ValueError(f"unknown norm {kind!r}; choose one of ['layer', 'rms']")
