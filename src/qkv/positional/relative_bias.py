"""T5 relative position bias: a learned scalar per head for each bucket of key - query offsets.

    scores[h, i, j] = q_i · k_j + b[h, bucket(j - i)]

Raffel et al., "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer", 2020 (arXiv:1910.10683), section 2.1. The idea of attending by relative position
comes from Shaw, Uszkoreit and Vaswani, "Self-Attention with Relative Position
Representations", 2018 (arXiv:1803.02155), see ``relative_keys.py``.

Instead of encoding where a token is, T5 lets each head learn how much it likes keys at each
offset j - i from the query. Offsets are grouped into ``num_buckets`` buckets: small offsets get
a bucket each (nearby words matter individually), larger ones share buckets whose width grows
logarithmically up to ``max_distance``, and everything farther shares the last bucket::

    bidirectional (encoder), num_buckets=32, max_distance=128:
        offsets <= 0 -> buckets 0..15,  offsets > 0 -> buckets 16..31
        in each half, |offset| 0..7 -> exact buckets 0..7, larger ones -> log-spaced 8..15;
        the rounding down of the log puts every |offset| >= 91 in the last bucket (15)
        (bucket 16 is never used: offset 0 belongs to the first half)
    unidirectional (decoder): only offsets <= 0 (the past) are told apart, with all 32 buckets

The bias is shared by all layers in T5 (only the first layer owns it) and T5 does not scale its
scores by 1/sqrt(E); both are the model's choices, not this module's.

Shape legend: B batch · H query heads · T query positions · S key/value positions · E head dim.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from qkv.positional._positions import relative_positions

__all__ = ["T5RelativeBias", "t5_relative_bucket"]


# --8<-- [start:bucket]
def t5_relative_bucket(
    relative_position: Tensor,
    *,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> Tensor:
    """Map offsets key_pos - query_pos to T5's buckets, exactly as T5 does.

    Args:
        relative_position: integer offsets j - i, any shape.
        bidirectional: True for an encoder (offsets of both signs have their own buckets);
            False for a decoder (positive offsets, the future, all fall in bucket 0).
        num_buckets: how many buckets in all.
        max_distance: offsets at least this far all share the last bucket (of their sign).

    Returns:
        Bucket indices in [0, num_buckets), long, same shape as ``relative_position``.

    Example:
        >>> t5_relative_bucket(torch.tensor([-3, -1, 0, 1, 3]), num_buckets=8, max_distance=16)
        tensor([2, 1, 0, 5, 6])
    """
    if relative_position.is_floating_point():
        raise TypeError(f"relative_position must be integer, got {relative_position.dtype}")
    rel = relative_position.long()  # (...)
    bucket = torch.zeros_like(rel)  # (...)
    if bidirectional:
        # Half of the buckets for each sign: offsets > 0 (keys after the query) use the top half.
        num_buckets //= 2
        bucket = bucket + (rel > 0).long() * num_buckets  # (...)
        distance = rel.abs()  # (...)
    else:
        # Only the past is told apart: keys after the query count as distance 0.
        distance = -torch.clamp(rel, max=0)  # (...)
    # Half of the (remaining) buckets hold one small distance each: 0, 1, ..., max_exact - 1.
    max_exact = num_buckets // 2
    is_small = distance < max_exact  # (...)
    # The other half covers max_exact .. max_distance with logarithmically growing widths.
    # (Distances below max_exact are clamped only to keep log() finite; they use is_small.)
    ratio = distance.clamp(min=max_exact).float() / max_exact  # (...)
    log_scaled = torch.log(ratio) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    if_large = max_exact + log_scaled.long()  # (...), .long() truncates like T5's int cast
    if_large = torch.clamp(if_large, max=num_buckets - 1)  # (...) farther all share the last
    return bucket + torch.where(is_small, distance, if_large)  # (...)


# --8<-- [end:bucket]


class T5RelativeBias(nn.Module):
    """T5's learned, bucketed relative position bias: pass it to ``score_bias=``, or call
    ``bias(T, S)`` once and hand the result to several layers (as T5 does).

    Args:
        n_heads: H, the number of query heads of the attention it serves.
        bidirectional: True for encoder self-attention, False for decoder self-attention.
        num_buckets: see ``t5_relative_bucket``.
        max_distance: see ``t5_relative_bucket``.

    Attributes:
        relative_attention_bias: ``nn.Embedding(num_buckets, n_heads)``, one learned scalar
            per (bucket, head); named as in Hugging Face's T5 to ease weight conversion.

    Example:
        >>> import torch
        >>> rel = T5RelativeBias(n_heads=4, bidirectional=False)
        >>> q = torch.randn(2, 4, 3, 8)  # (B, H, T, E)
        >>> rel(q, 5).shape  # the 3 queries are the last of 5 positions
        torch.Size([1, 4, 3, 5])
        >>> torch.equal(rel.bias(3, 5), rel(q, 5))  # the same, without queries
        True
    """

    def __init__(
        self,
        n_heads: int,
        *,
        bidirectional: bool = True,
        num_buckets: int = 32,
        max_distance: int = 128,
    ) -> None:
        super().__init__()
        self.n_heads, self.bidirectional = n_heads, bidirectional
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.relative_attention_bias = nn.Embedding(num_buckets, n_heads)  # weight (buckets, H)

    # --8<-- [start:t5_bias]
    def bias(self, t: int, s: int, *, device: torch.device | str | None = None) -> Tensor:
        """The bias for T queries against S keys, the queries the last T of the S positions.

        T5 computes it once per stack and passes it to every layer (``bias=``).

        Args:
            t: T, the number of queries.
            s: S, the number of keys (cached ones included), at least T.
            device: where to build it.

        Returns:
            (1, H, T, S), in the dtype of ``relative_attention_bias``.
        """
        rel = relative_positions(t, s, device=device)  # (T, S): j - i
        buckets = t5_relative_bucket(
            rel,
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )  # (T, S)
        values = self.relative_attention_bias(buckets)  # (T, S, H)
        return values.permute(2, 0, 1).unsqueeze(0)  # (1, H, T, S)

    def forward(self, q: Tensor, s: int) -> Tensor:
        """The bias for the queries ``q`` against ``s`` keys, queries aligned bottom-right.

        Args:
            q: queries, (B, H, T, E); only its head count, T and device are used.
            s: S, the number of keys.

        Returns:
            (1, H, T, S), in the dtype of ``relative_attention_bias``.
        """
        if q.dim() < 3 or q.shape[-3] != self.n_heads:
            raise ValueError(
                f"q must be (B, H, T, E) with H=n_heads={self.n_heads}, got {tuple(q.shape)}"
            )
        return self.bias(q.shape[-2], s, device=q.device)  # (1, H, T, S)

    # --8<-- [end:t5_bias]

    def extra_repr(self) -> str:
        return (
            f"n_heads={self.n_heads}, bidirectional={self.bidirectional}, "
            f"num_buckets={self.num_buckets}, max_distance={self.max_distance}"
        )
