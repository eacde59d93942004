"""Rotary position embeddings (RoPE): turn q and k by an angle proportional to their position.

    θ_i = base^(-2i / E),   i = 0 .. E/2 - 1                         base = 10000
    for each pair (a, b) = (x[i], x[i + E/2]) at position p:
        a' = a cos(p θ_i) - b sin(p θ_i)
        b' = b cos(p θ_i) + a sin(p θ_i)
    in one line:  x' = x ⊙ cos(p θ) + rotate_half(x) ⊙ sin(p θ),   rotate_half([x1, x2]) = [-x2, x1]

Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding", 2021
(arXiv:2104.09864).

Each head vector is cut into E/2 pairs and each pair, seen as a point in the plane, is rotated
by the angle p θ_i. Rotations preserve lengths, and rotating q by m θ and k by n θ changes their
dot product exactly as rotating k alone by (n - m) θ would:

    <R(m) q, R(n) k> = <q, R(n - m) k>

so the attention scores depend on how far apart two tokens are, not on where they are. Nothing
is added to the values, and nothing is learned.

Pairing convention. The paper pairs neighbouring dimensions (x[0], x[1]), (x[2], x[3]), ...;
this file follows Hugging Face transformers' ``LlamaRotaryEmbedding`` and
``apply_rotary_pos_emb`` (GPT-NeoX style, "rotate half"): dimension i pairs with i + E/2. The
two differ only by a fixed reordering of the head dimensions, which the q and k projections
absorb; checkpoints trained with one convention need their projection rows permuted to be used
with the other.

Numerics follow Hugging Face: angles, cos and sin are computed in float32, then cast to the
dtype of q and k, and the rotation runs in that dtype.

Shape legend: B batch · H query heads · K key/value heads · T positions · E head dim.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qkv.positional._positions import check_position_ids

__all__ = ["RotaryEmbedding", "apply_rotary", "rope_frequencies", "rotate_half"]


# --8<-- [start:frequencies]
def rope_frequencies(head_dim: int, *, base: float = 10000.0) -> Tensor:
    """The rotation speeds θ_i = base^(-2i / E), in radians per position.

    Args:
        head_dim: E, the head dimension; must be even.
        base: the larger, the slower the slowest pair turns (longer contexts use larger bases).

    Returns:
        (E/2,) float32, from 1 down towards 1/base.

    Example:
        >>> rope_frequencies(4)
        tensor([1.0000, 0.0100])
    """
    if head_dim % 2:
        raise ValueError(f"head_dim={head_dim} must be even: RoPE rotates pairs of dimensions")
    two_i = torch.arange(0, head_dim, 2).float()  # (E/2,)
    return 1.0 / (base ** (two_i / head_dim))  # (E/2,)


# --8<-- [end:frequencies]


# --8<-- [start:rotate]
def rotate_half(x: Tensor) -> Tensor:
    """[x1, x2] -> [-x2, x1], where x1, x2 are the first and second halves of the last dim.

    This is each pair (x[i], x[i + E/2]) turned by 90 degrees; with it the rotation of every pair
    is two elementwise products (see ``apply_rotary``).

    >>> rotate_half(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    tensor([-3., -4.,  1.,  2.])
    """
    x1, x2 = x.chunk(2, dim=-1)  # (..., E/2) each
    return torch.cat([-x2, x1], dim=-1)  # (..., E)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate every pair (x[i], x[i + E/2]) of ``x`` by the angle whose cos and sin are given.

    Args:
        x: q or k, (..., T, E).
        cos: cos(p θ) repeated for both halves, broadcastable to ``x`` (see ``RotaryEmbedding``).
        sin: sin(p θ), same shape as ``cos``.

    Returns:
        The rotated tensor, (..., T, E), in the common dtype of ``x``, ``cos`` and ``sin``.
    """
    return x * cos + rotate_half(x) * sin  # (..., T, E)


# --8<-- [end:rotate]


class RotaryEmbedding(nn.Module):
    """Rotates queries and keys by their positions; pass it to ``MultiHeadAttention(rotary=...)``.

    The inverse frequencies are a buffer that is not saved in the ``state_dict`` (they follow
    from ``head_dim`` and ``base``).

    Args:
        head_dim: E, the head dimension (even).
        base: see ``rope_frequencies``.
        max_seq_len: when given, positions must be below it (a guard against running a model
            past the lengths it was trained for); None allows any position.

    Example:
        >>> import torch
        >>> rope = RotaryEmbedding(head_dim=8)
        >>> q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)  # 4 query, 2 key/value heads
        >>> q_rot, k_rot = rope(q, k, torch.arange(5))
        >>> q_rot.shape, k_rot.shape
        (torch.Size([2, 4, 5, 8]), torch.Size([2, 2, 5, 8]))
        >>> bool(torch.allclose(q_rot.norm(dim=-1), q.norm(dim=-1), atol=1e-5))
        True
    """

    inv_freq: Tensor

    def __init__(
        self, head_dim: int, *, base: float = 10000.0, max_seq_len: int | None = None
    ) -> None:
        super().__init__()
        self.head_dim, self.base, self.max_seq_len = head_dim, base, max_seq_len
        self.register_buffer(
            "inv_freq", rope_frequencies(head_dim, base=base), persistent=False
        )  # (E/2,)

    # --8<-- [start:cos_sin]
    def cos_sin(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos(p θ) and sin(p θ) for each position p, computed in float32, returned in ``dtype``.

        Args:
            position_ids: integer positions, (T,) or (B, T).
            dtype: the dtype of the tensors they will rotate.

        Returns:
            cos and sin, each (T, E) or (B, T, E): the E/2 angles repeated for both halves.
        """
        check_position_ids(position_ids, self.max_seq_len, "max_seq_len")
        inv_freq = self.inv_freq  # (E/2,)
        if inv_freq.dtype != torch.float32:
            # Casting a whole model (model.to(torch.bfloat16)) also casts this buffer, which would
            # round the frequencies to 3 digits; recompute them exactly instead.
            inv_freq = rope_frequencies(self.head_dim, base=self.base).to(inv_freq.device)  # (E/2,)
        angles = position_ids.float().unsqueeze(-1) * inv_freq  # (..., T, E/2): p θ_i
        angles = torch.cat([angles, angles], dim=-1)  # (..., T, E): pair i and i + E/2 share θ_i
        return angles.cos().to(dtype), angles.sin().to(dtype)  # (..., T, E) each

    # --8<-- [end:cos_sin]

    def forward(self, q: Tensor, k: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Rotate q and k by the positions of their tokens.

        Args:
            q: queries, (B, H, T, E).
            k: keys, (B, K, T, E); K may differ from H (grouped-query attention).
            position_ids: integer positions of the T tokens, (T,) shared by the batch, or (B, T)
                per sequence (left-padded batches). They may start anywhere, e.g. at the cache
                length when decoding.

        Returns:
            (q_rot, k_rot), shaped and typed like q and k.
        """
        if q.shape[-1] != self.head_dim or k.shape[-1] != self.head_dim:
            raise ValueError(
                f"q and k must have head_dim={self.head_dim} as their last dimension, "
                f"got q {tuple(q.shape)}, k {tuple(k.shape)}"
            )
        t = q.shape[-2]
        if k.shape[-2] != t or position_ids.shape[-1] != t:
            raise ValueError(
                f"q, k and position_ids must cover the same T positions, got q {tuple(q.shape)}, "
                f"k {tuple(k.shape)}, position_ids {tuple(position_ids.shape)}"
            )
        if position_ids.dim() == 2 and position_ids.shape[0] not in (1, q.shape[0]):
            raise ValueError(
                f"position_ids (B, T) = {tuple(position_ids.shape)} does not match the batch "
                f"size B={q.shape[0]} of q"
            )
        cos, sin = self.cos_sin(position_ids, torch.float32)  # (..., T, E) each
        cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)  # (1, T, E) or (B, 1, T, E): all heads
        q_rot = apply_rotary(q, cos.to(q.dtype), sin.to(q.dtype))  # (B, H, T, E)
        k_rot = apply_rotary(k, cos.to(k.dtype), sin.to(k.dtype))  # (B, K, T, E)
        return q_rot, k_rot

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}, max_seq_len={self.max_seq_len}"
