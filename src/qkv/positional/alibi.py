"""ALiBi: attention with linear biases, a penalty on the scores that grows with distance.

    scores[h, i, j] = q_i · k_j / sqrt(E) - m_h · |i - j|

Press, Smith and Lewis, "Train Short, Test Long: Attention with Linear Biases Enables Input
Length Extrapolation", 2021 (arXiv:2108.12409).

No position vector is added anywhere. Instead each head h subtracts from its scores its slope
m_h times the distance between query and key, so every head prefers nearby tokens, some
strongly (large m_h) and some hardly at all (small m_h). Because the penalty is a simple
function of distance, a model trained on short sequences keeps working on longer ones.

Slopes. For H heads, H a power of two, the slopes are the geometric sequence
    m_h = 2^(-8 (h + 1) / H),   h = 0 .. H - 1,
e.g. 1/2, 1/4, ..., 1/256 for 8 heads. For other H, the paper (and its official code) takes the
H' slopes of the largest power of two H' < H, then adds every other slope of the 2H' sequence
(its 1st, 3rd, 5th, ...) until there are H.

The paper uses ALiBi with a causal mask, where i >= j and the penalty is m_h (i - j); with
|i - j| the same bias also serves bidirectional attention. (BLOOM's code adds m_h · j instead:
under a causal mask that differs from -m_h (i - j) by a constant per row, which the softmax
ignores.)

Shape legend: B batch · H query heads · T query positions · S key/value positions · E head dim.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from qkv.positional._positions import relative_positions

__all__ = ["ALiBi", "alibi_bias", "alibi_slopes"]


# --8<-- [start:slopes]
def _geometric_slopes(n: int) -> list[float]:
    """2^(-8/n), 2^(-16/n), ..., 2^(-8): the slopes for a power-of-two number of heads."""
    ratio = 2.0 ** (-8.0 / n)
    return [ratio ** (h + 1) for h in range(n)]


def alibi_slopes(n_heads: int) -> Tensor:
    """The slope m_h of each head, as in the paper's code.

    Args:
        n_heads: H.

    Returns:
        (H,) float32.

    Example:
        >>> alibi_slopes(4)
        tensor([0.2500, 0.0625, 0.0156, 0.0039])
    """
    if n_heads < 1:
        raise ValueError(f"n_heads must be positive, got {n_heads}")
    p = 2 ** math.floor(math.log2(n_heads))  # the largest power of two <= H
    slopes = _geometric_slopes(p)
    slopes += _geometric_slopes(2 * p)[0::2][: n_heads - p]  # nothing is added when H == p
    return torch.tensor(slopes, dtype=torch.float32)  # (H,)


# --8<-- [end:slopes]


# --8<-- [start:bias]
def _linear_bias(slopes: Tensor, t: int, s: int) -> Tensor:
    """-m_h |i - j| for queries aligned bottom-right: (H,) slopes -> (H, T, S)."""
    distance = relative_positions(t, s, device=slopes.device).abs()  # (T, S): |i - j|
    return slopes.float()[:, None, None] * -distance  # (H, T, S)


# --8<-- [end:bias]


def alibi_bias(n_heads: int, t: int, s: int, *, device: torch.device | str | None = None) -> Tensor:
    """The ALiBi bias to add to the scaled scores of T queries against S keys.

    Queries are aligned bottom-right, as with a key/value cache: query i sits at position
    S - T + i, key j at position j.

    Args:
        n_heads: H.
        t: T, the number of queries.
        s: S, the number of keys (S >= T).
        device: where to build the bias.

    Returns:
        (H, T, S) float32, equal to -m_h · |(S - T + i) - j|.

    Example:
        >>> alibi_bias(2, 2, 3)[0]  # head 0, slope 1/16; queries at positions 1 and 2
        tensor([[-0.0625,  0.0000, -0.0625],
                [-0.1250, -0.0625,  0.0000]])
    """
    return _linear_bias(alibi_slopes(n_heads).to(device), t, s)  # (H, T, S)


class ALiBi(nn.Module):
    """ALiBi as a score bias: pass it to ``MultiHeadAttention(score_bias=...)``.

    The slopes are a buffer (they follow ``.to(device)``) that is not saved in the
    ``state_dict``: they follow from ``n_heads``.

    Args:
        n_heads: H, the number of query heads of the attention it serves.

    Example:
        >>> import torch
        >>> alibi = ALiBi(n_heads=4)
        >>> q = torch.randn(2, 4, 3, 8)  # (B, H, T, E)
        >>> alibi(q, 5).shape  # the 3 queries are the last of 5 positions
        torch.Size([1, 4, 3, 5])
    """

    slopes: Tensor

    def __init__(self, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.register_buffer("slopes", alibi_slopes(n_heads), persistent=False)  # (H,)

    def forward(self, q: Tensor, s: int) -> Tensor:
        """The bias for the queries ``q`` against ``s`` keys.

        Args:
            q: queries, (B, H, T, E); only its head count, T and device are used.
            s: S, the number of keys.

        Returns:
            (1, H, T, S) float32, broadcasting over the batch.
        """
        if q.dim() < 3 or q.shape[-3] != self.n_heads:
            raise ValueError(
                f"q must be (B, H, T, E) with H=n_heads={self.n_heads}, got {tuple(q.shape)}"
            )
        slopes = self.slopes  # (H,)
        if slopes.dtype != torch.float32:
            # Casting a whole model to half precision also casts this buffer; keep exact slopes.
            slopes = alibi_slopes(self.n_heads)  # (H,)
        bias = _linear_bias(slopes.to(q.device), q.shape[-2], s)  # (H, T, S)
        return bias.unsqueeze(0)  # (1, H, T, S)

    def extra_repr(self) -> str:
        return f"n_heads={self.n_heads}"
