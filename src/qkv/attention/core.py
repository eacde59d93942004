"""Scaled dot-product attention: the one equation every Transformer is built on.

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k) + bias, masked) V

Vaswani et al., "Attention Is All You Need", 2017 (arXiv:1706.03762), section 3.2.1.

Each query asks "what am I looking for?", each key says "what do I offer?", each value is
"what I hand over". The score of query i for key j is their dot product; dividing by sqrt(d_k)
keeps the scores from growing with the head size (large scores saturate the softmax and its
gradient vanishes). The softmax turns each row of scores into weights that sum to 1, and the
output of a query is the weighted sum of the values.

This file is the place to start reading qkv. ``reference_attention`` does the math one step per
line; ``scaled_dot_product_attention`` is the function the rest of the library calls: it checks
its arguments and hands them to a backend (see ``backends.py``), by default PyTorch's fused kernel.

Shape legend (the same in every file):
    B batch · T query positions · S key/value positions · D model width · H query heads ·
    K key/value heads · E head dim · F MLP hidden width · V vocabulary · L layers.
Here "..." stands for any leading dimensions, usually (B, H).

Conventions that hold everywhere in qkv:
    * ``mask`` is boolean and True means "may attend". It broadcasts to (..., T, S).
    * ``bias`` is a float tensor added to the scaled scores (ALiBi, relative positions).
    * A query whose mask forbids every key gets a zero output and zero gradients, never NaN.
"""

from __future__ import annotations

from typing import Literal, overload

import torch
from torch import Tensor
from torch.nn import functional as F

from qkv.attention import masks
from qkv.attention.backends import (
    check_attention_inputs,
    get_backend,
    handles_causal,
    handles_grouped_kv,
    register_backend,
    repeat_kv,
)

__all__ = ["reference_attention", "scaled_dot_product_attention"]


# --8<-- [start:reference]
def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    *,
    bias: Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Attention written out step by step: the version to read.

    Args:
        q: queries, (..., T, E).
        k: keys, (..., S, E).
        v: values, (..., S, Ev).
        mask: boolean, True = may attend, broadcastable to (..., T, S).
        bias: additive scores, broadcastable to (..., T, S).
        scale: multiplies the scores; defaults to 1 / sqrt(E).
        dropout_p: probability of dropping an attention weight (training only).

    Returns:
        The output (..., T, Ev) in the dtype of ``v``, and the attention weights (..., T, S)
        in float32 (float64 for float64 inputs).
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5  # 1 / sqrt(d_k)

    # 1. How well does each query match each key? One dot product per (query, key) pair.
    scores = q @ k.transpose(-2, -1)  # (..., T, S)

    # 2. Scale, in float32 at least (float64 stays float64), so the softmax below is accurate
    #    even for float16/bfloat16 inputs.
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * scale  # (..., T, S)

    # 3. Add the positional bias, if any (ALiBi, T5 or Shaw relative positions).
    if bias is not None:
        scores = scores + bias.to(scores.dtype)  # (..., T, S)

    # 4. Hide the keys a query may not see. The smallest float32 (rather than -inf) keeps a fully
    #    masked row finite; step 6 then sets its weights to zero.
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)  # (..., T, S)

    # 5. Softmax over the keys: each row becomes weights that sum to 1.
    weights = torch.softmax(scores, dim=-1)  # (..., T, S)

    # 6. Masked keys get exactly zero weight, and a row with no visible key becomes all zeros.
    if mask is not None:
        weights = weights.masked_fill(~mask, 0.0)  # (..., T, S)

    # 7. Dropout on the weights (only while training; dropout_p=0 at inference).
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)  # (..., T, S)

    # 8. The output of each query is the weighted sum of the values.
    out = weights.to(v.dtype) @ v  # (..., T, Ev)
    return out, weights


# --8<-- [end:reference]

register_backend("reference", reference_attention)


@overload
def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    *,
    bias: Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    impl: str = "auto",
    return_weights: Literal[False] = False,
) -> Tensor: ...


@overload
def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    *,
    bias: Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    impl: str = "auto",
    return_weights: Literal[True],
) -> tuple[Tensor, Tensor]: ...


# --8<-- [start:dispatch]
def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    *,
    bias: Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    impl: str = "auto",
    return_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Scaled dot-product attention, checked, then computed by the chosen implementation.

    Query heads may outnumber key/value heads (grouped-query attention): when ``q`` is
    (B, H, T, E) and ``k``, ``v`` are (B, K, S, E) with H a multiple of K, query head h reads
    key/value head h // (H / K). Heads are the third-from-last dimension of 4-D (or larger)
    inputs; 3-D inputs are (B, T, E) and must agree in every leading dimension.

    Args:
        q: queries, (..., T, E).
        k: keys, (..., S, E).
        v: values, (..., S, Ev).
        mask: boolean, True = may attend, broadcastable to (..., T, S).
        bias: additive float scores, broadcastable to (..., T, S).
        scale: multiplies the scores; defaults to 1 / sqrt(E).
        dropout_p: dropout on the attention weights; pass 0.0 at inference.
        is_causal: also apply the causal mask ``masks.causal(T, S)`` (bottom-right aligned: the
            T queries are the last T of the S positions), joined with ``mask``. Backends that
            know causality skip the work it forbids; the others get it inside ``mask``.
        impl: ``"reference"`` (the step-by-step math, the only path that returns weights),
            ``"sdpa"`` (PyTorch's fused kernel), any other registered backend, or ``"auto"``:
            the fast path unless weights are requested.
        return_weights: also return the attention weights (..., T, S); needs the reference path.

    Returns:
        The output (..., T, Ev), or ``(output, weights)`` when ``return_weights`` is True.

    Example:
        >>> import torch, qkv
        >>> q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 7, 8), torch.randn(2, 4, 7, 8)
        >>> out, w = qkv.scaled_dot_product_attention(q, k, v, return_weights=True)
        >>> out.shape, w.shape
        (torch.Size([2, 4, 5, 8]), torch.Size([2, 4, 5, 7]))
        >>> bool(torch.allclose(w.sum(-1), torch.ones(2, 4, 5)))
        True
    """
    check_attention_inputs(q, k, v, mask, bias)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if impl == "auto":
        impl = "reference" if return_weights else "sdpa"
    if return_weights and impl != "reference":
        raise ValueError(
            f"impl={impl!r} cannot return attention weights; "
            "use impl='reference' (or 'auto') with return_weights=True"
        )
    backend = get_backend(impl)
    causal = {}  # (the keyword is passed only to backends that take it)
    if is_causal and handles_causal(impl):
        causal = {"is_causal": True}
    elif is_causal:
        causal_mask = masks.causal(q.shape[-2], k.shape[-2], device=q.device)  # (T, S)
        mask = causal_mask if mask is None else mask & causal_mask  # (..., T, S)
    n_rep = q.shape[-3] // k.shape[-3] if q.dim() >= 4 else 1
    if n_rep > 1 and not handles_grouped_kv(impl):
        # Grouped-query attention, written plainly: copy each key/value head to its queries.
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)  # (B, H, S, E)
    out, weights = backend(q, k, v, mask, bias=bias, scale=scale, dropout_p=dropout_p, **causal)
    if return_weights:
        assert weights is not None  # the reference backend always returns them
        return out, weights
    return out


# --8<-- [end:dispatch]
