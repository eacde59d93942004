"""qkv: attention and the Transformer, from first principles to the variants that run today.

Read in this order: ``qkv.attention.core`` (the equation), ``qkv.masks``,
``qkv.attention.multihead``, ``qkv.positional``, ``qkv.blocks``, ``qkv.models``.
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
    unregister_backend,
)
from qkv.blocks import (
    DecoderLayer,
    EncoderLayer,
    FeedForward,
    GatedFeedForward,
    LayerNorm,
    LayerSpec,
    RMSNorm,
)
from qkv.interop import CheckpointError, from_pretrained, save_pretrained
from qkv.models import (
    GPT,
    T5,
    Bart,
    Bert,
    Llama,
    Mixtral,
    ModelOutput,
    PrefixLM,
    Transformer,
    TransformerXL,
    ViT,
)
from qkv.positional import (
    ALiBi,
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    ShawRelativeKeys,
    SinusoidalPositionalEncoding,
    T5RelativeBias,
)

__version__ = "0.1.0"

__all__ = [
    "GPT",
    "T5",
    "ALiBi",
    "Bart",
    "Bert",
    "CheckpointError",
    "DecoderLayer",
    "EncoderLayer",
    "FeedForward",
    "GatedFeedForward",
    "KVCache",
    "LayerNorm",
    "LayerSpec",
    "LearnedPositionalEmbedding",
    "Llama",
    "Mixtral",
    "ModelOutput",
    "MultiHeadAttention",
    "PrefixLM",
    "QkvWarning",
    "RMSNorm",
    "RotaryEmbedding",
    "ShawRelativeKeys",
    "SinusoidalPositionalEncoding",
    "T5RelativeBias",
    "Transformer",
    "TransformerXL",
    "ViT",
    "__version__",
    "available_backends",
    "from_pretrained",
    "masks",
    "numpy_ref",
    "reference_attention",
    "register_backend",
    "save_pretrained",
    "scaled_dot_product_attention",
    "unregister_backend",
]
