"""Exercises of page 8, generation: a nucleus by hand, top-k, top-p, one cached decoding step.

Shape legend: B batch · V vocabulary · H heads · P cached positions · T new positions ·
E head dim.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from qkv.attention import masks
from qkv.attention.core import reference_attention
from qkv.exercises.cases import compare_number, compare_tensor, generator, randn
from qkv.exercises.grading import CaseResult, Exercise, call, require
from qkv.generate.sampling import top_k_filter, top_p_filter

__all__ = ["EXERCISES", "PAGE"]

PAGE = "docs/learn/08-generation.md"

NEG_INF = float("-inf")


def check_nucleus_by_hand(answer: Any) -> Iterator[CaseResult]:
    yield compare_number(
        answer,
        3.0,
        tol=0.0,
        hint="add the probabilities from the largest down and stop at the first token whose "
        "running total reaches p",
        wrong=[
            (2.0, "0.4 + 0.25 = 0.65 has not reached 0.7: the nucleus needs one more token"),
            (4.0, "0.4 + 0.25 + 0.2 = 0.85 already reaches 0.7: the fourth token is left out"),
        ],
    )


def _keep_top(logits: Tensor, k: int, fill: float = NEG_INF) -> Tensor:
    k = max(1, min(k, logits.shape[-1]))
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, fill)


def check_top_k(fn: Callable[..., Any]) -> Iterator[CaseResult]:
    for seed, (b, v, k) in enumerate([(2, 10, 3), (3, 50, 1), (1, 6, 6)]):
        logits = randn(generator(900 + seed), b, v) * 2
        tested = f"logits ({b}, {v}), k={k}"
        got = call(tested, "top_k_filter(logits, k)", fn, logits, k)
        smallest = -_keep_top(-logits, k, fill=float("inf"))
        yield compare_tensor(
            tested,
            got,
            top_k_filter(logits, k),
            hint="keep the k largest logits of each row where they are, set the others to -inf",
            wrong=[
                (_keep_top(logits, k, fill=0.0), "removed tokens must get -inf (so softmax gives "
                 "them 0), not 0: a logit of 0 still has probability"),
                (_keep_top(logits, k - 1), "off by one: keep k tokens, you kept k - 1"),
                (_keep_top(logits, k + 1), "off by one: keep k tokens, you kept k + 1"),
                (smallest, "keep the largest logits, not the smallest"),
                (torch.topk(logits, k, dim=-1).values, "return the full (B, V) logits with the "
                 "others set to -inf, in vocabulary order, not the top k values"),
            ],
        )  # fmt: skip


def _top_p_including(logits: Tensor, p: float) -> Tensor:
    """Drop a token once the mass up to and including it reaches p (drops the crossing one)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    drop_sorted = sorted_logits.softmax(-1).cumsum(-1) >= p
    return logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), NEG_INF)


def _top_p_unsorted(logits: Tensor, p: float) -> Tensor:
    probs = logits.softmax(-1)
    drop = probs.cumsum(-1) - probs >= p
    drop[..., 0] = False
    return logits.masked_fill(drop, NEG_INF)


def check_top_p(fn: Callable[..., Any]) -> Iterator[CaseResult]:
    for seed, (b, v, p) in enumerate([(2, 20, 0.9), (3, 8, 0.5), (2, 6, 0.01)]):
        logits = randn(generator(910 + seed), b, v) * 2
        tested = f"logits ({b}, {v}), p={p}"
        got = call(tested, "top_p_filter(logits, p)", fn, logits, p)
        want = top_p_filter(logits, p)
        yield compare_tensor(
            tested,
            got,
            want,
            hint="sort by probability; keep a token while the mass of the tokens before it is "
            "below p; always keep the most likely token",
            wrong=[
                (_top_p_including(logits, p), "keep the token whose mass takes the total past p: "
                 "drop a token only when the mass *before* it already reaches p (and always "
                 "keep the most likely token)"),
                (_top_p_unsorted(logits, p), "sort the probabilities in decreasing order before "
                 "the running sum, then put the decision back in vocabulary order"),
                (want.masked_fill(want.isinf(), 0.0), "removed tokens must get -inf, not 0"),
            ],
        )  # fmt: skip


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    return reference_attention(q, k, v, mask)[0]


def check_cached_step(fn: Callable[..., Any]) -> Iterator[CaseResult]:
    signature = "cached_attention(q, k_new, v_new, k_cache, v_cache)"
    b, h, e = 2, 2, 8
    for seed, (past, t) in enumerate([(5, 1), (4, 3), (0, 4)]):
        g = generator(920 + seed)
        k_all, v_all, q_all = (randn(g, b, h, past + t, e) for _ in range(3))
        k_cache, v_cache = k_all[..., :past, :], v_all[..., :past, :]
        k_new, v_new, q = k_all[..., past:, :], v_all[..., past:, :], q_all[..., past:, :]
        tested = f"cache of P={past} positions, T={t} new tokens, (B, H, E) = ({b}, {h}, {e})"
        got = call(
            tested,
            signature,
            fn,
            q,
            k_new,
            v_new,
            k_cache,
            v_cache,
            returns=("out", "k_all", "v_all"),
        )
        s = past + t
        # The full forward over all P + T positions, causal; its last T rows are the answer.
        want = _attend(q_all, k_all, v_all, masks.causal(s))[..., past:, :]
        query_pos = torch.arange(past, s)[:, None]
        key_pos = torch.arange(s)[None, :]
        swapped_k = torch.cat([k_new, k_cache], dim=-2)
        swapped_v = torch.cat([v_new, v_cache], dim=-2)
        require(compare_tensor(
            tested,
            got[1],
            k_all,
            what="k_all",
            hint="k_all = the cached keys followed by the new ones, along the positions",
            wrong=[(swapped_k, "the cache holds the earlier positions: torch.cat([k_cache, "
                    "k_new], dim=-2), in that order")],
        ))  # fmt: skip
        require(compare_tensor(tested, got[2], v_all, what="v_all", hint="as for k_all"))
        yield compare_tensor(
            tested,
            got[0],
            want,
            atol=1e-5,
            what="the output",
            hint="new query i sits at position P + i and may see keys 0 .. P + i: "
            "masks.causal(T, P + T) aligns it so",
            wrong=[
                (_attend(q, k_all, v_all, torch.ones(t, s).tril().bool()), "off by P: new "
                 "query i sits at position P + i, so it may see keys 0 .. P + i "
                 "(bottom-right alignment), not 0 .. i"),
                (_attend(q, k_all, v_all, key_pos < query_pos), "a query may see its own "
                 "key: keys 0 .. P + i, inclusive"),
                (_attend(q, k_all, v_all, None), "with T > 1 new tokens, each must not see "
                 "the new tokens after it: apply the causal mask"),
                (_attend(q, swapped_k, swapped_v, key_pos <= query_pos), "the cache holds "
                 "the earlier positions: concatenate [cache, new]"),
            ],
        )  # fmt: skip


EXERCISES = [
    Exercise(
        id="08.1",
        title="The nucleus by hand",
        kind="by hand",
        name="ANSWER",
        statement=(
            "The next-token probabilities, sorted, are 0.4, 0.25, 0.2, 0.1, 0.05. How many "
            "tokens does top-p sampling with p = 0.7 keep? `ANSWER = ...`."
        ),
        check=check_nucleus_by_hand,
    ),
    Exercise(
        id="08.2",
        title="Top-k filtering",
        kind="code",
        name="top_k_filter",
        statement=(
            "Write `top_k_filter(logits, k)`: logits (B, V); keep the k largest of each row in "
            "place and set every other entry to -inf. Return (B, V)."
        ),
        check=check_top_k,
    ),
    Exercise(
        id="08.3",
        title="Top-p (nucleus) filtering",
        kind="code",
        name="top_p_filter",
        statement=(
            "Write `top_p_filter(logits, p)`: logits (B, V). Sorting each row's probabilities "
            "in decreasing order, keep a token when the mass of the tokens before it is below "
            "p (so the token that reaches p stays, and the most likely token always stays); "
            "set the others to -inf. Return (B, V) in vocabulary order."
        ),
        check=check_top_p,
    ),
    Exercise(
        id="08.4",
        title="One decoding step with a key/value cache",
        kind="code",
        name="cached_attention",
        statement=(
            "Write `cached_attention(q, k_new, v_new, k_cache, v_cache)` -> (out, k_all, v_all): "
            "q, k_new, v_new (B, H, T, E) are T new tokens, k_cache and v_cache (B, H, P, E) "
            "the P earlier ones (P may be 0). Append the new keys and values after the cached "
            "ones, then attend (scale 1/sqrt(E)) with a causal mask: new token i is at "
            "position P + i. out is (B, H, T, E); k_all and v_all are (B, H, P + T, E)."
        ),
        check=check_cached_step,
    ),
]
