"""Hugging Face BERT checkpoints and qkv's ``Bert``: config fields and tensor names, both ways.

Reads ``model_type: "bert"`` checkpoints saved from ``BertModel`` (sentence-transformers models
such as all-MiniLM-L6-v2), ``BertForMaskedLM``, ``BertForPreTraining`` and
``BertForSequenceClassification``; writes the layout of the class matching ``config.head``
(``BertModel``, ``BertForMaskedLM`` or ``BertForSequenceClassification``).

Hugging Face name (``bert.`` prefix when saved with a head)   qkv name
    embeddings.word_embeddings                                tok_emb
    embeddings.position_embeddings                            pos_emb.emb
    embeddings.token_type_embeddings                          type_emb
    embeddings.LayerNorm                                      emb_norm
    encoder.layer.{i}.attention.self.{query,key,value}        layers.{i}.self_attn.{q,k,v}_proj
    encoder.layer.{i}.attention.output.dense                  layers.{i}.self_attn.out_proj
    encoder.layer.{i}.attention.output.LayerNorm              layers.{i}.attn_norm
    encoder.layer.{i}.intermediate.dense                      layers.{i}.mlp.up_proj
    encoder.layer.{i}.output.dense                            layers.{i}.mlp.down_proj
    encoder.layer.{i}.output.LayerNorm                        layers.{i}.mlp_norm
    pooler.dense                                              pooler
    cls.predictions.transform.dense                           head.transform
    cls.predictions.transform.LayerNorm                       head.norm
    cls.predictions.bias (= decoder.bias)                     head.lm_head.bias
    cls.predictions.decoder.weight (tied)                     head.lm_head.weight (= tok_emb)
    classifier                                                head.classifier

Both layouts store every linear weight as (out, in), like ``torch.nn.Linear``: no transposes.
Dropped on reading, by name only: the ``position_ids`` / ``token_type_ids`` buffers older
checkpoints carry, the next-sentence head ``cls.seq_relationship`` of ``BertForPreTraining``
(qkv has none), and the pooler when the config has none (``BertForMaskedLM`` builds none, yet
some of its checkpoints, like bert-base-uncased, still hold one). Every other tensor must map.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from qkv.interop.activations import ACTIVATIONS_FROM_HF, ACTIVATIONS_TO_HF
from qkv.interop.files import CheckpointError
from qkv.interop.registry import Converter, register
from qkv.models.bert import Bert, BertConfig

__all__ = ["bert_config_from_hf", "bert_config_to_hf", "bert_weights_from_hf", "bert_weights_to_hf"]

logger = logging.getLogger(__name__)

Tensors = dict[str, Tensor]

HEAD_FOR_ARCHITECTURE = {
    "BertModel": "none",
    "BertForMaskedLM": "mlm",
    "BertForPreTraining": "mlm",  # its next-sentence head is dropped
    "BertForSequenceClassification": "classification",
}
ARCHITECTURE_FOR_HEAD = {
    "none": "BertModel",
    "mlm": "BertForMaskedLM",
    "classification": "BertForSequenceClassification",
}
ACTIVATIONS = sorted(ACTIVATIONS_FROM_HF)
# Written only where it differs from what the architecture implies (a masked-LM model built
# with a pooler), so that qkv reads back exactly what it wrote; transformers ignores it.
POOLER_KEY = "qkv_add_pooler"

PREFIX = "bert."
BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
NSP_HEAD = "cls.seq_relationship."
TIED_DECODER = "cls.predictions.decoder.weight"
OUTPUT_BIAS, TIED_DECODER_BIAS = "cls.predictions.bias", "cls.predictions.decoder.bias"


def bert_config_from_hf(hf: dict[str, Any]) -> BertConfig:
    """A ``BertConfig`` from a Hugging Face BERT ``config.json``."""
    architectures = hf.get("architectures") or ["BertModel"]
    architecture = architectures[0]
    if architecture not in HEAD_FOR_ARCHITECTURE:
        raise CheckpointError(
            f"BERT architecture {architecture!r} is not supported; qkv reads "
            f"{sorted(HEAD_FOR_ARCHITECTURE)}"
        )
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise CheckpointError("this BERT is configured as a decoder; qkv's Bert is an encoder")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise CheckpointError(
            f"position_embedding_type={hf['position_embedding_type']!r} is not supported; "
            "qkv's Bert uses absolute learned positions"
        )
    act = hf.get("hidden_act", "gelu")
    if act not in ACTIVATIONS_FROM_HF:
        raise CheckpointError(f"hidden_act={act!r} is not supported; use one of {ACTIVATIONS}")
    head = HEAD_FOR_ARCHITECTURE[architecture]
    if head == "mlm" and hf.get("tie_word_embeddings", True) is False:
        raise CheckpointError("a masked-LM BERT with untied output embeddings is not supported")
    id2label = hf.get("id2label")
    num_labels = len(id2label) if id2label else int(hf.get("num_labels", 2))
    return BertConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        d_ff=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 512),
        type_vocab_size=hf.get("type_vocab_size", 2),
        # qkv uses one rate; the two are equal (0.1) in every released BERT. Training only.
        dropout=hf.get("hidden_dropout_prob", 0.1),
        norm_eps=hf.get("layer_norm_eps", 1e-12),
        activation=ACTIVATIONS_FROM_HF[act],
        pad_token_id=hf.get("pad_token_id", 0),
        head=head,  # type: ignore[arg-type]
        num_labels=num_labels,
        add_pooler=hf.get(POOLER_KEY, architecture != "BertForMaskedLM"),
    )


def bert_config_to_hf(config: BertConfig) -> dict[str, Any]:
    """The Hugging Face ``config.json`` of ``config``, for the class matching its head."""
    architecture = ARCHITECTURE_FOR_HEAD[config.head]
    hf: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": "bert",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "intermediate_size": config.d_ff,
        "hidden_act": ACTIVATIONS_TO_HF[config.activation],
        "hidden_dropout_prob": config.dropout,
        "attention_probs_dropout_prob": config.dropout,
        "max_position_embeddings": config.max_seq_len,
        "type_vocab_size": config.type_vocab_size,
        "initializer_range": 0.02,
        "layer_norm_eps": config.norm_eps,
        "pad_token_id": config.pad_token_id,
        "position_embedding_type": "absolute",
        "tie_word_embeddings": True,
    }
    if config.head == "classification":
        hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(config.num_labels)}
        hf["label2id"] = {f"LABEL_{i}": i for i in range(config.num_labels)}
    if config.add_pooler != (architecture != "BertForMaskedLM"):
        hf[POOLER_KEY] = config.add_pooler
    return hf


def _name_pairs(config: BertConfig) -> list[tuple[str, str]]:
    """(qkv name, Hugging Face name without the ``bert.`` prefix) for every mapped tensor."""
    modules = [
        ("tok_emb", "embeddings.word_embeddings"),
        ("pos_emb.emb", "embeddings.position_embeddings"),
        ("type_emb", "embeddings.token_type_embeddings"),
    ]
    pairs = [(f"{q}.weight", f"{h}.weight") for q, h in modules]
    modules = [("emb_norm", "embeddings.LayerNorm")]
    for i in range(config.n_layers):
        q, h = f"layers.{i}.", f"encoder.layer.{i}."
        modules += [
            (q + "self_attn.q_proj", h + "attention.self.query"),
            (q + "self_attn.k_proj", h + "attention.self.key"),
            (q + "self_attn.v_proj", h + "attention.self.value"),
            (q + "self_attn.out_proj", h + "attention.output.dense"),
            (q + "attn_norm", h + "attention.output.LayerNorm"),
            (q + "mlp.up_proj", h + "intermediate.dense"),
            (q + "mlp.down_proj", h + "output.dense"),
            (q + "mlp_norm", h + "output.LayerNorm"),
        ]
    if config.add_pooler:
        modules.append(("pooler", "pooler.dense"))
    if config.head == "mlm":
        modules += [
            ("head.transform", "cls.predictions.transform.dense"),
            ("head.norm", "cls.predictions.transform.LayerNorm"),
        ]
        pairs.append(("head.lm_head.bias", OUTPUT_BIAS))
    elif config.head == "classification":
        modules.append(("head.classifier", "classifier"))
    pairs += [(f"{q}.{p}", f"{h}.{p}") for q, h in modules for p in ("weight", "bias")]
    return pairs


def _is_head_name(name: str) -> bool:
    """Heads sit beside the ``bert.`` prefix in Hugging Face's layout, not under it."""
    return name.startswith(("cls.", "classifier."))


def bert_weights_from_hf(tensors: Tensors, config: BertConfig) -> Tensors:
    """Hugging Face BERT tensors renamed to ``Bert``'s state_dict (unknown names kept as-is,
    so that strict loading names them)."""
    original = {name.removeprefix(PREFIX): name for name in tensors}
    plain = {name: tensors[full] for name, full in original.items()}  # prefix stripped
    for name in [n for n in plain if n in BUFFERS]:
        del plain[name]
    unused = [n for n in plain if n.startswith(NSP_HEAD)]
    if not config.add_pooler:
        unused += [n for n in plain if n.startswith("pooler.")]
    if unused:
        logger.info("BERT checkpoint: not loading %s (no such module in this config)", unused)
    for name in unused:
        del plain[name]
    if config.head == "mlm":
        decoder = plain.pop(TIED_DECODER, None)
        words = plain.get("embeddings.word_embeddings.weight")
        if decoder is not None and words is not None and not torch.equal(decoder, words):
            raise CheckpointError(
                f"{TIED_DECODER} differs from the word embeddings; qkv's masked-LM head ties them"
            )
        decoder_bias = plain.pop(TIED_DECODER_BIAS, None)
        if OUTPUT_BIAS not in plain and decoder_bias is not None:
            plain[OUTPUT_BIAS] = decoder_bias
    out: Tensors = {}
    for q, h in _name_pairs(config):
        if h in plain:
            out[q] = plain.pop(h)
    if config.head == "mlm" and "tok_emb.weight" in out:
        out["head.lm_head.weight"] = out["tok_emb.weight"]  # the tied decoder
    # Leftovers keep their checkpoint names; strict loading reports them as unexpected.
    out.update({original[n]: t for n, t in plain.items()})
    return out


def bert_weights_to_hf(tensors: Tensors, config: BertConfig) -> Tensors:
    """``Bert``'s state_dict renamed to the Hugging Face class matching ``config.head``."""
    prefix = "" if config.head == "none" else PREFIX
    out: Tensors = {}
    for q, h in _name_pairs(config):
        out[h if _is_head_name(h) else prefix + h] = tensors[q]
    return out  # head.lm_head.weight is tok_emb.weight: transformers re-ties it on loading


register(
    Converter(
        model_class=Bert,
        model_types=("bert",),
        config_from_hf=bert_config_from_hf,
        config_to_hf=bert_config_to_hf,
        weights_from_hf=bert_weights_from_hf,
        weights_to_hf=bert_weights_to_hf,
    )
)
