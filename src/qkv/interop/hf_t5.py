"""Hugging Face T5 checkpoints (v1.0 and v1.1) <-> ``qkv.models.t5.T5``.

Reads and writes ``model_type`` "t5" (``T5ForConditionalGeneration``). The tensors only change
names; ``nn.Linear`` weights are (out, in) on both sides. Hugging Face nests each layer's
sublayers in a list, ``block.{i}.layer.{j}``: j = 0 self-attention, then (decoder only) 1
cross-attention, then the feed-forward network.

    qkv                                      Hugging Face
    tok_emb                                  shared  (encoder/decoder.embed_tokens: copies)
    encoder_pos_bias.relative_attention_bias encoder.block.0.layer.0.SelfAttention
                                               .relative_attention_bias  (decoder_: likewise)
    encoder_layers.{i}.attn_norm             encoder.block.{i}.layer.0.layer_norm
    encoder_layers.{i}.self_attn.q_proj      encoder.block.{i}.layer.0.SelfAttention.q  (k, v)
    encoder_layers.{i}.self_attn.out_proj    encoder.block.{i}.layer.0.SelfAttention.o
    encoder_layers.{i}.mlp_norm              encoder.block.{i}.layer.1.layer_norm
    encoder_layers.{i}.mlp.up_proj           encoder.block.{i}.layer.1.DenseReluDense.wi
    encoder_layers.{i}.mlp.down_proj         encoder.block.{i}.layer.1.DenseReluDense.wo
      (gated-gelu: mlp.gate_proj <-> DenseReluDense.wi_0, mlp.up_proj <-> DenseReluDense.wi_1)
    decoder_layers.{i}.cross_norm            decoder.block.{i}.layer.1.layer_norm
    decoder_layers.{i}.cross_attn.q_proj     decoder.block.{i}.layer.1.EncDecAttention.q  (...)
    decoder_layers.{i}.mlp...                decoder.block.{i}.layer.2...
    encoder_norm, decoder_norm               encoder.final_layer_norm, decoder.final_layer_norm
    lm_head                                  lm_head  (absent when tied to shared)

Tied embeddings: the old configs say ``tie_word_embeddings`` (true for v1.0, false for v1.1).
transformers 5 instead always writes ``tie_word_embeddings: true`` and keeps the v1.0 output
rescaling in ``scale_decoder_outputs``; it still loads a separate ``lm_head.weight`` when the
checkpoint has one. qkv's ``tie_embeddings`` is the rescaling flag, and a v1.1-style model whose
checkpoint has no ``lm_head.weight`` gets a copy of the embedding as its (untied) output layer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from qkv.interop.files import CheckpointError
from qkv.interop.registry import Converter, register
from qkv.models.t5 import T5, T5Config

__all__ = ["t5_config_from_hf", "t5_config_to_hf", "t5_weights_from_hf", "t5_weights_to_hf"]

Tensors = dict[str, Tensor]

_ATTENTION = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "out_proj": "o"}
_MLP = {
    "relu": {"up_proj": "wi", "down_proj": "wo"},
    "gated-gelu": {"gate_proj": "wi_0", "up_proj": "wi_1", "down_proj": "wo"},
}
# Copies of ``shared``, or (in old checkpoints) a bias that no layer uses; read and dropped.
_EMBED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
_UNUSED = "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"


def _name_map(config: T5Config) -> dict[str, str]:
    """qkv state_dict name -> Hugging Face name, for every tensor except ``lm_head``."""
    names = {"tok_emb.weight": "shared.weight"}
    stacks = (
        ("encoder", config.n_layers, [("self_attn", "attn_norm", "SelfAttention")]),
        ("decoder", config.decoder_layers, [("self_attn", "attn_norm", "SelfAttention"),
                                            ("cross_attn", "cross_norm", "EncDecAttention")]),
    )  # fmt: skip
    for stack, n_layers, attentions in stacks:
        names[f"{stack}_norm.weight"] = f"{stack}.final_layer_norm.weight"
        names[f"{stack}_pos_bias.relative_attention_bias.weight"] = (
            f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        )
        for i in range(n_layers):
            ours, theirs = f"{stack}_layers.{i}", f"{stack}.block.{i}.layer"
            for j, (attn, norm, hf_attn) in enumerate(attentions):
                names[f"{ours}.{norm}.weight"] = f"{theirs}.{j}.layer_norm.weight"
                for a, b in _ATTENTION.items():
                    names[f"{ours}.{attn}.{a}.weight"] = f"{theirs}.{j}.{hf_attn}.{b}.weight"
            j = len(attentions)
            names[f"{ours}.mlp_norm.weight"] = f"{theirs}.{j}.layer_norm.weight"
            for a, b in _MLP[config.feed_forward].items():
                names[f"{ours}.mlp.{a}.weight"] = f"{theirs}.{j}.DenseReluDense.{b}.weight"
    return names


def t5_config_from_hf(hf: dict[str, Any]) -> T5Config:
    """A ``T5Config`` from a Hugging Face T5 ``config.json`` dict."""
    feed_forward = hf.get("feed_forward_proj", "relu")
    if feed_forward not in _MLP:
        raise CheckpointError(
            f"T5 feed_forward_proj={feed_forward!r} is unsupported; qkv reads 'relu' (T5 v1.0) "
            "and 'gated-gelu' (T5 v1.1, Flan-T5)"
        )
    # transformers 5 keeps the v1.0 rescaling in scale_decoder_outputs; older configs tie it to
    # tie_word_embeddings (see the module docstring).
    scaled = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True))
    pad = hf.get("pad_token_id")
    pad = 0 if pad is None else pad
    start = hf.get("decoder_start_token_id")
    eos = hf.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) and eos else eos  # some configs list several
    eos = eos if isinstance(eos, int) else 1
    n_decoder = hf.get("num_decoder_layers")  # None in qkv means "as many as the encoder"
    return T5Config(
        vocab_size=hf["vocab_size"],
        d_model=hf["d_model"],
        d_kv=hf["d_kv"],
        d_ff=hf["d_ff"],
        n_layers=hf["num_layers"],
        n_decoder_layers=None if n_decoder in (None, hf["num_layers"]) else n_decoder,
        n_heads=hf["num_heads"],
        relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
        dropout=float(hf.get("dropout_rate", 0.1)),
        norm_eps=hf.get("layer_norm_epsilon", 1e-6),
        feed_forward=feed_forward,
        tie_embeddings=bool(scaled),
        pad_token_id=pad,
        eos_token_id=eos,
        decoder_start_token_id=pad if start is None else start,
    )


def t5_config_to_hf(config: T5Config) -> dict[str, Any]:
    """The Hugging Face ``config.json`` dict of a ``T5Config``."""
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "vocab_size": config.vocab_size,
        "d_model": config.d_model,
        "d_kv": config.d_kv,
        "d_ff": config.d_ff,
        "num_layers": config.n_layers,
        "num_decoder_layers": config.decoder_layers,
        "num_heads": config.n_heads,
        "relative_attention_num_buckets": config.relative_attention_num_buckets,
        "relative_attention_max_distance": config.relative_attention_max_distance,
        "dropout_rate": config.dropout,
        "layer_norm_epsilon": config.norm_eps,
        "initializer_factor": 1.0,
        "feed_forward_proj": config.feed_forward,
        # Both spellings of the v1.0 rescaling, for transformers 4 and 5 alike.
        "tie_word_embeddings": config.tie_embeddings,
        "scale_decoder_outputs": config.tie_embeddings,
        "is_encoder_decoder": True,
        "pad_token_id": config.pad_token_id,
        "eos_token_id": config.eos_token_id,
        "decoder_start_token_id": config.decoder_start_token_id,
    }


def t5_weights_from_hf(tensors: Tensors, config: T5Config) -> Tensors:
    """Hugging Face T5 tensors renamed to ``T5``'s state_dict (unknown names pass through, so
    the strict loader reports them)."""
    to_qkv = {theirs: ours for ours, theirs in _name_map(config).items()}
    shared = tensors.get("shared.weight")
    out: Tensors = {}
    for name, t in tensors.items():
        if name in _EMBED_COPIES and shared is not None:
            if not torch.equal(t, shared):
                raise CheckpointError(
                    f"{name} differs from shared.weight; qkv's T5 has one token embedding for "
                    "the encoder and the decoder"
                )
        elif name != _UNUSED and name != "lm_head.weight":
            out[to_qkv.get(name, name)] = t
    head = tensors.get("lm_head.weight")
    if shared is None:  # the strict loader names the missing embedding
        return out
    if config.tie_embeddings:
        if head is not None and not torch.equal(head, shared):
            raise CheckpointError(
                "lm_head.weight differs from shared.weight although the config ties them "
                "(tie_word_embeddings / scale_decoder_outputs true); a model with its own output "
                "layer is a T5 v1.1 style one: set tie_word_embeddings to false"
            )
        out["lm_head.weight"] = shared
    else:
        out["lm_head.weight"] = shared.clone() if head is None else head
    return out


def t5_weights_to_hf(tensors: Tensors, config: T5Config) -> Tensors:
    """``T5``'s state_dict renamed to Hugging Face's T5 names (``lm_head`` only when untied)."""
    names = _name_map(config)
    out = {names.get(name, name): t for name, t in tensors.items() if name != "lm_head.weight"}
    if not config.tie_embeddings:
        out["lm_head.weight"] = tensors["lm_head.weight"]
    return out


register(
    Converter(
        model_class=T5,
        model_types=("t5",),
        config_from_hf=t5_config_from_hf,
        config_to_hf=t5_config_to_hf,
        weights_from_hf=t5_weights_from_hf,
        weights_to_hf=t5_weights_to_hf,
    )
)
