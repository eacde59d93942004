"""Fused projections for inference: self-attention's q, k and v as one matrix product.

    [q | k | v] = x [W_Q; W_K; W_V]^T + [b_Q | b_K | b_V]      one product instead of three
    out         = o W_O^T + b_O                                  on the same fast kernel

``MultiHeadAttention`` computes q = x W_Q^T, k = x W_K^T and v = x W_V^T with three
``nn.Linear`` calls: the reference, and the path every gradient takes. Stacking the three
weight matrices gives the same numbers from one product, which matters when decoding: a token
passes through every layer's projections one row at a time, and each call costs microseconds
of dispatch whatever its size. Both products also run on ``inference_linear``
(``qkv._kernels``), the kernel that reads large weights fastest on a CPU. Generation enters
``fused_projections`` around its loop; the tests hold the fused path to the plain one.

The stacked weight is a copy, ((H + 2K) E, D) per module, kept on the module (not in its
state_dict) from one generation to the next and rebuilt when a projection's parameters change.

Shape legend: B batch · T query positions · D model width · H query heads · K key/value heads
· E head dim.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from qkv._kernels import inference_linear

if TYPE_CHECKING:
    from qkv.attention.multihead import MultiHeadAttention

__all__ = ["FusedQKV", "fused_output", "fused_projections", "fused_qkv", "fused_self_projections"]


class FusedQKV(NamedTuple):
    """[W_Q; W_K; W_V] and their biases side by side, with the key of the parameters they were
    built from (each one's storage, version counter and dtype)."""

    key: tuple[tuple[int, int, torch.dtype], ...]
    weight: Tensor  # ((H + 2K) E, D)
    bias: Tensor | None  # ((H + 2K) E,)


def fused_qkv(mha: MultiHeadAttention) -> FusedQKV:
    """``mha``'s stacked q/k/v weights: built on first use, cached on the module until they change.

    The cache is keyed on each parameter's storage and version counter: an optimizer step,
    ``load_state_dict``, ``.to(...)`` or any in-place write to a parameter rebuilds it. (Writes
    through ``param.data`` bypass the version counter, as they bypass autograd's own checks;
    call ``mha.clear_fused_cache()`` after them.)
    """
    projections = (mha.q_proj, mha.k_proj, mha.v_proj)
    params = [p for m in projections for p in (m.weight, m.bias) if p is not None]
    key = tuple((p.data_ptr(), p._version, p.dtype) for p in params)
    if mha._fused is None or mha._fused.key != key:
        with torch.no_grad():
            weight = torch.cat([m.weight for m in projections])  # ((H + 2K) E, D)
            bias = None
            if any(m.bias is not None for m in projections):
                bias = torch.cat(
                    [
                        m.weight.new_zeros(m.out_features) if m.bias is None else m.bias
                        for m in projections
                    ]
                )  # ((H + 2K) E,)
        mha._fused = FusedQKV(key, weight, bias)
    return mha._fused


# --8<-- [start:fused_self_projections]
def fused_self_projections(mha: MultiHeadAttention, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The fast path of ``mha._plain_projections(x)``: one product, then three views.

    Args:
        mha: the attention module; its stacked weights must be built (``fused_projections``
            builds them on entry).
        x: (B, T, D).

    Returns:
        q (B, H, T, E), k and v (B, K, T, E).
    """
    assert mha._fused is not None, "enter fused_projections first"
    qkv = inference_linear(x, mha._fused.weight, mha._fused.bias)  # (B, T, (H + 2K) E)
    hq, hk = mha.n_heads * mha.head_dim, mha.n_kv_heads * mha.head_dim
    q = mha._split_heads(qkv[..., :hq], mha.n_heads)  # (B, H, T, E)
    k = mha._split_heads(qkv[..., hq : hq + hk], mha.n_kv_heads)  # (B, K, T, E)
    v = mha._split_heads(qkv[..., hq + hk :], mha.n_kv_heads)  # (B, K, T, E)
    return q, k, v


# --8<-- [end:fused_self_projections]


def fused_output(mha: MultiHeadAttention, out: Tensor) -> Tensor:
    """The fast path of ``mha.out_proj(out)``, (B, T, H E) -> (B, T, D): the same weights on
    ``inference_linear``, and no module call."""
    return inference_linear(out, mha.out_proj.weight, mha.out_proj.bias)  # (B, T, D)


# --8<-- [start:fused_projections]
@contextmanager
def fused_projections(modules: Sequence[MultiHeadAttention]) -> Iterator[None]:
    """Run the projections of ``modules`` on the fused path while the block runs (in no-grad
    forwards only: with gradients the plain ``nn.Linear`` path runs).

    On entry each module's stacked weights are checked against its parameters (rebuilt if they
    changed), so the parameters are compared once per generation, not once per token; inside
    the block they must not change. Modules whose keys come from another width (cross-attention
    to a wider memory) are left plain. Generation (``qkv.generate``) enters it around the
    decoding loop.

    Args:
        modules: the attention modules to switch, e.g. ``attention_modules(model)``.

    Example:
        >>> import torch
        >>> from qkv.attention.multihead import MultiHeadAttention
        >>> mha = MultiHeadAttention(d_model=8, n_heads=2).eval()
        >>> x = torch.randn(1, 3, 8)
        >>> with torch.no_grad():
        ...     plain = mha(x, causal=True)
        ...     with fused_projections([mha]):
        ...         fused = mha(x, causal=True)
        >>> bool(torch.allclose(plain, fused, atol=1e-6)), mha.fuse_projections
        (True, False)
    """
    modules = [m for m in modules if m.k_proj.in_features == m.d_model]  # self-attention shapes
    before = [m.fuse_projections for m in modules]
    try:
        for m in modules:
            fused_qkv(m)  # rebuilt here if the parameters changed
            m.fuse_projections = True
        yield
    finally:
        for m, was in zip(modules, before, strict=True):
            m.fuse_projections = was


# --8<-- [end:fused_projections]
