"""LoRA adapters in the file layout of Hugging Face's PEFT library, both directions.

An adapter directory, as ``peft.PeftModel.save_pretrained`` writes it and
``peft.PeftModel.from_pretrained`` reads it::

    adapter_config.json         {"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                                 "target_modules": ["q_proj", "v_proj"], ...}
    adapter_model.safetensors   base_model.model.<module>.lora_A.weight   (r, d_in)
                                base_model.model.<module>.lora_B.weight   (d_out, r)

``<module>`` is the layer's name in the *transformers* model that qkv exports (``save_pretrained``),
so ``layers.0.self_attn.out_proj`` of a qkv ``Llama`` is ``model.layers.0.self_attn.o_proj``.
These names come from the family's converter (``hf_<family>.py``): a layer whose weight the
converter only renames maps one to one, with A and B unchanged (PEFT keeps them in
``nn.Linear``'s (out, in) layout whatever the base layer is).

The scaling is alpha / r, as in qkv's ``LoRALinear``; per-layer ranks and alphas go to PEFT's
``rank_pattern`` and ``alpha_pattern``. PEFT's variants that change the computation (DoRA,
rsLoRA, trained biases, fully trained ``modules_to_save``) are refused with a named error.

GPT-2 is refused too, because its converter does more than rename: transformers' GPT-2 computes
q, k and v with one fused ``Conv1D`` ``c_attn`` (D -> 3D), where qkv has three projections. A
PEFT adapter on ``c_attn`` is one A (r, D) and one B (3D, r): the three row blocks of B share A.
It could be read exactly (each of q, k, v gets that A and its rows of B), and qkv's separate
adapters could be written exactly as one adapter of rank r_q + r_k + r_v (A stacked, B block
diagonal), but then saving and loading would not round-trip (rank r on q and v comes back as
rank 2r on all three, k included) and the file would carry zeros. Until that trade is chosen on
purpose, an adapter for a GPT-2 model raises an error saying so; the Llama family (Llama,
Mistral) maps one to one.

Shapes: r the rank, d_in and d_out a layer's input and output widths.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from qkv._io import atomic_write, atomic_write_json
from qkv.blocks.lora import LoRALinear, LoRAReport, apply_lora
from qkv.interop.files import CheckpointError, read_safetensors
from qkv.interop.registry import Converter, converter_for_class
from qkv.models.base import QkvModel

__all__ = ["ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME", "load_peft_adapter", "save_peft_adapter"]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model
_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<matrix>[AB])\.weight")

# adapter_config.json settings qkv's LoRALinear cannot honour: key -> the value it must have.
_UNSUPPORTED = {
    "bias": "none",  # trained biases
    "use_dora": False,  # weight-decomposed LoRA
    "use_rslora": False,  # scaling alpha / sqrt(r)
    "lora_bias": False,  # a bias on lora_B
    "modules_to_save": None,  # whole layers trained and saved beside the adapters
    "target_parameters": None,  # adapters on raw parameters (MoE experts)
    "layer_replication": None,
}


def _converter(model: nn.Module) -> Converter:
    converter = converter_for_class(type(model)) if isinstance(model, QkvModel) else None
    experts = getattr(getattr(model, "config", None), "experts", None) is not None
    if converter is None or experts:
        what = "with experts in place of its feed-forward networks " if experts else ""
        raise CheckpointError(
            f"{type(model).__name__} {what}has no Hugging Face counterpart, so a PEFT adapter "
            "for it has no transformers module names; save the adapters with qkv's "
            "lora_state_dict(model) instead"
        )
    return converter


def _base_state(model: nn.Module) -> dict[str, Tensor]:
    """The model's parameters under their names before ``apply_lora``, without the adapters
    (``x.base.weight`` -> ``x.weight``); the very tensors, not copies."""
    adapted = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    state = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        module, _, leaf = key.rpartition(".")
        if module in adapted:  # lora_A, lora_B
            continue
        owner, _, child = module.rpartition(".")
        state[f"{owner}.{leaf}" if child == "base" and owner in adapted else key] = tensor
    return state


@torch.no_grad()
def _hf_module_names(model: nn.Module) -> dict[str, str]:
    """qkv linear layer -> transformers module, for every linear layer the converter renames.

    Found by running the converter over the model's own tensors: a weight that comes out
    under a new name as the very same tensor object was only renamed. Layers it transforms
    (transposed, fused, stacked) are left out.
    """
    converter = _converter(model)
    state = _base_state(model)
    hf_tensors = converter.weights_to_hf(state, model.config)
    hf_name_of = {id(t): name for name, t in hf_tensors.items()}
    names = {}
    for name in state:
        hf_name = hf_name_of.get(id(state[name]))
        if name.endswith(".weight") and hf_name is not None and hf_name.endswith(".weight"):
            names[name.removesuffix(".weight")] = hf_name.removesuffix(".weight")
    return names


def _refuse_gpt2(model: nn.Module) -> None:
    if _converter(model).model_types == ("gpt2",):
        raise CheckpointError(
            "PEFT adapters for GPT-2 are not supported: transformers' GPT-2 fuses q, k and v "
            "into one Conv1D c_attn whose LoRA shares one A across the three, so qkv's "
            "separate q_proj/k_proj/v_proj adapters do not map one to one (see "
            "qkv.interop.peft); the Llama family does"
        )


def _peft_suffixes(adapted: list[str], modules: list[str]) -> list[str]:
    """Short name endings that PEFT's ``target_modules`` list matches onto exactly ``adapted``
    among ``modules``: for each adapted module, its shortest ending (not starting at a layer
    number) that matches no other module (``q_proj`` when every q_proj is adapted,
    ``layers.1.self_attn.o_proj`` when only that one is)."""

    def matches(module: str, suffix: str) -> bool:  # PEFT's rule for a list of names
        return module == suffix or module.endswith("." + suffix)

    chosen = set()
    for name in adapted:
        parts = name.split(".")
        for i in reversed(range(len(parts))):  # q_proj, self_attn.q_proj, ..., the full name
            ending = ".".join(parts[i:])
            if parts[i].isdigit():  # not "1.self_attn.o_proj": "layers.1.self_attn.o_proj"
                continue
            if i == 0 or all(m in adapted for m in modules if matches(m, ending)):
                chosen.add(ending)
                break
    return sorted(chosen)


def _most_common(values: dict[str, Any]) -> Any:
    return Counter(values.values()).most_common(1)[0][0]


def save_peft_adapter(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    base_model_name_or_path: str | None = None,
    task_type: str = "CAUSAL_LM",
) -> Path:
    """Write ``model``'s LoRA adapters as a PEFT adapter directory.

    ``peft.PeftModel.from_pretrained(hf_model, directory)`` then adapts the transformers model
    that ``model.save_pretrained`` writes (before ``merge_lora``) exactly as qkv did.

    Args:
        model: a qkv model with unmerged adapters from ``apply_lora``.
        directory: created if needed; ``adapter_config.json`` and
            ``adapter_model.safetensors`` are written atomically.
        base_model_name_or_path: recorded in the config, for PEFT to find the base model.
        task_type: PEFT's task type ("CAUSAL_LM" for decoders).

    Raises:
        CheckpointError: the model has no adapters, a merged one, or an adapter on a layer
            without a one-to-one transformers counterpart (any GPT-2 model).
    """
    _refuse_gpt2(model)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    if not layers:
        raise CheckpointError(f"{type(model).__name__} has no LoRA adapters; see apply_lora")
    merged = [n for n, m in layers.items() if m.merged]
    if merged:
        raise CheckpointError(
            f"adapters {merged[:3]} are merged into their base weights; unmerge() them before "
            "saving, or PEFT would add the update to weights that already hold it"
        )
    hf_names = _hf_module_names(model)
    missing = [n for n in layers if n not in hf_names]
    if missing:
        raise CheckpointError(
            f"layers {missing[:3]} have no one-to-one transformers counterpart, so PEFT cannot "
            "load their adapters; adapt other layers"
        )
    ranks = {hf_names[n]: m.rank for n, m in layers.items()}
    alphas = {hf_names[n]: m.alpha for n, m in layers.items()}
    r, alpha = _most_common(ranks), _most_common(alphas)
    all_modules = sorted(set(hf_names.values()))
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": max(m.dropout.p for m in layers.values()),
        "target_modules": _peft_suffixes(sorted(ranks), all_modules),
        "rank_pattern": {name: rank for name, rank in ranks.items() if rank != r},
        "alpha_pattern": {name: a for name, a in alphas.items() if a != alpha},
        "bias": "none",
        "fan_in_fan_out": False,  # the base layers are nn.Linear, weights (out, in)
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "use_rslora": False,
        "use_dora": False,
        "revision": None,
    }
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{PREFIX}{hf_names[name]}.lora_A.weight"] = layer.lora_A  # (r, d_in)
        tensors[f"{PREFIX}{hf_names[name]}.lora_B.weight"] = layer.lora_B  # (d_out, r)
    plain = {k: t.detach().cpu().contiguous().clone() for k, t in tensors.items()}
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt"}
    atomic_write(out / ADAPTER_WEIGHTS_NAME, lambda tmp: save_file(plain, tmp, metadata=meta))
    atomic_write_json(out / ADAPTER_CONFIG_NAME, config)
    return out


def _read_adapter_config(directory: Path) -> dict[str, Any]:
    path = directory / ADAPTER_CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(
            f"{directory} has no {ADAPTER_CONFIG_NAME}; is it a PEFT adapter directory?"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise CheckpointError(f"{path} holds a {kind!r} adapter; qkv reads LoRA adapters only")
    for key, supported in _UNSUPPORTED.items():
        if config.get(key, supported) not in (supported, [], {}):
            raise CheckpointError(
                f"{path} has {key}={config[key]!r}; qkv's LoRALinear supports only "
                f"{key}={supported!r}"
            )
    return config


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key that ``module``
    ends with, as a regular expression after a dot."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def load_peft_adapter(model: nn.Module, directory: str | os.PathLike[str]) -> LoRAReport:
    """Put the LoRA adapters of a PEFT adapter directory on ``model``, in place.

    The counterpart of ``save_peft_adapter``: reads what ``PeftModel.save_pretrained`` wrote
    for the transformers model that ``model.save_pretrained`` exports. Each adapted layer gets
    a ``LoRALinear`` with the file's A and B (its rank read from their shapes); every other
    parameter is frozen, as with ``apply_lora``.

    Returns:
        A ``LoRAReport`` over every adapter the model now has.

    Raises:
        CheckpointError: the directory is not a LoRA adapter qkv can compute, or it was made
            for another architecture or size (a module this model lacks, a shape that differs).
    """
    _refuse_gpt2(model)
    folder = Path(directory)
    config = _read_adapter_config(folder)
    tensors = read_safetensors(folder / ADAPTER_WEIGHTS_NAME)
    qkv_names = {hf: ours for ours, hf in _hf_module_names(model).items()}
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        found = _KEY.fullmatch(key)
        if found is None:
            raise CheckpointError(
                f"{folder / ADAPTER_WEIGHTS_NAME} holds {key!r}, which is not a LoRA weight "
                "of a linear layer (base_model.model.<module>.lora_A.weight / .lora_B.weight)"
            )
        pairs.setdefault(found["module"], {})[found["matrix"]] = tensor
    unknown = sorted(m for m in pairs if m not in qkv_names)
    if unknown:
        raise CheckpointError(
            f"the adapter targets {unknown[:3]}, which {type(model).__name__} does not have as "
            f"linear layers (it has e.g. {sorted(qkv_names)[:3]}); was it made for another "
            "architecture or number of layers?"
        )
    if not pairs:
        raise CheckpointError(f"{folder / ADAPTER_WEIGHTS_NAME} holds no adapter weights")
    groups: dict[tuple[int, float], list[str]] = {}  # (rank, alpha) -> qkv layer names
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise CheckpointError(f"the adapter of {module} has lora_{''.join(pair)} only")
        a, b, base = pair["A"], pair["B"], model.get_submodule(qkv_names[module])
        d_in, d_out = getattr(base, "in_features", None), getattr(base, "out_features", None)
        if a.dim() != 2 or a.shape[1] != d_in or b.shape != (d_out, a.shape[0]):
            raise CheckpointError(
                f"the adapter of {module} has A {tuple(a.shape)} and B {tuple(b.shape)}, but "
                f"{qkv_names[module]} maps {d_in} -> {d_out} features (A must be (r, {d_in}), "
                f"B ({d_out}, r)); was it made for a model of another size?"
            )
        rank = a.shape[0]  # (rank_pattern may say so too; the tensors are what counts)
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        groups.setdefault((rank, alpha), []).append(qkv_names[module])
    dropout = float(config.get("lora_dropout", 0.0))
    for (rank, alpha), names in groups.items():
        report = apply_lora(model, names, rank=rank, alpha=alpha, dropout=dropout)
    with torch.no_grad():
        for module, pair in pairs.items():
            layer = model.get_submodule(qkv_names[module])
            assert isinstance(layer, LoRALinear)
            layer.lora_A.copy_(pair["A"])  # (r, d_in)
            layer.lora_B.copy_(pair["B"])  # (d_out, r)
    adapted = tuple(n for n, m in model.named_modules() if isinstance(m, LoRALinear))
    return LoRAReport(adapted, report.trainable, report.total)
