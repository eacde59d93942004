"""Exercises of page 4, positions: a sinusoidal entry by hand, the table, RoPE, ALiBi.

Shape legend: N positions · D model width · H heads · T query positions · S key positions ·
E head dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from qkv.exercises.cases import compare_number, compare_tensor, generator, randn
from qkv.exercises.grading import CaseResult, Exercise, call
from qkv.positional.alibi import alibi_slopes
from qkv.positional.rope import apply_rotary, rope_frequencies
from qkv.positional.sinusoidal import sinusoidal_table

__all__ = ["EXERCISES", "PAGE"]

PAGE = "docs/learn/04-positions.md"


def check_table_entry(answer: Any) -> Iterator[CaseResult]:
    want = float(sinusoidal_table(3, 4)[2, 1])  # cos(2 / 10000^0)
    yield compare_number(
        answer,
        want,
        tol=2e-3,
        hint="column 2i holds sin(pos / 10000^(2i/D)) and column 2i + 1 the cos of the same angle",
        wrong=[
            (math.sin(2.0), "odd columns hold cosines, even columns sines"),
            (math.cos(2.0 / 10000 ** (2 / 4)), "columns 0 and 1 share one frequency (i = 0): "
             "the angle of column 1 is pos / 10000^0"),
            (math.cos(math.radians(2.0)), "the angles are in radians"),
        ],
    )  # fmt: skip


def _table(n: int, d: int, *, exponent_by_column: bool = False, swap: bool = False) -> Tensor:
    pos = torch.arange(n, dtype=torch.float64)[:, None]  # (N, 1)
    i = torch.arange(d // 2, dtype=torch.float64)  # (D/2,)
    angles = pos / 10000 ** ((i if exponent_by_column else 2 * i) / d)  # (N, D/2)
    first, second = (angles.cos(), angles.sin()) if swap else (angles.sin(), angles.cos())
    return torch.stack([first, second], dim=-1).flatten(-2).float()  # (N, D)


def check_sinusoidal(fn: Callable[..., Any]) -> Iterator[CaseResult]:
    for n, d in [(4, 4), (50, 16), (7, 32)]:
        tested = f"sinusoidal_table({n}, {d})"
        got = call(tested, "sinusoidal_table(n_positions, d_model)", fn, n, d)
        yield compare_tensor(
            tested,
            got,
            sinusoidal_table(n, d),
            atol=1e-4,
            hint="entry [pos, 2i] = sin(pos / 10000^(2i/D)), entry [pos, 2i + 1] = cos(same)",
            wrong=[
                (sinusoidal_table(n, d, interleaved=False), "interleave the columns: sin, cos, "
                 "sin, cos, ... (you put all sines first, then all cosines)"),
                (_table(n, d, swap=True), "even columns hold sines and odd columns cosines; "
                 "yours are swapped"),
                (_table(n, d, exponent_by_column=True), "the exponent is 2i/D with i the "
                 "frequency index (0 .. D/2 - 1), so the pair of columns (2i, 2i + 1) uses 2i/D"),
            ],
        )  # fmt: skip


def _rope(x: Tensor, positions: Tensor, base: float = 10000.0, *, sign: float = 1.0) -> Tensor:
    angles = positions.float()[:, None] * rope_frequencies(x.shape[-1], base=base)  # (T, E/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, E)
    return apply_rotary(x, angles.cos(), sign * angles.sin())  # (..., T, E)


def _rope_neighbours(x: Tensor, positions: Tensor) -> Tensor:
    """The paper's pairing, (x[0], x[1]), (x[2], x[3]), ...: a different convention."""
    angles = positions.float()[:, None] * rope_frequencies(x.shape[-1])  # (T, E/2)
    a, b = x[..., 0::2], x[..., 1::2]  # (..., T, E/2)
    cos, sin = angles.cos(), angles.sin()
    return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)


def check_rope(fn: Callable[..., Any]) -> Iterator[CaseResult]:
    signature = "rope(x, positions), positions an int tensor (T,)"
    cases = [
        ((1, 4, 8), torch.arange(4)),
        ((2, 3, 6, 16), torch.arange(6)),
        ((2, 5, 4), torch.tensor([7, 8, 9, 10, 11])),
    ]
    for seed, (size, positions) in enumerate(cases):
        x = randn(generator(500 + seed), *size)
        tested = f"x {size}, positions {positions.tolist()}"
        got = call(tested, signature, fn, x, positions)
        yield compare_tensor(
            tested,
            got,
            _rope(x, positions),
            atol=1e-5,
            hint="pair (x[i], x[i + E/2]) at position p turns by the angle p·θ_i, "
            "θ_i = 10000^(-2i/E)",
            wrong=[
                (_rope_neighbours(x, positions), "this file pairs x[i] with x[i + E/2] "
                 "(rotate-half, as LLaMA); you paired neighbours x[2i], x[2i + 1]"),
                (_rope(x, positions, sign=-1.0), "you turned the other way: a' = a cos - b sin, "
                 "b' = b cos + a sin"),
                (_rope(x, positions + 1), "off by one: the angle is p·θ_i with the given "
                 "positions, so position 0 is not rotated"),
                (_rope(x, positions, base=10000.0**0.5), "the exponent is -2i/E with i = 0 .. "
                 "E/2 - 1 (you used -i/E)"),
            ],
        )  # fmt: skip


def _alibi(
    slopes: Tensor, t: int, s: int, *, aligned: bool = True, absolute: bool = True
) -> Tensor:
    offset = s - t if aligned else 0
    distance = torch.arange(offset, offset + t)[:, None] - torch.arange(s)[None, :]  # (T, S)
    if absolute:
        distance = distance.abs()
    return -slopes[:, None, None] * distance  # (H, T, S)


def check_alibi(fn: Callable[..., Any]) -> Iterator[CaseResult]:
    signature = "alibi_bias(slopes, t, s), slopes a tensor (H,)"
    for h, t, s in [(4, 5, 5), (2, 2, 6), (3, 1, 4)]:
        slopes = alibi_slopes(h)
        tested = f"slopes ({h},), t={t}, s={s}"
        got = call(tested, signature, fn, slopes, t, s)
        yield compare_tensor(
            tested,
            got,
            _alibi(slopes, t, s),
            hint="bias[h, i, j] = -slopes[h] * |(S - T + i) - j|",
            wrong=[
                (-_alibi(slopes, t, s), "ALiBi is a penalty: the bias is -m·distance"),
                (_alibi(slopes, t, s, aligned=False), "with S > T the queries are the last T "
                 "positions: query i sits at S - T + i"),
                (_alibi(slopes, t, s, absolute=False), "the distance is |i - j|, not i - j"),
            ],
        )  # fmt: skip


EXERCISES = [
    Exercise(
        id="04.1",
        title="A sinusoidal encoding by hand",
        kind="by hand",
        name="ANSWER",
        statement=(
            "With d_model = 4 and base 10000, what is entry [2, 1] of the sinusoidal table "
            "(position 2, column 1, counting both from 0)? Write `ANSWER = ...` (three decimals)."
        ),
        check=check_table_entry,
    ),
    Exercise(
        id="04.2",
        title="The sinusoidal table",
        kind="code",
        name="sinusoidal_table",
        statement=(
            "Write `sinusoidal_table(n_positions, d_model)`: a float32 (N, D) tensor whose "
            "column 2i holds sin(pos / 10000^(2i/D)) and column 2i + 1 holds cos of the same "
            "angle (sines and cosines interleaved, as in the paper)."
        ),
        check=check_sinusoidal,
    ),
    Exercise(
        id="04.3",
        title="Rotate by position: RoPE",
        kind="code",
        name="rope",
        statement=(
            "Write `rope(x, positions)`: x (..., T, E) with E even, positions an int tensor "
            "(T,). Each pair (x[i], x[i + E/2]) (the rotate-half pairing of LLaMA and qkv) at "
            "position p turns by the angle p·θ_i, θ_i = 10000^(-2i/E): "
            "a' = a cos - b sin, b' = b cos + a sin."
        ),
        check=check_rope,
    ),
    Exercise(
        id="04.4",
        title="The ALiBi bias",
        kind="code",
        name="alibi_bias",
        statement=(
            "Write `alibi_bias(slopes, t, s)`: slopes (H,) float, return the (H, T, S) bias "
            "-slopes[h]·|(S - T + i) - j| that is added to the scores of query i and key j "
            "(queries are the last T of the S positions)."
        ),
        check=check_alibi,
    ),
]
