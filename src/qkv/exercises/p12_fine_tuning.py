"""Exercises of page 12, fine-tuning: LoRA's trainable parameters by hand, the LoRA forward,
merging an adapter into its weight, the distillation loss.

Shape legend: N rows · T positions · V vocabulary (or C classes); d_in, d_out a linear layer's
widths, r the LoRA rank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from qkv.blocks.lora import LoRALinear
from qkv.exercises.cases import compare_number, compare_tensor, generator, randn
from qkv.exercises.grading import CaseResult, Exercise, call
from qkv.train.distill import distillation_loss_sum as soft_loss

__all__ = ["EXERCISES", "PAGE"]

PAGE = "docs/learn/12-fine-tuning.md"


def _adapter(d_in: int, d_out: int, rank: int, alpha: float, seed: int | None = None) -> LoRALinear:
    """A LoRA layer; with a seed, every weight (B too) random, so that the update shows."""
    with torch.device("meta"):
        layer = LoRALinear(nn.Linear(d_in, d_out), rank, alpha)
    if seed is None:
        return layer
    layer.to_empty(device="cpu").requires_grad_(False)
    g = generator(seed)
    for p in layer.parameters():
        p.copy_(randn(g, *p.shape))
    return layer


def check_lora_size_by_hand(answer: Any) -> Iterator[CaseResult]:
    per_adapter = sum(p.numel() for p in _adapter(768, 768, 8, 16).parameters() if p.requires_grad)
    want = 12 * 2 * per_adapter
    yield compare_number(
        answer,
        want,
        tol=0.5,
        hint="an adapter trains A (r x d_in) and B (d_out x r): r·(d_in + d_out) numbers, one "
        "adapter per adapted matrix, in every layer",
        wrong=[
            (want // 2, "each of the 12 layers has two adapters (q_proj, v_proj), and each "
             "adapter two matrices, A (r x d_in) and B (d_out x r)"),
            (12 * 2 * 768 * 768, "that is full fine-tuning of the two matrices: LoRA trains "
             "r·(d_in + d_out) numbers per matrix, not d_in·d_out"),
            (want // 12, "that is one layer: the model has 12"),
        ],
    )  # fmt: skip


# The layers of 12.2 and 12.3: (d_in, d_out, r, alpha, the leading dimensions of x).
LAYERS = [(6, 4, 2, 4.0, (5,)), (16, 8, 4, 16.0, (2, 3)), (12, 12, 8, 8.0, (2, 5))]


def check_lora_forward(fn: Callable[..., Any]) -> Iterator[CaseResult]:
    for seed, (d_in, d_out, r, alpha, lead) in enumerate(LAYERS):
        layer = _adapter(d_in, d_out, r, alpha, seed=1200 + seed)
        x = randn(generator(1210 + seed), *lead, d_in)
        tested = f"x {(*lead, d_in)}, d_out={d_out}, r={r}, alpha={alpha:g}"
        a, b = layer.lora_A, layer.lora_B
        weights = (layer.base.weight.clone(), layer.base.bias.clone(), a.clone(), b.clone())
        got = call(tested, "lora_forward(x, weight, bias, lora_A, lora_B, alpha)", fn, x.clone(),
                   *weights, alpha)  # fmt: skip
        base, low_rank = layer.base(x), x @ a.T @ b.T  # (..., d_out) each
        yield compare_tensor(
            tested,
            got,
            layer(x),
            hint="x W^T + b + (alpha / r) · x A^T B^T, with r = lora_A.shape[0]",
            wrong=[
                (base + alpha * low_rank, "scale the update by alpha / r, not alpha"),
                (base + r / alpha * low_rank, "the scale is alpha / r, not r / alpha"),
                (base + low_rank, "scale the low-rank path by alpha / r"),
                (base, "add the low-rank path (alpha / r) · x A^T B^T to the frozen layer's "
                 "output"),
            ],
        )  # fmt: skip


def check_merge(fn: Callable[..., Any]) -> Iterator[CaseResult]:
    for seed, (d_in, d_out, r, alpha, _) in enumerate(LAYERS):
        layer = _adapter(d_in, d_out, r, alpha, seed=1220 + seed)
        tested = f"weight ({d_out}, {d_in}), r={r}, alpha={alpha:g}"
        w, a, b = layer.base.weight.clone(), layer.lora_A, layer.lora_B
        got = call(tested, "merge_lora(weight, lora_A, lora_B, alpha)", fn, w.clone(), a.clone(),
                   b.clone(), alpha)  # fmt: skip
        layer.merge()  # qkv's merge: W <- W + (alpha / r) B A
        square = d_in == d_out
        yield compare_tensor(
            tested,
            got,
            layer.base.weight,
            hint="W + (alpha / r) · B A, a (d_out, d_in) matrix like W",
            wrong=[
                (w + b @ a, "scale the update by alpha / r before adding it"),
                (w + alpha * (b @ a), "scale the update by alpha / r, not alpha"),
                ((alpha / r) * (b @ a), "add the update to W: the merged weight is W + (alpha "
                 "/ r) B A"),
                (w + (alpha / r) * (a.T @ b.T) if square else None, "the update is B A, (d_out, "
                 "r) @ (r, d_in): the transpose of A^T B^T"),
            ],
        )  # fmt: skip


def check_distillation(fn: Callable[..., Any]) -> Iterator[CaseResult]:
    cases = [
        ("logits (2, 5, 7), τ = 2, some targets -100", (2, 5), 7, 2.0, 3.0, True),
        ("logits (6, 4), a classifier, τ = 4", (6,), 4, 4.0, 3.0, False),
        ("logits (3, 4, 50) in the hundreds, τ = 1.5, some targets -100", (3, 4), 50, 1.5,
         300.0, True),
    ]  # fmt: skip
    for seed, (tested, lead, v, tau, spread, ignore) in enumerate(cases):
        g = generator(1230 + seed)
        student, teacher = randn(g, *lead, v) * spread, randn(g, *lead, v) * spread
        targets = torch.randint(v, lead, generator=g)
        if ignore:
            targets.view(-1)[::3] = -100
        signature = "distillation_loss(student_logits, teacher_logits, targets, temperature)"
        got = call(tested, signature, fn, student.clone(), teacher.clone(), targets.clone(), tau)
        want = soft_loss(student, teacher, targets, tau)
        n = int((targets != -100).sum())
        yield compare_tensor(
            tested,
            got,
            want,
            hint="τ² · sum over the targets that are not -100 of KL(p_t || p_s), p = "
            "softmax(logits / τ)",
            wrong=[
                (want / tau**2, "multiply by τ²: it keeps the gradient's size the same at "
                 "every temperature"),
                (want / tau, "multiply by τ², not τ"),
                (soft_loss(teacher, student, targets, tau), "KL the other way: KL(p_t || p_s) = "
                 "sum p_t (log p_t - log p_s), the teacher's probabilities in front"),
                (soft_loss(student, teacher, torch.zeros_like(targets), tau), "leave out the "
                 "positions whose target is -100"),
                (want / n, "sum over the scored targets (the trainer divides by N later), do "
                 "not average"),
            ],
            nan_hint="exp of logits in the hundreds overflows: use torch.log_softmax",
        )  # fmt: skip


EXERCISES = [
    Exercise(
        id="12.1",
        title="What LoRA trains, by hand",
        kind="by hand",
        name="ANSWER",
        statement=(
            "A BERT-base has 12 layers of width D = 768. LoRA with rank r = 8 goes on the "
            "query and value projections (q_proj and v_proj, each 768 x 768) of every layer, "
            "and everything else is frozen. How many parameters train? `ANSWER = ...` "
            "(exactly)."
        ),
        check=check_lora_size_by_hand,
    ),
    Exercise(
        id="12.2",
        title="The LoRA forward",
        kind="code",
        name="lora_forward",
        statement=(
            "Write `lora_forward(x, weight, bias, lora_A, lora_B, alpha)`: x (..., d_in), the "
            "frozen weight (d_out, d_in) and bias (d_out,), lora_A (r, d_in), lora_B (d_out, "
            "r). Return x W^T + b + (alpha / r) · x A^T B^T, (..., d_out)."
        ),
        check=check_lora_forward,
    ),
    Exercise(
        id="12.3",
        title="Merging an adapter",
        kind="code",
        name="merge_lora",
        statement=(
            "Write `merge_lora(weight, lora_A, lora_B, alpha)` -> (d_out, d_in): the one "
            "matrix that a plain nn.Linear needs to compute what the LoRA layer of 12.2 "
            "computes, W + (alpha / r) · B A."
        ),
        check=check_merge,
    ),
    Exercise(
        id="12.4",
        title="The distillation loss",
        kind="code",
        name="distillation_loss",
        statement=(
            "Write `distillation_loss(student_logits, teacher_logits, targets, temperature)`: "
            "logits (..., V), targets (...) int64 where -100 marks a position left out. Return "
            "the scalar tensor τ² · sum, over the positions that are not -100, of "
            "KL(p_t || p_s), with p_t = softmax(teacher / τ) and p_s = softmax(student / τ). "
            "It must stay finite for logits in the hundreds."
        ),
        check=check_distillation,
    ),
]
