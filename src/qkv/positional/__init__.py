"""Positions: how attention, which is blind to order by itself, learns where tokens are.

Read in this order, from the oldest idea to the ones today's models use:

1. ``sinusoidal``: fixed sin/cos waves added to the token embeddings (Transformer, 2017).
2. ``learned``: a trained vector per position, added the same way (BERT, GPT-2).
3. ``rope``: rotate q and k by their positions so scores depend on offsets (RoFormer, LLaMA).
4. ``alibi``: subtract a per-head penalty proportional to distance from the scores (BLOOM).
5. ``relative_bias``: a learned scalar per head and bucket of offsets added to the scores (T5),
   and ``relative_keys``: Shaw et al.'s learned relative vectors added to the keys.

The first two give vectors to add to the token embeddings; ``RotaryEmbedding`` is passed to
``MultiHeadAttention(rotary=...)``; ``ALiBi``, ``T5RelativeBias`` and ``ShawRelativeKeys`` to
``MultiHeadAttention(score_bias=...)``.
"""

from qkv.positional.alibi import ALiBi, alibi_bias, alibi_slopes
from qkv.positional.learned import LearnedPositionalEmbedding
from qkv.positional.relative_bias import T5RelativeBias, t5_relative_bucket
from qkv.positional.relative_keys import ShawRelativeKeys
from qkv.positional.rope import RotaryEmbedding, apply_rotary, rope_frequencies, rotate_half
from qkv.positional.sinusoidal import SinusoidalPositionalEncoding, sinusoidal_table

__all__ = [
    "ALiBi",
    "LearnedPositionalEmbedding",
    "RotaryEmbedding",
    "ShawRelativeKeys",
    "SinusoidalPositionalEncoding",
    "T5RelativeBias",
    "alibi_bias",
    "alibi_slopes",
    "apply_rotary",
    "rope_frequencies",
    "rotate_half",
    "sinusoidal_table",
    "t5_relative_bucket",
]
