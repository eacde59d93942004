"""Hidden cases: the inputs a checker feeds the learner's function, and the verdict on what it
returns, compared with qkv's own result.

Inputs come from a fixed seed (``generator``), so a case is the same on every run. A comparison
never prints the expected result: it says how far off the answer is and gives a hint, the one
aimed at a known mistake when the answer equals that mistake's output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from qkv.exercises.grading import CaseResult

__all__ = [
    "compare_attention",
    "compare_number",
    "compare_tensor",
    "generator",
    "randn",
    "shape",
]


def generator(seed: int) -> torch.Generator:
    """The random source of one hidden case: the same inputs on every run."""
    return torch.Generator().manual_seed(seed)


def randn(g: torch.Generator, *size: int) -> Tensor:
    return torch.randn(*size, generator=g)


def shape(t: Tensor) -> str:
    return str(tuple(t.shape))


def _max_error(got: Tensor, want: Tensor) -> float:
    """Largest |got - want|, counting equal infinities as 0 and any NaN as infinite."""
    diff = (got.double() - want.double()).abs()
    diff = diff.masked_fill(got.double() == want.double(), 0.0).nan_to_num(nan=math.inf)
    return float(diff.max()) if diff.numel() else 0.0


def _close(got: Tensor, want: Tensor, atol: float, rtol: float) -> bool:
    if got.shape != want.shape:
        return False
    if want.dtype == torch.bool or got.dtype == torch.bool:
        return bool(torch.equal(got.bool(), want.bool()))
    return bool(torch.allclose(got.double(), want.double(), atol=atol, rtol=rtol))


Wrong = Sequence[tuple[Tensor | None, str]]


def compare_tensor(
    tested: str,
    got: object,
    want: Tensor,
    *,
    hint: str,
    wrong: Wrong = (),
    nan_hint: str | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    what: str = "the result",
) -> CaseResult:
    """Compare a tensor the learner returned with the expected one.

    Args:
        tested: what the case fed the function (shapes, mask kind), printed with the result.
        got: what the learner's function returned.
        want: the expected tensor (never printed).
        hint: the hint when the result is wrong in no recognised way.
        wrong: (output of a known mistake, hint naming it); the first one the result equals,
            within the same tolerance, gives the hint.
        nan_hint: the hint when the result holds NaN or ±inf where the expected one is finite
            (an overflowing exp, a 0·log 0).
        atol, rtol: the tolerance, |got - want| <= atol + rtol |want| elementwise.
        what: what the compared tensor is, in messages ("the weights").
    """
    if not isinstance(got, Tensor):
        return CaseResult(
            tested,
            False,
            f"{what} is a {type(got).__name__}, expected a tensor of shape {shape(want)}",
            "return a torch.Tensor",
        )
    if want.dtype == torch.bool and got.dtype != torch.bool:
        return CaseResult(
            tested,
            False,
            f"{what} has dtype {got.dtype}, expected torch.bool",
            "a mask is boolean, True = may attend: build it from comparisons (<=, <, &, |)",
        )
    matches = [h for w, h in wrong if w is not None and _close(got, w, atol, rtol)]
    if got.shape != want.shape:
        problem = f"{what} has shape {shape(got)}, expected {shape(want)}"
        return CaseResult(tested, False, problem, matches[0] if matches else hint)
    if _close(got, want, atol, rtol):
        return CaseResult(tested, True)
    if want.dtype == torch.bool:
        n_wrong = int((got != want).sum())
        problem = f"{what}: {n_wrong} of {want.numel()} entries differ from the expected mask"
    else:
        problem = (
            f"{what}: max |error| {_max_error(got, want):.3g} "
            f"(tolerance {atol:g} + {rtol:g}·|expected|)"
        )
        if nan_hint is not None and bool((~got.isfinite() & want.isfinite()).any()):
            return CaseResult(tested, False, f"{what}: contains NaN or infinity", nan_hint)
    return CaseResult(tested, False, problem, matches[0] if matches else hint)


def compare_number(
    got: object,
    want: float,
    *,
    tol: float,
    relative: bool = False,
    hint: str,
    wrong: Sequence[tuple[float, str]] = (),
) -> CaseResult:
    """Compare a number worked out by hand (``ANSWER``) with the expected one.

    Args:
        got: the learner's ANSWER.
        want: the expected value (never printed).
        tol: the tolerance, absolute or, with ``relative``, a fraction of ``want``.
        hint: the hint when the answer matches no known mistake.
        wrong: (the answer a known mistake gives, hint naming it).
    """
    tested = "ANSWER"
    try:
        if isinstance(got, (bool, str)):
            raise TypeError
        value = float(got)  # type: ignore[arg-type]
    except (TypeError, ValueError, RuntimeError):
        return CaseResult(
            tested, False, f"ANSWER is a {type(got).__name__}", "write a number: ANSWER = 0.123"
        )
    allowed = tol * abs(want) if relative else tol
    stated = f"{tol:.1%} of the answer" if relative else f"±{tol:g}"
    if abs(value - want) <= allowed:
        return CaseResult(tested, True)
    problem = f"ANSWER = {value:g} is not the expected value (tolerance {stated})"
    for w, h in wrong:
        if abs(value - w) <= (tol * abs(w) if relative else tol):
            return CaseResult(tested, False, problem, h)
    return CaseResult(tested, False, problem, hint)


def compare_attention(
    tested: str,
    got: tuple[object, object],
    want_output: Tensor,
    want_weights: Tensor,
    *,
    hint: str,
    wrong: Wrong = (),
    nan_hint: str | None = None,
    output: str = "the output",
    output_hint: str = "your weights are right: the output is weights @ v",
) -> CaseResult:
    """Compare what an attention function returned, (output, weights): the weights first, with
    ``hint``, ``wrong`` and ``nan_hint`` as in ``compare_tensor``, since a wrong output follows
    from wrong weights; then the output (named ``output``), with ``output_hint``."""
    weights = compare_tensor(
        tested, got[1], want_weights, hint=hint, wrong=wrong, nan_hint=nan_hint, what="the weights"
    )
    if not weights.passed:
        return weights
    return compare_tensor(tested, got[0], want_output, hint=output_hint, what=output)
