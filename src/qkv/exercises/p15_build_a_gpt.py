"""Exercises of page 15, building a GPT: the loss of a model that knows nothing, the bigram
table, averaging the past, one causal head, several heads joined.

Shape legend: B batch · T positions · D model width · H heads · E head dim · V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from qkv.attention import masks
from qkv.attention.core import reference_attention
from qkv.attention.multihead import MultiHeadAttention
from qkv.exercises.cases import compare_number, compare_tensor, generator, randn
from qkv.exercises.grading import CaseResult, Exercise, call

__all__ = ["EXERCISES", "PAGE"]

PAGE = "docs/learn/15-build-a-gpt.md"


def check_uniform_loss_by_hand(answer: Any) -> Iterator[CaseResult]:
    yield compare_number(
        answer,
        math.log(103),
        tol=2e-3,
        hint="the loss is -ln(probability of the right character), in nats",
        wrong=[
            (math.log2(103), "that is in bits (log base 2); the loss is in nats (natural log)"),
            (math.log10(103), "use the natural logarithm, ln"),
            (1 / 103, "that is the probability; the loss is minus its natural logarithm"),
        ],
    )


def _counts(ids: Tensor, v: int, *, wrap: bool = False) -> Tensor:
    following = ids.roll(-1) if wrap else ids[1:]
    current = ids if wrap else ids[:-1]
    counts = torch.zeros(v, v, dtype=torch.long)  # (V, V)
    return counts.index_put_((current, following), torch.ones_like(current), accumulate=True)


def check_bigram_counts(fn: Callable[..., Any]) -> Iterator[CaseResult]:
    for seed, (n, v) in enumerate([(10, 4), (60, 7), (200, 30)]):
        ids = torch.randint(v - 1 if seed == 2 else v, (n,), generator=generator(1500 + seed))
        tested = f"ids ({n},), vocab_size={v}" + (", the last id never occurs" if seed == 2 else "")
        got = call(tested, "bigram_counts(ids, vocab_size)", fn, ids.clone(), v)
        want = _counts(ids, v)
        yield compare_tensor(
            tested,
            got,
            want,
            atol=0,
            rtol=0,
            what="the counts",
            hint="counts[a, b] = how many times id b directly follows id a",
            wrong=[
                (want.T, "row = the current character, column = the one after it: counts[a, b] "
                 "counts b following a"),
                (_counts(ids, v, wrap=True), "the last character has no successor: count the "
                 "pairs (ids[i], ids[i + 1]) for i < N - 1, without wrapping around"),
            ],
        )  # fmt: skip


def _average(x: Tensor, mask: Tensor) -> Tensor:
    """The average of the values the mask allows: attention whose scores are all equal."""
    zeros = x.new_zeros(*x.shape[:-1], 1)  # (B, T, 1): q = k = 0, so every score is 0
    return reference_attention(zeros, zeros, x, mask)[0]  # (B, T, D)


def check_average_past(fn: Callable[..., Any]) -> Iterator[CaseResult]:
    for seed, (b, t, d) in enumerate([(1, 4, 3), (2, 7, 5), (3, 16, 8)]):
        x = randn(generator(1510 + seed), b, t, d)
        tested = f"x {(b, t, d)}"
        got = call(tested, "average_past(x)", fn, x.clone())
        yield compare_tensor(
            tested,
            got,
            _average(x, masks.causal(t)),
            hint="row t of the (T, T) weights is 1/(t + 1) in columns 0 .. t and 0 after: "
            "torch.tril(ones), each row divided by its sum",
            wrong=[
                (_average(x, masks.causal(t).T), "that averages the future: keep the lower "
                 "triangle (columns 0 .. t of row t), torch.tril"),
                (x.cumsum(dim=1), "divide each row of the triangle by its sum, t + 1: a sum "
                 "of the past is not its average"),
                (x.cumsum(dim=1) / t, "divide position t by t + 1, the number of positions "
                 "averaged, not by T"),
            ],
        )  # fmt: skip


def _head(x: Tensor, w: tuple[Tensor, ...], mask: Tensor | None, scale: float | None) -> Tensor:
    q, k, v = (x @ m.T for m in w)  # (B, T, E) each
    return reference_attention(q, k, v, mask, scale=scale)[0]  # (B, T, E)


def check_head(fn: Callable[..., Any]) -> Iterator[CaseResult]:
    for seed, (b, t, d, e) in enumerate([(1, 5, 8, 4), (2, 9, 16, 16), (3, 12, 12, 6)]):
        g = generator(1520 + seed)
        x, w = randn(g, b, t, d), tuple(randn(g, e, d) / math.sqrt(d) for _ in range(3))
        tested = f"x {(b, t, d)}, w_q/w_k/w_v {(e, d)}"
        got = call(tested, "causal_head(x, w_q, w_k, w_v)", fn, x.clone(), *(m.clone() for m in w))
        causal = masks.causal(t)
        yield compare_tensor(
            tested,
            got,
            _head(x, w, causal, None),
            hint="q, k, v = x W^T; softmax(q k^T / sqrt(E)) with -inf above the diagonal; "
            "times v",
            wrong=[
                (_head(x, w, None, None), "mask the future: scores above the diagonal get "
                 "-inf before the softmax"),
                (_head(x, w, causal, 1.0), "divide the scores by sqrt(E), the head width"),
                (_head(x, w, causal, d**-0.5) if d != e else None, "divide by sqrt(E), the "
                 "head width (w_q.shape[0]), not sqrt(D)"),
                (_head(x, w, causal.T, None), "the mask is the wrong way round: position t "
                 "may see positions 0 .. t, the lower triangle"),
            ],
        )  # fmt: skip


def _multi_head(x: Tensor, heads: list[tuple[Tensor, ...]], w_o: Tensor, b_o: Tensor) -> Tensor:
    """qkv's MultiHeadAttention, with the heads' (E, D) matrices stacked, head 0 first."""
    d = x.shape[-1]
    mha = MultiHeadAttention(d, len(heads), attn_impl="reference").requires_grad_(False)
    for i, proj in enumerate((mha.q_proj, mha.k_proj, mha.v_proj)):
        proj.weight.copy_(torch.cat([head[i] for head in heads]))  # (H·E, D) = (D, D)
        proj.bias.zero_()
    mha.out_proj.weight.copy_(w_o)
    mha.out_proj.bias.copy_(b_o)
    return mha(x, causal=True)  # (B, T, D)


def check_multi_head(fn: Callable[..., Any]) -> Iterator[CaseResult]:
    for seed, (b, t, d, h) in enumerate([(1, 6, 8, 2), (2, 10, 16, 4), (2, 7, 12, 3)]):
        g = generator(1530 + seed)
        e = d // h
        x = randn(g, b, t, d)
        heads = [tuple(randn(g, e, d) / math.sqrt(d) for _ in range(3)) for _ in range(h)]
        w_o, b_o = randn(g, d, d) / math.sqrt(d), randn(g, d)
        tested = f"x {(b, t, d)}, H={h} heads of w_q/w_k/w_v {(e, d)}, w_o {(d, d)}"
        given = [tuple(m.clone() for m in head) for head in heads]
        got = call(tested, "multi_head(x, heads, w_o, b_o)", fn, x.clone(), given, w_o.clone(),
                   b_o.clone())  # fmt: skip
        joined = torch.cat([_head(x, w, masks.causal(t), None) for w in heads], dim=-1)
        yield compare_tensor(
            tested,
            got,
            _multi_head(x, heads, w_o, b_o),
            hint="each head on its own (15.4), outputs side by side, head 0 first, then "
            "x @ w_o.T + b_o",
            wrong=[
                (_multi_head(x, heads[::-1], w_o, b_o), "put the heads' outputs side by side "
                 "in order, head 0 first"),
                (joined, "mix the heads with the output projection: concat @ w_o.T + b_o"),
                (joined @ w_o + b_o, "an nn.Linear-style weight is (out, in): multiply by "
                 "w_o.T"),
            ],
        )  # fmt: skip


EXERCISES = [
    Exercise(
        id="15.1",
        title="The loss of a model that knows nothing",
        kind="by hand",
        name="ANSWER",
        statement=(
            "A model gives each of the V = 103 characters the same probability, whatever came "
            "before. What is its loss, in nats per character? `ANSWER = ...` (three decimals)."
        ),
        check=check_uniform_loss_by_hand,
    ),
    Exercise(
        id="15.2",
        title="The bigram table",
        kind="code",
        name="bigram_counts",
        statement=(
            "Write `bigram_counts(ids, vocab_size)` -> (V, V) int64: ids (N,) is a text as "
            "character ids; counts[a, b] is how many times id b directly follows id a. (Row a, "
            "normalised, is what the bigram model of stage 1 learns to predict after a.)"
        ),
        check=check_bigram_counts,
    ),
    Exercise(
        id="15.3",
        title="Averaging the past",
        kind="code",
        name="average_past",
        statement=(
            "Write `average_past(x)` -> (B, T, D): x (B, T, D); position t gets the mean of "
            "x[:, 0], ..., x[:, t], computed for all positions at once as stage 2 does it, with "
            "a (T, T) lower-triangular matrix whose rows sum to 1."
        ),
        check=check_average_past,
    ),
    Exercise(
        id="15.4",
        title="One head of causal self-attention",
        kind="code",
        name="causal_head",
        statement=(
            "Write `causal_head(x, w_q, w_k, w_v)` -> (B, T, E): x (B, T, D); w_q, w_k, w_v "
            "(E, D) as nn.Linear stores them, without biases. q, k, v = x W^T; weights = "
            "softmax(q k^T / sqrt(E)) with the future masked; return weights @ v."
        ),
        check=check_head,
    ),
    Exercise(
        id="15.5",
        title="Several heads, joined",
        kind="code",
        name="multi_head",
        statement=(
            "Write `multi_head(x, heads, w_o, b_o)` -> (B, T, D): heads is a list of H tuples "
            "(w_q, w_k, w_v), each (E, D) with E = D / H; run each as the causal head of 15.4, "
            "put the outputs side by side (head 0 first) and apply the output projection: "
            "w_o (D, D) in nn.Linear's layout, b_o (D,)."
        ),
        check=check_multi_head,
    ),
]
