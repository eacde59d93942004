"""GPT-2 checkpoints in Hugging Face's layout <-> ``qkv.models.gpt.GPT``.

Hugging Face (``GPT2LMHeadModel``, model_type "gpt2")       qkv (``GPT``)
    transformer.wte.weight          (V, D)                  tok_emb.weight
    transformer.wpe.weight          (max_seq_len, D)        pos_emb.emb.weight
    transformer.h.{i}.ln_1.*                                layers.{i}.attn_norm.*
    transformer.h.{i}.attn.c_attn.* (D, 3D) / (3D,)         layers.{i}.self_attn.{q,k,v}_proj.*
    transformer.h.{i}.attn.c_proj.* (D, D)                  layers.{i}.self_attn.out_proj.*
    transformer.h.{i}.ln_2.*                                layers.{i}.mlp_norm.*
    transformer.h.{i}.mlp.c_fc.*    (D, F)                  layers.{i}.mlp.up_proj.*
    transformer.h.{i}.mlp.c_proj.*  (F, D)                  layers.{i}.mlp.down_proj.*
    transformer.ln_f.*                                      final_norm.*
    lm_head.weight                  (V, D)                  lm_head.weight (tied: tok_emb's)

Two things differ beyond the names:
    * GPT-2's linear layers are ``Conv1D`` modules that store the weight as (in, out), the
      transpose of ``nn.Linear``'s (out, in), so every weight is transposed on the way.
    * One ``c_attn`` projects to q | k | v concatenated along the output axis; qkv has three
      projections, so it is split in three (and concatenated again when saving).

Checkpoints written by ``GPT2Model`` (such as OpenAI's original ``gpt2``) have no
``transformer.`` prefix; older files also carry ``attn.bias`` / ``attn.masked_bias``, the causal
mask as a buffer, which qkv builds itself and ignores. With tied embeddings ``lm_head.weight``
may be absent and is taken from ``wte``.

Shape legend: D model width · F MLP hidden width · V vocabulary.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from qkv.blocks.mlp import ActivationName
from qkv.interop.activations import ACTIVATIONS_FROM_HF, ACTIVATIONS_TO_HF
from qkv.interop.files import CheckpointError
from qkv.interop.registry import Converter, register
from qkv.models.gpt import GPT, GPTConfig

__all__ = ["config_from_hf", "config_to_hf", "weights_from_hf", "weights_to_hf"]

logger = logging.getLogger(__name__)

Tensors = dict[str, Tensor]

# transformers' activation names -> qkv's; GPT-2 configs may also name the faster tanh GELU.
_ACTIVATIONS_FROM_HF: dict[str, ActivationName] = {
    **ACTIVATIONS_FROM_HF,
    "gelu_fast": "gelu_tanh",
}

# --8<-- [start:names]
# Per-layer names: qkv suffix -> Hugging Face suffix (Conv1D weights are transposed).
_LAYER_NAMES = {
    "attn_norm": "ln_1",
    "self_attn.out_proj": "attn.c_proj",
    "mlp_norm": "ln_2",
    "mlp.up_proj": "mlp.c_fc",
    "mlp.down_proj": "mlp.c_proj",
}

# --8<-- [end:names]

_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # the old causal-mask buffers


def config_from_hf(hf: dict[str, Any]) -> GPTConfig:
    """A ``GPTConfig`` from a Hugging Face GPT-2 ``config.json``; unsupported options raise."""
    unsupported = {
        "add_cross_attention": False,
        "scale_attn_by_inverse_layer_idx": False,
        "scale_attn_weights": True,
    }
    for key, supported in unsupported.items():
        if hf.get(key, supported) != supported:
            raise CheckpointError(
                f"GPT-2 config has {key}={hf[key]}; qkv's GPT supports only {key}={supported}"
            )
    activation = hf.get("activation_function", "gelu_new")
    if activation not in _ACTIVATIONS_FROM_HF:
        raise CheckpointError(
            f"GPT-2 activation_function={activation!r} is not supported; qkv reads "
            f"{sorted(_ACTIVATIONS_FROM_HF)}"
        )
    dropouts = {hf.get(k, 0.1) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
    if len(dropouts) > 1:
        logger.info("GPT-2 config has several dropout rates %s; qkv uses resid_pdrop", dropouts)
    return GPTConfig(
        vocab_size=hf.get("vocab_size", 50257),
        d_model=hf.get("n_embd", 768),
        n_layers=hf.get("n_layer", 12),
        n_heads=hf.get("n_head", 12),
        d_ff=hf.get("n_inner"),
        max_seq_len=hf.get("n_positions", 1024),
        dropout=hf.get("resid_pdrop", 0.1),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        activation=_ACTIVATIONS_FROM_HF[activation],
        tie_embeddings=hf.get("tie_word_embeddings", True),
        # A missing key means transformers' default, 50256; an explicit null stays None.
        bos_token_id=_token_id(hf.get("bos_token_id", 50256), hf.get("vocab_size", 50257)),
        eos_token_id=_token_id(hf.get("eos_token_id", 50256), hf.get("vocab_size", 50257)),
        pad_token_id=_token_id(hf.get("pad_token_id"), hf.get("vocab_size", 50257)),
    )


def _token_id(value: Any, vocab_size: int) -> int | None:
    """A config's token id, or None; of a list of them (several end tokens), the first.

    transformers only warns about an id outside the vocabulary (GPT-2's default 50256 in a small
    model); such an id names no token, so it is read as None, with a warning.
    """
    if isinstance(value, list):
        value = value[0] if value else None
    if value is not None and not 0 <= value < vocab_size:
        logger.warning("GPT-2 config: token id %s is outside the vocabulary; ignoring it", value)
        return None
    return value


def config_to_hf(config: GPTConfig) -> dict[str, Any]:
    """The ``config.json`` that ``transformers.GPT2LMHeadModel`` loads."""
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": config.vocab_size,
        "n_embd": config.d_model,
        "n_layer": config.n_layers,
        "n_head": config.n_heads,
        "n_inner": config.d_ff,
        "n_positions": config.max_seq_len,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.norm_eps,
        "activation_function": ACTIVATIONS_TO_HF[config.activation],
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": 0.02,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
    }


# --8<-- [start:weights_from_hf]
def weights_from_hf(tensors: Tensors, config: GPTConfig) -> Tensors:
    """Rename, transpose and split Hugging Face GPT-2 tensors into ``GPT``'s state dict."""
    hf = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    hf = {k: v for k, v in hf.items() if not k.endswith(_IGNORED_SUFFIXES)}
    out: Tensors = {}

    def take(name: str) -> Tensor:
        if name not in hf:
            raise CheckpointError(f"GPT-2 checkpoint has no tensor {name!r}")
        return hf.pop(name)

    out["tok_emb.weight"] = take("wte.weight")  # (V, D)
    out["pos_emb.emb.weight"] = take("wpe.weight")  # (max_seq_len, D)
    for i in range(config.n_layers):
        src, dst = f"h.{i}.", f"layers.{i}."
        # c_attn: weight (D, 3D) = [W_q | W_k | W_v] in Conv1D's (in, out) layout.
        w_q, w_k, w_v = take(src + "attn.c_attn.weight").t().chunk(3, dim=0)  # 3 x (D, D)
        b_q, b_k, b_v = take(src + "attn.c_attn.bias").chunk(3, dim=0)  # 3 x (D,)
        for proj, w, b in (("q_proj", w_q, b_q), ("k_proj", w_k, b_k), ("v_proj", w_v, b_v)):
            out[f"{dst}self_attn.{proj}.weight"] = w.contiguous()  # (D, D), (out, in)
            out[f"{dst}self_attn.{proj}.bias"] = b.contiguous()  # (D,)
        for ours, theirs in _LAYER_NAMES.items():
            w = take(f"{src}{theirs}.weight")
            # Conv1D weights (in, out) -> nn.Linear (out, in); LayerNorm gains stay as they are.
            out[f"{dst}{ours}.weight"] = w if "ln_" in theirs else w.t().contiguous()
            out[f"{dst}{ours}.bias"] = take(f"{src}{theirs}.bias")
    out["final_norm.weight"] = take("ln_f.weight")
    out["final_norm.bias"] = take("ln_f.bias")
    head = hf.pop("lm_head.weight", None)
    if config.tie_embeddings:
        out["lm_head.weight"] = out["tok_emb.weight"]  # the same tensor, tied in the model too
    elif head is None:
        raise CheckpointError(
            "GPT-2 checkpoint has tie_word_embeddings=false but no lm_head.weight"
        )
    else:
        out["lm_head.weight"] = head  # (V, D)
    if hf:
        raise CheckpointError(
            f"GPT-2 checkpoint has tensors qkv does not know: {sorted(hf)[:10]}; was it saved "
            f"with more than n_layer={config.n_layers} layers, or from another architecture?"
        )
    return out


# --8<-- [end:weights_from_hf]


def weights_to_hf(tensors: Tensors, config: GPTConfig) -> Tensors:
    """``GPT``'s state dict under Hugging Face GPT-2 names (the inverse of weights_from_hf)."""
    out: Tensors = {
        "transformer.wte.weight": tensors["tok_emb.weight"],  # (V, D)
        "transformer.wpe.weight": tensors["pos_emb.emb.weight"],  # (max_seq_len, D)
    }
    for i in range(config.n_layers):
        src, dst = f"layers.{i}.", f"transformer.h.{i}."
        projs = [f"{src}self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
        w_qkv = torch.cat([tensors[p + ".weight"] for p in projs], dim=0)  # (3D, D)
        out[dst + "attn.c_attn.weight"] = w_qkv.t().contiguous()  # (D, 3D), Conv1D layout
        out[dst + "attn.c_attn.bias"] = torch.cat([tensors[p + ".bias"] for p in projs])  # (3D,)
        for ours, theirs in _LAYER_NAMES.items():
            w = tensors[f"{src}{ours}.weight"]
            out[f"{dst}{theirs}.weight"] = w if "ln_" in theirs else w.t().contiguous()
            out[f"{dst}{theirs}.bias"] = tensors[f"{src}{ours}.bias"]
    out["transformer.ln_f.weight"] = tensors["final_norm.weight"]
    out["transformer.ln_f.bias"] = tensors["final_norm.bias"]
    if not config.tie_embeddings:  # a tied head is wte itself: transformers does not store it
        out["lm_head.weight"] = tensors["lm_head.weight"]  # (V, D)
    return out


register(
    Converter(
        model_class=GPT,
        model_types=("gpt2",),
        config_from_hf=config_from_hf,
        config_to_hf=config_to_hf,
        weights_from_hf=weights_from_hf,
        weights_to_hf=weights_to_hf,
    )
)
