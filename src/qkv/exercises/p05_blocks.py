"""Exercises of page 5, blocks: LayerNorm by hand, LayerNorm, RMSNorm, SwiGLU, a pre-norm block.

Shape legend: B batch · T positions · D model width · F MLP hidden width.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from qkv.blocks.norms import layer_norm_reference, rms_norm
from qkv.exercises.cases import compare_number, compare_tensor, generator, randn
from qkv.exercises.grading import CaseResult, Exercise, call

__all__ = ["EXERCISES", "PAGE"]

PAGE = "docs/learn/05-blocks.md"


def check_layer_norm_by_hand(answer: Any) -> Iterator[CaseResult]:
    # x = (1, 2, 3, 6): mean 3, biased variance 14 / 4; the last entry becomes 3 / sqrt(3.5).
    yield compare_number(
        answer,
        3.0 / math.sqrt(3.5),
        tol=2e-3,
        hint="subtract the mean, divide by the standard deviation (variance divided by D)",
        wrong=[
            (3.0 / math.sqrt(14.0 / 3.0), "LayerNorm divides the squared deviations by D = 4, "
             "not D - 1"),
            (6.0 / math.sqrt(12.5), "that is RMSNorm; LayerNorm subtracts the mean first"),
            (3.0 / 3.5, "divide by the standard deviation, the square root of the variance"),
        ],
    )  # fmt: skip


def _layer_norm_cases() -> list[tuple[str, Tensor, Tensor | None, Tensor | None]]:
    g = generator(600)
    tiny = "x (2, 5, 8) with tiny values (variance ~1e-6, where eps matters)"
    return [
        ("x (4, 8), no weight or bias", randn(g, 4, 8) * 3 + 1, None, None),
        ("x (2, 3, 16) with weight and bias (16,)", randn(g, 2, 3, 16), randn(g, 16), randn(g, 16)),
        (tiny, randn(g, 2, 5, 8) * 1e-3, None, None),
    ]


def check_layer_norm(fn: Callable[..., Any]) -> Iterator[CaseResult]:
    signature = "layer_norm(x, weight, bias, eps), weight/bias maybe None"
    eps = 1e-5
    for tested, x, weight, bias in _layer_norm_cases():
        got = call(tested, signature, fn, x, weight, bias, eps)
        want = layer_norm_reference(x, weight, bias, eps)
        mean = x.mean(-1, keepdim=True)
        centred = x - mean
        w = 1.0 if weight is None else weight
        b = 0.0 if bias is None else bias
        unbiased = centred / torch.sqrt(x.var(-1, keepdim=True) + eps) * w + b
        eps_outside = centred / (centred.pow(2).mean(-1, keepdim=True).sqrt() + eps) * w + b
        yield compare_tensor(
            tested,
            got,
            want,
            atol=1e-4,
            hint="y = (x - mean) / sqrt(var + eps) * weight + bias, over the last dimension",
            wrong=[
                (unbiased, "use the biased variance (divide by D, as torch's LayerNorm): "
                 "x.var(-1, unbiased=False) or the mean of squared deviations"),
                (eps_outside, "eps goes inside the square root: sqrt(var + eps)"),
                (layer_norm_reference(x, None, None, eps), "apply the weight and the bias"),
                (F.layer_norm(x, x.shape[-1:], eps=0.0) * w + b, "add eps to the variance"),
            ],
        )  # fmt: skip


def check_rms_norm(fn: Callable[..., Any]) -> Iterator[CaseResult]:
    eps = 1e-6
    g = generator(610)
    cases = [
        ("x (4, 8), weight (8,)", randn(g, 4, 8) + 2, randn(g, 8)),
        ("x (2, 3, 16), weight (16,)", randn(g, 2, 3, 16), randn(g, 16)),
    ]
    for tested, x, weight in cases:
        got = call(tested, "rms_norm(x, weight, eps)", fn, x, weight, eps)
        mean_square = x.pow(2).mean(-1, keepdim=True)
        yield compare_tensor(
            tested,
            got,
            rms_norm(x, weight, eps),
            atol=1e-4,
            hint="y = x / sqrt(mean(x^2) + eps) * weight, the mean over the last dimension",
            wrong=[
                (layer_norm_reference(x, weight, None, eps), "that is LayerNorm: RMSNorm does "
                 "not subtract the mean"),
                (x / torch.sqrt(x.pow(2).sum(-1, keepdim=True) + eps) * weight, "use the *mean* "
                 "of the squares, not their sum"),
                (x / torch.sqrt(mean_square + eps), "multiply by the weight (the learned gain)"),
            ],
        )  # fmt: skip


def check_swiglu(fn: Callable[..., Any]) -> Iterator[CaseResult]:
    signature = "swiglu(x, w_gate, w_up, w_down)"
    for seed, (b, t, d, f) in enumerate([(2, 3, 8, 12), (1, 5, 16, 40)]):
        g = generator(620 + seed)
        x = randn(g, b, t, d)
        w_gate, w_up, w_down = randn(g, d, f) / d**0.5, randn(g, d, f) / d**0.5, randn(g, f, d)
        tested = f"x ({b}, {t}, {d}), w_gate/w_up ({d}, {f}), w_down ({f}, {d})"
        got = call(tested, signature, fn, x, w_gate, w_up, w_down)
        gate, up = x @ w_gate, x @ w_up  # (B, T, F)
        yield compare_tensor(
            tested,
            got,
            (F.silu(gate) * up) @ w_down,
            atol=1e-4,
            hint="out = (silu(x @ w_gate) * (x @ w_up)) @ w_down",
            wrong=[
                ((gate * F.silu(up)) @ w_down, "the activation goes on the gate: "
                 "silu(x @ w_gate) * (x @ w_up)"),
                ((torch.sigmoid(gate) * up) @ w_down, "SwiGLU's gate is SiLU, x·sigmoid(x), "
                 "not the sigmoid alone (that is GLU)"),
                ((F.relu(gate) * up) @ w_down, "SwiGLU uses SiLU, not ReLU"),
                (F.silu(up) @ w_down, "multiply the activated gate with the up projection"),
            ],
        )  # fmt: skip


def _sublayers(g: torch.Generator, d: int) -> list[Callable[[Tensor], Tensor]]:
    """Stand-ins for attention, the MLP and the two norms: fixed random functions."""
    a, m = randn(g, d, d) / d**0.5, randn(g, d, d) / d**0.5
    w1, b1, w2, b2 = randn(g, d) + 1, randn(g, d), randn(g, d) + 1, randn(g, d)

    def attn(x: Tensor) -> Tensor:
        return torch.tanh(x @ a)

    def mlp(x: Tensor) -> Tensor:
        return F.gelu(x @ m)

    def attn_norm(x: Tensor) -> Tensor:
        return F.layer_norm(x, (d,), w1, b1)

    def mlp_norm(x: Tensor) -> Tensor:
        return F.layer_norm(x, (d,), w2, b2)

    return [attn, mlp, attn_norm, mlp_norm]


def check_pre_norm(fn: Callable[..., Any]) -> Iterator[CaseResult]:
    signature = "pre_norm_block(x, attn, mlp, attn_norm, mlp_norm)"
    for seed, (b, t, d) in enumerate([(2, 4, 8), (1, 6, 16)]):
        g = generator(630 + seed)
        x = randn(g, b, t, d) * 2
        attn, mlp, n1, n2 = _sublayers(g, d)
        tested = f"x ({b}, {t}, {d}); attn, mlp, attn_norm, mlp_norm: fixed random functions"
        got = call(tested, signature, fn, x, attn, mlp, n1, n2)
        h = x + attn(n1(x))
        post_h = n1(x + attn(x))
        yield compare_tensor(
            tested,
            got,
            h + mlp(n2(h)),
            atol=1e-4,
            hint="h = x + attn(attn_norm(x)); out = h + mlp(mlp_norm(h))",
            wrong=[
                (n2(post_h + mlp(post_h)), "that is post-norm, norm(x + sublayer(x)); pre-norm "
                 "normalises the sublayer's input: x + sublayer(norm(x))"),
                (n1(x) + attn(n1(x)) + mlp(n2(n1(x) + attn(n1(x)))), "the residual adds the "
                 "stream x itself, not its normalised copy: x + attn(attn_norm(x))"),
                (x + attn(n1(x)) + mlp(n2(x)), "the MLP reads the stream after attention has "
                 "added to it (h), not the block's input"),
                (h + mlp(n1(h)), "each sublayer has its own norm: the MLP's is mlp_norm"),
            ],
        )  # fmt: skip


EXERCISES = [
    Exercise(
        id="05.1",
        title="LayerNorm by hand",
        kind="by hand",
        name="ANSWER",
        statement=(
            "LayerNorm (no gain, no bias, eps = 0) of the vector x = (1, 2, 3, 6): what does "
            "its last entry become? Write `ANSWER = ...` (three decimals)."
        ),
        check=check_layer_norm_by_hand,
    ),
    Exercise(
        id="05.2",
        title="LayerNorm",
        kind="code",
        name="layer_norm",
        statement=(
            "Write `layer_norm(x, weight, bias, eps)` over the last dimension of x (..., D): "
            "(x - mean) / sqrt(var + eps), times weight (D,) and plus bias (D,), either of which "
            "may be None (then skipped); var is the biased variance (divided by D). Without "
            "torch's layer_norm."
        ),
        check=check_layer_norm,
    ),
    Exercise(
        id="05.3",
        title="RMSNorm",
        kind="code",
        name="rms_norm",
        statement=(
            "Write `rms_norm(x, weight, eps)`: x (..., D) divided by the root mean square of "
            "its last dimension, sqrt(mean(x²) + eps), times weight (D,)."
        ),
        check=check_rms_norm,
    ),
    Exercise(
        id="05.4",
        title="The SwiGLU feed-forward network",
        kind="code",
        name="swiglu",
        statement=(
            "Write `swiglu(x, w_gate, w_up, w_down)`: x (B, T, D), w_gate and w_up (D, F), "
            "w_down (F, D), no biases; return (silu(x W_gate) ⊙ x W_up) W_down, (B, T, D)."
        ),
        check=check_swiglu,
    ),
    Exercise(
        id="05.5",
        title="A pre-norm block",
        kind="code",
        name="pre_norm_block",
        statement=(
            "Write `pre_norm_block(x, attn, mlp, attn_norm, mlp_norm)`: the decoder-only layer "
            "with pre-norm residuals. The four arguments after x are functions (B, T, D) -> "
            "(B, T, D): first attention in a residual branch with its norm, then the MLP with "
            "its own norm. Return (B, T, D)."
        ),
        check=check_pre_norm,
    ),
]
