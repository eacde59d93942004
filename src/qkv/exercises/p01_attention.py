"""Exercises of page 1, attention: weights by hand, softmax, scaled dot-product attention.

Shape legend: T query positions · S key/value positions · E head dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from qkv.attention.core import reference_attention
from qkv.exercises.cases import compare_attention, compare_number, compare_tensor, generator, randn
from qkv.exercises.grading import CaseResult, Exercise, call, forbid

__all__ = ["EXERCISES", "PAGE"]

PAGE = "docs/learn/01-attention.md"


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def check_weight_by_hand(answer: Any) -> Iterator[CaseResult]:
    # q.k1 = 4, q.k2 = 1; scaled by 1/sqrt(4): 2 and 0.5; two keys, so w1 = sigmoid(2 - 0.5).
    yield compare_number(
        answer,
        _sigmoid(1.5),
        tol=2e-3,
        hint="scores q·k_j, times 1/sqrt(d_k), then softmax: e^s1 / (e^s1 + e^s2)",
        wrong=[
            (_sigmoid(3.0), "that is the weight without the scale: divide the scores by sqrt(4)"),
            (_sigmoid(0.75), "you divided by d_k = 4; the scale is 1/sqrt(d_k) = 1/2"),
            (_sigmoid(-1.5), "that is the weight of key 2; the question asks for key 1"),
            (1.5, "that is the difference of the scaled scores; now take the softmax"),
        ],
    )


def check_score_spread(answer: Any) -> Iterator[CaseResult]:
    yield compare_number(
        answer,
        16.0,
        tol=0.05,
        hint="each product q_e k_e has variance 1; the dot product sums d_k of them",
        wrong=[
            (256.0, "256 is the variance of q·k; the standard deviation is its square root"),
            (1.0, "1 is the spread after dividing by sqrt(d_k); the question asks before"),
        ],
    )


def check_softmax(fn: Callable[..., Any]) -> Iterator[CaseResult]:
    cases = [
        ("x (5,), values around 0", (5,), 1.0, False),
        ("x (3, 7), each row its own distribution", (3, 7), 2.0, False),
        ("x (2, 4, 6), some entries -inf (masked keys)", (2, 4, 6), 2.0, True),
        ("x (4, 5) with values in the thousands", (4, 5), 1000.0, False),
    ]
    for seed, (tested, size, spread, with_inf) in enumerate(cases):
        x = randn(generator(100 + seed), *size) * spread
        if with_inf:
            x[..., 1::3] = float("-inf")  # every row keeps its first entry
        want = torch.softmax(x, dim=-1)
        with forbid(
            [
                (torch, "softmax"),
                (F, "softmax"),
                (torch.Tensor, "softmax"),
                (torch.special, "softmax"),
            ],
            "write softmax yourself with torch.exp and .sum (torch.softmax is off for this "
            "exercise)",
        ):
            got = call(tested, "softmax(x) with x a float tensor (..., N)", fn, x)
        wrong = [(torch.softmax(x, dim=0), "you normalised over the first dimension: use dim=-1")]
        if x.dim() > 1:
            wrong.append((torch.softmax(x, dim=-2), "you normalised over dim=-2: use dim=-1"))
        global_norm = x.exp() / x.exp().sum()
        wrong.append(
            (global_norm, "normalise each row on its own: .sum(dim=-1, keepdim=True), not .sum()")
        )
        yield compare_tensor(
            tested,
            got,
            want,
            hint="softmax(x)_i = exp(x_i) / sum_j exp(x_j), over the last dimension",
            wrong=wrong,
            nan_hint=(
                "exp overflows to inf for large inputs and inf/inf is NaN: subtract each row's "
                "maximum first (x - x.amax(dim=-1, keepdim=True)); softmax does not change when "
                "a row is shifted by a constant"
            ),
        )


def _weights(q: Tensor, k: Tensor, scale: float) -> Tensor:
    return torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1)


def check_attention(fn: Callable[..., Any]) -> Iterator[CaseResult]:
    signature = "attention(q, k, v) or attention(q, k, v, scale=0.3)"
    cases = [
        ("q (2, 3, 4, 8), k (2, 3, 8, 8), v (2, 3, 8, 5): S = E", (2, 3), 4, 8, 8, 5, None),
        ("q (3, 8), k/v (5, 8), default scale", (3,), 3, 5, 8, 8, None),
        ("q (2, 6, 16), k/v (2, 6, 16), scale=0.3 given", (2,), 6, 6, 16, 16, 0.3),
    ]
    for seed, (tested, lead, t, s, e, ev, scale) in enumerate(cases):
        g = generator(200 + seed)
        q, k, v = randn(g, *lead, t, e), randn(g, *lead, s, e), randn(g, *lead, s, ev)
        want_out, want_w = reference_attention(q, k, v, scale=scale)
        kwargs = {} if scale is None else {"scale": scale}
        got = call(tested, signature, fn, q, k, v, **kwargs, returns=("out", "weights"))
        default = e**-0.5
        used = default if scale is None else scale
        wrong = [
            (_weights(q, k, 1.0), "your weights equal attention without the 1/sqrt(d_k) scale"),
            (_weights(q, k, 1.0 / e), "you scaled by 1/d_k; the scale is 1/sqrt(d_k)"),
            (
                torch.softmax((q @ k.transpose(-2, -1)) * used, dim=-2),
                "the softmax runs over the keys (dim=-1): each query's weights sum to 1",
            ),
        ]
        if s == e:
            wrong.append(
                (
                    torch.softmax((q @ k) * used, dim=-1),
                    "scores are q @ k.transpose(-2, -1): you multiplied by k without the transpose",
                )
            )
        if scale is not None:
            wrong.append((_weights(q, k, default), "use the `scale` argument when it is given"))
        yield compare_attention(
            tested,
            got,
            want_out,
            want_w,
            hint="weights = softmax(q @ k.transpose(-2, -1) * scale, dim=-1)",
            wrong=wrong,
        )


EXERCISES = [
    Exercise(
        id="01.1",
        title="Attention weights by hand",
        kind="by hand",
        name="ANSWER",
        statement=(
            "One query q = (1, 2, 0, 1) and two keys k1 = (2, 1, 0, 0), k2 = (0, 0, 1, 1), so "
            "d_k = 4. With scaled dot-product attention, what weight does the query give key 1? "
            "Work it out on paper (a calculator for e^x is fine) and write `ANSWER = 0.xyz` "
            "(three decimals)."
        ),
        check=check_weight_by_hand,
    ),
    Exercise(
        id="01.2",
        title="Why the scale: the spread of q·k",
        kind="by hand",
        name="ANSWER",
        statement=(
            "q and k have d_k = 256 entries each, all independent with mean 0 and variance 1. "
            "What is the standard deviation of the unscaled score q·k? Write `ANSWER = ...`."
        ),
        check=check_score_spread,
    ),
    Exercise(
        id="01.3",
        title="Softmax, numerically stable",
        kind="code",
        name="softmax",
        statement=(
            "Write `softmax(x)`: the softmax of a float tensor x (..., N) over its last "
            "dimension, with torch.exp and .sum (torch.softmax is switched off while the check "
            "runs). It must work for inputs in the thousands and for entries equal to -inf "
            "(masked keys), as long as a row has one finite entry."
        ),
        check=check_softmax,
    ),
    Exercise(
        id="01.4",
        title="Scaled dot-product attention",
        kind="code",
        name="attention",
        statement=(
            "Write `attention(q, k, v, scale=None)` for q (..., T, E), k (..., S, E), "
            "v (..., S, Ev), returning `(out, weights)`: weights (..., T, S) = "
            "softmax(q kᵀ · scale) over the keys, scale defaulting to 1/sqrt(E), and out "
            "(..., T, Ev) = weights @ v. torch.softmax is allowed here."
        ),
        check=check_attention,
    ),
]
