"""Exercises of page 2, masks: counting a combined mask, causal, padding, masked attention.

Shape legend: B batch · H heads · T query positions · S key/value positions · E head dim.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from qkv.attention import masks
from qkv.attention.core import reference_attention
from qkv.exercises.cases import compare_attention, compare_number, compare_tensor, generator, randn
from qkv.exercises.grading import CaseResult, Exercise, call

__all__ = ["EXERCISES", "PAGE"]

PAGE = "docs/learn/02-self-attention-and-masks.md"


def check_count(answer: Any) -> Iterator[CaseResult]:
    want = float((masks.causal(6) & masks.padding([4], 6)).sum())
    yield compare_number(
        answer,
        want,
        tol=0.0,
        hint="draw the 6 x 6 grid: row i may see key j when j <= i and j < 4; count the 1s",
        wrong=[
            (
                float(masks.causal(6).sum()),
                "that is the causal mask alone; padding also hides keys 4 and 5",
            ),
            (
                float(masks.padding([4], 6).expand(1, 1, 6, 6).sum()),
                "that is the padding mask alone; the causal mask also hides later keys",
            ),
            (
                float((masks.causal(6) | masks.padding([4], 6)).sum()),
                "that is `|` (either allows); combining two restrictions is `&` (both allow)",
            ),
        ],
    )


def _causal_top_left(t: int, s: int) -> Tensor:
    return torch.ones(t, s, dtype=torch.bool).tril()


def check_causal(fn: Callable[..., Any]) -> Iterator[CaseResult]:
    for t, s in [(4, None), (5, 5), (3, 7), (1, 6)]:
        tested = f"causal_mask({t})" if s is None else f"causal_mask({t}, {s})"
        args = (t,) if s is None else (t, s)
        got = call(tested, "causal_mask(t) and causal_mask(t, s)", fn, *args)
        want = masks.causal(t, s)
        s_ = t if s is None else s
        query_pos = torch.arange(s_ - t, s_)[:, None]  # (T, 1)
        key_pos = torch.arange(s_)[None, :]  # (1, S)
        yield compare_tensor(
            tested,
            got,
            want,
            hint="query i sits at position S - T + i and may see key j when j <= that position",
            wrong=[
                (~want, "True means *may attend*: your mask is inverted"),
                (key_pos >= query_pos, "the mask is the wrong way round: queries see the future "
                 "and not the past (lower triangle, not upper)"),
                (key_pos < query_pos, "a query may see its own key: use <=, not <"),
                (_causal_top_left(t, s_), "with S > T, align bottom-right: the last query is the "
                 "newest position and sees every key (query i is at position S - T + i)"),
            ],
        )  # fmt: skip


def check_padding(fn: Callable[..., Any]) -> Iterator[CaseResult]:
    signature = "padding_mask(lengths, s) with lengths a list of ints"
    for lengths, s in [([3, 5, 1], 5), ([2, 2], 4), ([0, 3], 3)]:
        tested = f"padding_mask({lengths}, {s})"
        got = call(tested, signature, fn, list(lengths), s)
        want = masks.padding(lengths, s)  # (B, 1, 1, S)
        flat = want[:, 0, 0, :]  # (B, S)
        positions = torch.arange(s)[None, :]
        le = positions <= torch.tensor(lengths)[:, None]
        yield compare_tensor(
            tested,
            got,
            want,
            hint="key j of sequence b is real when j < lengths[b]",
            wrong=[
                (flat, "return (B, 1, 1, S), so that the mask broadcasts over heads and queries: "
                 "add the two axes with mask[:, None, None, :]"),
                (~want, "True means *may attend* (a real token); your mask is inverted"),
                (le[:, None, None, :], "off by one: positions count from 0, so key j is real "
                 "when j < length, not j <= length"),
            ],
        )  # fmt: skip


def check_masked_attention(fn: Callable[..., Any]) -> Iterator[CaseResult]:
    signature = "masked_attention(q, k, v, mask), mask boolean"
    b, h, t, e = 2, 3, 5, 8
    cases = [
        ("causal mask (T, S) = (5, 5)", masks.causal(t)),
        ("padding mask (B, 1, 1, S), lengths [3, 5]", masks.padding([3, 5], t)),
        (
            "causal & padding, lengths [0, 4]: every query of sequence 0 sees no key",
            masks.causal(t) & masks.padding([0, 4], t),
        ),
    ]
    for seed, (tested, mask) in enumerate(cases):
        g = generator(300 + seed)
        q, k, v = randn(g, b, h, t, e), randn(g, b, h, t, e), randn(g, b, h, t, e)
        tested = f"q/k/v ({b}, {h}, {t}, {e}), {tested}"
        got = call(tested, signature, fn, q, k, v, mask, returns=("out", "weights"))
        want_out, want_w = reference_attention(q, k, v, mask)
        scores = (q @ k.transpose(-2, -1)) * e**-0.5  # (B, H, T, S)
        low = torch.finfo(scores.dtype).min
        not_zeroed = torch.softmax(scores.masked_fill(~mask, low), dim=-1)
        inverted = torch.softmax(scores.masked_fill(mask, low), dim=-1).masked_fill(mask, 0.0)
        added = torch.softmax(scores + mask.float(), dim=-1)
        unscaled = reference_attention(q, k, v, mask, scale=1.0)[1]
        yield compare_attention(
            tested,
            got,
            want_out,
            want_w,
            hint="scores of hidden keys become a large negative number before the softmax, "
            "and their weights become 0 after it",
            wrong=[
                (inverted, "True means *may attend*: you hid the keys the mask allows"),
                (added, "never add a boolean mask to the scores (True becomes +1); fill the hidden "
                 "scores with masked_fill(~mask, torch.finfo(scores.dtype).min)"),
                (not_zeroed, "a query that may see no key must get all-zero weights: after the "
                 "softmax, set the weights of hidden keys to 0 (masked_fill(~mask, 0.0))"),
                (unscaled, "your weights equal masked attention without the 1/sqrt(d_k) scale"),
            ],
            nan_hint="a query whose keys are all hidden gets a row of -inf, and softmax of "
            "that is NaN: fill with torch.finfo(scores.dtype).min instead of -inf, then zero the "
            "hidden weights after the softmax",
            output_hint="out = weights @ v",
        )  # fmt: skip


EXERCISES = [
    Exercise(
        id="02.1",
        title="Count what a combined mask allows",
        kind="by hand",
        name="ANSWER",
        statement=(
            "One sequence of 6 positions whose last two are padding (length 4). How many "
            "(query, key) pairs does causal(6) & padding([4], 6) allow, i.e. how many entries "
            "of the 6 x 6 grid are True? Draw the grid and write `ANSWER = ...`."
        ),
        check=check_count,
    ),
    Exercise(
        id="02.2",
        title="The causal mask",
        kind="code",
        name="causal_mask",
        statement=(
            "Write `causal_mask(t, s=None)`: a boolean (T, S) tensor, True = may attend, S "
            "defaulting to T. Query i may see key j when j is not after it. When S > T (a "
            "key/value cache holds S - T earlier positions) the queries are the last T "
            "positions: query i sits at position S - T + i (bottom-right alignment)."
        ),
        check=check_causal,
    ),
    Exercise(
        id="02.3",
        title="The padding mask",
        kind="code",
        name="padding_mask",
        statement=(
            "Write `padding_mask(lengths, s)`: lengths is a list of B real lengths (sequences "
            "padded on the right to s positions). Return a boolean (B, 1, 1, S) tensor, True "
            "for real keys, which broadcasts over heads and queries."
        ),
        check=check_padding,
    ),
    Exercise(
        id="02.4",
        title="Attention under a mask",
        kind="code",
        name="masked_attention",
        statement=(
            "Write `masked_attention(q, k, v, mask)` returning `(out, weights)`: scaled "
            "dot-product attention (q, k, v (B, H, T, E), scale 1/sqrt(E)) where the boolean "
            "`mask`, broadcastable to (B, H, T, S), hides the keys where it is False. Hidden "
            "keys get weight exactly 0, and a query that may see no key at all gets all-zero "
            "weights and a zero output, never NaN."
        ),
        check=check_masked_attention,
    ),
]
