"""Activation names in Hugging Face configs and their qkv counterparts, both directions.

transformers spells one function several ways (``silu`` and ``swish``; ``gelu_new`` and
``gelu_pytorch_tanh`` for the tanh approximation of GELU); qkv has one name for each, the keys
of ``qkv.blocks.mlp.ACTIVATIONS``. A converter reads any spelling and writes one.
"""

from __future__ import annotations

from qkv.blocks.mlp import ActivationName

__all__ = ["ACTIVATIONS_FROM_HF", "ACTIVATIONS_TO_HF"]

# transformers' names -> qkv's (this order is the one error messages list).
ACTIVATIONS_FROM_HF: dict[str, ActivationName] = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}

# qkv's names -> the one transformers name written (a family may spell one differently).
ACTIVATIONS_TO_HF: dict[ActivationName, str] = {
    "gelu": "gelu",
    "gelu_tanh": "gelu_new",
    "relu": "relu",
    "silu": "silu",
}
