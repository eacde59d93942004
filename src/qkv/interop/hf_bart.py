"""BART and Marian checkpoints in Hugging Face's layout (``BartForConditionalGeneration``,
``MarianMTModel``), read into and written from ``qkv.models.bart.Bart``.

One converter reads both model types: ``"bart"`` (learned positions, embedding LayerNorm) and
``"marian"`` (fixed sinusoids, scaled token embeddings). Which one a qkv model is written as
follows from its config: ``positions="learned"`` with ``layernorm_embedding=True`` is BART,
``positions="sinusoidal"`` with ``layernorm_embedding=False`` is Marian; other mixes have no
Hugging Face counterpart.

Tensor names, qkv <- Hugging Face (``model.`` prefix elided)::

    tok_emb.weight                    shared.weight (also encoder/decoder.embed_tokens, lm_head)
    lm_head.weight                    the same tensor (tied)
    final_logits_bias (V,)            final_logits_bias (1, V), zeros when absent
    enc_pos.emb.weight                encoder.embed_positions.weight    (BART only; Marian's
    dec_pos.emb.weight                decoder.embed_positions.weight     table is recomputed)
    enc_emb_norm / dec_emb_norm       encoder/decoder.layernorm_embedding          (BART only)
    encoder.{i}.self_attn.{q,k,v,out}_proj    encoder.layers.{i}.self_attn.{q,k,v,out}_proj
    encoder.{i}.attn_norm             encoder.layers.{i}.self_attn_layer_norm
    encoder.{i}.mlp.up_proj / down_proj       encoder.layers.{i}.fc1 / fc2
    encoder.{i}.mlp_norm              encoder.layers.{i}.final_layer_norm
    decoder.{i}.cross_attn.*          decoder.layers.{i}.encoder_attn.*
    decoder.{i}.cross_norm            decoder.layers.{i}.encoder_attn_layer_norm
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from qkv.interop.activations import ACTIVATIONS_FROM_HF, ACTIVATIONS_TO_HF
from qkv.interop.files import CheckpointError
from qkv.interop.registry import Converter, register
from qkv.models.bart import Bart, BartConfig
from qkv.positional import sinusoidal_table

__all__ = ["CONVERTER", "config_from_hf", "config_to_hf", "weights_from_hf", "weights_to_hf"]

Tensors = dict[str, Tensor]

# qkv activation names -> Hugging Face's: as everywhere, but BART and Marian configs say "swish".
_ACTIVATIONS_TO_HF = {**ACTIVATIONS_TO_HF, "silu": "swish"}

# Per-layer tensors: qkv name -> Hugging Face name (each with .weight and .bias).
_ENCODER_LAYER = {
    **{f"self_attn.{p}": f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")},
    "attn_norm": "self_attn_layer_norm",
    "mlp.up_proj": "fc1",
    "mlp.down_proj": "fc2",
    "mlp_norm": "final_layer_norm",
}
_DECODER_LAYER = {
    **_ENCODER_LAYER,
    **{f"cross_attn.{p}": f"encoder_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")},
    "cross_norm": "encoder_attn_layer_norm",
}
_ARCHITECTURES = {"bart": "BartForConditionalGeneration", "marian": "MarianMTModel"}
_SHARED = "model.shared.weight"
# Copies of the shared embedding a checkpoint may also hold (transformers writes none).
_TIED_COPIES = ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight")
_POSITIONS = ("model.encoder.embed_positions.weight", "model.decoder.embed_positions.weight")
_IGNORED = ("model.encoder.version", "model.decoder.version")  # fairseq leftovers


def _model_type(config: BartConfig) -> str:
    if config.positions == "learned" and config.layernorm_embedding:
        return "bart"
    if config.positions == "sinusoidal" and not config.layernorm_embedding:
        return "marian"
    raise ValueError(
        f"positions={config.positions!r} with layernorm_embedding={config.layernorm_embedding} "
        "has no Hugging Face counterpart: BART is learned + True, Marian sinusoidal + False"
    )


def _name_map(config: BartConfig) -> dict[str, str]:
    """qkv name -> Hugging Face name, for every tensor but the tied ones and Marian's table."""
    names: dict[str, str] = {}
    stacks = (
        ("encoder", config.n_encoder_layers, _ENCODER_LAYER),
        ("decoder", config.n_decoder_layers, _DECODER_LAYER),
    )
    for stack, n_layers, layer_map in stacks:
        for i in range(n_layers):
            for ours, theirs in layer_map.items():
                for p in ("weight", "bias"):
                    names[f"{stack}.{i}.{ours}.{p}"] = f"model.{stack}.layers.{i}.{theirs}.{p}"
        if config.positions == "learned":
            names[f"{stack[:3]}_pos.emb.weight"] = f"model.{stack}.embed_positions.weight"
        if config.layernorm_embedding:
            for p in ("weight", "bias"):
                names[f"{stack[:3]}_emb_norm.{p}"] = f"model.{stack}.layernorm_embedding.{p}"
    return names


def _required(hf: dict[str, Any], key: str) -> Any:
    if hf.get(key) is None:
        raise CheckpointError(f"config.json of a {hf.get('model_type')} model lacks {key!r}")
    value = hf[key]
    return value[0] if isinstance(value, list) else value  # eos_token_id may be a list


def config_from_hf(hf: dict[str, Any]) -> BartConfig:
    """A ``BartConfig`` from a Hugging Face BART or Marian ``config.json``."""
    model_type = hf.get("model_type")
    for a, b in (("encoder_attention_heads", "decoder_attention_heads"),
                 ("encoder_ffn_dim", "decoder_ffn_dim")):  # fmt: skip
        if _required(hf, a) != _required(hf, b):
            raise CheckpointError(f"qkv's Bart needs {a} == {b}, got {hf[a]} and {hf[b]}")
    if not hf.get("tie_word_embeddings", True):
        raise CheckpointError("qkv's Bart ties its output layer to the embeddings; this "
                              "checkpoint sets tie_word_embeddings=false")  # fmt: skip
    if hf.get("normalize_before") or hf.get("add_final_layer_norm"):
        raise CheckpointError("pre-norm BART (mBART layout) is not the post-norm qkv Bart")
    if model_type == "marian":
        decoder_vocab = hf.get("decoder_vocab_size") or hf["vocab_size"]
        if (
            not hf.get("share_encoder_decoder_embeddings", True)
            or decoder_vocab != hf["vocab_size"]
        ):
            raise CheckpointError(
                "qkv's Bart shares one vocabulary between encoder and decoder; this Marian "
                "checkpoint has separate ones (share_encoder_decoder_embeddings=false)"
            )
    activation = hf.get("activation_function", "gelu")
    if activation not in ACTIVATIONS_FROM_HF:
        raise CheckpointError(f"activation_function {activation!r} is not supported by qkv")
    marian = model_type == "marian"
    return BartConfig(
        vocab_size=_required(hf, "vocab_size"), d_model=_required(hf, "d_model"),
        n_encoder_layers=_required(hf, "encoder_layers"),
        n_decoder_layers=_required(hf, "decoder_layers"),
        n_heads=_required(hf, "encoder_attention_heads"), d_ff=_required(hf, "encoder_ffn_dim"),
        max_seq_len=hf.get("max_position_embeddings", 1024),
        positions="sinusoidal" if marian else "learned",
        scale_embedding=bool(hf.get("scale_embedding", False)),
        layernorm_embedding=not marian,
        activation=ACTIVATIONS_FROM_HF[activation],
        dropout=hf.get("dropout", 0.1), attention_dropout=hf.get("attention_dropout", 0.0),
        activation_dropout=hf.get("activation_dropout", 0.0), init_std=hf.get("init_std", 0.02),
        pad_token_id=_required(hf, "pad_token_id"), bos_token_id=hf.get("bos_token_id"),
        eos_token_id=_required(hf, "eos_token_id"),
        decoder_start_token_id=_required(hf, "decoder_start_token_id"),
    )  # fmt: skip


def config_to_hf(config: BartConfig) -> dict[str, Any]:
    """The ``config.json`` that transformers reads as this model (BART or Marian)."""
    model_type = _model_type(config)
    hf: dict[str, Any] = {
        "model_type": model_type,
        "architectures": [_ARCHITECTURES[model_type]],
        "vocab_size": config.vocab_size, "d_model": config.d_model,
        "encoder_layers": config.n_encoder_layers, "decoder_layers": config.n_decoder_layers,
        "encoder_attention_heads": config.n_heads, "decoder_attention_heads": config.n_heads,
        "encoder_ffn_dim": config.d_ff, "decoder_ffn_dim": config.d_ff,
        "activation_function": _ACTIVATIONS_TO_HF[config.activation],
        "max_position_embeddings": config.max_seq_len,
        "scale_embedding": config.scale_embedding,
        "dropout": config.dropout, "attention_dropout": config.attention_dropout,
        "activation_dropout": config.activation_dropout, "init_std": config.init_std,
        "encoder_layerdrop": 0.0, "decoder_layerdrop": 0.0,
        "pad_token_id": config.pad_token_id, "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id, "forced_eos_token_id": config.eos_token_id,
        "decoder_start_token_id": config.decoder_start_token_id,
        "is_encoder_decoder": True, "tie_word_embeddings": True,
    }  # fmt: skip
    if model_type == "marian":
        hf["share_encoder_decoder_embeddings"] = True
        hf["decoder_vocab_size"] = config.vocab_size
    return hf


def _with_model_prefix(tensors: Tensors) -> Tensors:
    """A bare ``BartModel`` checkpoint (``shared.weight``) under the ``model.`` prefix."""
    if any(k.startswith("model.") for k in tensors):
        return tensors
    return {k if k in ("final_logits_bias", "lm_head.weight") else f"model.{k}": v
            for k, v in tensors.items()}  # fmt: skip


def _check_same(name: str, t: Tensor, reference: Tensor, what: str, atol: float = 0.0) -> None:
    """Raise unless ``t`` equals ``reference``: qkv keeps one tensor where a checkpoint has two."""
    if t.shape != reference.shape:
        raise CheckpointError(f"{name} {tuple(t.shape)} differs in shape from {what} "
                              f"{tuple(reference.shape)}")  # fmt: skip
    diff = (t.float() - reference.float()).abs().max().item() if t.numel() else 0.0
    if diff > atol:
        raise CheckpointError(
            f"{name} differs from {what} (max abs difference {diff:.3g} > {atol}); qkv's Bart "
            "holds one tensor for both, so it cannot load this checkpoint faithfully"
        )


def weights_from_hf(tensors: Tensors, config: BartConfig) -> Tensors:
    """Hugging Face BART/Marian tensors -> ``Bart.state_dict()`` names."""
    hf = dict(_with_model_prefix(tensors))
    shared_names = [n for n in (_SHARED, *_TIED_COPIES, "lm_head.weight") if n in hf]
    if not shared_names:
        raise CheckpointError(f"no token embedding in the checkpoint (expected {_SHARED})")
    shared = hf.pop(shared_names[0])
    for name in shared_names[1:]:  # tied copies must be copies
        _check_same(name, hf.pop(name), shared, shared_names[0])
    if config.positions == "sinusoidal":
        table = sinusoidal_table(config.max_seq_len, config.d_model, interleaved=False)
        for name in _POSITIONS:
            if name in hf:
                _check_same(name, hf.pop(name), table, "Marian's sinusoid table", atol=1e-5)
    bias = hf.pop("final_logits_bias", None)
    out: Tensors = {
        "tok_emb.weight": shared,
        "lm_head.weight": shared,
        "final_logits_bias": (
            torch.zeros(config.vocab_size, dtype=shared.dtype) if bias is None else bias.reshape(-1)
        ),
    }
    for ours, theirs in _name_map(config).items():
        if theirs in hf:
            out[ours] = hf.pop(theirs)
    leftover = sorted(k for k in hf if k not in _IGNORED)
    if leftover:
        raise CheckpointError(f"tensors qkv's Bart does not know: {leftover[:10]}")
    return out  # missing tensors are reported by the strict load


def weights_to_hf(tensors: Tensors, config: BartConfig) -> Tensors:
    """``Bart.state_dict()`` -> the tensors transformers saves (tied copies and Marian's table
    left out, as transformers itself does)."""
    _model_type(config)
    out: Tensors = {
        _SHARED: tensors["tok_emb.weight"],
        "final_logits_bias": tensors["final_logits_bias"].reshape(1, -1),  # (1, V)
    }
    for ours, theirs in _name_map(config).items():
        out[theirs] = tensors[ours]
    return out


CONVERTER = register(
    Converter(
        model_class=Bart,
        model_types=("bart", "marian"),
        config_from_hf=config_from_hf,
        config_to_hf=config_to_hf,
        weights_from_hf=weights_from_hf,
        weights_to_hf=weights_to_hf,
    )
)
