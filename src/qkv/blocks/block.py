"""Transformer layers: attention and a feed-forward network, each inside a residual with a norm.

    post-norm (the 2017 paper):  x = Norm(x + Dropout(Sublayer(x)))
    pre-norm:                    x = x + Dropout(Sublayer(Norm(x)))

Vaswani et al., "Attention Is All You Need", 2017 (arXiv:1706.03762), sections 3.1 and 5.4.
Xiong et al., "On Layer Normalization in the Transformer Architecture", 2020 (arXiv:2002.04745).

An encoder layer is self-attention then a feed-forward network (BERT, ViT, the T5 encoder). A
decoder layer is causal self-attention, then cross-attention to the encoder's output (the
"memory"), then a feed-forward network; without cross-attention it is the decoder-only layer
of GPT and LLaMA. Each sublayer sits in a residual branch, and ``norm_first`` says where the
norm goes::

    post-norm (norm_first=False)          pre-norm (norm_first=True)

        x -----------+                        x -----------+
        |            |                        |            |
     Sublayer        |                       Norm          |
        |            |                        |            |
     Dropout         |                     Sublayer        |
        |            |                        |            |
       (+) <---------+                     Dropout         |
        |                                     |            |
       Norm                                  (+) <---------+
        |                                     |
        out                                   out

Post-norm normalises the residual stream itself after every sublayer; deep post-norm stacks
train only with a learning-rate warm-up. Pre-norm leaves the stream as a plain sum, so the
gradient reaches early layers through the identity path, and trains stably without warm-up
(Xiong et al. 2020); a pre-norm stack then needs one final norm after its last layer, which
the model adds, not the layer.

Shape legend: B batch · T query positions · S key/value positions (the memory) · D model width ·
H query heads · K key/value heads · F MLP hidden width.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from qkv.attention.kv_cache import KVCache
from qkv.attention.multihead import MultiHeadAttention
from qkv.blocks.mlp import ActivationName, FeedForward, GatedFeedForward
from qkv.blocks.norms import NormKind, make_norm

__all__ = ["DecoderLayer", "EncoderLayer", "residual_sublayer"]


# --8<-- [start:residual_sublayer]
def residual_sublayer(
    x: Tensor,
    sublayer: Callable[[Tensor], Tensor],
    norm: Callable[[Tensor], Tensor],
    dropout: Callable[[Tensor], Tensor],
    *,
    norm_first: bool,
) -> Tensor:
    """Run ``sublayer`` inside a residual branch, with the norm before it or after the sum.

    Args:
        x: the residual stream, (B, T, D).
        sublayer: attention or feed-forward, (B, T, D) -> (B, T, D).
        norm: LayerNorm or RMSNorm.
        dropout: residual dropout, applied to the sublayer's output.
        norm_first: True for pre-norm, False for post-norm (see the module docstring).

    Returns:
        (B, T, D).
    """
    if norm_first:
        return x + dropout(sublayer(norm(x)))  # (B, T, D)
    return norm(x + dropout(sublayer(x)))  # (B, T, D)


# --8<-- [end:residual_sublayer]


def _make_mlp(
    d_model: int, d_ff: int, activation: ActivationName, gated: bool, bias: bool, dropout: float
) -> nn.Module:
    if gated:
        return GatedFeedForward(d_model, d_ff, activation=activation, bias=bias, dropout=dropout)
    return FeedForward(d_model, d_ff, activation=activation, bias=bias, dropout=dropout)


def _identity(x: Tensor) -> Tensor:
    return x


class EncoderLayer(nn.Module):
    """Self-attention then a feed-forward network, each in a residual branch with a norm.

    Args:
        d_model: D.
        n_heads: H, the number of query heads.
        d_ff: F, the feed-forward hidden width.
        n_kv_heads: K, key/value heads (grouped-query attention); defaults to H.
        dropout: one rate for the attention weights, the feed-forward hidden activations and
            the residual branches, as in ``torch.nn.TransformerEncoderLayer``.
        activation: the feed-forward activation, see ``qkv.blocks.mlp.ACTIVATIONS``.
        gated: use a gated feed-forward network (SwiGLU with ``activation="silu"``).
        norm: ``"layer"`` (LayerNorm) or ``"rms"`` (RMSNorm).
        norm_eps: the norms' epsilon.
        bias: whether the linear layers and LayerNorms have biases.
        norm_first: pre-norm if True, post-norm (the 2017 paper) if False.
        head_dim: E, the width of each head; defaults to D / H (T5 sets it independently).
        attn_scale: multiplies the attention scores; defaults to 1 / sqrt(E) (T5 uses 1.0).
        rotary: optional rotary position module for the self-attention.
        score_bias: optional positional score bias for the self-attention (ALiBi, T5).
        attn_impl: the attention backend, see ``qkv.scaled_dot_product_attention``.

    Example:
        >>> import torch
        >>> from qkv import masks
        >>> layer = EncoderLayer(d_model=16, n_heads=4, d_ff=64)
        >>> x = torch.randn(2, 5, 16)
        >>> layer(x, mask=masks.padding([5, 3])).shape
        torch.Size([2, 5, 16])
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        *,
        n_kv_heads: int | None = None,
        dropout: float = 0.0,
        activation: ActivationName = "relu",
        gated: bool = False,
        norm: NormKind = "layer",
        norm_eps: float = 1e-5,
        bias: bool = True,
        norm_first: bool = False,
        head_dim: int | None = None,
        attn_scale: float | None = None,
        rotary: nn.Module | None = None,
        score_bias: nn.Module | None = None,
        attn_impl: str = "auto",
    ) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(
            d_model, n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, bias=bias,
            dropout=dropout, scale=attn_scale, rotary=rotary, score_bias=score_bias,
            attn_impl=attn_impl,
        )  # fmt: skip
        self.mlp = _make_mlp(d_model, d_ff, activation, gated, bias, dropout)
        self.attn_norm = make_norm(norm, d_model, eps=norm_eps, bias=bias)
        self.mlp_norm = make_norm(norm, d_model, eps=norm_eps, bias=bias)
        self.dropout = nn.Dropout(dropout)  # residual dropout

    # --8<-- [start:encoder_forward]
    def forward(
        self,
        x: Tensor,
        *,
        mask: Tensor | None = None,
        bias: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> Tensor:
        """Encode ``x``: every position attends to every position ``mask`` allows.

        Args:
            x: (B, T, D).
            mask: boolean, True = may attend, broadcastable to (B, H, T, T); e.g.
                ``qkv.masks.padding(lengths)`` (B, 1, 1, T) to hide padding.
            bias: additive attention scores broadcastable to (B, H, T, T).
            position_ids: positions (B, T) or (T,) for ``rotary``; default 0 .. T - 1.

        Returns:
            (B, T, D).
        """

        def attend(h: Tensor) -> Tensor:
            return self.self_attn(h, mask=mask, bias=bias, position_ids=position_ids)

        pre = self.norm_first
        drop = self.dropout if self.training else _identity  # dropout is off at inference
        x = residual_sublayer(x, attend, self.attn_norm, drop, norm_first=pre)  # (B, T, D)
        x = residual_sublayer(x, self.mlp, self.mlp_norm, drop, norm_first=pre)  # (B, T, D)
        return x

    # --8<-- [end:encoder_forward]


class DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention to ``memory``, then a feed-forward network.

    Args:
        d_model, n_heads, d_ff, n_kv_heads, dropout, activation, gated, norm, norm_eps, bias,
            norm_first, head_dim, attn_scale, rotary, score_bias, attn_impl: as for
            ``EncoderLayer``; ``rotary`` and ``score_bias`` apply to the self-attention only.
        cross_attention: whether the layer attends to an encoder's output (the 2017 decoder,
            T5); False gives the decoder-only layer of GPT and LLaMA, and ``cross_attn`` and
            ``cross_norm`` are None.

    Example:
        >>> import torch
        >>> layer = DecoderLayer(d_model=16, n_heads=4, d_ff=64)
        >>> x, memory = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
        >>> layer(x, memory).shape
        torch.Size([2, 5, 16])
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        *,
        n_kv_heads: int | None = None,
        dropout: float = 0.0,
        activation: ActivationName = "relu",
        gated: bool = False,
        norm: NormKind = "layer",
        norm_eps: float = 1e-5,
        bias: bool = True,
        norm_first: bool = False,
        cross_attention: bool = True,
        head_dim: int | None = None,
        attn_scale: float | None = None,
        rotary: nn.Module | None = None,
        score_bias: nn.Module | None = None,
        attn_impl: str = "auto",
    ) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(
            d_model, n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, bias=bias,
            dropout=dropout, scale=attn_scale, rotary=rotary, score_bias=score_bias,
            attn_impl=attn_impl,
        )  # fmt: skip
        self.attn_norm = make_norm(norm, d_model, eps=norm_eps, bias=bias)
        self.cross_attn: MultiHeadAttention | None = None
        self.cross_norm: nn.Module | None = None
        if cross_attention:
            self.cross_attn = MultiHeadAttention(
                d_model, n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, bias=bias,
                dropout=dropout, scale=attn_scale, attn_impl=attn_impl,
            )  # fmt: skip
            self.cross_norm = make_norm(norm, d_model, eps=norm_eps, bias=bias)
        self.mlp = _make_mlp(d_model, d_ff, activation, gated, bias, dropout)
        self.mlp_norm = make_norm(norm, d_model, eps=norm_eps, bias=bias)
        self.dropout = nn.Dropout(dropout)  # residual dropout

    # --8<-- [start:decoder_forward]
    def forward(
        self,
        x: Tensor,
        memory: Tensor | None = None,
        *,
        self_mask: Tensor | None = None,
        memory_mask: Tensor | None = None,
        causal: bool = True,
        bias: Tensor | None = None,
        cache: KVCache | None = None,
        cross_cache: KVCache | None = None,
        position_ids: Tensor | None = None,
    ) -> Tensor:
        """Decode ``x``: each position attends to the earlier ones, then to ``memory``.

        Args:
            x: (B, T, D); during cached decoding, only the new positions.
            memory: the encoder's output (B, S, D); required with cross-attention, and given
                at every step even when ``cross_cache`` already holds its keys and values.
            self_mask: boolean, True = may attend, broadcastable to (B, H, T, T + cached).
            memory_mask: boolean, True = may attend, broadcastable to (B, H, T, S); e.g.
                ``qkv.masks.padding(memory_lengths)`` to hide the memory's padding.
            causal: add the causal mask to the self-attention (bottom-right aligned).
            bias: additive self-attention scores.
            cache: the self-attention's key/value cache, extended by the T new positions.
            cross_cache: the cross-attention's cache, filled from ``memory`` on the first call.
            position_ids: positions of the T queries for ``rotary``; default: cache length on.

        Returns:
            (B, T, D).
        """
        if (memory is None) != (self.cross_attn is None):
            raise ValueError(
                "pass memory (B, S, D) exactly when the layer has cross-attention; this layer "
                f"was built with cross_attention={self.cross_attn is not None}"
            )

        def self_attend(h: Tensor) -> Tensor:
            return self.self_attn(
                h, mask=self_mask, causal=causal, bias=bias, cache=cache,
                position_ids=position_ids,
            )  # fmt: skip

        pre = self.norm_first
        drop = self.dropout if self.training else _identity  # dropout is off at inference
        x = residual_sublayer(x, self_attend, self.attn_norm, drop, norm_first=pre)  # (B, T, D)
        cross_attn, cross_norm = self.cross_attn, self.cross_norm
        if cross_attn is not None and cross_norm is not None:

            def cross_attend(h: Tensor) -> Tensor:
                return cross_attn(h, memory, mask=memory_mask, cache=cross_cache)

            x = residual_sublayer(x, cross_attend, cross_norm, drop, norm_first=pre)  # (B, T, D)
        x = residual_sublayer(x, self.mlp, self.mlp_norm, drop, norm_first=pre)  # (B, T, D)
        return x

    # --8<-- [end:decoder_forward]
