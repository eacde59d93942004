"""qkv: attention and the Transformer, from first principles to the variants that run today.

Read in this order: ``qkv.attention.core`` (the equation), ``qkv.masks``,
``qkv.attention.multihead``, ``qkv.positional``, ``qkv.blocks``.
"""

from qkv._errors import QkvWarning
from qkv.attention import (
    KVCache,
    MultiHeadAttention,
    available_backends,
    masks,
    numpy_ref,
    reference_attention,
    register_backend,
    scaled_dot_product_attention,
)

__version__ = "0.1.0"

__all__ = [
    "KVCache",
    "MultiHeadAttention",
    "QkvWarning",
    "__version__",
    "available_backends",
    "masks",
    "numpy_ref",
    "reference_attention",
    "register_backend",
    "scaled_dot_product_attention",
]
