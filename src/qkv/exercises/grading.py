"""How ``qkv check`` grades a learner's file: the exercise record, loading and running it.

An exercise names one thing the learner's file must define: a function (``def attention(...)``)
or, for an exercise done by hand, a value (``ANSWER = 0.82``). Its checker feeds that thing
hidden cases, fresh random inputs from a fixed seed, and compares the result with qkv's own
implementation within a stated tolerance (``cases.py`` builds the inputs and compares). A case
that fails says what it tested (shapes, mask kind), how far off the result was, and a hint;
where the wrong result equals a known mistake (attention without the 1/sqrt(d_k) scale, a mask
the wrong way round) the hint names that mistake. The expected result itself is never printed.

The learner's file is their own code and runs in this process, imported like any module (its
``if __name__ == "__main__":`` block does not run). Nothing is sandboxed: check only files you
would run yourself.
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch import Tensor

__all__ = [
    "CaseFailed",
    "CaseResult",
    "Exercise",
    "LoadError",
    "Report",
    "call",
    "find_file",
    "forbid",
    "grade",
    "learner_traceback",
    "load_answer",
    "require",
]

_HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class CaseResult:
    """One hidden case: what it tested, and for a failure what was wrong and a hint."""

    tested: str
    passed: bool
    problem: str = ""
    hint: str = ""


class CaseFailed(Exception):
    """A failed case that ends the check: ``call`` raises it when the learner's function raised
    or returned the wrong kind of thing, ``require`` when a comparison failed; ``grade`` records
    ``result``."""

    def __init__(self, result: CaseResult) -> None:
        super().__init__(result.problem)
        self.result = result


def require(result: CaseResult) -> None:
    """Stop the case at ``result`` if it failed: for a case that compares several things (the
    parts of a tuple, the tensors of a state dict), each must pass before the next is looked at."""
    if not result.passed:
        raise CaseFailed(result)


Checker = Callable[[Any], Iterable[CaseResult]]


@dataclass(frozen=True, kw_only=True)
class Exercise:
    """One exercise of a learning-path page.

    ``id`` is "PAGE.N" (e.g. "01.3", "00b.2"); ``name`` is what the learner's file defines: a
    function for ``kind="code"``, ``ANSWER`` for ``kind="by hand"``. ``check`` yields one result
    per hidden case, simplest first; grading stops at the first failure, or at the
    ``CaseFailed`` that ``call`` or ``require`` raises.
    """

    id: str
    title: str
    kind: Literal["by hand", "code"]
    name: str
    statement: str
    check: Checker

    @property
    def page(self) -> str:
        """The learning-path page: "00", "00b", "01", ..."""
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
    try:
        for result in exercise.check(answer):
            cases.append(result)
            if not result.passed:
                break
    except CaseFailed as failed:
        cases.append(failed.result)
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
# Running the learner's function.


def call(
    tested: str,
    signature: str,
    fn: Callable[..., Any],
    /,
    *args: Any,
    returns: Sequence[str] = (),
    **kwargs: Any,
) -> Any:
    """Run the learner's ``fn(*args, **kwargs)`` on copies of the tensors among ``args`` and
    ``kwargs``, for the case ``tested``; return what it returns.

    Args:
        tested: what the case feeds the function, printed with a failure.
        signature: how the function is called, the hint when it raises
            ("attention(q, k, v)").
        fn: the learner's function.
        returns: for a function that returns a tuple, the names of its parts
            (("out", "weights")); anything else it returns fails the case.

    Raises:
        CaseFailed: ``fn`` raised (the case shows the learner's own traceback) or did not return
            the tuple named by ``returns``; ``grade`` records the failed case and stops there.
    """
    # Copies of the tensors: a function that writes into its inputs cannot change the case.
    args = tuple(a.clone() if isinstance(a, Tensor) else a for a in args)
    kwargs = {k: a.clone() if isinstance(a, Tensor) else a for k, a in kwargs.items()}
    try:
        got = fn(*args, **kwargs)
    except Exception as e:
        problem = f"raised an error:\n{learner_traceback(e)}"
        raise CaseFailed(
            CaseResult(tested, False, problem, f"the function is called as {signature}")
        ) from None
    if returns and not (isinstance(got, tuple) and len(got) == len(returns)):
        what = f"a tuple of {len(got)}" if isinstance(got, tuple) else f"a {type(got).__name__}"
        raise CaseFailed(
            CaseResult(tested, False, f"returned {what}", f"return ({', '.join(returns)})")
        )
    return got


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
