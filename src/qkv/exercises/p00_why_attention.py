"""Exercises of page 0, why attention: the n x n table by hand, Bahdanau's weights by hand, an
RNN's states, additive attention.

Shape legend: T positions · S source positions (encoder states) · D state width · A width of
the scoring network · B batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from qkv.attention.core import reference_attention
from qkv.exercises.cases import compare_attention, compare_number, compare_tensor, generator, randn
from qkv.exercises.grading import CaseResult, Exercise, call

__all__ = ["EXERCISES", "PAGE"]

PAGE = "docs/learn/00-why-attention.md"

MiB = 2**20


def check_table_by_hand(answer: Any) -> Iterator[CaseResult]:
    n = 4096
    yield compare_number(
        answer,
        n * n * 4 / MiB,
        tol=0.01,
        relative=True,
        hint="one score per (query, key) pair: n x n numbers of 4 bytes; 1 MiB = 2^20 bytes",
        wrong=[
            (n * n / MiB, "that counts the scores; each float32 score takes 4 bytes"),
            (n * n * 4 / 1e6, "a MiB is 2^20 = 1,048,576 bytes, not a million"),
            (n * n * 4 / 2**30, "that is in GiB; the question asks for MiB (2^20 bytes)"),
            (n * 4 / MiB, "the table has n x n entries, one per pair, not n"),
        ],
    )


def _additive_scores(s_prev: Tensor, h: Tensor, w: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """e_j = v · tanh(W s_prev + U h_j) for every encoder state: (..., S)."""
    return torch.tanh((s_prev @ w.T).unsqueeze(-2) + h @ u.T) @ v  # (..., S)


# The by-hand case: W = U = I (2 x 2), v = (1, 1), s_prev = (1, 0), three encoder states.
_S_PREV = torch.tensor([1.0, 0.0], dtype=torch.float64)
_H = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
_EYE = torch.eye(2, dtype=torch.float64)
_ONES = torch.ones(2, dtype=torch.float64)


def check_additive_by_hand(answer: Any) -> Iterator[CaseResult]:
    weights = torch.softmax(_additive_scores(_S_PREV, _H, _EYE, _EYE, _ONES), dim=-1)  # (S,)
    no_tanh = torch.softmax((_S_PREV + _H) @ _ONES, dim=-1)
    dot = torch.softmax(_H @ _S_PREV, dim=-1)
    yield compare_number(
        answer,
        float(weights[2]),
        tol=2e-3,
        hint="e_j = v·tanh(s + h_j), adding the vectors first; then a softmax over the three "
        "scores: α_3 = e^(e_3) / (e^(e_1) + e^(e_2) + e^(e_3))",
        wrong=[
            (float(no_tanh[2]), "the tanh goes on each entry of W s + U h_j before the dot "
             "product with v"),
            (float(dot[2]), "that is a dot-product score s·h_j; Bahdanau's score is a small "
             "network, v·tanh(W s + U h_j)"),
            (float(weights[0]), "that is the weight of h_1; the question asks for h_3"),
        ],
    )  # fmt: skip


def _rnn(x: Tensor, w_h: Tensor, w_x: Tensor, *, recurrent: bool = True) -> Tensor:
    """h_t = tanh(h_{t-1} W_h + x_t W_x) from h_0 = 0; every state, (T, D)."""
    h = x.new_zeros(w_h.shape[0])  # (D,)
    states = []
    for x_t in x:  # one step after another: step t needs h_{t-1}
        h = torch.tanh((h @ w_h if recurrent else 0.0) + x_t @ w_x)  # (D,)
        states.append(h)
    return torch.stack(states)  # (T, D)


def check_rnn(fn: Callable[..., Any]) -> Iterator[CaseResult]:
    for seed, (t, d_in, d) in enumerate([(6, 4, 4), (5, 3, 8), (1, 2, 3)]):
        g = generator(60 + seed)
        x, w_h, w_x = randn(g, t, d_in), randn(g, d, d) * 0.5, randn(g, d_in, d) * 0.5
        tested = f"x ({t}, {d_in}), w_h ({d}, {d}), w_x ({d_in}, {d})"
        got = call(tested, "rnn_states(x, w_h, w_x)", fn, x, w_h, w_x)
        want = _rnn(x, w_h, w_x)
        yield compare_tensor(
            tested,
            got,
            want,
            hint="h_0 = 0; for t = 1 .. T: h_t = tanh(h_{t-1} @ w_h + x_t @ w_x); return the "
            "T states stacked, (T, D)",
            wrong=[
                (want[-1], "return every state, (T, D), not only the last: attention reads "
                 "them all"),
                (torch.cat([want.new_zeros(1, d), want[:-1]]), "off by one: the first row is "
                 "h_1, computed from x_1, not the zero start state"),
                (_rnn(x, w_h, w_x, recurrent=False), "each state needs the one before it: add "
                 "h_{t-1} @ w_h inside the tanh"),
                (_rnn(x, w_h.T, w_x), "states are row vectors here: h_{t-1} @ w_h, not w_h @ "
                 "h_{t-1}"),
            ],
        )  # fmt: skip


def check_additive_attention(fn: Callable[..., Any]) -> Iterator[CaseResult]:
    signature = "additive_attention(s_prev, h, W, U, v)"
    cases = [((), 4, 5, 4, 6), ((2,), 3, 7, 5, 8), ((2, 3), 6, 4, 6, 5)]  # lead, Ds, S, Dh, A
    for seed, (lead, d_s, s, d_h, a) in enumerate(cases):
        g = generator(70 + seed)
        s_prev, h = randn(g, *lead, d_s), randn(g, *lead, s, d_h)
        w, u, v = randn(g, a, d_s), randn(g, a, d_h), randn(g, a)
        tested = f"s_prev {(*lead, d_s)}, h {(*lead, s, d_h)}, W ({a}, {d_s}), U ({a}, {d_h})"
        got = call(tested, signature, fn, s_prev, h, w, u, v, returns=("context", "weights"))
        scores = _additive_scores(s_prev, h, w, u, v)  # (..., S)
        want_w = torch.softmax(scores, dim=-1)  # (..., S)
        wrong = [
            (torch.softmax(((s_prev @ w.T).unsqueeze(-2) + h @ u.T) @ v, dim=-1),
             "the tanh goes on W s_prev + U h_j, before the product with v"),
            (torch.softmax(torch.tanh((s_prev @ w.T).unsqueeze(-2) + h @ u.T).sum(-1), dim=-1),
             "the score is v · tanh(...): weight the entries by v before summing them"),
        ]  # fmt: skip
        if lead:
            wrong.append((torch.softmax(scores, dim=0), "the softmax runs over the S encoder "
                          "states (dim=-1), not over the batch"))  # fmt: skip
        if d_s == d_h:
            dot = reference_attention(s_prev.unsqueeze(-2), h, h)[1].squeeze(-2)  # (..., S)
            wrong.append((dot, "that is the Transformer's scaled dot product; Bahdanau's score "
                          "is v · tanh(W s_prev + U h_j)"))  # fmt: skip
            swapped = torch.softmax(_additive_scores(s_prev, h, u, w, v), dim=-1)
            wrong.append((swapped, "W acts on the decoder state s_prev, U on the encoder "
                          "states h_j"))  # fmt: skip
        yield compare_attention(
            tested,
            got,
            (want_w.unsqueeze(-2) @ h).squeeze(-2),  # (..., Dh)
            want_w,
            hint="e_j = v · tanh(W s_prev + U h_j); weights = softmax of the e_j over the S states",
            wrong=wrong,
            output="the context",
            output_hint="your weights are right: the context is sum_j α_j h_j, (..., Dh)",
        )


EXERCISES = [
    Exercise(
        id="00.1",
        title="The size of the n x n table",
        kind="by hand",
        name="ANSWER",
        statement=(
            "One attention head of one layer scores every pair of n = 4096 tokens and keeps the "
            "n x n scores in float32 (4 bytes each). How many MiB (2^20 bytes) is that table? "
            "`ANSWER = ...`."
        ),
        check=check_table_by_hand,
    ),
    Exercise(
        id="00.2",
        title="Additive attention by hand",
        kind="by hand",
        name="ANSWER",
        statement=(
            "Bahdanau's score e_j = v·tanh(W s + U h_j) with W = U = I (2 x 2), v = (1, 1), "
            "the decoder state s = (1, 0) and three encoder states h_1 = (1, 0), h_2 = (-1, 0), "
            "h_3 = (0, 1). What weight α_3 does the softmax of the scores give h_3? A calculator "
            "for tanh and e^x is fine; `ANSWER = 0.xyz` (three decimals)."
        ),
        check=check_additive_by_hand,
    ),
    Exercise(
        id="00.3",
        title="An RNN's states, one step after another",
        kind="code",
        name="rnn_states",
        statement=(
            "Write `rnn_states(x, w_h, w_x)`: x (T, Din) the inputs, w_h (D, D), w_x (Din, D). "
            "Starting from h_0 = 0, compute h_t = tanh(h_{t-1} @ w_h + x_t @ w_x) for "
            "t = 1 .. T and return all T states stacked, (T, D): the encoder states that "
            "attention will read."
        ),
        check=check_rnn,
    ),
    Exercise(
        id="00.4",
        title="Bahdanau's additive attention",
        kind="code",
        name="additive_attention",
        statement=(
            "Write `additive_attention(s_prev, h, W, U, v)` -> (context, weights): s_prev "
            "(..., Ds) the decoder's previous state, h (..., S, Dh) the encoder states, W "
            "(A, Ds), U (A, Dh), v (A,). Scores e_j = v · tanh(W s_prev + U h_j), weights "
            "(..., S) their softmax over the S states, context (..., Dh) = sum_j α_j h_j. The "
            "leading dimensions (...) may be empty."
        ),
        check=check_additive_attention,
    ),
]
