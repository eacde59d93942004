"""Exercises of page 13, cheaper models: an int8 level by hand, top-k routing, the
load-balancing loss, which choices an expert of limited capacity serves.

Shape legend: N tokens · X experts · k experts per token · C capacity per expert.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from qkv.blocks.moe import experts_loop, load_balancing_loss, route
from qkv.blocks.quant import quantize_int8
from qkv.exercises.cases import compare_number, compare_tensor, generator, randn
from qkv.exercises.grading import CaseResult, Exercise, call, require

__all__ = ["EXERCISES", "PAGE"]

PAGE = "docs/learn/13-cheaper-models.md"

ROW = [0.3, -1.27, 1.004, -0.05]  # 13.1: the row; the question is about ROW[2]


def check_int8_level(answer: Any) -> Iterator[CaseResult]:
    q, _ = quantize_int8(torch.tensor([ROW]))
    w, largest = ROW[2], max(abs(v) for v in ROW)
    yield compare_number(
        answer,
        float(q[0, 2]),
        tol=0.01,
        hint="s = max |w| / 127 over the row, then q = round(w / s)",
        wrong=[
            (round(w / (largest / 128)), "the largest |w| maps to level 127, not 128: "
             "s = max |w| / 127"),
            (round(w / (max(ROW) / 127)), "the scale comes from the largest *magnitude* in the "
             "row, |w|, and here that weight is negative"),
            (w / (largest / 127), "q is an integer level: round w / s to the nearest one"),
        ],
    )  # fmt: skip


def _switch_gates(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    experts = logits.topk(k, dim=-1).indices  # (N, k)
    return logits.softmax(dim=-1).gather(-1, experts), experts


ROUTE_CASES = [
    ("logits (5, 4), k = 2", 5, 4, 2, 1.0),
    ("logits (7, 8), k = 1", 7, 8, 1, 1.0),
    ("logits (6, 8), k = 3", 6, 8, 3, 2.0),
    ("logits (4, 16) in the hundreds, k = 2", 4, 16, 2, 300.0),
]


def check_route(fn: Callable[..., Any]) -> Iterator[CaseResult]:
    for seed, (tested, n, x, k, spread) in enumerate(ROUTE_CASES):
        logits = randn(generator(1300 + seed), n, x) * spread  # (N, X)
        gates, experts = route(logits, k)  # (N, k) each
        got = call(tested, "route(logits, k)", fn, logits, k, returns=("gates", "experts"))
        ascending = experts.flip(-1)
        require(compare_tensor(
            tested,
            got[1],
            experts,
            what="experts",
            hint="each token's k largest logits, largest first: logits.topk(k, dim=-1)",
            wrong=[
                (logits.topk(k, dim=-1, largest=False).indices, "take the k *largest* logits"),
                (ascending if k > 1 else None, "largest logit first: sort the chosen experts "
                 "from the largest logit down"),
            ],
        ))  # fmt: skip
        top = logits.gather(-1, experts)  # (N, k)
        yield compare_tensor(
            tested,
            got[0],
            gates,
            what="gates",
            hint="gates = softmax over the k chosen logits, in the order of the experts",
            wrong=[
                (_switch_gates(logits, k)[0], "Mixtral's gates are a softmax over the k chosen "
                 "logits only (so they sum to 1), not each expert's probability among all X"),
                (top, "turn the chosen logits into gates with a softmax"),
            ],
            nan_hint="exp of logits in the hundreds overflows: use torch.softmax, or subtract "
            "the largest logit first",
        )  # fmt: skip


def _first_choice_only(logits: Tensor, k: int) -> Tensor:
    return load_balancing_loss(logits, 1)


def _probabilities_twice(logits: Tensor, k: int) -> Tensor:
    p = logits.softmax(dim=-1).mean(dim=0)  # (X,)
    return logits.shape[-1] * (p * p).sum()


BALANCE_CASES = [
    ("logits (8, 4), k = 1", 8, 4, 1, 1.0),
    ("logits (32, 8), k = 2", 32, 8, 2, 1.0),
    ("logits (24, 6), k = 3, large", 24, 6, 3, 5.0),
]


def check_load_balancing(fn: Callable[..., Any]) -> Iterator[CaseResult]:
    for seed, (tested, n, x, k, spread) in enumerate(BALANCE_CASES):
        logits = randn(generator(1310 + seed), n, x) * spread  # (N, X)
        got = call(tested, "load_balancing_loss(logits, k)", fn, logits, k)
        want = load_balancing_loss(logits, k)
        yield compare_tensor(
            tested,
            got,
            want,
            hint="X · sum_i f_i P_i: f_i the share of tokens with expert i among their k "
            "choices, P_i the mean of softmax(logits)[:, i] over the tokens",
            wrong=[
                (want / x, "multiply by X, the number of experts: an even router then scores k"),
                (_first_choice_only(logits, k) if k > 1 else None, "f_i counts every token that "
                 "has expert i among its k choices, not only its first (so sum_i f_i = k)"),
                (_probabilities_twice(logits, k), "f_i is a count of choices (top-k), not the "
                 "mean probability: only P_i comes from the softmax"),
            ],
        )  # fmt: skip


def _served_by_qkv(experts: Tensor, n_experts: int, capacity: int | None) -> Tensor:
    """qkv's reference loop on experts that do nothing: its record of the served choices."""
    n, k = experts.shape
    identity = nn.ModuleList(nn.Identity() for _ in range(n_experts))
    return experts_loop(torch.zeros(n, 1), identity, torch.ones(n, k), experts, capacity)[1]


def _served_token_order(experts: Tensor, n_experts: int, capacity: int | None) -> Tensor:
    """The mistake: serve token 0's choices, then token 1's, ... (not first choices first)."""
    served = torch.zeros_like(experts, dtype=torch.bool)
    taken = [0] * n_experts
    for t, row in enumerate(experts.tolist()):
        for r, e in enumerate(row):
            if capacity is None or taken[e] < capacity:
                served[t, r], taken[e] = True, taken[e] + 1
    return served


def _choices(g: torch.Generator, n: int, n_experts: int, k: int) -> Tensor:
    """(N, k) experts, k different ones per token."""
    return torch.stack([torch.randperm(n_experts, generator=g)[:k] for _ in range(n)])


SERVED_CASES = [
    ("N = 6 tokens, k = 1, X = 3 experts, C = 2", 6, 1, 3, 2),
    ("N = 10 tokens, k = 2, X = 4 experts, C = 3", 10, 2, 4, 3),
    ("N = 16 tokens, k = 2, X = 4 experts, C = 9", 16, 2, 4, 9),
    ("N = 8 tokens, k = 3, X = 4 experts, capacity None", 8, 3, 4, None),
]


def check_served(fn: Callable[..., Any]) -> Iterator[CaseResult]:
    for seed, (tested, n, k, x, capacity) in enumerate(SERVED_CASES):
        experts = _choices(generator(1320 + seed), n, x, k)  # (N, k)
        got = call(tested, "served(experts, n_experts, capacity)", fn, experts, x, capacity)
        want = _served_by_qkv(experts, x, capacity)  # (N, k)
        off = [] if capacity is None else [capacity - 1, capacity + 1]
        yield compare_tensor(
            tested,
            got,
            want,
            hint="for each expert, its choices in order of service (every first choice by "
            "position, then every second choice, ...); it serves the first C of them",
            wrong=[
                (_served_token_order(experts, x, capacity), "first choices first: every "
                 "token's first choice, in order of position, is served before any second "
                 "choice"),
                (torch.ones_like(want), "an expert serves at most C choices; the rest are "
                 "dropped (False)"),
                *[(_served_by_qkv(experts, x, c), "off by one: an expert serves exactly its "
                   "first C choices") for c in off],
            ],
        )  # fmt: skip


EXERCISES = [
    Exercise(
        id="13.1",
        title="An int8 level, by hand",
        kind="by hand",
        name="ANSWER",
        statement=(
            "The row [0.3, -1.27, 1.004, -0.05] of a weight matrix is quantised to int8 with one "
            "symmetric scale for the row, as qkv.blocks.quant.quantize_int8 does: the largest "
            "magnitude maps to 127 and every weight is rounded to the nearest level. Which "
            "integer level q stores the weight 1.004? `ANSWER = ...`"
        ),
        check=check_int8_level,
    ),
    Exercise(
        id="13.2",
        title="Top-k routing",
        kind="code",
        name="route",
        statement=(
            "Write `route(logits, k)`: logits (N, X), the router's scores of N tokens for X "
            "experts. Return (gates, experts): experts (N, k) int64, each token's k largest "
            "logits' indices, largest first; gates (N, k), a softmax over those k logits "
            "(Mixtral's routing: each row of gates sums to 1). It must stay finite for logits in "
            "the hundreds."
        ),
        check=check_route,
    ),
    Exercise(
        id="13.3",
        title="The load-balancing loss",
        kind="code",
        name="load_balancing_loss",
        statement=(
            "Write `load_balancing_loss(logits, k)`: logits (N, X). Return the scalar tensor "
            "X · sum_i f_i P_i, where f_i is the share of the N tokens that have expert i among "
            "their k largest logits and P_i the mean over the tokens of softmax(logits)[:, i]. "
            "(A perfectly even router scores k.)"
        ),
        check=check_load_balancing,
    ),
    Exercise(
        id="13.4",
        title="Capacity: which choices are served",
        kind="code",
        name="served",
        statement=(
            "Write `served(experts, n_experts, capacity)`: experts (N, k) int64, each token's k "
            "different experts, first choice first; capacity C, an int, or None for no limit. "
            "Each expert serves at most C choices: every first choice, in order of token "
            "position, then every second choice, and so on; the rest are dropped. Return "
            "(N, k) bool, True where the choice is served."
        ),
        check=check_served,
    ),
]
