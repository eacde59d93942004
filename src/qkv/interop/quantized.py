"""Checkpoints of quantised models: the ``quantization`` entry of qkv's config and its layers.

A model whose linear layers were quantised (``qkv.blocks.quant``, ``qkv quantize``) is saved in
qkv's own layout, whatever its family: Hugging Face's layouts have no place for int8 or packed
int4 tensors and their scales. Its ``config.json`` reads

    {"qkv_family": "gpt", "qkv_version": ..., "config": {...},
     "quantization": {"bits": 4, "group_size": 128}}

and ``model.safetensors`` holds, for each quantised layer, ``<name>.qweight`` (int8 (N, K), or
uint8 (N, K/2) with two 4-bit values per byte), ``<name>.scales`` (and ``<name>.offsets`` for
int4) beside the other tensors under qkv's names. Loading builds the floating-point model from
the config, replaces the layers that have a ``qweight`` in the file by empty quantised ones,
then loads the tensors strictly. A tensor the model ties to another (GPT's output head is its
token embedding) is stored once, under its first name, and given to both names on loading.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from qkv.blocks.quant import QuantConfig, prepare_quantized
from qkv.interop.files import CheckpointError

__all__ = ["QUANTIZATION_KEY", "prepare_for_quantized_weights", "without_tied_copies"]

QUANTIZATION_KEY = "quantization"
_QWEIGHT = ".qweight"


def _tied_names(model: nn.Module) -> list[list[str]]:
    """Groups of state-dict names that hold one tensor (tied weights), in the model's order."""
    groups: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def without_tied_copies(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` without the second and later names of each tied tensor."""
    drop = {name for names in _tied_names(model) for name in names[1:]}
    return {name: tensor for name, tensor in state.items() if name not in drop}


def prepare_for_quantized_weights(model: nn.Module, entry: Any, tensors: dict[str, Tensor]) -> None:
    """Make ``model`` (built from a quantised checkpoint's config) ready for its tensors.

    Args:
        model: the floating-point model of the checkpoint's family and config.
        entry: the config's ``quantization`` entry.
        tensors: the checkpoint's tensors; each ``<name>.qweight`` names a quantised layer.
            Tied tensors stored once are added under their other names.
    """
    if not isinstance(entry, dict):
        raise CheckpointError(f"the config's {QUANTIZATION_KEY!r} entry must be an object")
    try:
        config = QuantConfig.from_dict(entry)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"the config's {QUANTIZATION_KEY!r} entry is invalid: {e}") from None
    names = sorted(key.removesuffix(_QWEIGHT) for key in tensors if key.endswith(_QWEIGHT))
    if not names:
        raise CheckpointError(
            f"the config says the model is quantised ({entry}), but the weights hold no "
            f"'*{_QWEIGHT}' tensor: the files do not belong together"
        )
    try:
        prepare_quantized(model, config, names)
    except (AttributeError, ValueError) as e:
        raise CheckpointError(
            f"the quantised weights do not fit {type(model).__name__}: {e}"
        ) from None
    for tied in _tied_names(model):
        stored = [name for name in tied if name in tensors]
        for name in tied if stored else []:
            tensors.setdefault(name, tensors[stored[0]])
