"""Multi-head attention, with grouped-query and multi-query attention as special cases.

    head_h = Attention(X W_Q^h, C W_K^g(h), C W_V^g(h))
    MultiHead(X, C) = Concat(head_1, ..., head_H) W_O

Vaswani et al., "Attention Is All You Need", 2017 (arXiv:1706.03762), section 3.2.2.
Shazeer, "Fast Transformer Decoding: One Write-Head is All You Need", 2019 (arXiv:1911.02150).
Ainslie et al., "GQA: Training Generalized Multi-Query Transformer Models", 2023
(arXiv:2305.13245).

Instead of one attention over the full width D, H heads each attend in their own E = D / H
dimensions and their outputs are concatenated: different heads can follow different relations
(the previous token, the subject of a verb, a matching bracket). Self-attention takes queries,
keys and values from the same sequence (C = X); cross-attention takes keys and values from
another one (C = the encoder's output).

Key/value heads may be fewer than query heads, K < H, to shrink the key/value cache::

    multi-head (K = H)       grouped-query (K = 2)      multi-query (K = 1)
    q: 0 1 2 3 4 5 6 7       q: 0 1 2 3 | 4 5 6 7       q: 0 1 2 3 4 5 6 7
    kv:0 1 2 3 4 5 6 7       kv:   0    |    1          kv:        0

Shape legend: B batch · T query positions · S key/value positions · D model width ·
H query heads · K key/value heads · E head dim.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple, Protocol

import torch
from torch import Tensor, nn

from qkv._kernels import autocast_input
from qkv.attention.core import scaled_dot_product_attention
from qkv.attention.kv_cache import KVCache

__all__ = [
    "AttentionCapture",
    "MultiHeadAttention",
    "QKRotation",
    "ScoreBias",
    "capturing",
    "recording_weights",
]


class QKRotation(Protocol):
    """A position encoding applied to q and k (RoPE): ``(q, k, position_ids) -> (q, k)``."""

    def __call__(self, q: Tensor, k: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]: ...


class ScoreBias(Protocol):
    """A position encoding added to the scores (ALiBi, T5, Shaw): ``(q, S) -> bias``.

    ``q`` is (B, H, T, E); the bias broadcasts to (B, H, T, S), aligned bottom-right.
    """

    def __call__(self, q: Tensor, s: int) -> Tensor: ...


class AttentionCapture(NamedTuple):
    """What a capturing forward keeps: the exact weights, and the two tensors that prove them
    (``weights @ values == output``, see ``qkv.viz.capture.check_weights``)."""

    weights: Tensor  # (B, H, T, S), recomputed from the q and k the fast path used
    values: Tensor  # (B, K, S, E), the values the fast path read
    output: Tensor  # (B, H, T, E), the fast path's heads, before they are merged


class MultiHeadAttention(nn.Module):
    """Multi-head attention (MHA), grouped-query (GQA) or multi-query (MQA).

    Args:
        d_model: width D of the queries' input and of the output.
        n_heads: number H of query heads.
        n_kv_heads: number K of key/value heads; H must be a multiple. Defaults to H (MHA);
            1 gives multi-query attention.
        head_dim: E; defaults to D / H.
        d_context: width of the keys' and values' input for cross-attention; defaults to D.
        bias: whether the four projections have biases.
        dropout: dropout on the attention weights while training.
        scale: multiplies the scores; defaults to 1 / sqrt(E).
        rotary: optional module rotating q and k by position (``qkv.positional.RotaryEmbedding``).
        score_bias: optional module adding a positional bias to the scores (ALiBi, T5, Shaw).
        attn_impl: the attention backend, see ``qkv.scaled_dot_product_attention``.

    Attributes:
        capture_weights: when True, each forward also stores an ``AttentionCapture`` in
            ``last_capture``: the exact attention weights (B, H, T, S), recomputed from the same
            q and k, with the values and heads' output they must reproduce, while the output
            still comes from the fast path. The weights are those before attention dropout
            (identical to the ones used in eval mode); ``last_weights`` is a shortcut to them.
            ``capturing`` switches it on for a block of code.

    Example:
        >>> import torch
        >>> mha = MultiHeadAttention(d_model=16, n_heads=4, n_kv_heads=2)
        >>> x = torch.randn(2, 5, 16)
        >>> mha(x, causal=True).shape
        torch.Size([2, 5, 16])
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        d_context: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        scale: float | None = None,
        rotary: nn.Module | None = None,
        score_bias: nn.Module | None = None,
        attn_impl: str = "auto",
    ) -> None:
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if n_heads < 1 or n_kv_heads < 1:
            raise ValueError(
                f"n_heads and n_kv_heads must be positive, got {n_heads}, {n_kv_heads}"
            )
        if head_dim is None:
            if d_model % n_heads:
                raise ValueError(
                    f"d_model={d_model} is not divisible by n_heads={n_heads}; "
                    "change one of them or give head_dim explicitly"
                )
            head_dim = d_model // n_heads
        if n_heads % n_kv_heads:
            raise ValueError(
                f"n_heads={n_heads} is not divisible by n_kv_heads={n_kv_heads}; "
                "each key/value head must serve the same number of query heads"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.d_model, self.n_heads, self.n_kv_heads, self.head_dim = (
            d_model,
            n_heads,
            n_kv_heads,
            head_dim,
        )
        self.dropout, self.scale, self.attn_impl = dropout, scale, attn_impl
        d_context = d_model if d_context is None else d_context
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(d_context, n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(d_context, n_kv_heads * head_dim, bias=bias)
        self.out_proj = nn.Linear(n_heads * head_dim, d_model, bias=bias)
        self.rotary = rotary
        self.score_bias = score_bias
        self.capture_weights = False
        self.last_capture: AttentionCapture | None = None

    @property
    def last_weights(self) -> Tensor | None:
        """The weights (B, H, T, S) of the last capturing forward, or None."""
        return None if self.last_capture is None else self.last_capture.weights

    # --8<-- [start:split_heads]
    def _split_heads(self, x: Tensor, n: int) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, n, self.head_dim).transpose(1, 2)  # (B, n, T, E)

    # --8<-- [end:split_heads]

    # --8<-- [start:projections]
    def _self_projections(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Self-attention's q = x W_Q, k = x W_K, v = x W_V of x (B, T, D), split into heads."""
        x = autocast_input(x)  # under autocast: one bfloat16 copy of x for the three products
        q = self._split_heads(self.q_proj(x), self.n_heads)  # (B, H, T, E)
        k = self._split_heads(self.k_proj(x), self.n_kv_heads)  # (B, K, T, E)
        v = self._split_heads(self.v_proj(x), self.n_kv_heads)  # (B, K, T, E)
        return q, k, v

    # --8<-- [end:projections]

    # --8<-- [start:forward]
    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        mask: Tensor | None = None,
        causal: bool = False,
        bias: Tensor | None = None,
        cache: KVCache | None = None,
        position_ids: Tensor | None = None,
    ) -> Tensor:
        """Attend from ``x`` to itself (self-attention) or to ``context`` (cross-attention).

        Args:
            x: queries' input, (B, T, D).
            context: keys' and values' input for cross-attention, (B, S, D_context).
            mask: boolean, True = may attend, broadcastable to (B, H, T, S).
            causal: also apply a causal mask (bottom-right aligned when a cache holds the past).
            bias: additive scores broadcastable to (B, H, T, S), added to ``score_bias``'s.
            cache: key/value cache; self-attention appends to it, cross-attention fills it once
                with the context's keys and values and reuses them afterwards.
            position_ids: positions of the T queries, (B, T) or (T,), for ``rotary``; default:
                cache length, cache length + 1, ...

        Returns:
            (B, T, D).
        """
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"x must be (B, T, D) with D=d_model={self.d_model}, got {tuple(x.shape)}"
            )
        b, t, _ = x.shape
        if context is None and cache is not None and cache.cross:
            raise ValueError(
                "this cache holds a cross-attention's keys and values; pass the encoder's output "
                "as context (it is read from the cache, not recomputed)"
            )
        if context is None:  # self-attention
            q, k, v = self._self_projections(x)  # (B, H, T, E), (B, K, T, E), (B, K, T, E)
            if self.rotary is not None:
                if position_ids is None:
                    past = 0 if cache is None else cache.seq_len
                    position_ids = torch.arange(past, past + t, device=x.device)  # (T,)
                q, k = self.rotary(q, k, position_ids)
            if cache is not None:
                k, v = cache.update(k, v)  # (B, K, S, E)
        elif cache is not None and cache.seq_len > 0:  # cross-attention, keys already cached
            q = self._split_heads(self.q_proj(x), self.n_heads)  # (B, H, T, E)
            k, v = cache.keys, cache.values  # type: ignore[assignment]
        else:  # cross-attention
            q = self._split_heads(self.q_proj(x), self.n_heads)  # (B, H, T, E)
            context = autocast_input(context)  # one copy for the k and v products
            k = self._split_heads(self.k_proj(context), self.n_kv_heads)  # (B, K, S, E)
            v = self._split_heads(self.v_proj(context), self.n_kv_heads)  # (B, K, S, E)
            if cache is not None:
                cache.update(k, v)
                cache.cross = True
        s = k.shape[-2]
        if self.score_bias is not None:
            extra = self.score_bias(q, s)  # broadcasts to (B, H, T, S)
            bias = extra if bias is None else bias + extra
        is_causal = causal and t > 1  # (one new query, bottom-right aligned, sees every key)
        dropout_p = self.dropout if self.training else 0.0
        out = scaled_dot_product_attention(
            q, k, v, mask, bias=bias, scale=self.scale, dropout_p=dropout_p, is_causal=is_causal,
            impl=self.attn_impl,
        )  # (B, H, T, E)  # fmt: skip
        if self.capture_weights:  # the exact weights, with the v and output that prove them
            weights = self._exact_weights(q, k, v, mask, bias, is_causal)  # (B, H, T, S)
            self.last_capture = AttentionCapture(weights.detach(), v.detach(), out.detach())
        out = out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)  # (B, T, H * E)
        return self.out_proj(out)  # (B, T, D)

    # --8<-- [end:forward]

    # --8<-- [start:exact_weights]
    def _exact_weights(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Tensor | None,
        bias: Tensor | None,
        is_causal: bool,
    ) -> Tensor:
        """softmax(q k^T * scale + bias, masked) from the very q and k the fast path used."""
        _, weights = scaled_dot_product_attention(
            q, k, v, mask, bias=bias, scale=self.scale, is_causal=is_causal, impl="reference",
            return_weights=True,
        )  # fmt: skip
        return weights  # (B, H, T, S)

    # --8<-- [end:exact_weights]


@contextmanager
def capturing(modules: Sequence[MultiHeadAttention]) -> Iterator[list[AttentionCapture | None]]:
    """Capture the attention of ``modules`` while the block runs (``capture_weights``).

    The one recording mechanism: ``recording_weights`` (models' ``output_attentions``) and
    ``qkv.viz.capture.record_attention`` are built on it. On entry each module's
    ``capture_weights`` is switched on and its earlier capture dropped; on leaving the block
    each module gets back the setting it had, and those that were not capturing before free
    their capture (the list holds the caller's reference).

    Args:
        modules: the attention modules to capture, in the order their captures should come.

    Yields:
        A list that, once the block exits normally, holds each module's ``AttentionCapture``
        in the order of ``modules``, or None for a module that did not run in the block.
    """
    modules = list(modules)
    before = [m.capture_weights for m in modules]
    captures: list[AttentionCapture | None] = []
    try:
        for m in modules:
            m.capture_weights, m.last_capture = True, None
        yield captures
        captures.extend(m.last_capture for m in modules)
    finally:
        for m, was in zip(modules, before, strict=True):
            m.capture_weights = was
            if not was:
                m.last_capture = None  # the caller holds its copy; do not keep (B, H, T, S) alive


@contextmanager
def recording_weights(
    modules: Sequence[MultiHeadAttention], enabled: bool = True
) -> Iterator[list[Tensor]]:
    """Record the exact attention weights of ``modules`` while the block runs.

    ``capturing``, keeping the weights only. Models use it for ``output_attentions=True``.

    Args:
        modules: the attention modules to record, in the order their weights should come.
        enabled: when False, nothing is switched on and the list stays empty; lets a forward
            write ``with recording_weights(attns, output_attentions) as weights:`` once.

    Yields:
        A list that, once the block exits normally, holds each module's weights (B, H, T, S),
        in the order of ``modules``; a module that did not run in the block is left out.

    Example:
        >>> import torch
        >>> layers = [MultiHeadAttention(d_model=8, n_heads=2) for _ in range(2)]
        >>> x = torch.randn(1, 3, 8)
        >>> with recording_weights(layers) as weights:
        ...     y = layers[1](layers[0](x))
        >>> [tuple(w.shape) for w in weights], layers[0].capture_weights
        ([(1, 2, 3, 3), (1, 2, 3, 3)], False)
    """
    weights: list[Tensor] = []
    with capturing(modules if enabled else []) as captures:
        yield weights
    weights.extend(c.weights for c in captures if c is not None)
