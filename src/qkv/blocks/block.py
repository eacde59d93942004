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

What a layer is made of (its sizes, norm kind and placement, activation, biases, positions) is
one frozen ``LayerSpec``; a model builds it once from its config and passes it to every layer.

Shape legend: B batch · T query positions · S key/value positions (the memory) · D model width ·
H query heads · K key/value heads · F MLP hidden width.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, get_args

from torch import Tensor, nn

from qkv.attention.kv_cache import KVCache
from qkv.attention.multihead import MultiHeadAttention
from qkv.blocks.mlp import ACTIVATIONS, ActivationName, FeedForward, GatedFeedForward
from qkv.blocks.moe import Experts, MixtureOfExperts
from qkv.blocks.norms import NormKind, make_norm

__all__ = ["DecoderLayer", "EncoderLayer", "LayerSpec", "residual_sublayer"]


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


# --8<-- [start:layer_spec]
@dataclass(frozen=True, kw_only=True)
class LayerSpec:
    """The sizes and switches of one Transformer layer, shared by ``EncoderLayer`` and
    ``DecoderLayer``: a model builds one spec and hands it to every layer.

    Attributes:
        d_model: D.
        n_heads: H, the number of query heads.
        d_ff: F, the feed-forward hidden width.
        n_kv_heads: K, key/value heads (grouped-query attention); None means H.
        dropout: the rate on the residual branches, and on the attention weights and the
            feed-forward hidden activations unless those have their own (one rate for all
            three, as in ``torch.nn.TransformerEncoderLayer``).
        attention_dropout: the rate on the attention weights; None means ``dropout``.
        activation_dropout: the rate on the feed-forward hidden activations; None means
            ``dropout`` (BART and Marian set these two apart).
        activation: the feed-forward activation, see ``qkv.blocks.mlp.ACTIVATIONS``.
        gated: use a gated feed-forward network (SwiGLU with ``activation="silu"``).
        norm: ``"layer"`` (LayerNorm) or ``"rms"`` (RMSNorm).
        norm_eps: the norms' epsilon.
        bias: whether the linear layers and LayerNorms have biases.
        norm_first: pre-norm if True, post-norm (the 2017 paper) if False.
        head_dim: E, the width of each head; None means D / H (T5 sets it independently).
        attn_scale: multiplies the attention scores; None means 1 / sqrt(E) (T5 uses 1.0).
        rotary: optional rotary position module for the self-attention.
        score_bias: optional positional score bias for the self-attention (ALiBi, T5).
        attn_impl: the attention backend, see ``qkv.scaled_dot_product_attention``.
        experts: a mixture of experts in place of the feed-forward network, its experts of
            the network's shape (``qkv.blocks.moe.Experts``); None: one dense network.

    Example:
        >>> spec = LayerSpec(d_model=16, n_heads=4, d_ff=64, norm_first=True)
        >>> spec.kv_heads
        4
    """

    d_model: int
    n_heads: int
    d_ff: int
    n_kv_heads: int | None = None  # fewer than n_heads gives grouped-query attention
    dropout: float = 0.0
    attention_dropout: float | None = None
    activation_dropout: float | None = None
    activation: ActivationName = "relu"
    gated: bool = False
    norm: NormKind = "layer"
    norm_eps: float = 1e-5
    bias: bool = True
    norm_first: bool = False
    head_dim: int | None = None
    attn_scale: float | None = None
    rotary: nn.Module | None = None
    score_bias: nn.Module | None = None
    attn_impl: str = "auto"
    experts: Experts | None = None

    def __post_init__(self) -> None:
        for name in ("d_model", "n_heads", "d_ff", "n_kv_heads", "head_dim"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                "change one of them or give head_dim explicitly"
            )
        if self.n_heads % self.kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}; "
                "each key/value head must serve the same number of query heads"
            )
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            rate = getattr(self, name)
            if rate is not None and not 0.0 <= rate < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {rate}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {self.activation!r}; choose one of {list(ACTIVATIONS)}"
            )
        if self.norm not in get_args(NormKind):
            raise ValueError(
                f"unknown norm {self.norm!r}; choose one of {list(get_args(NormKind))}"
            )
        if self.norm_eps < 0:
            raise ValueError(f"norm_eps must be >= 0, got {self.norm_eps}")

    @property
    def kv_heads(self) -> int:
        """K: ``n_kv_heads``, or H when it is None."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads


# --8<-- [end:layer_spec]

_SIZES = ("d_model", "n_heads", "d_ff")


def _resolve_spec(
    layer: str,
    spec: LayerSpec | int | None,
    sizes: tuple[int, ...],
    fields: dict[str, Any],
    extras: tuple[str, ...] = (),
) -> LayerSpec:
    """The layer's spec: ``spec`` itself, or one built from the older flat call.

    ``EncoderLayer(d_model, n_heads, d_ff, **fields)``, or all of them as keywords, predates
    ``LayerSpec`` and still works: it builds ``LayerSpec(d_model=..., ..., **fields)``.
    """
    if isinstance(spec, LayerSpec):
        if sizes or fields:
            given = [*map(str, sizes), *fields]
            raise TypeError(
                f"{layer}(spec) takes no other layer arguments, got {', '.join(given)}; "
                "use dataclasses.replace(spec, ...) to change a field"
            )
        return spec
    if spec is not None and not isinstance(spec, int):
        raise TypeError(f"{layer}() takes a LayerSpec or d_model first, got {type(spec).__name__}")
    positional = sizes if spec is None else (spec, *sizes)
    if len(positional) > len(_SIZES):
        raise TypeError(
            f"{layer}() takes at most {len(_SIZES)} positional sizes ({', '.join(_SIZES)}), "
            f"got {len(positional)}; pass the rest as keywords or build a LayerSpec"
        )
    named: dict[str, Any] = dict(zip(_SIZES, positional, strict=False))
    if twice := sorted(named.keys() & fields.keys()):
        raise TypeError(f"{layer}() got multiple values for {', '.join(twice)}")
    valid = [f.name for f in dataclasses.fields(LayerSpec)]
    if unknown := sorted(fields.keys() - set(valid)):
        raise TypeError(
            f"{layer}() got unexpected keyword argument(s) {', '.join(unknown)}; "
            f"valid ones are {', '.join([*valid, *extras])}"
        )
    if missing := [name for name in _SIZES if name not in named and name not in fields]:
        raise TypeError(
            f"{layer}() missing {', '.join(missing)}: pass a LayerSpec, or d_model, n_heads "
            "and d_ff"
        )
    return LayerSpec(**named, **fields)


def _attention(spec: LayerSpec, *, positions: bool) -> MultiHeadAttention:
    """Attention built from ``spec``; ``positions`` gives it the rotary and score-bias modules."""
    return MultiHeadAttention(
        spec.d_model, spec.n_heads, n_kv_heads=spec.n_kv_heads, head_dim=spec.head_dim,
        bias=spec.bias, scale=spec.attn_scale,
        dropout=spec.dropout if spec.attention_dropout is None else spec.attention_dropout,
        rotary=spec.rotary if positions else None,
        score_bias=spec.score_bias if positions else None, attn_impl=spec.attn_impl,
    )  # fmt: skip


def _mlp(spec: LayerSpec) -> nn.Module:
    rate = spec.dropout if spec.activation_dropout is None else spec.activation_dropout
    if spec.experts is not None:  # X networks of this shape, and a router
        return MixtureOfExperts.from_spec(
            spec.experts, spec.d_model, spec.d_ff, gated=spec.gated,
            activation=spec.activation, bias=spec.bias, dropout=rate,
        )  # fmt: skip
    kind = GatedFeedForward if spec.gated else FeedForward
    return kind(spec.d_model, spec.d_ff, activation=spec.activation, bias=spec.bias, dropout=rate)


def _norm(spec: LayerSpec) -> nn.Module:
    return make_norm(spec.norm, spec.d_model, eps=spec.norm_eps, bias=spec.bias)


def _identity(x: Tensor) -> Tensor:
    return x


class EncoderLayer(nn.Module):
    """Self-attention then a feed-forward network, each in a residual branch with a norm.

    Args:
        spec: the layer's sizes and switches, a ``LayerSpec``.
        *sizes, **fields: the flat form, still accepted: ``EncoderLayer(d_model, n_heads,
            d_ff, **fields)`` with ``LayerSpec``'s field names builds the spec from them.

    Example:
        >>> import torch
        >>> from qkv import masks
        >>> layer = EncoderLayer(LayerSpec(d_model=16, n_heads=4, d_ff=64))
        >>> x = torch.randn(2, 5, 16)
        >>> layer(x, mask=masks.padding([5, 3])).shape
        torch.Size([2, 5, 16])
        >>> EncoderLayer(d_model=16, n_heads=4, d_ff=64).spec == layer.spec
        True
    """

    def __init__(self, spec: LayerSpec | int | None = None, *sizes: int, **fields: Any) -> None:
        super().__init__()
        spec = _resolve_spec("EncoderLayer", spec, sizes, fields)
        self.spec = spec
        self.norm_first = spec.norm_first
        self.self_attn = _attention(spec, positions=True)
        self.mlp = _mlp(spec)
        self.attn_norm = _norm(spec)
        self.mlp_norm = _norm(spec)
        self.dropout = nn.Dropout(spec.dropout)  # residual dropout

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
        spec: the layer's sizes and switches, a ``LayerSpec``; its ``rotary`` and
            ``score_bias`` apply to the self-attention only.
        *sizes, **fields: the flat form, as for ``EncoderLayer``.
        cross_attention: whether the layer attends to an encoder's output (the 2017 decoder,
            T5); False gives the decoder-only layer of GPT and LLaMA, and ``cross_attn`` and
            ``cross_norm`` are None.

    Example:
        >>> import torch
        >>> layer = DecoderLayer(LayerSpec(d_model=16, n_heads=4, d_ff=64))
        >>> x, memory = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
        >>> layer(x, memory).shape
        torch.Size([2, 5, 16])
    """

    def __init__(
        self,
        spec: LayerSpec | int | None = None,
        *sizes: int,
        cross_attention: bool = True,
        **fields: Any,
    ) -> None:
        super().__init__()
        spec = _resolve_spec("DecoderLayer", spec, sizes, fields, extras=("cross_attention",))
        self.spec = spec
        self.norm_first = spec.norm_first
        self.self_attn = _attention(spec, positions=True)
        self.attn_norm = _norm(spec)
        self.cross_attn: MultiHeadAttention | None = None
        self.cross_norm: nn.Module | None = None
        if cross_attention:
            self.cross_attn = _attention(spec, positions=False)
            self.cross_norm = _norm(spec)
        self.mlp = _mlp(spec)
        self.mlp_norm = _norm(spec)
        self.dropout = nn.Dropout(spec.dropout)  # residual dropout

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
