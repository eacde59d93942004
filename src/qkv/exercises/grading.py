"""How ``qkv check`` grades a learner's file: the exercise record, hidden cases, comparisons.

An exercise names one thing the learner's file must define: a function (``def attention(...)``)
or, for an exercise done by hand, a value (``ANSWER = 0.82``). Its checker feeds that thing
hidden cases, fresh random inputs from a fixed seed, and compares the result with qkv's own
implementation within a stated tolerance. A case that fails says what it tested (shapes, mask
kind), how far off the result was, and a hint; where the wrong result equals a known mistake
(attention without the 1/sqrt(d_k) scale, a mask the wrong way round) the hint names that
mistake. The expected result itself is never printed.

The learner's file is their own code and runs in this process, imported like any module (its
``if __name__ == "__main__":`` block does not run). Nothing is sandboxed: check only files you
would run yourself.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import re
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = [
    "CaseResult",
    "Exercise",
    "LoadError",
    "Report",
    "call",
    "compare_number",
    "compare_tensor",
    "find_file",
    "forbid",
    "generator",
    "grade",
    "learner_traceback",
    "load_answer",
    "raised",
    "randn",
    "shape",
]

_HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class CaseResult:
    """One hidden case: what it tested, and for a failure what was wrong and a hint."""

    tested: str
    passed: bool
    problem: str = ""
    hint: str = ""


Checker = Callable[[Any], Iterable[CaseResult]]


@dataclass(frozen=True, kw_only=True)
class Exercise:
    """One exercise of a learning-path page.

    ``id`` is "PAGE.N" (e.g. "01.3"); ``name`` is what the learner's file defines: a function
    for ``kind="code"``, ``ANSWER`` for ``kind="by hand"``. ``check`` yields one result per
    hidden case, simplest first; grading stops at the first failure.
    """

    id: str
    title: str
    kind: Literal["by hand", "code"]
    name: str
    statement: str
    check: Checker

    @property
    def page(self) -> str:
        """The learning-path page, "01" ... "10"."""
        return self.id.split(".")[0]

    @property
    def file_name(self) -> str:
        """The file ``qkv check`` looks for in a folder: ``ex_01_3.py`` for "01.3"."""
        return f"ex_{self.id.replace('.', '_')}.py"


@dataclass(frozen=True)
class Report:
    """The cases run on a learner's answer, up to and including the first failure."""

    exercise: Exercise
    cases: list[CaseResult]

    @property
    def passed(self) -> bool:
        return bool(self.cases) and all(c.passed for c in self.cases)


def grade(exercise: Exercise, answer: object) -> Report:
    """Run the hidden cases of ``exercise`` on ``answer`` (a function or a value)."""
    if exercise.kind == "code" and not callable(answer):
        what = type(answer).__name__
        return Report(
            exercise,
            [
                CaseResult(
                    f"{exercise.name} is a function",
                    False,
                    f"{exercise.name} is a {what}, not a function",
                    f"define it with `def {exercise.name}(...):`",
                )
            ],
        )
    cases: list[CaseResult] = []
    for result in exercise.check(answer):
        cases.append(result)
        if not result.passed:
            break
    return Report(exercise, cases)


# ---------------------------------------------------------------------------------------------
# Loading the learner's file.


class LoadError(Exception):
    """The learner's file could not be used; the message is ready to print."""


def find_file(exercise: Exercise, path: Path) -> Path:
    """The file to check: ``path`` itself, or inside a folder ``ex_01_3.py``, or else the one
    ``.py`` file there that defines the exercise's function."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise LoadError(f"{path}: no such file or folder")
    named = path / exercise.file_name
    if named.is_file():
        return named
    if exercise.kind == "by hand":
        raise LoadError(
            f"{path} has no {exercise.file_name}; write `ANSWER = ...` in a file of that name"
        )
    defines = re.compile(rf"^\s*def\s+{re.escape(exercise.name)}\s*\(", re.MULTILINE)
    found = sorted(
        p
        for p in path.glob("*.py")
        if defines.search(p.read_text(encoding="utf-8", errors="ignore"))
    )
    if len(found) == 1:
        return found[0]
    if not found:
        raise LoadError(
            f"{path} has no {exercise.file_name} and no .py file defining "
            f"`{exercise.name}`; create {exercise.file_name} with `def {exercise.name}(...)`"
        )
    names = ", ".join(p.name for p in found)
    raise LoadError(
        f"several files in {path} define `{exercise.name}` ({names}); pass the one to check"
    )


def _is_ours(filename: str) -> bool:
    """Frames of the grading machinery and of importlib, left out of a learner's traceback."""
    return filename.startswith("<frozen ") or Path(filename).resolve().is_relative_to(_HERE)


def learner_traceback(error: BaseException) -> str:
    """The traceback of an error raised by the learner's code, without our own frames."""
    tb = traceback.TracebackException.from_exception(error)
    tb.stack = traceback.StackSummary.from_list([f for f in tb.stack if not _is_ours(f.filename)])
    return "".join(tb.format()).rstrip()


def load_answer(exercise: Exercise, file: Path) -> object:
    """Import ``file`` and return what it defines under ``exercise.name``.

    The file's folder is on ``sys.path`` while it imports, so it may import its neighbours.
    """
    module_name = f"_qkv_learner_{file.stem}"
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        raise LoadError(f"{file}: cannot be imported as Python (is it a .py file?)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    sys.path.insert(0, str(file.resolve().parent))
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:
        raise LoadError(
            f"{file} raised an error while being imported (your code):\n{learner_traceback(e)}"
        ) from None
    finally:
        sys.path.remove(str(file.resolve().parent))
    if not hasattr(module, exercise.name):
        what = (
            f"`def {exercise.name}(...)`" if exercise.kind == "code" else f"`{exercise.name} = ...`"
        )
        raise LoadError(
            f"{file} does not define {exercise.name}; exercise {exercise.id} needs {what}"
        )
    return getattr(module, exercise.name)


# ---------------------------------------------------------------------------------------------
# Calling the learner's function and comparing what it returns.


def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, str | None]:
    """``fn(*args, **kwargs)`` and None, or None and the learner's traceback if it raised."""
    try:
        return fn(*args, **kwargs), None
    except Exception as e:
        return None, f"raised an error:\n{learner_traceback(e)}"


def raised(tested: str, error: str, signature: str) -> CaseResult:
    """The result of a case in which the learner's function raised."""
    return CaseResult(tested, False, error, f"the function is called as {signature}")


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


@contextlib.contextmanager
def forbid(targets: Sequence[tuple[Any, str]], advice: str) -> Iterator[None]:
    """Make ``getattr(owner, name)`` raise while the learner's function runs, for exercises
    whose point is to write that function yourself (softmax, cross-entropy)."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(advice)

    saved = [(owner, name, getattr(owner, name)) for owner, name in targets]
    try:
        for owner, name in targets:
            setattr(owner, name, refuse)
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def generator(seed: int) -> torch.Generator:
    """The random source of one hidden case: the same inputs on every run."""
    return torch.Generator().manual_seed(seed)


def randn(g: torch.Generator, *size: int) -> Tensor:
    return torch.randn(*size, generator=g)
