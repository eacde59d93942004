"""Summary numbers per attention head, and attention rollout across layers.

A model has L x H heads; these turn each head's (T, S) weights into a few numbers, so that a
whole model fits in one table:

    entropy      H_h = mean_i  -sum_j a_ij log a_ij        nats; 0 = one key, log S = uniform
    distance     d_h = mean_i   sum_j a_ij |pos_i - pos_j|  tokens (or patches, or pixels)
    special      s_h = mean_i   sum_{j special} a_ij        the share sent to [CLS], [SEP], <s>...

and attention rollout (Abnar and Zuidema, "Quantifying Attention Flow in Transformers", 2020,
arXiv:2005.00928) follows the weights through the layers. Each layer's output is its input plus
what attention added (the residual connection), so a layer mixes tokens by roughly
Â_l = (mean over heads of A_l + I), its rows renormalised to sum to 1; the mixing of the whole
stack is the product

    R = Â_L Â_{L-1} ... Â_1        (T, T): row i, how much of token j reaches position i.

Rollout ignores the values, the MLPs and the norms: it is a heuristic to look at, not a
measurement of what the model uses.

Only queries that see at least one key count in the means (a query whose mask hides every key,
say left padding under a causal mask, has an all-zero row).

Shape legend (the same in every file):
    B batch · T query positions · S key/value positions · D model width · H query heads ·
    K key/value heads · E head dim · F MLP hidden width · V vocabulary · L layers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "SPECIAL_TOKEN",
    "attention_rollout",
    "entropy",
    "mean_distance",
    "patch_positions",
    "special_attention",
    "special_token_mask",
]

# [CLS], [SEP], [PAD], <s>, </s>, <pad>, <|endoftext|>, ...: the tokens a tokenizer adds.
SPECIAL_TOKEN = re.compile(r"^(\[[A-Z]+\]|<\|?[\w/]+\|?>)$")


def _mean_over_queries(per_query: Tensor, weights: Tensor) -> Tensor:
    """Average (..., T) over the queries whose row is not all zero: -> (...)."""
    seen = (weights.sum(-1) > 0).to(per_query.dtype)  # (..., T): 1 = the query saw a key
    return (per_query * seen).sum(-1) / seen.sum(-1).clamp(min=1)  # (...)


# --8<-- [start:entropy]
def entropy(weights: Tensor) -> Tensor:
    """Entropy of each query's weights in nats, averaged over the queries.

    Args:
        weights: (..., T, S), rows summing to 1, e.g. (L, H, T, S).

    Returns:
        (...), e.g. (L, H): 0 when every query puts all its weight on one key, log S when
        every query spreads it evenly over S keys.

    Example:
        >>> w = torch.tensor([[[1.0, 0.0], [0.5, 0.5]]])  # one head, T = S = 2
        >>> entropy(w)  # (0 + log 2) / 2
        tensor([0.3466])
    """
    per_query = -torch.special.xlogy(weights, weights).sum(-1)  # (..., T); 0 log 0 = 0
    return _mean_over_queries(per_query, weights)  # (...)


# --8<-- [end:entropy]


# --8<-- [start:distance]
def mean_distance(
    weights: Tensor,
    query_positions: Tensor | None = None,
    key_positions: Tensor | None = None,
) -> Tensor:
    """How far each head looks: the attention-weighted distance from query to key, averaged.

    Args:
        weights: (..., T, S), rows summing to 1.
        query_positions: (T,) positions or (T, P) coordinates of the queries; default
            S - T, ..., S - 1 (the queries are the last T of the S positions, as with a cache).
        key_positions: (S,) or (S, P); default 0, ..., S - 1. Distances are Euclidean, so
            (N, 2) patch coordinates give distances in patches (or pixels, if scaled).

    Returns:
        (...), in the units of the positions.

    Example:
        >>> previous_token = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        >>> mean_distance(previous_token)  # (0 + 1 + 1) / 3
        tensor(0.6667)
    """
    t, s = weights.shape[-2:]
    if key_positions is None:
        key_positions = torch.arange(s, dtype=torch.float32)  # (S,)
    if query_positions is None:
        query_positions = torch.arange(s - t, s, dtype=torch.float32)  # (T,)
    q = query_positions.to(weights.dtype).reshape(t, -1)  # (T, P)
    k = key_positions.to(weights.dtype).reshape(s, -1)  # (S, P)
    dist = torch.cdist(q, k)  # (T, S): |pos_i - pos_j|
    per_query = (weights * dist).sum(-1)  # (..., T)
    return _mean_over_queries(per_query, weights)  # (...)


# --8<-- [end:distance]


def patch_positions(grid: tuple[int, int], *, patch_size: float = 1.0, cls: bool = True) -> Tensor:
    """Coordinates of a ViT's tokens for ``mean_distance``: (1 + N, 2) or (N, 2).

    Patch r, c (row-major) sits at (r, c) * patch_size; the [CLS] token, which has no place
    in the image, is given the centre of the image.

    Example:
        >>> patch_positions((2, 2), patch_size=4)
        tensor([[2., 2.],
                [0., 0.],
                [0., 4.],
                [4., 0.],
                [4., 4.]])
    """
    rows, cols = grid
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")  # (R, C) each
    coords = torch.stack([r.flatten(), c.flatten()], dim=-1).float() * patch_size  # (N, 2)
    if not cls:
        return coords
    centre = torch.tensor([[(rows - 1) / 2, (cols - 1) / 2]]) * patch_size  # (1, 2)
    return torch.cat([centre, coords])  # (1 + N, 2)


def special_token_mask(tokens: Sequence[str], special: Sequence[str] | None = None) -> Tensor:
    """Which tokens are special: (S,) bool.

    Args:
        tokens: the key tokens.
        special: the strings that count as special; default every token that looks like one
            (``SPECIAL_TOKEN``: ``[CLS]``, ``[SEP]``, ``<s>``, ``</s>``, ``<|endoftext|>``...).

    Example:
        >>> special_token_mask(["[CLS]", "it", "[SEP]"]).tolist()
        [True, False, True]
    """
    if special is not None:
        return torch.tensor([t in special for t in tokens], dtype=torch.bool)
    return torch.tensor([bool(SPECIAL_TOKEN.match(t)) for t in tokens], dtype=torch.bool)


# --8<-- [start:special]
def special_attention(weights: Tensor, special: Tensor) -> Tensor:
    """The share of attention that goes to special tokens, averaged over the queries.

    Args:
        weights: (..., T, S), rows summing to 1.
        special: (S,) bool, True for special keys (see ``special_token_mask``).

    Returns:
        (...) in [0, 1].

    Example:
        >>> w = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])  # T = 2, S = 3
        >>> special_attention(w, torch.tensor([True, False, True]))  # (0.8 + 0.9) / 2
        tensor(0.8500)
    """
    per_query = (weights * special.to(weights.dtype)).sum(-1)  # (..., T)
    return _mean_over_queries(per_query, weights)  # (...)


# --8<-- [end:special]


# --8<-- [start:rollout]
def attention_rollout(weights: Tensor, *, residual: bool = True) -> Tensor:
    """Attention rollout: how much each input token flows into each position after all layers.

    Args:
        weights: (..., L, H, T, T) self-attention weights of L consecutive layers, first layer
            first (e.g. ``CapturedAttention["self"].weights``).
        residual: add the identity for the residual connection (Abnar and Zuidema); without
            it, the plain product of the head-averaged weights.

    Returns:
        (..., T, T): row i is how position i, at the top of the stack, mixes the inputs;
        each row sums to 1.

    Example:
        >>> one_layer = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])  # (L, H, T, T) = (1, 1, 2, 2)
        >>> attention_rollout(one_layer)  # (A + I) / 2
        tensor([[0.5000, 0.5000],
                [0.0000, 1.0000]])
    """
    t = weights.shape[-1]
    if weights.dim() < 4 or weights.shape[-2] != t:
        raise ValueError(
            f"rollout needs self-attention weights (..., L, H, T, T), got {tuple(weights.shape)}"
        )
    eye = torch.eye(t, dtype=weights.dtype, device=weights.device)  # (T, T)
    mixed = weights.mean(dim=-3)  # (..., L, T, T): average the heads
    if residual:
        mixed = mixed + eye  # the residual stream carries each token on unchanged
        mixed = mixed / mixed.sum(-1, keepdim=True)  # (..., L, T, T), rows sum to 1 again
    rollout = eye.expand((*mixed.shape[:-3], t, t))  # (..., T, T)
    for layer in range(mixed.shape[-3]):
        rollout = mixed[..., layer, :, :] @ rollout  # (..., T, T): layer l on top of 1 .. l-1
    return rollout


# --8<-- [end:rollout]
