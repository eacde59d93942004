"""Choosing the next token: how a score vector over the vocabulary becomes one token id.

A language model gives logits z (B, V) for the next position; p = softmax(z). Each function
here rewrites z, or picks from it, and is one small, pure step:

    greedy             x = argmax_v z_v
    temperature        z' = z / τ                      τ < 1 sharpens p, τ > 1 flattens it
    top-k              keep the k largest z_v, the others get -inf
    top-p (nucleus)    keep the smallest set of most likely tokens whose mass reaches p
    min-p              keep v with p_v >= min_p * max_u p_u
    repetition         z_v / θ if z_v > 0 else z_v * θ, for every v already in the sequence
    sample             x ~ Categorical(softmax(z')), drawn with a seeded torch.Generator

Holtzman et al., "The Curious Case of Neural Text Degeneration", 2019 (arXiv:1904.09751): top-p.
Fan et al., "Hierarchical Neural Story Generation", 2018 (arXiv:1805.04833): top-k.
Nguyen et al., "Turning Up the Heat: Min-p Sampling for Creative and Coherent LLM Outputs",
2024 (arXiv:2407.01082): min-p.
Keskar et al., "CTRL: A Conditional Transformer Language Model for Controllable Generation",
2019 (arXiv:1909.05858), section 4.1: the repetition penalty.

Removed tokens get -inf, so that softmax gives them probability exactly 0. Every filter keeps at
least one token. ``process_logits`` applies the steps in the order transformers applies them:
repetition penalty, temperature, top-k, top-p, min-p.

Shape legend: B batch · N tokens so far · V vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "greedy",
    "min_p_filter",
    "process_logits",
    "repetition_penalty",
    "sample",
    "temperature",
    "top_k_filter",
    "top_p_filter",
]


# --8<-- [start:greedy]
def greedy(logits: Tensor) -> Tensor:
    """The most likely token of each row: x = argmax_v z_v.

    Args:
        logits: (B, V).

    Returns:
        (B,) long token ids.

    Example:
        >>> greedy(torch.tensor([[0.1, 2.0, -1.0]]))
        tensor([1])
    """
    return logits.argmax(dim=-1)  # (B,)


# --8<-- [end:greedy]


# --8<-- [start:temperature]
def temperature(logits: Tensor, tau: float) -> Tensor:
    """Rescale the logits: z' = z / τ, with τ > 0.

    Example:
        >>> temperature(torch.tensor([[2.0, -1.0]]), 0.5)
        tensor([[ 4., -2.]])
    """
    return logits / tau  # (B, V)


# --8<-- [end:temperature]


# --8<-- [start:top_k]
def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the k highest logits of each row; the rest become -inf (ties with the k-th stay).

    Example:
        >>> top_k_filter(torch.tensor([[1.0, 3.0, 2.0]]), 2)
        tensor([[-inf, 3., 2.]])
    """
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1), the k-th largest
    return logits.masked_fill(logits < kth, float("-inf"))  # (B, V)


# --8<-- [end:top_k]


# --8<-- [start:top_p]
def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose mass reaches p.

    Sort p_v in decreasing order; token i (in that order) is kept when the mass of the tokens
    before it is still below p: sum_{j < i} p_(j) < p. The most likely token is always kept.

    Example:
        >>> probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
        >>> top_p_filter(probs.log(), 0.8).exp()  # 0.5 + 0.3 reaches 0.8
        tensor([[0.5000, 0.3000, 0.0000, 0.0000]])
    """
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.softmax(dim=-1)  # (B, V), decreasing
    before = probs.cumsum(dim=-1) - probs  # (B, V), the mass of the tokens before token i
    drop_sorted = before >= p  # (B, V)
    drop_sorted[..., 0] = False  # the most likely token always stays
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # (B, V), back in vocabulary order
    return logits.masked_fill(drop, float("-inf"))  # (B, V)


# --8<-- [end:top_p]


# --8<-- [start:min_p]
def min_p_filter(logits: Tensor, min_p: float) -> Tensor:
    """Keep the tokens at least ``min_p`` times as likely as the most likely one.

    keep v  iff  p_v >= min_p * max_u p_u   (the most likely token always passes).

    Example:
        >>> probs = torch.tensor([[0.6, 0.3, 0.1]])
        >>> min_p_filter(probs.log(), 0.25).exp()  # the bar is 0.25 * 0.6 = 0.15
        tensor([[0.6000, 0.3000, 0.0000]])
    """
    probs = logits.softmax(dim=-1)  # (B, V)
    bar = min_p * probs.amax(dim=-1, keepdim=True)  # (B, 1)
    return logits.masked_fill(probs < bar, float("-inf"))  # (B, V)


# --8<-- [end:min_p]


# --8<-- [start:repetition_penalty]
def repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL's penalty on tokens already in the sequence (θ > 1 discourages repeating them).

    z'_v = z_v / θ if z_v > 0 else z_v * θ,  for every v in ``seen``; other logits unchanged.

    Args:
        logits: (B, V).
        seen: (B, N) token ids already in each row (repeats are fine).
        penalty: θ > 0.

    Returns:
        (B, V).

    Example:
        >>> repetition_penalty(torch.tensor([[2.0, -1.0, 3.0]]), torch.tensor([[0, 1]]), 2.0)
        tensor([[ 1., -2.,  3.]])
    """
    z = logits.gather(-1, seen)  # (B, N)
    z = torch.where(z > 0, z / penalty, z * penalty)  # (B, N)
    return logits.scatter(-1, seen, z)  # (B, V)


# --8<-- [end:repetition_penalty]


# --8<-- [start:process_logits]
def process_logits(
    logits: Tensor,
    *,
    seen: Tensor | None = None,
    repetition: float | None = None,
    tau: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
) -> Tensor:
    """Apply the steps that are set, in transformers' order; unset steps cost nothing.

    Args:
        logits: (B, V).
        seen: (B, N) ids for the repetition penalty.
        repetition, tau, top_k, top_p, min_p: each step's parameter; None (tau: 1.0) skips it.

    Returns:
        (B, V).
    """
    if repetition is not None and seen is not None:
        logits = repetition_penalty(logits, seen, repetition)
    if tau != 1.0:
        logits = temperature(logits, tau)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    if min_p is not None and min_p > 0.0:
        logits = min_p_filter(logits, min_p)
    return logits


# --8<-- [end:process_logits]


# --8<-- [start:sample]
def sample(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Draw one token per row from softmax(z): x ~ Categorical(p).

    Args:
        logits: (B, V); -inf entries are never drawn.
        generator: a seeded ``torch.Generator`` for reproducible draws (None: torch's global one).

    Returns:
        (B,) long token ids.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> sample(torch.tensor([[0.0, float("-inf")]]), g)
        tensor([0])
    """
    probs = logits.float().softmax(dim=-1)  # (B, V), float32 for a stable softmax
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


# --8<-- [end:sample]
