"""Attention: the reference math (core.py, start here), masks, multi-head attention, backends.

The efficient variants (tiled, sparse, linear, ...) live in ``variants/`` and register themselves
as backends when this package is imported.
"""

from qkv.attention import masks, numpy_ref, variants
from qkv.attention.backends import (
    available_backends,
    register_backend,
    repeat_kv,
    unregister_backend,
)
from qkv.attention.core import reference_attention, scaled_dot_product_attention
from qkv.attention.kv_cache import KVCache
from qkv.attention.multihead import MultiHeadAttention, recording_weights

__all__ = [
    "KVCache",
    "MultiHeadAttention",
    "available_backends",
    "masks",
    "numpy_ref",
    "recording_weights",
    "reference_attention",
    "register_backend",
    "repeat_kv",
    "scaled_dot_product_attention",
    "unregister_backend",
    "variants",
]
