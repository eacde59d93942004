"""GPT's decoding step written flat: one token per row through the whole model as plain calls.

    x = tok_emb[token] + pos_emb[position]                               (N, D)
    for each layer:
        q, k, v = split(LayerNorm_1(x) [W_Q W_K W_V]^T + b)              (N, H, 1, E) each
        k, v    = cache.append(k, v)                                     (N, H, S, E)
        x       = x + softmax(q k^T / sqrt(E) + padding) v W_O^T + b_O   (N, D)
        x       = x + act(LayerNorm_2(x) W_1^T + b_1) W_2^T + b_2        (N, D)
    logits = LayerNorm_f(x) W_E^T                                        (N, V)

This is ``GPT.forward`` specialised to what a decoding step is: one new position per row, a
key/value cache, inference. It computes the same logits (the tests hold it to the module path
within float32 rounding, and to the same greedy tokens), but it is not the place to learn the
model: read ``qkv.models.gpt`` and ``qkv.blocks.block`` for that. It exists because, at small
sizes, a decoding step is dominated by Python: the module path makes about 30 module calls and
several checks per token, each costing microseconds, while the arithmetic of a small model
costs less. Written as one loop over the weights, the step makes only the calls that do work,
and every matrix product runs on the kernel that reads its weights fastest on a CPU, chosen
once per weight (``qkv._kernels``). ``benchmarks/generation.py`` measures both effects.

Generation uses it for a ``GPT`` whose parts are the stock ones (checked by ``flat_step``);
anything else (a subclass, hooks, another attention implementation, LLaMA, Prefix-LM, encoder-
decoders) decodes through its modules.

Shape legend: N rows (batch, or batch times beams) · S cached positions · D model width ·
H heads · E head dim · F MLP hidden width · V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qkv._kernels import bound_linear
from qkv.attention.fused import fused_qkv
from qkv.attention.kv_cache import KVCache
from qkv.attention.multihead import MultiHeadAttention
from qkv.blocks.block import DecoderLayer
from qkv.blocks.mlp import FeedForward
from qkv.models.gpt import GPT

__all__ = ["GPTFlatStep", "flat_step"]


Linear = Callable[[Tensor], Tensor]


class _LayerWeights(NamedTuple):
    """What one decoder layer's step reads, in the order it reads it: each norm's gain and
    shift (D,), and each projection bound to its weight, bias and kernel (``bound_linear``)."""

    norm1: tuple[Tensor, Tensor | None]  # LayerNorm_1
    qkv: Linear  # x [W_Q W_K W_V]^T + b, (N, D) -> (N, 3 H E)
    out: Linear  # x W_O^T + b_O, (N, H E) -> (N, D)
    norm2: tuple[Tensor, Tensor | None]  # LayerNorm_2
    up: Linear  # x W_1^T + b_1, (N, D) -> (N, F)
    down: Linear  # x W_2^T + b_2, (N, F) -> (N, D)


def _layer_weights(layer: nn.Module) -> _LayerWeights:
    """Gather one stock pre-norm layer's weights (see ``_stock_layer``)."""
    assert isinstance(layer, DecoderLayer) and isinstance(layer.mlp, FeedForward)
    norm1, norm2, attn, mlp = layer.attn_norm, layer.mlp_norm, layer.self_attn, layer.mlp
    assert isinstance(norm1, nn.LayerNorm) and isinstance(norm2, nn.LayerNorm)
    stacked = fused_qkv(attn)  # [W_Q; W_K; W_V], rebuilt if stale
    return _LayerWeights(
        norm1=(norm1.weight, norm1.bias),
        qkv=bound_linear(stacked.weight, stacked.bias),
        out=bound_linear(attn.out_proj.weight, attn.out_proj.bias),
        norm2=(norm2.weight, norm2.bias),
        up=bound_linear(mlp.up_proj.weight, mlp.up_proj.bias),
        down=bound_linear(mlp.down_proj.weight, mlp.down_proj.bias),
    )


class GPTFlatStep:
    """One decoding step of a ``GPT``, as plain calls over its weights (see the module doc).

    Built once per generation, inside ``fused_projections`` or not (it builds the attention
    modules' fused weights itself); the model's parameters must not change while it is used.

    Args:
        model: a ``GPT`` that ``flat_step`` accepts.
    """

    def __init__(self, model: GPT) -> None:
        c = model.config
        self.d_model, self.n_heads, self.head_dim = c.d_model, c.n_heads, c.head_dim
        self.eps = c.norm_eps
        self.tok_emb = model.tok_emb.weight  # (V, D)
        self.pos_emb = model.pos_emb.emb.weight  # (max_seq_len, D)
        self.final_norm = (model.final_norm.weight, model.final_norm.bias)
        self.lm_head = bound_linear(model.lm_head.weight)  # x W_E^T, (N, D) -> (N, V)
        self.layers = [_layer_weights(layer) for layer in model.layers]
        first = model.layers[0]
        assert isinstance(first, DecoderLayer) and isinstance(first.mlp, FeedForward)
        self.scale = first.self_attn.scale  # None: 1 / sqrt(E)
        self.act: Callable[[Tensor], Tensor] = first.mlp.act

    # --8<-- [start:step]
    def __call__(
        self,
        tokens: Tensor,
        cache: Sequence[KVCache],
        attention_mask: Tensor | None = None,
        position: Tensor | None = None,
    ) -> Tensor:
        """Append one token per row and return the next token's logits.

        Args:
            tokens: the new tokens (N,).
            cache: the model's caches (one per layer), extended in place by one position.
            attention_mask: (N, S) covering the cached positions and the new one, 1 = real
                token; None when no row has padding.
            position: (N, 1), each row's position for the new token (with a mask); None:
                the cache length.

        Returns:
            Logits (N, V).
        """
        n, d, h, e = tokens.shape[0], self.d_model, self.n_heads, self.head_dim
        if position is None:
            pos = self.pos_emb[cache[0].seq_len]  # (D,), the same for every row
        else:
            pos = F.embedding(position[:, 0], self.pos_emb)  # (N, D)
        x = F.embedding(tokens, self.tok_emb) + pos  # (N, D)
        mask = None  # True = may attend; one new query sees every cached key: no causal mask
        if attention_mask is not None:
            mask = attention_mask.bool()[:, None, None, :]  # (N, 1, 1, S)
        for w, layer_cache in zip(self.layers, cache, strict=True):
            a = torch.layer_norm(x, (d,), *w.norm1, self.eps)  # (N, D)
            q, k, v = w.qkv(a).view(n, 3, h, 1, e).unbind(1)  # (N, H, 1, E) each
            k, v = layer_cache.update(k, v)  # (N, H, S, E)
            a = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=self.scale
            )  # (N, H, 1, E)
            x = x + w.out(a.view(n, h * e))  # (N, D)
            a = torch.layer_norm(x, (d,), *w.norm2, self.eps)  # (N, D)
            x = x + w.down(self.act(w.up(a)))  # (N, D)
        x = torch.layer_norm(x, (d,), *self.final_norm, self.eps)  # (N, D)
        return self.lm_head(x)  # (N, V)

    # --8<-- [end:step]


def _has_hooks(model: nn.Module) -> bool:
    return any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in model.modules()
    )


def _stock_layer(layer: nn.Module) -> bool:
    """A pre-norm GPT layer built from the library's own parts, with the sdpa attention."""
    if type(layer) is not DecoderLayer or layer.cross_attn is not None or not layer.norm_first:
        return False
    attn, mlp = layer.self_attn, layer.mlp
    return (
        type(attn) is MultiHeadAttention
        and attn.n_kv_heads == attn.n_heads
        and attn.rotary is None
        and attn.score_bias is None
        and attn.attn_impl in ("auto", "sdpa")
        and not attn.capture_weights
        and type(mlp) is FeedForward
        and all(type(m) is nn.Linear for m in (attn.q_proj, attn.k_proj, attn.v_proj))
        and all(type(m) is nn.Linear for m in (attn.out_proj, mlp.up_proj, mlp.down_proj))
        and all(type(m) is nn.LayerNorm for m in (layer.attn_norm, layer.mlp_norm))
    )


def flat_step(model: Any) -> GPTFlatStep | None:
    """The flat decoding step for ``model``, or None when it must decode through its modules.

    Taken for a ``GPT`` itself (not a subclass, which may change ``forward``) in eval mode,
    without hooks, whose layers are the stock pre-norm ones with the default attention.
    """
    if type(model) is not GPT or model.training or _has_hooks(model):
        return None
    if not all(_stock_layer(layer) for layer in model.layers):
        return None
    if type(model.final_norm) is not nn.LayerNorm:
        return None
    return GPTFlatStep(model)
