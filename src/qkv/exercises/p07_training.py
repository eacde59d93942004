"""Exercises of page 7, training: the schedule by hand, cross-entropy, warmup-cosine, AdamW.

Shape legend: B batch · T positions · V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from qkv.exercises.cases import compare_number, compare_tensor, generator, randn
from qkv.exercises.grading import CaseResult, Exercise, call, forbid, require
from qkv.train.schedule import warmup_cosine_lr

__all__ = ["EXERCISES", "PAGE"]

PAGE = "docs/learn/07-training.md"


def _lr(step: int, peak: float, w: int, max_steps: int, r: float) -> float:
    return warmup_cosine_lr(
        step, peak=peak, warmup_steps=w, progress=(step - w) / (max_steps - w), min_lr_ratio=r
    )


def check_lr_by_hand(answer: Any) -> Iterator[CaseResult]:
    peak, w, n, r = 3e-4, 100, 1100, 0.1
    cosine = 0.5 * (1 + math.cos(math.pi * 0.25))
    yield compare_number(
        answer,
        _lr(350, peak, w, n, r),
        tol=1e-3,
        relative=True,
        hint="p = (step - warmup) / (max_steps - warmup); lr = peak·(r + (1 - r)·(1 + cos πp)/2)",
        wrong=[
            (peak * cosine, "the cosine ends at the floor r·peak, not at 0: lr = peak·(r + "
             "(1 - r)·cosine)"),
            (peak * (r + (1 - r) * 0.75), "the decay is half a cosine, not a straight line"),
            (_lr_from_zero(350, peak, n, r), "progress counts from the end of warmup: "
             "p = (350 - 100) / (1100 - 100)"),
        ],
    )  # fmt: skip


def _lr_from_zero(step: int, peak: float, n: int, r: float) -> float:
    return peak * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * step / n)))


def check_cross_entropy(fn: Callable[..., Any]) -> Iterator[CaseResult]:
    signature = "cross_entropy(logits, targets), targets -100 = ignore"
    cases = [
        ("logits (4, 10), no ignored targets", (4,), 10, 1.0, False),
        ("logits (2, 5, 7), some targets -100", (2, 5), 7, 2.0, True),
        ("logits (3, 6, 50) in the hundreds, some targets -100", (3, 6), 50, 300.0, True),
    ]
    for seed, (tested, lead, v, spread, ignore) in enumerate(cases):
        g = generator(800 + seed)
        logits = randn(g, *lead, v) * spread
        targets = torch.randint(v, lead, generator=g)
        if ignore:
            targets[..., ::3] = -100
        with forbid(
            [(F, "cross_entropy"), (F, "nll_loss")],
            "write cross-entropy yourself (F.cross_entropy and F.nll_loss are off for this "
            "exercise; torch.logsumexp and F.log_softmax are allowed)",
        ):
            got = call(tested, signature, fn, logits, targets)
        flat_logits, flat_targets = logits.reshape(-1, v), targets.reshape(-1)
        want = F.cross_entropy(flat_logits, flat_targets, ignore_index=-100)
        total = F.cross_entropy(flat_logits, flat_targets, ignore_index=-100, reduction="sum")
        yield compare_tensor(
            tested,
            got,
            want,
            hint="mean over the kept targets of logsumexp(logits) - logits[target]",
            wrong=[
                (total / flat_targets.numel(), "divide by the number of targets that count "
                 "(targets != -100), not by all positions"),
                (total, "average over the kept targets; you summed them"),
            ],
            nan_hint="exp of logits in the hundreds overflows: use torch.logsumexp or "
            "F.log_softmax, which subtract the maximum first",
        )  # fmt: skip


def _schedule_case(fn: Callable[..., Any], peak: float, w: int, n: int, r: float) -> CaseResult:
    """One schedule (peak, warmup w, budget n, floor ratio r), checked at the steps that matter."""
    steps = [0, 1, w - 1, w, w + 1, (w + n) // 2, n - 1, n, n + 5]
    tested = f"peak={peak:g}, warmup_steps={w}, max_steps={n}, min_lr_ratio={r}, steps {steps}"
    signature = "warmup_cosine(step, peak=, warmup_steps=, max_steps=, min_lr_ratio=)"
    got = []
    for step in steps:
        lr = call(
            tested, signature, fn, step, peak=peak, warmup_steps=w, max_steps=n, min_lr_ratio=r
        )
        got.append(lr)
    try:
        got_t = torch.tensor([float(x) for x in got], dtype=torch.float64)
    except (TypeError, ValueError):
        return CaseResult(tested, False, "a learning rate is not a number", "return a float")

    def curve(f: Callable[[int], float]) -> Tensor:
        return torch.tensor([f(s) for s in steps], dtype=torch.float64)

    def warmup(s: int) -> float:
        return peak * (s + 1) / w

    def unclipped(s: int) -> float:
        p = (s - w) / (n - w)  # not clipped
        return warmup(s) if s < w else peak * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * p)))

    return compare_tensor(
        tested,
        got_t,
        curve(lambda s: _lr(s, peak, w, n, r)),
        atol=1e-12,
        rtol=1e-6,
        what="the learning rates at those steps",
        hint="warmup: peak·(step + 1)/warmup_steps; then peak·(r + (1 - r)·(1 + cos πp)/2), "
        "p = (step - warmup_steps)/(max_steps - warmup_steps) clipped to [0, 1]",
        wrong=[
            (curve(lambda s: peak * s / w if s < w else _lr(s, peak, w, n, r)),
             "warm up with (step + 1)/warmup_steps: step 0 must not get a learning rate of 0"),
            (curve(lambda s: _lr(s, peak, w, n, 0.0) if s >= w else warmup(s)),
             "the cosine ends at min_lr_ratio·peak, not at 0"),
            (curve(lambda s: warmup(s) if s < w else _lr_from_zero(s, peak, n, r)),
             "the cosine starts at the end of warmup: p = (step - w) / (max_steps - w)"),
            (curve(unclipped), "after max_steps clip p to 1: the rate stays at its floor"),
        ],
    )  # fmt: skip


def check_schedule(fn: Callable[..., Any]) -> Iterator[CaseResult]:
    for peak, w, n, r in [(1e-3, 10, 110, 0.1), (6e-4, 4, 20, 0.0)]:
        yield _schedule_case(fn, peak, w, n, r)


def _adamw_chain(
    p: Tensor, grads: list[Tensor], hp: dict[str, float], *, mistake: str = ""
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Steps of AdamW written out (or with one named mistake), as (param, m, v) per step."""
    lr, b1, b2, eps, wd = hp["lr"], hp["beta1"], hp["beta2"], hp["eps"], hp["weight_decay"]
    m, v, out = torch.zeros_like(p), torch.zeros_like(p), []
    for t, g in enumerate(grads, start=1):
        if mistake == "l2":
            g = g + wd * p
        elif mistake == "no_lr":
            p = p - wd * p
        else:
            p = p - lr * wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        if mistake == "no_bias_correction":
            m_hat, v_hat = m, v
        else:
            m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        p = p - lr * m_hat / (v_hat.sqrt() + eps)
        out.append((p, m, v))
    return out


def check_adamw(fn: Callable[..., Any]) -> Iterator[CaseResult]:
    signature = "adamw_step(param, m, v, grad, step, lr=, beta1=, beta2=, eps=, weight_decay=)"
    hp = {"lr": 0.1, "beta1": 0.9, "beta2": 0.99, "eps": 1e-8, "weight_decay": 0.1}
    g = generator(820)
    param0 = randn(g, 6, 4)
    grads = [randn(g, 6, 4) for _ in range(5)]
    # The expected parameters come from torch.optim.AdamW itself.
    p = param0.clone().requires_grad_(True)
    opt = torch.optim.AdamW(
        [p], lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), eps=hp["eps"],
        weight_decay=hp["weight_decay"], foreach=False,
    )  # fmt: skip
    torch_params = []
    for grad in grads:
        p.grad = grad.clone()
        opt.step()
        torch_params.append(p.detach().clone())
    right = _adamw_chain(param0, grads, hp)
    mistakes = ("l2", "no_lr", "no_bias_correction")
    wrong = {k: _adamw_chain(param0, grads, hp, mistake=k) for k in mistakes}
    hints = {
        "l2": "that is Adam with L2 (the decay added to the gradient); AdamW decays the weights "
        "directly: param -= lr·weight_decay·param, apart from the Adam update",
        "no_lr": "the decoupled decay is scaled by the learning rate: param -= lr·wd·param",
        "no_bias_correction": "divide m by (1 - beta1^t) and v by (1 - beta2^t): without "
        "the bias correction the first steps are far too small",
    }
    state = (param0.clone(), torch.zeros_like(param0), torch.zeros_like(param0))
    for t, grad in enumerate(grads, start=1):
        tested = f"step {t} of 5 from zero moments, param (6, 4), {hp}"
        got = call(tested, signature, fn, *state, grad, t, returns=("param", "m", "v"), **hp)
        for index, what in enumerate(("param", "m", "v")):
            want = torch_params[t - 1] if what == "param" else right[t - 1][index]
            require(
                compare_tensor(
                    tested,
                    got[index],
                    want,
                    atol=1e-6,
                    rtol=1e-5,
                    what=f"the new {what}",
                    hint="decay, then m, v, their bias corrections, and the step "
                    "lr·m̂/(sqrt(v̂) + eps), in the order of the statement",
                    wrong=[(chain[t - 1][index], hints[k]) for k, chain in wrong.items()],
                )
            )
        yield CaseResult(tested, True)
        state = right[t - 1]  # the next step starts from the right state


EXERCISES = [
    Exercise(
        id="07.1",
        title="The learning rate by hand",
        kind="by hand",
        name="ANSWER",
        statement=(
            "Warmup + cosine with peak 3e-4, 100 warmup steps, max_steps 1100 and "
            "min_lr_ratio 0.1 (the formula in src/qkv/train/schedule.py). What is the learning "
            "rate at step 350? Write `ANSWER = ...` (to 0.1%)."
        ),
        check=check_lr_by_hand,
    ),
    Exercise(
        id="07.2",
        title="Cross-entropy with ignored targets",
        kind="code",
        name="cross_entropy",
        statement=(
            "Write `cross_entropy(logits, targets)`: logits (..., V) float, targets (...) int64 "
            "where -100 marks a position left out. Return the mean, over the targets that are "
            "not -100, of -log softmax(logits)[target], as a scalar tensor. It must stay finite "
            "for logits in the hundreds. F.cross_entropy and F.nll_loss are off while the check "
            "runs."
        ),
        check=check_cross_entropy,
    ),
    Exercise(
        id="07.3",
        title="The warmup-cosine schedule",
        kind="code",
        name="warmup_cosine",
        statement=(
            "Write `warmup_cosine(step, *, peak, warmup_steps, max_steps, min_lr_ratio)` -> "
            "float, steps counted from 0: peak·(step + 1)/warmup_steps during warmup; then "
            "peak·(r + (1 - r)·(1 + cos(π p))/2) with r = min_lr_ratio and "
            "p = (step - warmup_steps)/(max_steps - warmup_steps) clipped to [0, 1]."
        ),
        check=check_schedule,
    ),
    Exercise(
        id="07.4",
        title="One AdamW step",
        kind="code",
        name="adamw_step",
        statement=(
            "Write `adamw_step(param, m, v, grad, step, *, lr, beta1, beta2, eps, "
            "weight_decay)` -> (param, m, v), step counted from 1, as torch.optim.AdamW does "
            "it: param ← param - lr·weight_decay·param; m ← beta1·m + (1 - beta1)·grad; "
            "v ← beta2·v + (1 - beta2)·grad²; m̂ = m/(1 - beta1^step); "
            "v̂ = v/(1 - beta2^step); param ← param - lr·m̂/(sqrt(v̂) + eps)."
        ),
        check=check_adamw,
    ),
]
