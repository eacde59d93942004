"""The table of Hugging Face converters: which qkv family reads which ``model_type``.

Each ``hf_<family>.py`` module describes its mapping with a ``Converter`` and registers it here.
A converter is four plain functions, two per direction:

    config_from_hf(hf_config: dict) -> qkv config
    config_to_hf(qkv config) -> dict
    weights_from_hf(tensors, qkv config) -> tensors
    weights_to_hf(tensors, qkv config) -> tensors

``weights_from_hf`` renames (and, where the layouts differ, transposes or splits) Hugging Face
tensors into the model's own ``state_dict`` names; ``weights_to_hf`` is its inverse.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from qkv.models.base import QkvModel

__all__ = ["Converter", "converter_for_class", "converter_for_model_type", "register"]

Tensors = dict[str, Tensor]


# --8<-- [start:converter]
@dataclass(frozen=True)
class Converter:
    """How one qkv model class maps to and from one Hugging Face architecture."""

    model_class: type[QkvModel]
    model_types: tuple[str, ...]  # Hugging Face config "model_type" values this reads
    config_from_hf: Callable[[dict[str, Any]], Any]
    config_to_hf: Callable[[Any], dict[str, Any]]
    weights_from_hf: Callable[[Tensors, Any], Tensors]
    weights_to_hf: Callable[[Tensors, Any], Tensors]
    # Optional: choose among several qkv classes for one model_type (e.g. a BERT with a
    # masked-LM head or a classifier); returns True when this converter fits the config.
    accepts: Callable[[dict[str, Any]], bool] | None = None


# --8<-- [end:converter]


_CONVERTERS: list[Converter] = []


def register(converter: Converter) -> Converter:
    """Add a converter to the table (each hf_<family>.py calls this once per class)."""
    _CONVERTERS.append(converter)
    return converter


def converter_for_model_type(hf_config: dict[str, Any]) -> Converter | None:
    """The converter that reads this Hugging Face config, or None."""
    model_type = hf_config.get("model_type")
    candidates = [c for c in _CONVERTERS if model_type in c.model_types]
    for c in candidates:
        if c.accepts is None or c.accepts(hf_config):
            return c
    return None


def converter_for_class(model_class: type[QkvModel]) -> Converter | None:
    """The converter that writes this qkv class in a Hugging Face layout, or None."""
    for c in _CONVERTERS:
        if c.model_class is model_class:
            return c
    return None


def supported_model_types() -> list[str]:
    """Every Hugging Face model_type qkv can read."""
    return sorted({t for c in _CONVERTERS for t in c.model_types})
