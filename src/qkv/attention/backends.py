"""Attention backends: the fast implementations, a registry to choose them by name, and the checks.

Every backend computes exactly the function of ``reference_attention`` in ``core.py`` and has its
signature:

    backend(q, k, v, mask, *, bias, scale, dropout_p) -> (output, weights or None)

with q (..., T, E), k (..., S, E), v (..., S, Ev), a boolean ``mask`` (True = may attend) and an
additive ``bias``, both broadcastable to (..., T, S). A backend registered with ``causal=True``
also takes ``is_causal``: the causal mask is then left to it (so it can skip the work above the
diagonal) instead of arriving inside ``mask``. The tests in ``tests/attention`` run every
registered backend against the reference and against an independent NumPy implementation.

Built in:
    ``"reference"``  core.reference_attention, the step-by-step math that returns the weights
                     (registered in core.py, next to its definition).
    ``"sdpa"``       torch.nn.functional.scaled_dot_product_attention, PyTorch's fused kernels
                     (FlashAttention-style on GPUs, a tiled kernel on CPUs).

Shape legend: B batch · T query positions · S key/value positions · H query heads ·
K key/value heads · E head dim.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor
from torch.nn import functional as F

from qkv.attention import masks

__all__ = [
    "AttentionBackend",
    "available_backends",
    "check_attention_inputs",
    "get_backend",
    "handles_causal",
    "handles_grouped_kv",
    "register_backend",
    "register_unavailable",
    "repeat_kv",
    "sdpa_attention",
    "unregister_backend",
]


class AttentionBackend(Protocol):
    """What a backend looks like: the signature of ``reference_attention``."""

    def __call__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Tensor | None,
        *,
        bias: Tensor | None,
        scale: float | None,
        dropout_p: float,
    ) -> tuple[Tensor, Tensor | None]: ...


# --8<-- [start:repeat_kv]
def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """Give each query head its key/value head: (B, K, S, E) -> (B, K * n_rep, S, E).

    Query heads h = g * n_rep ... g * n_rep + n_rep - 1 share key/value head g::

        q heads:  0 1 2 3 | 4 5 6 7     (H = 8)
        kv heads:    0    |    1        (K = 2, n_rep = 4)
    """
    if n_rep == 1:
        return x
    *lead, n_kv, s, e = x.shape
    expanded = x.unsqueeze(-3).expand(*lead, n_kv, n_rep, s, e)  # (B, K, n_rep, S, E)
    return expanded.reshape(*lead, n_kv * n_rep, s, e)  # (B, K * n_rep, S, E)


# --8<-- [end:repeat_kv]


# --8<-- [start:sdpa]
def sdpa_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    *,
    bias: Tensor | None,
    scale: float | None,
    dropout_p: float,
    is_causal: bool = False,
) -> tuple[Tensor, None]:
    """PyTorch's fused attention, with qkv's mask semantics made explicit.

    Must match ``reference_attention``. Three things are arranged around the kernel:
    * causal attention with no other mask and T = S is the kernel's own ``is_causal``, which
      never builds the mask and skips the blocks above the diagonal; otherwise the causal mask
      (bottom-right aligned, as qkv's masks are; the kernel's ``is_causal`` is top-left aligned)
      joins ``mask``;
    * a query row with no visible key attends to every key inside the kernel (so no kernel ever
      sees an all-masked row) and its output is then set to zero, which also zeroes its gradients;
    * when both a bias and a mask are given they become one float mask: the bias with -inf where
      the mask forbids. Nothing is added to a large negative constant, so half precision cannot
      overflow.
    """
    grouped = q.dim() >= 4 and q.shape[-3] != k.shape[-3]
    t, s = q.shape[-2], k.shape[-2]
    if is_causal and mask is None and bias is None and t == s:
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale, enable_gqa=grouped
        )  # (..., T, Ev)
        return out, None
    if is_causal:
        causal = masks.causal(t, s, device=q.device)  # (T, S)
        mask = causal if mask is None else mask & causal  # (..., T, S)
    has_key = None
    attn_mask: Tensor | None = None
    if mask is not None:
        has_key = mask.any(dim=-1, keepdim=True)  # (..., T, 1)
        mask = mask | ~has_key  # (..., T, S)
        attn_mask = mask
    if bias is not None:
        attn_mask = bias.to(q.dtype)
        if mask is not None:
            attn_mask = attn_mask.masked_fill(~mask, float("-inf"))  # (..., T, S)
    out = F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=attn_mask,
        dropout_p=dropout_p,
        scale=scale,
        enable_gqa=grouped,
    )  # (..., T, Ev)
    if has_key is not None:
        out = out.masked_fill(~has_key, 0.0)  # (..., T, Ev)
    return out, None


# --8<-- [end:sdpa]


# --8<-- [start:registry]
# "reference" is registered by core.py, next to its definition.
_BACKENDS: dict[str, AttentionBackend] = {"sdpa": sdpa_attention}
# Backends that take k, v with fewer heads than q themselves; the others get them repeated.
_GROUPED_KV: set[str] = {"sdpa"}
# Backends that take ``is_causal`` and apply the causal mask themselves.
_CAUSAL: set[str] = {"sdpa"}
# Backends known to qkv that this installation lacks, with what to do about it.
_UNAVAILABLE: dict[str, str] = {}


def register_backend(
    name: str, backend: AttentionBackend, *, grouped_kv: bool = False, causal: bool = False
) -> None:
    """Add an attention implementation under ``name`` (it must match the reference's math).

    With ``grouped_kv=False`` the backend always receives as many key/value heads as query
    heads (grouped ones are repeated for it); with True it receives (B, K, S, E) and must
    share each key/value head among H / K query heads itself. With ``causal=False`` a causal
    request arrives as part of ``mask``; with True the backend takes a keyword ``is_causal``
    and applies the causal mask (bottom-right aligned) itself.
    """
    if name == "auto":
        raise ValueError("'auto' is reserved: it picks a backend, it is not one")
    _BACKENDS[name] = backend
    for flag, names in ((grouped_kv, _GROUPED_KV), (causal, _CAUSAL)):
        if flag:
            names.add(name)
        else:
            names.discard(name)


def unregister_backend(name: str) -> None:
    """Remove a backend added with ``register_backend``; the built-in ones stay."""
    if name in ("reference", "sdpa"):
        raise ValueError(f"the built-in backend {name!r} cannot be removed")
    if _BACKENDS.pop(name, None) is None:
        raise ValueError(f"no backend named {name!r}; registered: {available_backends()}")
    _GROUPED_KV.discard(name)
    _CAUSAL.discard(name)


def handles_causal(name: str) -> bool:
    """Whether the backend ``name`` takes ``is_causal`` and applies the causal mask itself."""
    return name in _CAUSAL


def handles_grouped_kv(name: str) -> bool:
    """Whether the backend ``name`` shares key/value heads among query heads itself."""
    return name in _GROUPED_KV


def available_backends() -> list[str]:
    """Names accepted by ``impl=`` (besides ``"auto"``)."""
    return sorted(_BACKENDS)


def register_unavailable(name: str, reason: str) -> None:
    """Name a backend that this installation cannot offer; asking for it raises ``reason``."""
    _UNAVAILABLE[name] = reason


def get_backend(name: str) -> AttentionBackend:
    """The backend registered under ``name``; a clear error for an unknown one."""
    try:
        return _BACKENDS[name]
    except KeyError:
        if name in _UNAVAILABLE:
            raise ValueError(_UNAVAILABLE[name]) from None
        raise ValueError(
            f"unknown attention impl {name!r}; choose one of {['auto', *available_backends()]}"
        ) from None


# --8<-- [end:registry]


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(d) for d in t.shape) + ")"


def _check_broadcast(name: str, t: Tensor, target: tuple[int, ...]) -> None:
    # Plain Python on the sizes: this runs at every decoding step, torch.broadcast_shapes is
    # several times slower.
    fits = t.dim() <= len(target) and all(
        size in (1, want) for size, want in zip(reversed(t.shape), reversed(target), strict=False)
    )
    if not fits:
        raise ValueError(
            f"{name} of shape {_shape(t)} does not broadcast to the scores' shape "
            f"{tuple(target)} (..., T, S); give it T={target[-2]} rows and S={target[-1]} "
            "columns, or size-1 dimensions to broadcast"
        )


def check_attention_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    bias: Tensor | None = None,
) -> None:
    """Raise a ValueError naming the problem when attention's inputs do not fit together."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(f"{name} must have at least 2 dimensions (..., positions, head_dim)")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; "
            "cast them with .to(dtype)"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}"
        )
    if q.dim() != k.dim() or k.dim() != v.dim():
        raise ValueError(
            f"q, k and v must have the same number of dimensions, got q {_shape(q)}, "
            f"k {_shape(k)}, v {_shape(v)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q and k must share the head dim E (last dimension): q {_shape(q)}, k {_shape(k)}"
        )
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"k and v must have the same number of positions S: k {_shape(k)}, v {_shape(v)}"
        )
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(
            f"k and v must have the same leading dimensions: k {_shape(k)}, v {_shape(v)}"
        )
    if q.dim() == 3 and q.shape[0] != k.shape[0]:
        raise ValueError(
            f"q and k must have the same batch size: q {_shape(q)}, k {_shape(k)}; for "
            "grouped-query attention give 4-D (B, H, T, E) queries and (B, K, S, E) keys"
        )
    if q.dim() >= 4:
        h, kv = q.shape[-3], k.shape[-3]
        if h != kv and (h % kv != 0):
            raise ValueError(
                f"q has {h} heads and k/v have {kv}: the number of query heads must be a "
                "multiple of the number of key/value heads (grouped-query attention)"
            )
        if q.shape[:-3] != k.shape[:-3]:
            raise ValueError(
                f"q and k must have the same batch dimensions: q {_shape(q)}, k {_shape(k)}"
            )
    target = (*q.shape[:-1], k.shape[-2])  # (..., T, S)
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a boolean torch.Tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(
                f"mask must be boolean (True = may attend), got {mask.dtype}; "
                "build one with qkv.masks, or pass additive float scores as bias="
            )
        if mask.device != q.device:
            raise ValueError(f"mask is on {mask.device} but q is on {q.device}")
        _check_broadcast("mask", mask, target)
    if bias is not None:
        if not isinstance(bias, Tensor) or not bias.is_floating_point():
            raise TypeError(
                "bias must be a floating-point tensor of additive scores; "
                "for a boolean mask use mask="
            )
        if bias.device != q.device:
            raise ValueError(f"bias is on {bias.device} but q is on {q.device}")
        _check_broadcast("bias", bias, target)
