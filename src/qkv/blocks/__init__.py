"""Blocks: the pieces a Transformer layer is made of, and the layers themselves.

Read in this order: ``norms.py`` (LayerNorm, RMSNorm), ``mlp.py`` (the feed-forward network,
plain and gated), ``block.py`` (encoder and decoder layers, post-norm and pre-norm).
"""

from qkv.blocks.block import DecoderLayer, EncoderLayer, LayerSpec, residual_sublayer
from qkv.blocks.mlp import (
    ACTIVATIONS,
    ActivationName,
    FeedForward,
    GatedFeedForward,
    get_activation,
)
from qkv.blocks.moe import MixtureOfExperts, MoEOutput, MoEStats
from qkv.blocks.norms import (
    LayerNorm,
    NormKind,
    RMSNorm,
    layer_norm_reference,
    make_norm,
    rms_norm,
)

__all__ = [
    "ACTIVATIONS",
    "ActivationName",
    "DecoderLayer",
    "EncoderLayer",
    "FeedForward",
    "GatedFeedForward",
    "LayerNorm",
    "LayerSpec",
    "MixtureOfExperts",
    "MoEOutput",
    "MoEStats",
    "NormKind",
    "RMSNorm",
    "get_activation",
    "layer_norm_reference",
    "make_norm",
    "residual_sublayer",
    "rms_norm",
]
