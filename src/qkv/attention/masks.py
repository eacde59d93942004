"""Attention masks: which keys each query may see.

A mask is a plain boolean tensor, True = may attend, that broadcasts to the scores (..., T, S).
Masks combine with ``&`` (both allow) and ``|`` (either allows). One sequence of 4 positions,
the last of which is padding (``max_len=4`` gives the padding mask the same S as the causal one)::

    causal(4)           padding([3], 4)       causal(4) & padding([3], 4)
    1 . . .             1 1 1 .               1 . . .
    1 1 . .             (every row)           1 1 . .
    1 1 1 .                                   1 1 1 .
    1 1 1 1                                   1 1 1 .

    (T, S) = (4, 4)     (B, 1, 1, S)          (B, 1, T, S) = (1, 1, 4, 4)

>>> (causal(4) & padding([3], 4)).int()[0, 0]
tensor([[1, 0, 0, 0],
        [1, 1, 0, 0],
        [1, 1, 1, 0],
        [1, 1, 1, 0]], dtype=torch.int32)

* causal: generation must not peek at the future (GPT, decoders).
* padding: batches pad short sequences; real tokens must not attend to the padding.
* prefix-LM: the prompt sees itself in both directions, the rest is causal (Raffel et al. 2020,
  "Exploring the Limits of Transfer Learning", arXiv:1910.10683, section 3.2.1).
* sliding window: each query sees only the most recent keys (Longformer, arXiv:2004.05150;
  Mistral 7B, arXiv:2310.06825).

When T != S (decoding with a key/value cache: T new queries, S = past + T keys), masks are
aligned **bottom-right**: the last query is the newest position and sees every key.

Shape legend: B batch · T query positions · S key/value positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from qkv.positional._positions import aligned_positions

__all__ = ["causal", "padding", "prefix_lm", "sliding_window"]


# --8<-- [start:causal]
def causal(t: int, s: int | None = None, *, device: torch.device | str | None = None) -> Tensor:
    """Each query sees itself and the keys before it: (T, S), bottom-right aligned.

    >>> causal(2, 3).int()
    tensor([[1, 1, 0],
            [1, 1, 1]], dtype=torch.int32)
    """
    query_pos, key_pos = aligned_positions(t, t if s is None else s, device)
    return key_pos <= query_pos  # (T, S)


# --8<-- [end:causal]


# --8<-- [start:padding]
def padding(
    lengths_or_attention_mask: Tensor | Sequence[int],
    max_len: int | None = None,
    *,
    device: torch.device | str | None = None,
) -> Tensor:
    """Hide padding keys: a (B, 1, 1, S) mask that broadcasts over heads and queries.

    Args:
        lengths_or_attention_mask: either the real length of each sequence, (B,) integers
            (padding on the right), or a Hugging Face style ``attention_mask`` (B, S) of 1/0
            or True/False, 1 = real token (padding on either side).
        max_len: S when lengths are given; defaults to the longest length.

    >>> padding([2, 3]).int().squeeze(1).squeeze(1)
    tensor([[1, 1, 0],
            [1, 1, 1]], dtype=torch.int32)
    """
    x = torch.as_tensor(lengths_or_attention_mask, device=device)
    if x.dim() == 2:
        if x.is_floating_point():
            raise TypeError(
                "attention_mask must hold integers or booleans (1 = real token, 0 = padding), "
                f"got {x.dtype}"
            )
        if max_len is not None and max_len != x.shape[1]:
            raise ValueError(f"max_len={max_len} disagrees with attention_mask of {x.shape[1]}")
        keep = x.bool()  # (B, S)
    elif x.dim() == 1:
        if x.is_floating_point() or x.dtype == torch.bool:
            raise TypeError(f"lengths must be integers, got {x.dtype}")
        if (x < 0).any():
            raise ValueError(f"lengths must be non-negative, got {x.tolist()}")
        s = int(x.max()) if max_len is None and x.numel() else (max_len or 0)
        if x.numel() and int(x.max()) > s:
            raise ValueError(f"a length of {int(x.max())} does not fit in max_len={s}")
        keep = torch.arange(s, device=x.device).unsqueeze(0) < x.unsqueeze(1)  # (B, S)
    else:
        raise ValueError(
            "padding() takes lengths (B,) or an attention_mask (B, S), "
            f"got a tensor of shape {tuple(x.shape)}"
        )
    return keep[:, None, None, :]  # (B, 1, 1, S)


# --8<-- [end:padding]


# --8<-- [start:prefix_lm]
def prefix_lm(
    prefix_len: int | Tensor,
    t: int,
    s: int | None = None,
    *,
    device: torch.device | str | None = None,
) -> Tensor:
    """Prefix-LM: the first ``prefix_len`` positions see each other, the rest is causal.

    ``prefix_len`` is an int, giving (T, S), or a (B,) tensor of per-example prefix lengths,
    giving (B, 1, T, S). S defaults to T; with a cache (S > T) queries align bottom-right.

    >>> prefix_lm(2, 4).int()
    tensor([[1, 1, 0, 0],
            [1, 1, 0, 0],
            [1, 1, 1, 0],
            [1, 1, 1, 1]], dtype=torch.int32)
    """
    s = t if s is None else s
    query_pos, key_pos = aligned_positions(t, s, device)
    if isinstance(prefix_len, Tensor):
        if prefix_len.dim() != 1:
            raise ValueError(f"prefix_len must be an int or a (B,) tensor, got {prefix_len.shape}")
        in_prefix = key_pos < prefix_len.to(key_pos.device)[:, None, None, None]  # (B, 1, 1, S)
        return (key_pos <= query_pos) | in_prefix  # (B, 1, T, S)
    if not 0 <= prefix_len <= s:
        raise ValueError(f"prefix_len must be between 0 and S={s}, got {prefix_len}")
    return (key_pos <= query_pos) | (key_pos < prefix_len)  # (T, S)


# --8<-- [end:prefix_lm]


# --8<-- [start:sliding_window]
def sliding_window(
    t: int,
    window: int,
    s: int | None = None,
    *,
    causal: bool = True,
    device: torch.device | str | None = None,
) -> Tensor:
    """Each query sees only keys less than ``window`` positions away: (T, S), bottom-right aligned.

    With ``causal=True`` (Mistral-style) a query sees itself and the ``window - 1`` keys before
    it; with ``causal=False`` (Longformer-style local attention) it also sees ``window - 1`` keys
    after it.

    >>> sliding_window(4, 2).int()
    tensor([[1, 0, 0, 0],
            [1, 1, 0, 0],
            [0, 1, 1, 0],
            [0, 0, 1, 1]], dtype=torch.int32)
    """
    if window < 1:
        raise ValueError(f"window must be at least 1 (the query itself), got {window}")
    query_pos, key_pos = aligned_positions(t, t if s is None else s, device)
    distance = query_pos - key_pos  # (T, S)
    if causal:
        return (distance >= 0) & (distance < window)  # (T, S)
    return distance.abs() < window  # (T, S)


# --8<-- [end:sliding_window]
