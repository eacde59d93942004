"""ViT <-> Hugging Face ``transformers`` (model_type "vit"): config keys and tensor names.

Two Hugging Face classes are read and written:
    * ``ViTForImageClassification``: tensors under ``vit.`` plus ``classifier``; no pooler. It
      maps to ``ViT`` with ``num_labels > 0`` (or ``num_labels = 0``: no head, no pooler).
    * ``ViTModel`` (the backbone, e.g. google/vit-base-patch16-224-in21k): tensors without a
      prefix, with the pooler ``pooler.dense`` (``add_pooling_layer=True``, its default). It
      maps to ``ViT`` with ``num_labels=0, pooler=True``. A ViTModel saved with
      ``add_pooling_layer=False`` cannot be told apart from its config alone and is refused
      with a clear error; save it as ``ViTForImageClassification`` with ``num_labels=0``.

The layouts agree tensor for tensor: no transposes, no splits; the position embeddings only
lose their leading batch axis, (1, T, D) -> (T, D).
"""

from __future__ import annotations

import logging
from typing import Any

from torch import Tensor

from qkv.interop.activations import ACTIVATIONS_FROM_HF
from qkv.interop.files import CheckpointError
from qkv.interop.registry import Converter, register
from qkv.models.vit import ViT, ViTConfig

__all__ = ["vit_config_from_hf", "vit_config_to_hf", "vit_weights_from_hf", "vit_weights_to_hf"]

logger = logging.getLogger(__name__)

Tensors = dict[str, Tensor]

CLASSIFIER, BACKBONE = "ViTForImageClassification", "ViTModel"


def _square(hf: dict[str, Any], key: str) -> int:
    value = hf[key]
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise CheckpointError(f"qkv's ViT takes square {key}, got {value}")
        value = value[0]
    return int(value)


def _architecture(hf: dict[str, Any]) -> str:
    archs = hf.get("architectures") or [CLASSIFIER]
    known = [a for a in archs if a in (CLASSIFIER, BACKBONE)]
    if not known:
        raise CheckpointError(
            f"ViT architecture {archs} is not supported; qkv reads {CLASSIFIER} and {BACKBONE}"
        )
    return known[0]


def vit_config_from_hf(hf: dict[str, Any]) -> ViTConfig:
    """A ``ViTConfig`` from a Hugging Face ViT ``config.json``."""
    if not hf.get("qkv_bias", True):
        raise CheckpointError("qkv_bias=False is not supported: qkv's ViT has q/k/v biases")
    act = hf.get("hidden_act", "gelu")
    if act not in ACTIVATIONS_FROM_HF:
        raise CheckpointError(
            f"hidden_act={act!r} is not supported; qkv reads {list(ACTIVATIONS_FROM_HF)}"
        )
    backbone = _architecture(hf) == BACKBONE
    d_model = hf.get("hidden_size", 768)
    if backbone and (
        hf.get("pooler_output_size", d_model) != d_model or hf.get("pooler_act", "tanh") != "tanh"
    ):
        raise CheckpointError("qkv's ViT pooler is tanh(dense) of width hidden_size")
    if "num_labels" in hf:
        num_labels = int(hf["num_labels"])
    else:
        num_labels = len(hf["id2label"]) if "id2label" in hf else 2  # transformers' default
    dropout = hf.get("hidden_dropout_prob", 0.0)
    if hf.get("attention_probs_dropout_prob", dropout) != dropout:
        logger.info("qkv's ViT has one dropout rate; using hidden_dropout_prob=%s", dropout)
    return ViTConfig(
        image_size=_square(hf, "image_size") if "image_size" in hf else 224,
        patch_size=_square(hf, "patch_size") if "patch_size" in hf else 16,
        num_channels=hf.get("num_channels", 3),
        d_model=d_model,
        n_layers=hf.get("num_hidden_layers", 12),
        n_heads=hf.get("num_attention_heads", 12),
        d_ff=hf.get("intermediate_size", 3072),
        num_labels=0 if backbone else num_labels,
        pooler=backbone,
        dropout=dropout,
        norm_eps=hf.get("layer_norm_eps", 1e-12),
        activation=ACTIVATIONS_FROM_HF[act],
    )


def vit_config_to_hf(config: ViTConfig) -> dict[str, Any]:
    """A Hugging Face ViT ``config.json`` for ``config``."""
    c = config
    hf_act = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "silu": "silu"}
    return {
        "model_type": "vit",
        "architectures": [BACKBONE if c.pooler else CLASSIFIER],
        "image_size": c.image_size,
        "patch_size": c.patch_size,
        "num_channels": c.num_channels,
        "hidden_size": c.d_model,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "intermediate_size": c.d_ff,
        "hidden_act": hf_act[c.activation],
        "hidden_dropout_prob": c.dropout,
        "attention_probs_dropout_prob": c.dropout,
        "layer_norm_eps": c.norm_eps,
        "initializer_range": 0.02,
        "qkv_bias": True,
        "pooler_output_size": c.d_model,
        "pooler_act": "tanh",
        "id2label": {str(i): f"LABEL_{i}" for i in range(c.num_labels)},
        "label2id": {f"LABEL_{i}": i for i in range(c.num_labels)},
    }


def _names(config: ViTConfig) -> list[tuple[str, str]]:
    """(qkv name, Hugging Face name without the ``vit.`` prefix) for every tensor."""
    names = [
        ("cls_token", "embeddings.cls_token"),
        ("pos_emb.emb.weight", "embeddings.position_embeddings"),
        ("patch_emb.weight", "embeddings.patch_embeddings.projection.weight"),
        ("patch_emb.bias", "embeddings.patch_embeddings.projection.bias"),
    ]
    for i in range(config.n_layers):
        ours, hf = f"layers.{i}.", f"encoder.layer.{i}."
        for qkv_part, hf_part in [
            ("self_attn.q_proj", "attention.attention.query"),
            ("self_attn.k_proj", "attention.attention.key"),
            ("self_attn.v_proj", "attention.attention.value"),
            ("self_attn.out_proj", "attention.output.dense"),
            ("mlp.up_proj", "intermediate.dense"),
            ("mlp.down_proj", "output.dense"),
            ("attn_norm", "layernorm_before"),
            ("mlp_norm", "layernorm_after"),
        ]:
            for p in ("weight", "bias"):
                names.append((f"{ours}{qkv_part}.{p}", f"{hf}{hf_part}.{p}"))
    names += [("final_norm.weight", "layernorm.weight"), ("final_norm.bias", "layernorm.bias")]
    if config.pooler:
        names += [("pooler.weight", "pooler.dense.weight"), ("pooler.bias", "pooler.dense.bias")]
    return names


def _head_names(config: ViTConfig) -> list[tuple[str, str]]:
    """The classifier, which sits outside the ``vit.`` prefix."""
    if not config.num_labels:
        return []
    return [("head.weight", "classifier.weight"), ("head.bias", "classifier.bias")]


def vit_weights_from_hf(tensors: Tensors, config: ViTConfig) -> Tensors:
    """Hugging Face ViT tensors -> ``ViT`` state_dict; every tensor must be used."""
    prefix = "vit." if any(k.startswith("vit.") for k in tensors) else ""
    pairs = [(q, prefix + h) for q, h in _names(config)] + _head_names(config)
    missing = [h for _, h in pairs if h not in tensors]
    if missing:
        hint = ""
        if config.pooler and any("pooler" in h for h in missing):
            hint = (
                " (a ViTModel saved with add_pooling_layer=False: qkv reads ViTModel with its "
                "pooler, or ViTForImageClassification, num_labels=0 for a backbone without one)"
            )
        raise CheckpointError(f"ViT checkpoint lacks tensors {missing[:5]}{hint}")
    unexpected = sorted(set(tensors) - {h for _, h in pairs})
    if unexpected:
        raise CheckpointError(
            f"ViT checkpoint has tensors qkv's ViT does not use: {unexpected[:5]}; "
            f"qkv reads {CLASSIFIER} and {BACKBONE} (with its pooler)"
        )
    out = {q: tensors[h] for q, h in pairs}
    out["pos_emb.emb.weight"] = out["pos_emb.emb.weight"].squeeze(0)  # (1, T, D) -> (T, D)
    return out


def vit_weights_to_hf(tensors: Tensors, config: ViTConfig) -> Tensors:
    """``ViT`` state_dict -> Hugging Face tensors (ViTModel when pooled, else the classifier)."""
    prefix = "" if config.pooler else "vit."
    out = {prefix + h: tensors[q] for q, h in _names(config)}
    out.update({h: tensors[q] for q, h in _head_names(config)})
    pos = prefix + "embeddings.position_embeddings"
    out[pos] = out[pos].unsqueeze(0)  # (T, D) -> (1, T, D)
    return out


register(
    Converter(
        model_class=ViT,
        model_types=("vit",),
        config_from_hf=vit_config_from_hf,
        config_to_hf=vit_config_to_hf,
        weights_from_hf=vit_weights_from_hf,
        weights_to_hf=vit_weights_to_hf,
    )
)
