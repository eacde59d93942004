"""A decoder's decoding step written flat: one token per row through the model as plain calls.

    x = tok_emb[token] (+ pos_emb[position], GPT)                          (N, D)
    for each layer:
        q, k, v = split(Norm_1(x) [W_Q; W_K; W_V]^T + b)                   (N, H or K, 1, E)
        q, k    = rotate(q, k, position)              (RoPE: LLaMA, Mistral)
        k, v    = cache.append(k, v)                                       (N, K, S, E)
        x       = x + softmax(q k^T / sqrt(E) + mask) v W_O^T + b_O        (N, D)
        x       = x + MLP(Norm_2(x))                                       (N, D)
    logits = Norm_f(x) W_out^T                                             (N, V)

This is the forward of a pre-norm decoder-only model (``qkv.models.gpt.GPT``,
``qkv.models.llama.Llama``, Mistral's windowed Llama) specialised to what a decoding step is:
one new position per row, a key/value cache, inference. It computes the same logits (the tests
hold it to the module path within float32 rounding, and to the same tokens), but it is not the
place to learn the models: read ``qkv.models`` and ``qkv.blocks.block`` for that. It exists
because, at small sizes, a decoding step is dominated by Python: the module path makes about 30
module calls and several checks per token, each costing microseconds, while the arithmetic of a
small model costs less. Written as one loop over the weights, the step makes only the calls
that do work, multiplies by each layer's q, k and v weights stacked into one matrix (a copy
the step owns for one generation: ``stacked_qkv``), computes RoPE's angles once per step
instead of once per layer (and rotates q and k in one call), uses PyTorch's fused RMSNorm for
``rms_norm``, and runs every matrix product on the kernel that reads its weights fastest on
a CPU, chosen once per weight (``qkv._kernels``). ``benchmarks/generation.py`` measures the effect.

Generation takes it for a model of a type in ``FLAT_MODELS`` whose parts are the stock ones
(checked by ``flat_step``); anything else (a subclass, hooks, another attention implementation,
attention capture, Prefix-LM, encoder-decoders) decodes through its modules. It is
generation's one fast path: the modules have a single forward each, with no inference branch.

Shape legend: N rows (batch, or batch times beams) · S cached positions · D model width ·
H query heads · K key/value heads · E head dim · F MLP hidden width · V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qkv._kernels import bound_linear
from qkv.attention import masks
from qkv.attention.kv_cache import KVCache
from qkv.attention.multihead import MultiHeadAttention
from qkv.blocks.block import DecoderLayer
from qkv.blocks.mlp import FeedForward, GatedFeedForward
from qkv.blocks.norms import RMSNorm
from qkv.models.gpt import GPT
from qkv.models.llama import Llama
from qkv.positional.rope import RotaryEmbedding, apply_rotary

__all__ = ["FLAT_MODELS", "FlatDecoderStep", "flat_step", "stacked_qkv"]

FLAT_MODELS: tuple[type[nn.Module], ...] = (GPT, Llama)  # exactly these types, not subclasses

Fn = Callable[[Tensor], Tensor]


class _LayerSteps(NamedTuple):
    """One layer's parts as functions of a (N, width) tensor, each bound to its weights."""

    norm1: Fn  # attn_norm, (N, D) -> (N, D)
    qkv: Fn  # x [W_Q; W_K; W_V]^T + b, (N, D) -> (N, (H + 2K) E)
    out: Fn  # x W_O^T + b_O, (N, H E) -> (N, D)
    norm2: Fn  # mlp_norm, (N, D) -> (N, D)
    mlp: Fn  # (N, D) -> (N, D)


def _norm(module: nn.Module) -> Fn:
    """LayerNorm or RMSNorm as a function, with the module's weights bound."""
    if isinstance(module, nn.LayerNorm):
        shape, weight, bias, eps = module.normalized_shape, module.weight, module.bias, module.eps
        return lambda x: torch.layer_norm(x, shape, weight, bias, eps)
    assert isinstance(module, RMSNorm)
    gain, rms_eps = module.weight, module.eps  # PyTorch's fused kernel for qkv's rms_norm
    return lambda x: F.rms_norm(x, gain.shape, gain, rms_eps)


def _mlp(module: nn.Module) -> Fn:
    """The plain or the gated feed-forward network as a function."""
    assert isinstance(module, (FeedForward, GatedFeedForward))
    act = module.act
    up = bound_linear(module.up_proj.weight, module.up_proj.bias)
    down = bound_linear(module.down_proj.weight, module.down_proj.bias)
    if isinstance(module, GatedFeedForward):
        gate = bound_linear(module.gate_proj.weight, module.gate_proj.bias)
        return lambda x: down(act(gate(x)) * up(x))  # (N, D)
    return lambda x: down(act(up(x)))  # (N, D)


@torch.no_grad()
def stacked_qkv(attn: MultiHeadAttention) -> tuple[Tensor, Tensor | None]:
    """[W_Q; W_K; W_V] ((H + 2K) E, D) and [b_Q | b_K | b_V] ((H + 2K) E,) or None.

    A copy of the three projections' weights, made from the weights as they are when a
    generation starts: the step then computes q, k and v with one product instead of three
    (each call costs microseconds of dispatch, whatever its size). The step holds the copy and
    the generation drops it when it ends; nothing is kept on the module.
    """
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    weight = torch.cat([m.weight.detach() for m in projections])  # ((H + 2K) E, D)
    if all(m.bias is None for m in projections):
        return weight, None
    biases: list[Tensor] = [
        m.weight.new_zeros(m.out_features) if m.bias is None else m.bias.detach()
        for m in projections
    ]  # (H E,), (K E,), (K E,)
    return weight, torch.cat(biases)  # ((H + 2K) E,)


def _layer_steps(layer: nn.Module) -> _LayerSteps:
    """Gather one stock pre-norm layer's parts (see ``_stock_layer``)."""
    assert isinstance(layer, DecoderLayer)
    attn = layer.self_attn
    return _LayerSteps(
        norm1=_norm(layer.attn_norm),
        qkv=bound_linear(*stacked_qkv(attn)),  # one product for q, k and v
        out=bound_linear(attn.out_proj.weight, attn.out_proj.bias),
        norm2=_norm(layer.mlp_norm),
        mlp=_mlp(layer.mlp),
    )


class FlatDecoderStep:
    """One decoding step of a GPT or a Llama, as plain calls over its weights (see the module
    docstring).

    Built once per generation, from the parameters as they are then (it holds its own stacked
    copy of each layer's q/k/v weights, freed with it); the parameters must not change while it
    is used.

    Args:
        model: a model that ``flat_step`` accepts.
    """

    def __init__(self, model: Any) -> None:
        first = model.layers[0].self_attn
        self.n_heads, self.n_kv_heads, self.head_dim = (
            first.n_heads,
            first.n_kv_heads,
            first.head_dim,
        )
        self.scale = first.scale  # None: 1 / sqrt(E)
        self.rotary: RotaryEmbedding | None = first.rotary  # shared by every layer
        pos_emb = getattr(model, "pos_emb", None)  # GPT's learned positions
        self.pos_emb = None if pos_emb is None else pos_emb.emb.weight  # (max_seq_len, D)
        self.window: int | None = getattr(model.config, "sliding_window", None)  # Mistral
        self.tok_emb = model.tok_emb.weight  # (V, D)
        self.layers = [_layer_steps(layer) for layer in model.layers]
        self.final_norm = _norm(model.final_norm)
        self.lm_head = bound_linear(model.lm_head.weight, model.lm_head.bias)  # (N, D) -> (N, V)

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
        n, h, kh, e = tokens.shape[0], self.n_heads, self.n_kv_heads, self.head_dim
        s = cache[0].seq_len + 1  # keys once the new one is appended
        pos = torch.tensor([s - 1], device=tokens.device) if position is None else position
        x = F.embedding(tokens, self.tok_emb)  # (N, D)
        if self.pos_emb is not None:  # learned positions, added to the input (GPT)
            x = x + F.embedding(pos.view(-1), self.pos_emb)  # (N, D)
        if self.rotary is not None:  # RoPE's angles: the same for every layer
            cos, sin = self.rotary.cos_sin(pos.view(-1, 1), x.dtype)  # (N or 1, 1, E) each
            cos, sin = cos[:, None], sin[:, None]  # (N or 1, 1, 1, E): every head
        mask = None  # True = may attend; one new query sees every cached key: no causal mask
        if attention_mask is not None:
            mask = attention_mask.bool()[:, None, None, :]  # (N, 1, 1, S)
        if self.window is not None and s > self.window:  # only the last W keys (Mistral)
            window = masks.sliding_window(1, self.window, s, device=x.device)  # (1, S)
            mask = window if mask is None else mask & window  # (1, S) or (N, 1, 1, S)
        for layer, layer_cache in zip(self.layers, cache, strict=True):
            qkv = layer.qkv(layer.norm1(x))  # (N, (H + 2K) E)
            qk = qkv[:, : (h + kh) * e].view(n, h + kh, 1, e)  # (N, H + K, 1, E)
            if self.rotary is not None:  # q and k side by side: one rotation for both
                qk = apply_rotary(qk, cos, sin)  # (N, H + K, 1, E)
            q, k = qk[:, :h], qk[:, h:]  # (N, H, 1, E), (N, K, 1, E)
            v = qkv[:, (h + kh) * e :].view(n, kh, 1, e)  # (N, K, 1, E)
            k, v = layer_cache.update(k, v)  # (N, K, S, E)
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=kh != h
            )  # (N, H, 1, E)
            x = x + layer.out(o.view(n, h * e))  # (N, D)
            x = x + layer.mlp(layer.norm2(x))  # (N, D)
        return self.lm_head(self.final_norm(x))  # (N, V)

    # --8<-- [end:step]


def _has_hooks(model: nn.Module) -> bool:
    return any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in model.modules()
    )


def _stock_norm(module: nn.Module) -> bool:
    return type(module) in (nn.LayerNorm, RMSNorm)


def _stock_layer(layer: nn.Module, rotary: nn.Module | None) -> bool:
    """A pre-norm layer built from the library's own parts, with the sdpa attention."""
    if type(layer) is not DecoderLayer or layer.cross_attn is not None or not layer.norm_first:
        return False
    attn, mlp = layer.self_attn, layer.mlp
    if type(mlp) not in (FeedForward, GatedFeedForward):  # e.g. a mixture of experts
        return False
    linears = [attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj, mlp.up_proj, mlp.down_proj]
    if type(mlp) is GatedFeedForward:
        linears.append(mlp.gate_proj)
    return (
        type(attn) is MultiHeadAttention
        and attn.rotary is rotary
        and attn.score_bias is None
        and attn.attn_impl in ("auto", "sdpa")
        and not attn.capture_weights
        and all(type(m) is nn.Linear for m in linears)
        and _stock_norm(layer.attn_norm)
        and _stock_norm(layer.mlp_norm)
    )


def flat_step(model: Any) -> FlatDecoderStep | None:
    """The flat decoding step for ``model``, or None when it must decode through its modules.

    Taken for a model whose type is one of ``FLAT_MODELS`` (not a subclass, which may change
    ``forward``) in eval mode, without hooks, whose layers are the stock pre-norm ones with
    the default attention.
    """
    if type(model) not in FLAT_MODELS or model.training or _has_hooks(model):
        return None
    rotary = getattr(model, "rotary", None)  # Llama's shared RoPE; GPT has none
    if rotary is not None and type(rotary) is not RotaryEmbedding:
        return None
    if not all(_stock_layer(layer, rotary) for layer in model.layers):
        return None
    if not _stock_norm(model.final_norm) or type(model.lm_head) is not nn.Linear:
        return None
    return FlatDecoderStep(model)
