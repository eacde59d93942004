"""Exercises of page 9, efficient attention: the online softmax and a cache by hand, a sliding
window, attention one key block at a time, causal linear attention.

Shape legend: B batch · H heads · K key/value heads · L layers · T query positions · S key
positions · E head dim · M feature dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from qkv.attention import masks
from qkv.attention.core import reference_attention
from qkv.attention.kv_cache import kv_cache_bytes_per_token
from qkv.attention.variants.linear import dense_kernel_attention, elu_feature_map, kernel_attention
from qkv.exercises.cases import compare_number, compare_tensor, generator, randn
from qkv.exercises.grading import CaseResult, Exercise, call, forbid, require

__all__ = ["EXERCISES", "PAGE"]

PAGE = "docs/learn/09-efficient-attention.md"

# The by-hand row: scores arriving in two blocks of two.
_FIRST, _SECOND = (1.0, 2.0), (4.0, 0.0)


def _sum_exp(scores: tuple[float, ...], m: float) -> float:
    return sum(math.exp(s - m) for s in scores)


def check_online_by_hand(answer: Any) -> Iterator[CaseResult]:
    m1, m2 = max(_FIRST), max(_FIRST + _SECOND)
    l1, block = _sum_exp(_FIRST, m1), _sum_exp(_SECOND, m2)
    want = float(torch.tensor(_FIRST + _SECOND).logsumexp(0).exp()) / math.exp(m2)
    yield compare_number(
        answer,
        want,
        tol=2e-3,
        hint="the maximum rises to the second block's: α = e^(m_old - m_new), then "
        "ℓ = α·ℓ_old + the second block's sum of e^(s - m_new)",
        wrong=[
            (l1 + block, "the first block's sum was taken under the old maximum: multiply it by "
             "α = e^(m_old - m_new) before adding"),
            (_sum_exp(_FIRST + _SECOND, m1), "the running maximum has risen: express ℓ "
             "relative to the new maximum"),
            (math.exp(m2 - m1) * l1 + block, "α = e^(m_old - m_new), which is below 1 when the "
             "maximum rises; yours is upside down"),
            (block, "add the first block's sum too, rescaled by α"),
        ],
    )  # fmt: skip


def check_cache_by_hand(answer: Any) -> Iterator[CaseResult]:
    batch, context, gib = 4, 32_768, 2**30
    per_token = kv_cache_bytes_per_token(80, 8, 128, torch.bfloat16)
    yield compare_number(
        answer,
        batch * context * per_token / gib,
        tol=0.01,
        relative=True,
        hint="per token: 2 (a key and a value) x L x K x E x 2 bytes; times the tokens of "
        "context and the sequences of the batch; 1 GiB = 2^30 bytes",
        wrong=[
            (batch * context * 8 * per_token / gib, "the cache keeps the K = 8 key/value "
             "heads, not the H = 64 query heads"),
            (batch * context * per_token / 2 / gib, "keep a key *and* a value: a factor 2"),
            (batch * context * 2 * per_token / gib, "bfloat16 takes 2 bytes per number, not 4"),
            (context * per_token / gib, "every sequence of the batch has its own cache: times 4"),
            (batch * context * per_token / 1e9, "a GiB is 2^30 bytes, not 10^9"),
        ],
    )  # fmt: skip


def _window_top_left(t: int, window: int, s: int) -> Tensor:
    distance = torch.arange(t)[:, None] - torch.arange(s)[None, :]  # (T, S)
    return (distance >= 0) & (distance < window)


def check_sliding_window(fn: Callable[..., Any]) -> Iterator[CaseResult]:
    signature = "sliding_window_mask(t, window) and sliding_window_mask(t, window, s)"
    for t, window, s in [(6, 3, None), (5, 1, None), (4, 2, 7), (3, 8, None)]:
        args = (t, window) if s is None else (t, window, s)
        tested = f"sliding_window_mask{args}"
        got = call(tested, signature, fn, *args)
        want = masks.sliding_window(t, window, s)
        wrong = [
            (masks.sliding_window(t, window + 1, s), "off by one: a query sees itself and the "
             "window - 1 keys before it, window keys in all"),
            (masks.sliding_window(t, window, s, causal=False), "the window is causal here: no "
             "key after the query"),
            (~want, "True means *may attend*: your mask is inverted"),
        ]  # fmt: skip
        if s is not None:
            wrong.append((_window_top_left(t, window, s), "align bottom-right: the T queries "
                          "are the last T of the S positions"))  # fmt: skip
        if window < t:
            wrong.append((masks.causal(t, s), "also hide the keys window or more positions "
                          "back"))  # fmt: skip
        yield compare_tensor(
            tested,
            got,
            want,
            hint="query i (at position S - T + i) may see key j when 0 <= position - j < window",
            wrong=wrong,
        )


def _without_rescale(q: Tensor, k: Tensor, v: Tensor, block: int) -> Tensor:
    """The online softmax with a mistake: what was summed under an older maximum is never
    rescaled by α when the maximum rises. The output, (..., T, Ev)."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (..., T, S)
    m = scores.new_full(scores.shape[:-1], float("-inf"))  # (..., T)
    total = torch.zeros_like(m)  # (..., T)
    acc = q.new_zeros(*q.shape[:-1], v.shape[-1])  # (..., T, Ev)
    for start in range(0, k.shape[-2], block):
        s_j, v_j = scores[..., start : start + block], v[..., start : start + block, :]
        m = torch.maximum(m, s_j.amax(-1))  # (..., T)
        p = torch.exp(s_j - m[..., None])  # (..., T, block)
        total, acc = total + p.sum(-1), acc + p @ v_j  # no α
    return acc / total[..., None]  # (..., T, Ev)


def check_online_attention(fn: Callable[..., Any]) -> Iterator[CaseResult]:
    signature = "online_attention(q, k, v, block_size)"
    cases = [
        ("q (4, 8), k/v (12, 8), block_size=4", (), 4, 12, 8, 8, 4, 1.0),
        ("q (2, 3, 5, 16), k/v (2, 3, 10, 16/6), block_size=3", (2, 3), 5, 10, 16, 6, 3, 1.0),
        ("q (3, 6, 16), k/v (3, 9, 16), scores in the hundreds, block_size=2", (3,), 6, 9, 16,
         16, 2, 10.0),
    ]  # fmt: skip
    for seed, (tested, lead, t, s, e, ev, block, size) in enumerate(cases):
        g = generator(90 + seed)
        q, k, v = randn(g, *lead, t, e) * size, randn(g, *lead, s, e) * size, randn(g, *lead, s, ev)
        with forbid(
            [
                (torch, "softmax"),
                (F, "softmax"),
                (torch.Tensor, "softmax"),
                (torch.special, "softmax"),
                (torch, "logsumexp"),
                (torch.Tensor, "logsumexp"),
                (torch.special, "logsumexp"),
                (F, "scaled_dot_product_attention"),
            ],
            "keep the running maximum and sum yourself, with torch.exp and .sum (softmax, "
            "logsumexp and fused attention are off for this exercise)",
        ):
            got = call(tested, signature, fn, q, k, v, block, returns=("out", "lse"))
        want_out, _ = reference_attention(q, k, v)  # (..., T, Ev)
        scores = (q @ k.transpose(-2, -1)) * e**-0.5  # (..., T, S)
        want_lse = scores.logsumexp(-1)  # (..., T)
        require(compare_tensor(
            tested,
            got[0],
            want_out,
            atol=1e-4,
            what="the output",
            hint="per key block: new_m = max(m, block max), α = exp(m - new_m), "
            "ℓ = α·ℓ + sum exp(s - new_m), acc = α·acc + exp(s - new_m) @ v_block; "
            "out = acc / ℓ",
            wrong=[
                (_without_rescale(q, k, v, block), "when the maximum rises, multiply ℓ and acc "
                 "by α = exp(m_old - m_new): they were summed relative to the old maximum"),
                (reference_attention(q, k, v, scale=1.0)[0], "scale the scores by 1/sqrt(E) "
                 "first"),
            ],
            nan_hint="exp overflows for scores in the hundreds: subtract the running maximum "
            "inside the exp, exp(s - m)",
        ))  # fmt: skip
        yield compare_tensor(
            tested,
            got[1],
            want_lse,
            atol=1e-4,
            what="lse",
            hint="the log-sum-exp of each query's scaled scores, L = m + log ℓ",
            wrong=[(want_lse - scores.amax(-1), "L = m + log ℓ: add the final maximum m to log ℓ")],
        )


def _causal_unnormalised(phi_q: Tensor, phi_k: Tensor, v: Tensor) -> Tensor:
    t = phi_q.shape[-2]
    sim = (phi_q @ phi_k.transpose(-2, -1)).masked_fill(~masks.causal(t), 0.0)  # (..., T, T)
    return sim @ v  # (..., T, Ev)


def check_causal_linear(fn: Callable[..., Any]) -> Iterator[CaseResult]:
    signature = "causal_linear_attention(phi_q, phi_k, v)"
    for seed, (lead, t, m, ev) in enumerate([((), 6, 4, 3), ((2, 2), 9, 8, 5), ((1,), 1, 3, 2)]):
        g = generator(95 + seed)
        phi_q = elu_feature_map(randn(g, *lead, t, m))  # (..., T, M), positive
        phi_k = elu_feature_map(randn(g, *lead, t, m))  # (..., T, M)
        v = randn(g, *lead, t, ev)
        tested = f"phi_q/phi_k {(*lead, t, m)}, v {(*lead, t, ev)}"
        got = call(tested, signature, fn, phi_q, phi_k, v)
        want, _ = dense_kernel_attention(phi_q, phi_k, v, masks.causal(t))  # (..., T, Ev)
        before = torch.ones(t, t, dtype=torch.bool).tril(-1)  # key strictly before the query
        yield compare_tensor(
            tested,
            got,
            want,
            atol=1e-5,
            hint="running sums over t: S_t = S_(t-1) + φ(k_t) v_tᵀ, z_t = z_(t-1) + φ(k_t); "
            "o_t = φ(q_t)ᵀ S_t / φ(q_t)ᵀ z_t",
            wrong=[
                (kernel_attention(phi_q, phi_k, v), "query t may see only keys 0 .. t: use "
                 "running sums up to t, not sums over all keys"),
                (dense_kernel_attention(phi_q, phi_k, v, before)[0], "query t sees key t "
                 "itself: add φ(k_t) to the running sums before reading them"),
                (_causal_unnormalised(phi_q, phi_k, v), "divide by the normaliser "
                 "φ(q_t)ᵀ z_t, the same sum with every value replaced by 1"),
            ],
            nan_hint="a query whose normaliser φ(q_t)ᵀ z_t is 0 divides by zero: query t sees "
            "keys 0 .. t, key t itself included, so update the sums before reading them",
        )  # fmt: skip


EXERCISES = [
    Exercise(
        id="09.1",
        title="The online softmax by hand",
        kind="by hand",
        name="ANSWER",
        statement=(
            "One query's scores arrive in two blocks, (1, 2) and then (4, 0). After the first "
            "block the running maximum is m = 2 and the running sum ℓ = e^(1-2) + e^(2-2). "
            "What is ℓ after the second block, relative to the new maximum? `ANSWER = ...` "
            "(three decimals)."
        ),
        check=check_online_by_hand,
    ),
    Exercise(
        id="09.2",
        title="A grouped-query cache by hand",
        kind="by hand",
        name="ANSWER",
        statement=(
            "A model shaped like Llama 2 70B: 80 layers, 64 query heads and 8 key/value heads "
            "of head dim 128, its cache in bfloat16. How many GiB (2^30 bytes) does the "
            "key/value cache of a batch of 4 sequences with 32,768 tokens of context each "
            "take? `ANSWER = ...`."
        ),
        check=check_cache_by_hand,
    ),
    Exercise(
        id="09.3",
        title="A sliding-window mask",
        kind="code",
        name="sliding_window_mask",
        statement=(
            "Write `sliding_window_mask(t, window, s=None)`: a boolean (T, S) mask, True = may "
            "attend, with S = T when s is None. The T queries are the last T of the S positions "
            "(query i sits at position S - T + i, as in a causal mask) and each sees itself and "
            "the window - 1 keys before it."
        ),
        check=check_sliding_window,
    ),
    Exercise(
        id="09.4",
        title="Attention one key block at a time",
        kind="code",
        name="online_attention",
        statement=(
            "Write `online_attention(q, k, v, block_size)` -> (out, lse): q (..., T, E), "
            "k (..., S, E), v (..., S, Ev), scale 1/sqrt(E). Go through the keys block_size at "
            "a time, keeping for each query a running maximum m, sum ℓ and weighted sum of "
            "values, rescaled whenever m rises (the online softmax). out (..., T, Ev) is "
            "attention's output and lse (..., T) = m + log ℓ, the log-sum-exp of the scores. "
            "Softmax and logsumexp are switched off while the check runs; scores may be in the "
            "hundreds."
        ),
        check=check_online_attention,
    ),
    Exercise(
        id="09.5",
        title="Causal linear attention, the RNN view",
        kind="code",
        name="causal_linear_attention",
        statement=(
            "Write `causal_linear_attention(phi_q, phi_k, v)`: phi_q and phi_k (..., T, M) "
            "positive features, v (..., T, Ev). Query t sees keys 0 .. t: with the running "
            "sums S_t = sum_(s<=t) φ(k_s) v_sᵀ (M, Ev) and z_t = sum_(s<=t) φ(k_s) (M,), "
            "o_t = φ(q_t)ᵀ S_t / φ(q_t)ᵀ z_t. Return (..., T, Ev) without forming a T x T "
            "table (a loop over t, or torch.cumsum)."
        ),
        check=check_causal_linear,
    ),
]
