"""Hugging Face Mixtral checkpoints <-> ``qkv.models.mixtral.Mixtral``.

Reads and writes ``model_type`` "mixtral" (``MixtralForCausalLM``). Attention, norms,
embeddings and head are LLaMA's and go through ``hf_llama``; this module maps the experts.
Checkpoint files (the Hub's, and what transformers 5 writes) keep one tensor per expert matrix;
transformers 5 stacks them in memory (its ``state_dict``), and both layouts are read::

    qkv                                    Hugging Face file            transformers 5 in memory
    layers.{i}.mlp.router                  ...block_sparse_moe.gate     ...mlp.gate
    layers.{i}.mlp.experts.{e}.gate_proj   ...block_sparse_moe          ...mlp.experts.gate_up_proj
                                              .experts.{e}.w1              [e, :F]   (X, 2F, D)
    layers.{i}.mlp.experts.{e}.up_proj     ... .experts.{e}.w3             [e, F:]
    layers.{i}.mlp.experts.{e}.down_proj   ... .experts.{e}.w2          ...mlp.experts.down_proj
                                                                           [e]       (X, D, F)

(``...`` is ``model.layers.{i}``; every matrix is ``nn.Linear``'s (out, in) on both sides.)
Written checkpoints use the file layout, which transformers 4 and 5 both load.

Switch's ``capacity_factor`` and the router z-loss weight have no counterpart in transformers,
which never drops tokens: they are written as extra config keys (that transformers keeps and
ignores) so that qkv reads them back, with a warning when the capacity would change results.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any

from torch import Tensor

from qkv.interop.files import CheckpointError
from qkv.interop.hf_llama import (
    llama_config_from_hf,
    llama_config_to_hf,
    llama_weights_from_hf,
    llama_weights_to_hf,
)
from qkv.interop.registry import Converter, register
from qkv.models.mixtral import Mixtral, MixtralConfig

__all__ = [
    "mixtral_config_from_hf",
    "mixtral_config_to_hf",
    "mixtral_weights_from_hf",
    "mixtral_weights_to_hf",
]

logger = logging.getLogger(__name__)

Tensors = dict[str, Tensor]

# transformers' MixtralConfig defaults, where they differ from LLaMA's.
_HF_DEFAULTS = {"rope_theta": 1e6, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096 * 32}

# --8<-- [start:names]
# Inside layers.{i}.mlp.experts.{e} (qkv) and model.layers.{i}.block_sparse_moe.experts.{e}.
_EXPERT_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_FILE = re.compile(
    r"model\.layers\.(\d+)\.block_sparse_moe\.(gate|experts\.(\d+)\.(w[123]))\.weight"
)
_STACKED = re.compile(
    r"model\.layers\.(\d+)\.mlp\.(gate\.weight|experts\.gate_up_proj|experts\.down_proj)"
)
# --8<-- [end:names]


def mixtral_config_from_hf(hf: dict[str, Any]) -> MixtralConfig:
    """A ``MixtralConfig`` from a Hugging Face Mixtral ``config.json`` dict."""
    if hf.get("router_jitter_noise", 0.0):
        raise CheckpointError(
            f"router_jitter_noise={hf['router_jitter_noise']} is unsupported: qkv's Mixtral "
            "routes without noise; set it to 0.0"
        )
    base = llama_config_from_hf({**_HF_DEFAULTS, **hf})  # attention, norms, sizes, token ids
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    return MixtralConfig(
        **{**fields, "sliding_window": hf.get("sliding_window")},
        n_experts=hf.get("num_local_experts", 8),
        top_k=hf.get("num_experts_per_tok", 2),
        router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.001),
        router_z_loss_coef=hf.get("router_z_loss_coef", 0.0),  # qkv's own key
        capacity_factor=hf.get("capacity_factor"),  # qkv's own key
    )


def mixtral_config_to_hf(config: MixtralConfig) -> dict[str, Any]:
    """A Hugging Face ``config.json`` dict for ``MixtralForCausalLM``."""
    hf = llama_config_to_hf(config)
    for key in ("attention_bias", "mlp_bias"):  # LLaMA's keys, absent from Mixtral's config
        hf.pop(key, None)
    hf.update(
        architectures=["MixtralForCausalLM"],
        model_type="mixtral",
        sliding_window=config.sliding_window,
        num_local_experts=config.n_experts,
        num_experts_per_tok=config.top_k,
        router_aux_loss_coef=config.router_aux_loss_coef,
        router_jitter_noise=0.0,
        output_router_logits=False,
    )
    if config.router_z_loss_coef:
        hf["router_z_loss_coef"] = config.router_z_loss_coef
    if config.capacity_factor is not None:
        logger.warning(
            "capacity_factor=%s is written to config.json for qkv, but transformers' Mixtral "
            "ignores it and drops no tokens, so its outputs may differ from qkv's",
            config.capacity_factor,
        )
        hf["capacity_factor"] = config.capacity_factor
    return hf


def _ours(layer: str, expert: int | str, proj: str) -> str:
    return f"layers.{layer}.mlp.experts.{expert}.{proj}.weight"


def mixtral_weights_from_hf(tensors: Tensors, config: MixtralConfig) -> Tensors:
    """Rename (and unstack) Hugging Face tensors to ``Mixtral``'s state_dict names.

    Unknown names pass through unchanged, so that the strict loader names them.
    """
    ours_by_file = {theirs: ours for ours, theirs in _EXPERT_NAMES.items()}
    out: Tensors = {}
    rest: Tensors = {}
    for name, t in tensors.items():
        if m := _FILE.fullmatch(name):
            layer, what, expert, w = m.groups()
            if what == "gate":
                out[f"layers.{layer}.mlp.router.weight"] = t  # (X, D)
            else:
                out[_ours(layer, expert, ours_by_file[w])] = t
        elif m := _STACKED.fullmatch(name):
            layer, what = m.groups()
            if what == "gate.weight":
                out[f"layers.{layer}.mlp.router.weight"] = t  # (X, D)
            elif what == "experts.gate_up_proj":  # (X, 2F, D): gate rows, then up rows
                gates, ups = t.chunk(2, dim=1)  # (X, F, D) each
                for e, (gate, up) in enumerate(zip(gates, ups, strict=True)):
                    out[_ours(layer, e, "gate_proj")] = gate  # (F, D)
                    out[_ours(layer, e, "up_proj")] = up  # (F, D)
            else:  # (X, D, F)
                for e, down in enumerate(t.unbind(0)):
                    out[_ours(layer, e, "down_proj")] = down  # (D, F)
        else:
            rest[name] = t
    return {**llama_weights_from_hf(rest, config), **out}


def mixtral_weights_to_hf(tensors: Tensors, config: MixtralConfig) -> Tensors:
    """Rename ``Mixtral``'s state_dict to the Hugging Face file layout (one tensor per expert)."""
    out: Tensors = {}
    rest: Tensors = {}
    for name, t in tensors.items():
        parts = name.split(".")  # layers.{i}.mlp.router.weight, layers.{i}.mlp.experts.{e}.*
        if len(parts) >= 4 and parts[0] == "layers" and parts[2] == "mlp":
            prefix = f"model.layers.{parts[1]}.block_sparse_moe"
            if parts[3] == "router":
                out[f"{prefix}.gate.weight"] = t
            else:
                out[f"{prefix}.experts.{parts[4]}.{_EXPERT_NAMES[parts[5]]}.weight"] = t
        else:
            rest[name] = t
    return {**llama_weights_to_hf(rest, config), **out}


register(
    Converter(
        model_class=Mixtral,
        model_types=("mixtral",),
        config_from_hf=mixtral_config_from_hf,
        config_to_hf=mixtral_config_to_hf,
        weights_from_hf=mixtral_weights_from_hf,
        weights_to_hf=mixtral_weights_to_hf,
    )
)
