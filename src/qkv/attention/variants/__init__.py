"""Efficient attention: each answer to attention's O(T x S) cost in a file of its own.

Each module teaches one idea with a readable version next to its fast path; the backends
register themselves by name, so that ``impl=`` of ``qkv.scaled_dot_product_attention`` and a
model config's ``attn_impl`` can choose them. Tests hold each to its dense masked reference.

    tiled.py         ``"tiled"``: exact attention block by block with the online softmax, never
                     forming T x S (FlashAttention's algorithm), with its own backward
    triton_flash.py  ``"triton"``: the same algorithm as a GPU kernel in Triton (optional)
    sparse.py        ``"block_sparse"``: only the blocks a sparse pattern keeps (sliding
                     window, Longformer, BigBird; see ``qkv.masks``)
    linear.py        ``"linear"``: kernelised attention, elu + 1 features, O(T) with a
                     recurrent state for decoding
    performer.py     ``"performer"``: FAVOR+ random features that approximate softmax attention
    xl_relative.py   Transformer-XL's attention over [memory; segment] with relative positions
                     (an attention module, used by ``qkv.models.transformer_xl``)
"""

from qkv.attention.variants import (
    linear,  # noqa: F401  (registers "linear")
    performer,  # noqa: F401  (registers "performer")
    sparse,  # noqa: F401  (registers "block_sparse")
    tiled,  # noqa: F401  (registers "tiled")
    triton_flash,  # noqa: F401  (registers "triton" with Triton)
)
