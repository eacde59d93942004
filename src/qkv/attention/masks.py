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
* sparse patterns for long inputs: ``longformer`` (a symmetric window plus global tokens,
  arXiv:2004.05150) and ``bigbird`` (the same in blocks, plus random blocks, arXiv:2007.14062).
  ``variants/sparse.py`` computes attention under them without the blocks they hide.

When T != S (decoding with a key/value cache: T new queries, S = past + T keys), masks are
aligned **bottom-right**: the last query is the newest position and sees every key.

Shape legend: B batch · T query positions · S key/value positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from qkv.positional._positions import aligned_positions

__all__ = [
    "bigbird",
    "bigbird_blocks",
    "causal",
    "longformer",
    "longformer_globals",
    "padding",
    "prefix_lm",
    "sliding_window",
]


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


# --8<-- [start:longformer]
def longformer(
    t: int,
    window: int,
    global_tokens: Sequence[int] | Tensor,
    *,
    device: torch.device | str | None = None,
) -> Tensor:
    """Longformer: a symmetric sliding window plus global tokens, (T, T).

    Beltagy, Peters and Cohan, "Longformer: The Long-Document Transformer", 2020
    (arXiv:2004.05150), section 3.1. A window of ``window`` keys is ``window // 2`` keys on each
    side of the query, plus the query itself (``window + 1`` keys in all), as in the paper
    ("1/2 w tokens on each side") and Hugging Face's ``attention_window``; so ``window`` is even.
    Note that ``sliding_window(..., causal=False)`` counts differently (``window - 1`` a side).
    A global token (a classification token, the question in question answering) sees every
    position, and every position sees it::

        longformer(6, 2, [0])       window 2: one key each side
        1 1 1 1 1 1                 <- row 0: the global token sees everything
        1 1 1 . . .
        1 1 1 1 . .
        1 . 1 1 1 .
        1 . . 1 1 1
        1 . . . 1 1
        ^ column 0: every token sees the global token

    Args:
        t: sequence length T (self-attention: queries and keys are the same positions).
        window: even, between 2 and T; ``window // 2`` keys on each side of a query.
        global_tokens: distinct positions in [0, T) that see and are seen by all; may be empty.
        device: where to build the mask.

    Returns:
        Boolean (T, T), True = may attend.

    >>> longformer(5, 2, [4]).int()
    tensor([[1, 1, 0, 0, 1],
            [1, 1, 1, 0, 1],
            [0, 1, 1, 1, 1],
            [0, 0, 1, 1, 1],
            [1, 1, 1, 1, 1]], dtype=torch.int32)
    """
    is_global = longformer_globals(t, window, global_tokens).to(device)  # (T,)
    pos = torch.arange(t, device=device)  # (T,)
    local = (pos[:, None] - pos[None, :]).abs() <= window // 2  # (T, T)
    return local | is_global[:, None] | is_global[None, :]  # (T, T)


def longformer_globals(t: int, window: int, global_tokens: Sequence[int] | Tensor) -> Tensor:
    """Check ``longformer``'s arguments; return which positions are global, boolean (T,)."""
    if t < 1:
        raise ValueError(f"t must be at least 1, got {t}")
    if window <= 0 or window % 2:
        raise ValueError(
            f"window must be a positive even number (window // 2 keys on each side of the "
            f"query, as in Longformer), got {window}; use {max(2, window + window % 2)}"
        )
    if window > t:
        raise ValueError(
            f"window={window} is larger than the sequence (t={t}); use a window of at most {t}, "
            "or no mask at all for full attention"
        )
    tokens = torch.as_tensor(global_tokens, dtype=torch.long).cpu()
    if tokens.dim() != 1:
        raise ValueError(f"global_tokens must be a list of positions, got shape {tokens.shape}")
    out_of_range = [i for i in tokens.tolist() if not 0 <= i < t]
    if out_of_range:
        raise ValueError(
            f"global_tokens {out_of_range} are outside the sequence; give positions in [0, {t})"
        )
    if tokens.unique().numel() != tokens.numel():
        repeated = sorted({i for i in tokens.tolist() if tokens.tolist().count(i) > 1})
        raise ValueError(f"global_tokens repeats {repeated}; list each global position once")
    is_global = torch.zeros(t, dtype=torch.bool)  # (T,)
    is_global[tokens] = True
    return is_global


# --8<-- [end:longformer]


# --8<-- [start:bigbird]
def bigbird(
    t: int,
    block: int,
    window_blocks: int,
    global_blocks: int,
    random_blocks: int,
    seed: int,
    *,
    device: torch.device | str | None = None,
) -> Tensor:
    """BigBird: window, global and random attention between blocks of tokens, (T, T).

    Zaheer et al., "Big Bird: Transformers for Longer Sequences", 2020 (arXiv:2007.14062),
    section 2 and appendix D (the blocked ITC form). The sequence is cut into blocks of ``block``
    tokens and every token of a query block sees every token of the key blocks it keeps:

    * window: its own block and ``(window_blocks - 1) // 2`` blocks on each side
      (``window_blocks`` is odd; the paper uses 3);
    * global: the first ``global_blocks`` blocks see every block and are seen by every block;
    * random: ``random_blocks`` further key blocks per (non-global) query block, drawn uniformly
      among the blocks its window and the global blocks leave out, by a ``torch.Generator``
      seeded with ``seed``: the same arguments always give the same mask.

    When ``t`` is not a multiple of ``block`` the last block is shorter: the mask is the one of
    the sequence padded to a multiple of ``block``, with the padding's rows and columns dropped.
    Window and global parts are symmetric; random blocks are not::

        blocks (window_blocks=3, global_blocks=1, random_blocks=1)
                      key block 0 1 2 3 4 5
        query block 0           g g g g g g     g: global
                    1           g w w r . .     w: window, one block each side
                    2           g w w w . r     r: random, drawn with `seed`
                    3           g . w w w r
                    ...

    Args:
        t: sequence length T (self-attention).
        block: tokens per block, at least 1.
        window_blocks: odd, from 1 (the own block only) to the number of blocks.
        global_blocks: how many leading blocks are global, from 0 to the number of blocks.
        random_blocks: random key blocks per query block, at least 0.
        seed: seeds the random blocks.
        device: where to build the mask.

    Returns:
        Boolean (T, T), True = may attend. ``bigbird_blocks`` gives the pattern per block.

    >>> bigbird(6, 2, 1, 1, 0, seed=0).int()
    tensor([[1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 0, 0, 1, 1],
            [1, 1, 0, 0, 1, 1]], dtype=torch.int32)
    """
    keeps = bigbird_blocks(t, block, window_blocks, global_blocks, random_blocks, seed)
    block_of = torch.arange(t) // block  # (T,) the block of each position
    return keeps[block_of[:, None], block_of[None, :]].to(device)  # (T, T)


def bigbird_blocks(
    t: int, block: int, window_blocks: int, global_blocks: int, random_blocks: int, seed: int
) -> Tensor:
    """The BigBird pattern per block: boolean (N, N) with N = ceil(T / block) blocks, True where
    query block i sees key block j. Arguments as in ``bigbird``."""
    if t < 1 or block < 1:
        raise ValueError(f"t and block must be at least 1, got t={t}, block={block}")
    n = -(-t // block)  # number of blocks, the last one possibly shorter
    if window_blocks < 1 or window_blocks % 2 == 0 or window_blocks > n:
        raise ValueError(
            f"window_blocks must be odd (the query's own block and (window_blocks - 1) // 2 on "
            f"each side) and at most the {n} blocks of t={t} in blocks of {block}, "
            f"got {window_blocks}; BigBird uses 3"
        )
    if not 0 <= global_blocks <= n:
        raise ValueError(f"global_blocks must be between 0 and the {n} blocks, got {global_blocks}")
    if random_blocks < 0:
        raise ValueError(f"random_blocks must be at least 0, got {random_blocks}")
    blocks = torch.arange(n)  # (N,)
    keeps = (blocks[:, None] - blocks[None, :]).abs() <= window_blocks // 2  # (N, N) window
    keeps[:global_blocks, :] = True  # global blocks see every block ...
    keeps[:, :global_blocks] = True  # ... and every block sees them
    generator = torch.Generator().manual_seed(seed)
    for i in range(global_blocks, n):
        left_out = (~keeps[i]).nonzero().squeeze(1)  # key blocks row i does not see yet
        if random_blocks > left_out.numel():
            raise ValueError(
                f"random_blocks={random_blocks} is more than query block {i} can draw from: "
                f"only {left_out.numel()} blocks lie outside its window and the global blocks; "
                "use fewer random, window or global blocks, or a longer sequence"
            )
        drawn = torch.randperm(left_out.numel(), generator=generator)[:random_blocks]
        keeps[i, left_out[drawn]] = True
    return keeps  # (N, N)


# --8<-- [end:bigbird]
