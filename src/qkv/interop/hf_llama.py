"""Hugging Face LLaMA and Mistral checkpoints <-> ``qkv.models.llama.Llama``.

Reads ``model_type`` "llama" (``LlamaForCausalLM``) and "mistral" (``MistralForCausalLM``); writes
"llama", or "mistral" when the model has a sliding window. The tensors only change names:
Hugging Face's checkpoints already use the rotate-half RoPE pairing that qkv uses (its
conversion script permuted Meta's q and k rows once), and ``nn.Linear`` weights are (out, in)
on both sides.

    qkv                              Hugging Face
    tok_emb                          model.embed_tokens
    layers.{i}.attn_norm             model.layers.{i}.input_layernorm
    layers.{i}.self_attn.q_proj      model.layers.{i}.self_attn.q_proj     (and k_proj, v_proj)
    layers.{i}.self_attn.out_proj    model.layers.{i}.self_attn.o_proj
    layers.{i}.mlp_norm              model.layers.{i}.post_attention_layernorm
    layers.{i}.mlp.gate_proj         model.layers.{i}.mlp.gate_proj        (and up_proj, down_proj)
    final_norm                       model.norm
    lm_head                          lm_head        (absent when tie_word_embeddings is true)
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from qkv.interop.files import CheckpointError
from qkv.interop.registry import Converter, register
from qkv.models.llama import Llama, LlamaConfig

__all__ = [
    "llama_config_from_hf",
    "llama_config_to_hf",
    "llama_weights_from_hf",
    "llama_weights_to_hf",
]

Tensors = dict[str, Tensor]

# --8<-- [start:names]
# Inside layers.{i} (qkv) and model.layers.{i} (Hugging Face).
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "self_attn.q_proj.weight": "self_attn.q_proj.weight",
    "self_attn.k_proj.weight": "self_attn.k_proj.weight",
    "self_attn.v_proj.weight": "self_attn.v_proj.weight",
    "self_attn.out_proj.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {
    "tok_emb.weight": "model.embed_tokens.weight",
    "final_norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}

# --8<-- [end:names]


def _name_map(config: LlamaConfig) -> dict[str, str]:
    """qkv state_dict name -> Hugging Face name, for every tensor of the model."""
    names = dict(_TOP_NAMES)
    for i in range(config.n_layers):
        for ours, theirs in _LAYER_NAMES.items():
            names[f"layers.{i}.{ours}"] = f"model.layers.{i}.{theirs}"
    return names


def _rope_theta(hf: dict[str, Any]) -> float:
    """RoPE's base, refusing the scaled variants qkv does not implement.

    transformers 5 writes ``rope_parameters: {"rope_type": ..., "rope_theta": ...}``; older
    configs have a top-level ``rope_theta`` and an optional ``rope_scaling`` dict.
    """
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for source in (params, scaling):
        kind = source.get("rope_type", source.get("type", "default"))
        if kind != "default":
            raise CheckpointError(
                f"RoPE scaling of type {kind!r} (used by Llama 3.1+, YaRN and long-context "
                "fine-tunes) is unsupported: qkv implements plain RoPE only (rope_type "
                "'default')"
            )
    return float(params.get("rope_theta", hf.get("rope_theta", 10_000.0)))


def llama_config_from_hf(hf: dict[str, Any]) -> LlamaConfig:
    """A ``LlamaConfig`` from a Hugging Face LLaMA or Mistral ``config.json`` dict."""
    unsupported = {
        "hidden_act": (hf.get("hidden_act", "silu"), "silu"),
        "attention_bias": (hf.get("attention_bias", False), False),
        "mlp_bias": (hf.get("mlp_bias", False), False),
    }
    for key, (value, supported) in unsupported.items():
        if value != supported:
            raise CheckpointError(
                f"{key}={value!r} is unsupported: qkv's LLaMA has {key}={supported!r}"
            )
    d_model, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * n_heads != d_model:
        raise CheckpointError(
            f"head_dim={head_dim} with num_attention_heads={n_heads} does not give "
            f"hidden_size={d_model}; qkv's LLaMA needs head_dim = hidden_size / heads"
        )
    # transformers applies a sliding window for Mistral only; a "llama" config never has one.
    window = hf.get("sliding_window") if hf.get("model_type") == "mistral" else None
    return LlamaConfig(
        vocab_size=hf["vocab_size"],
        d_model=d_model,
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        d_ff=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_base=_rope_theta(hf),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        sliding_window=window,
        tie_embeddings=hf.get("tie_word_embeddings", False),
        # A missing key means transformers' defaults, 1 and 2; an explicit null stays None.
        bos_token_id=_token_id(hf.get("bos_token_id", 1)),
        eos_token_id=_token_id(hf.get("eos_token_id", 2)),
        pad_token_id=_token_id(hf.get("pad_token_id")),
    )


def _token_id(value: Any) -> int | None:
    """A config's token id, or None; of a list of them (several end tokens), the first."""
    if isinstance(value, list):
        return value[0] if value else None
    return value


def llama_config_to_hf(config: LlamaConfig) -> dict[str, Any]:
    """A Hugging Face ``config.json`` dict: Mistral with a sliding window, LLaMA without."""
    mistral = config.sliding_window is not None
    hf: dict[str, Any] = {
        "architectures": ["MistralForCausalLM" if mistral else "LlamaForCausalLM"],
        "model_type": "mistral" if mistral else "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.d_ff,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_base,  # transformers 4
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_base},  # 5
        "tie_word_embeddings": config.tie_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
    }
    if mistral:
        hf["sliding_window"] = config.sliding_window
    else:
        hf["attention_bias"] = hf["mlp_bias"] = False
    return hf


def llama_weights_from_hf(tensors: Tensors, config: LlamaConfig) -> Tensors:
    """Rename Hugging Face tensors to ``Llama``'s state_dict names.

    Unknown names pass through unchanged, so that the strict loader names them.
    """
    ours_by_hf = {hf: ours for ours, hf in _name_map(config).items()}
    out = {}
    for name, t in tensors.items():
        if name.endswith("rotary_emb.inv_freq"):  # old exports saved RoPE's derived buffer
            continue
        if name == "lm_head.weight" and config.tie_embeddings:
            continue  # the embedding matrix is the head
        out[ours_by_hf.get(name, name)] = t
    if config.tie_embeddings and "tok_emb.weight" in out:
        out["lm_head.weight"] = out["tok_emb.weight"]
    return out


def llama_weights_to_hf(tensors: Tensors, config: LlamaConfig) -> Tensors:
    """Rename ``Llama``'s state_dict to Hugging Face names (no lm_head when tied)."""
    names = _name_map(config)
    return {
        names[name]: t
        for name, t in tensors.items()
        if not (name == "lm_head.weight" and config.tie_embeddings)
    }


register(
    Converter(
        model_class=Llama,
        model_types=("llama", "mistral"),
        config_from_hf=llama_config_from_hf,
        config_to_hf=llama_config_to_hf,
        weights_from_hf=llama_weights_from_hf,
        weights_to_hf=llama_weights_to_hf,
    )
)
