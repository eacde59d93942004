"""Exercises of page 10, looking inside: entropy by hand, the entropy of a head, rollout.

Shape legend: L layers · H heads · T query positions · S key positions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from qkv.attention import masks
from qkv.exercises.cases import compare_number, compare_tensor, generator, randn
from qkv.exercises.grading import CaseResult, Exercise, call
from qkv.viz.stats import attention_rollout, entropy

__all__ = ["EXERCISES", "PAGE"]

PAGE = "docs/learn/10-looking-inside.md"


def check_entropy_by_hand(answer: Any) -> Iterator[CaseResult]:
    yield compare_number(
        answer,
        -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)),
        tol=2e-3,
        hint="H = -sum_j a_j log a_j, with the natural logarithm",
        wrong=[
            (1.5, "that is in bits (log base 2); qkv measures entropy in nats (natural log)"),
            (-(0.5 * math.log(0.5) + 0.25 * math.log(0.25)), "sum over all three keys"),
        ],
    )


def _weights(g: torch.Generator, *size: int, mask: Tensor | None = None) -> Tensor:
    scores = randn(g, *size) * 2
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with no key becomes zeros


def _per_query(w: Tensor) -> Tensor:
    return -torch.special.xlogy(w, w).sum(-1)  # (..., T)


def check_entropy(fn: Callable[..., Any]) -> Iterator[CaseResult]:
    g = generator(1000)
    one_hot = torch.eye(4)[torch.tensor([2, 0, 3, 3, 1])].expand(2, 5, 4)  # (H, T, S)
    no_key = masks.causal(5) & masks.padding(torch.tensor([[0, 1, 1, 1, 1]]))[0]  # (1, T, S)
    cases = [
        ("weights (2, 3, 4, 6) from a softmax, rows summing to 1", _weights(g, 2, 3, 4, 6)),
        ("weights (2, 5, 4), each row one-hot (0·log 0 must count as 0)", one_hot.clone()),
        ("weights (3, 5, 5) under a causal mask with query 0 seeing no key (an all-zero row)",
         _weights(g, 3, 5, 5, mask=no_key)),
    ]  # fmt: skip
    for tested, w in cases:
        got = call(tested, "head_entropy(weights)", fn, w)
        per_query = _per_query(w)
        yield compare_tensor(
            tested,
            got,
            entropy(w),
            atol=1e-5,
            hint="per query -sum_j a_ij log a_ij (natural log, 0·log 0 = 0), then the mean over "
            "the queries whose row is not all zero",
            wrong=[
                (per_query.sum(-1), "average over the queries; you summed them"),
                (per_query.mean(-1), "leave out queries whose row is all zero (they saw no key) "
                 "when you average"),
                (entropy(w) / math.log(2), "use the natural logarithm (nats), not log2"),
                (per_query, "return one number per head: average over the queries (dim -1 of "
                 "the per-query entropies)"),
            ],
            nan_hint="0·log 0 gives NaN in floating point: treat it as 0, e.g. with "
            "torch.special.xlogy(a, a) or a masked log",
        )  # fmt: skip


def _rollout_variant(
    w: Tensor,
    *,
    reverse: bool = False,
    renorm: bool = True,
    residual: bool = True,
    mean: bool = True,
) -> Tensor:
    t = w.shape[-1]
    eye = torch.eye(t)
    mixed = w.mean(-3) if mean else w.sum(-3)  # (L, T, T)
    if residual:
        mixed = mixed + eye
        if renorm:
            mixed = mixed / mixed.sum(-1, keepdim=True)
    out = eye
    for layer in range(mixed.shape[0]):
        out = out @ mixed[layer] if reverse else mixed[layer] @ out
    return out


def check_rollout(fn: Callable[..., Any]) -> Iterator[CaseResult]:
    for seed, (n_layers, h, t) in enumerate([(1, 1, 3), (3, 2, 5), (2, 4, 6)]):
        w = _weights(generator(1010 + seed), n_layers, h, t, t)
        tested = f"weights (L, H, T, T) = {(n_layers, h, t, t)}"
        got = call(tested, "rollout(weights)", fn, w)
        yield compare_tensor(
            tested,
            got,
            attention_rollout(w),
            atol=1e-5,
            hint="per layer Â = rownorm(mean over heads + I); R = Â_L ... Â_2 Â_1",
            wrong=[
                (_rollout_variant(w, reverse=True), "multiply in the other order: the last layer "
                 "goes on the left, R = Â_L ... Â_1"),
                (_rollout_variant(w, residual=False), "add the identity for the residual "
                 "connection before multiplying"),
                (_rollout_variant(w, renorm=False), "after adding the identity, divide each row "
                 "by its sum so that it sums to 1 again"),
                (_rollout_variant(w, mean=False), "average the heads (mean over dim -3), don't "
                 "sum them"),
            ],
        )  # fmt: skip


EXERCISES = [
    Exercise(
        id="10.1",
        title="Entropy by hand",
        kind="by hand",
        name="ANSWER",
        statement=(
            "A query puts weights 0.5, 0.25, 0.25 on three keys. What is the entropy of its "
            "weights, in nats? `ANSWER = ...` (three decimals)."
        ),
        check=check_entropy_by_hand,
    ),
    Exercise(
        id="10.2",
        title="The entropy of a head",
        kind="code",
        name="head_entropy",
        statement=(
            "Write `head_entropy(weights)`: weights (..., T, S), each row a query's weights. "
            "Return (...): the mean over the queries of -sum_j a_ij log a_ij (natural log, "
            "0·log 0 = 0), leaving out queries whose row is all zero (they saw no key)."
        ),
        check=check_entropy,
    ),
    Exercise(
        id="10.3",
        title="Attention rollout",
        kind="code",
        name="rollout",
        statement=(
            "Write `rollout(weights)`: weights (L, H, T, T) of L consecutive self-attention "
            "layers, first layer first. Per layer Â_l = (mean over heads + I), rows divided by "
            "their sums; return R = Â_L ... Â_2 Â_1, (T, T)."
        ),
        check=check_rollout,
    ),
]
