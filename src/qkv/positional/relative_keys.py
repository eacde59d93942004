"""Relative position keys (Shaw et al.): a learned vector per query-key offset, added to the key.

    e_ij = q_i (k_j + a_ij)^T / sqrt(E),    a_ij = w[clip(j - i, -M, M)]

Shaw, Uszkoreit and Vaswani, "Self-Attention with Relative Position Representations", 2018
(arXiv:1803.02155), section 3.

The first relative position encoding. For every offset j - i between a query and a key there is
a learned vector a_ij (one table w of 2M + 1 vectors, shared by all heads), added to the key
when the query looks at it. Offsets beyond ±M share the vector of ±M: the paper found that
precise distances matter only up to a few tokens.

Expanding the product separates it into the ordinary score and a position term:

    e_ij = q_i k_j^T / sqrt(E)  +  q_i a_ij^T / sqrt(E)
           (attention's scores)    (this module's bias)

so the module is a score bias: pass it to ``MultiHeadAttention(score_bias=...)``, which uses the
default scale 1/sqrt(E) that the bias assumes. Shaw et al. also add relative vectors to the
values (a^V_ij); a score bias cannot express that, so only the keys' half is implemented.

Computing it: rather than gathering a (T, S, E) tensor of a_ij vectors, each query is scored
once against all 2M + 1 table vectors, (B, H, T, 2M + 1), and each score (i, j) is then picked
from its row at index clip(j - i) + M. Same numbers, memory of the size of the scores.

Shape legend: B batch · H query heads · T query positions · S key/value positions · E head dim ·
M max_distance.
"""

from __future__ import annotations

from torch import Tensor, nn

from qkv.positional._positions import relative_positions

__all__ = ["ShawRelativeKeys"]


class ShawRelativeKeys(nn.Module):
    """Shaw et al.'s relative position keys, as a score bias q_i · a_ij / sqrt(E).

    Args:
        head_dim: E, the head dimension of the queries.
        max_distance: M; offsets are clipped to [-M, M].

    Attributes:
        table: ``nn.Embedding(2M + 1, E)``; row j - i + M holds a_ij (after clipping).

    Example:
        >>> import torch
        >>> rel = ShawRelativeKeys(head_dim=8, max_distance=4)
        >>> q = torch.randn(2, 4, 3, 8)  # (B, H, T, E)
        >>> rel(q, 5).shape  # the 3 queries are the last of 5 positions
        torch.Size([2, 4, 3, 5])
    """

    def __init__(self, head_dim: int, max_distance: int) -> None:
        super().__init__()
        if max_distance < 0:
            raise ValueError(f"max_distance must be non-negative, got {max_distance}")
        self.head_dim, self.max_distance = head_dim, max_distance
        self.table = nn.Embedding(2 * max_distance + 1, head_dim)  # weight (2M + 1, E)

    # --8<-- [start:shaw]
    def forward(self, q: Tensor, s: int) -> Tensor:
        """The bias q_i · a_ij / sqrt(E) for the queries ``q`` against ``s`` keys.

        Queries are aligned bottom-right: query i sits at position S - T + i, key j at j.

        Args:
            q: queries, (B, H, T, E).
            s: S, the number of keys.

        Returns:
            (B, H, T, S), in the dtype of ``q``.
        """
        if q.shape[-1] != self.head_dim:
            raise ValueError(
                f"q must have head_dim={self.head_dim} as its last dimension, got {tuple(q.shape)}"
            )
        m = self.max_distance
        rel = relative_positions(q.shape[-2], s, device=q.device)  # (T, S): j - i
        index = rel.clamp(-m, m) + m  # (T, S): row of a_ij in the table
        w = self.table.weight.to(q.dtype)  # (2M + 1, E)
        # Score each query against every relative key vector once ...
        scores = q @ w.transpose(0, 1) * self.head_dim**-0.5  # (B, H, T, 2M + 1)
        # ... then pick, for each key j, the score of its offset: scores[..., i, index[i, j]].
        index = index.expand(*q.shape[:-2], *index.shape)  # (B, H, T, S)
        return scores.gather(-1, index)  # (B, H, T, S)

    # --8<-- [end:shaw]

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, max_distance={self.max_distance}"
