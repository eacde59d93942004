"""Exercises of page 3, multi-head attention: cache size by hand, split and merge heads, GQA.

Shape legend: B batch · T positions · D model width · H query heads · K key/value heads ·
E head dim · S key/value positions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from qkv.attention.backends import repeat_kv
from qkv.attention.kv_cache import kv_cache_bytes_per_token
from qkv.exercises.cases import compare_number, compare_tensor, generator, randn
from qkv.exercises.grading import CaseResult, Exercise, call

__all__ = ["EXERCISES", "PAGE"]

PAGE = "docs/learn/03-multi-head.md"


def check_cache_bytes(answer: Any) -> Iterator[CaseResult]:
    want = float(kv_cache_bytes_per_token(32, 8, 128, torch.float32))
    yield compare_number(
        answer,
        want,
        tol=0.0,
        hint="per token: a key and a value, per layer, per key/value head, head_dim numbers "
        "each, 4 bytes per float32",
        wrong=[
            (4 * want, "you counted the 32 query heads; the cache keeps only the K = 8 "
             "key/value heads"),
            (want / 2, "keys *and* values: two vectors per head and layer"),
            (want / 4, "that is a count of numbers; the question asks for bytes (float32: 4 each)"),
        ],
    )  # fmt: skip


def check_split(fn: Callable[..., Any]) -> Iterator[CaseResult]:
    for seed, (b, t, h, e) in enumerate([(2, 5, 4, 3), (1, 4, 4, 8), (3, 2, 8, 2)]):
        g = generator(400 + seed)
        x = randn(g, b, t, h * e)
        tested = f"x ({b}, {t}, {h * e}), n_heads={h}" + (" (T = H)" if t == h else "")
        got = call(tested, "split_heads(x, n_heads)", fn, x, h)
        want = x.view(b, t, h, e).transpose(1, 2)  # (B, H, T, E)
        yield compare_tensor(
            tested,
            got,
            want,
            hint="cut the last axis into (H, E), then move the head axis before the positions",
            wrong=[
                (x.view(b, h, t, e), "reshaping straight to (B, H, T, E) mixes positions and "
                 "heads: view as (B, T, H, E) first, then .transpose(1, 2)"),
                (x.view(b, t, h, e), "you returned (B, T, H, E): move the head axis before the "
                 "positions with .transpose(1, 2)"),
                (x.view(b, t, e, h).transpose(1, 3), "head h owns the features h*E ... h*E + E - 1"
                 " (contiguous), not every H-th feature: view as (B, T, H, E)"),
            ],
        )  # fmt: skip


def check_merge(fn: Callable[..., Any]) -> Iterator[CaseResult]:
    for seed, (b, h, t, e) in enumerate([(2, 4, 5, 3), (1, 3, 3, 8)]):
        g = generator(410 + seed)
        x = randn(g, b, h, t, e)
        tested = f"x ({b}, {h}, {t}, {e})"
        got = call(tested, "merge_heads(x)", fn, x)
        want = x.transpose(1, 2).reshape(b, t, h * e)  # (B, T, H*E)
        yield compare_tensor(
            tested,
            got,
            want,
            hint="each position's H head outputs, side by side: (B, H, T, E) -> (B, T, H*E)",
            wrong=[
                (x.reshape(b, t, h * e), "reshaping (B, H, T, E) straight to (B, T, H*E) mixes "
                 "positions and heads: .transpose(1, 2) first (then .reshape)"),
                (x.transpose(1, 2), "you returned (B, T, H, E): flatten the last two axes"),
            ],
        )  # fmt: skip


def check_repeat_kv(fn: Callable[..., Any]) -> Iterator[CaseResult]:
    for seed, (b, kv, s, e, n_rep) in enumerate(
        [(2, 2, 5, 4, 4), (1, 3, 4, 2, 2), (2, 2, 3, 4, 1)]
    ):
        g = generator(420 + seed)
        x = randn(g, b, kv, s, e)
        tested = f"x ({b}, {kv}, {s}, {e}) with K = {kv}, n_rep={n_rep}"
        got = call(tested, "repeat_kv(x, n_rep)", fn, x, n_rep)
        yield compare_tensor(
            tested,
            got,
            repeat_kv(x, n_rep),
            hint="query head h reads key/value head h // n_rep",
            wrong=[
                (x.repeat(1, n_rep, 1, 1), "you tiled the whole block (heads 0 1 0 1 ...); query "
                 "heads h = g*n_rep ... g*n_rep + n_rep - 1 share head g, so repeat each head in "
                 "place (0 0 1 1 ...): repeat_interleave on dim 1, or expand + reshape"),
                (x.repeat_interleave(n_rep, dim=2), "you repeated positions (dim 2); repeat the "
                 "heads (dim 1)"),
            ],
        )  # fmt: skip


EXERCISES = [
    Exercise(
        id="03.1",
        title="The size of a key/value cache",
        kind="by hand",
        name="ANSWER",
        statement=(
            "A decoder has 32 layers, d_model = 4096, 32 query heads and 8 key/value heads "
            "(grouped-query attention), and keeps its cache in float32. How many bytes of "
            "key/value cache does one token of context take? Write `ANSWER = ...`."
        ),
        check=check_cache_bytes,
    ),
    Exercise(
        id="03.2",
        title="Split into heads",
        kind="code",
        name="split_heads",
        statement=(
            "Write `split_heads(x, n_heads)`: x (B, T, D) with D = H·E becomes (B, H, T, E), "
            "head h holding the features h·E ... h·E + E - 1 of each position."
        ),
        check=check_split,
    ),
    Exercise(
        id="03.3",
        title="Merge the heads",
        kind="code",
        name="merge_heads",
        statement=(
            "Write `merge_heads(x)`, the inverse of split_heads: x (B, H, T, E) becomes "
            "(B, T, H·E), each position's heads concatenated in head order."
        ),
        check=check_merge,
    ),
    Exercise(
        id="03.4",
        title="Grouped-query attention: repeat_kv",
        kind="code",
        name="repeat_kv",
        statement=(
            "Write `repeat_kv(x, n_rep)`: key/value heads x (B, K, S, E) become "
            "(B, K·n_rep, S, E) so that query head h reads key/value head h // n_rep "
            "(heads 0 1 -> 0 0 1 1 for n_rep = 2)."
        ),
        check=check_repeat_kv,
    ),
]
