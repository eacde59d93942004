"""``qkv exercises`` and ``qkv check``: the learning path's exercises, and grading a learner's file.

    qkv exercises               every exercise: id, kind, title, page
    qkv exercises 04            page 4's exercises with their statements
    qkv exercises 04.3          one statement
    qkv check 04.3 ex_04_3.py   grade a file (or a folder holding ex_04_3.py)

``qkv check`` imports the learner's file in this process (it is their own code, run as they
would run it) and runs the exercise's hidden cases on what it defines. Exit status: 0 when every
case passes, 1 when one fails or the file cannot be used (it does not define the name, or
raised while being imported), 2 for an unknown exercise or a path that does not exist.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qkv.exercises import Exercise

__all__ = ["cmd_check", "cmd_exercises", "register"]


def _line(exercise: Exercise) -> str:
    return f"  {exercise.id}  {exercise.kind:<7}  {exercise.title}"


def _statement(exercise: Exercise) -> str:
    body = textwrap.fill(
        exercise.statement, width=92, initial_indent="    ", subsequent_indent="    "
    )
    what = "`ANSWER = ...`" if exercise.kind == "by hand" else f"`def {exercise.name}(...)`"
    return (
        f"{_line(exercise)}\n{body}\n    Write {what} in {exercise.file_name}, then run: "
        f"qkv check {exercise.id} {exercise.file_name}"
    )


def cmd_exercises(args: argparse.Namespace) -> int:
    """List the exercises, a page's statements, or one exercise's statement."""
    from qkv.exercises import EXERCISES, PAGES, get, page_of

    which = args.which
    if which is not None and "." in which:
        try:
            exercise = get(which)
        except KeyError as e:
            print(f"qkv exercises: {e.args[0]}", file=sys.stderr)
            return 2
        print(f"exercise {exercise.id}, page {exercise.page} ({PAGES[exercise.page]})")
        print(_statement(exercise))
        return 0
    pages = list(PAGES)
    if which is not None:
        page = page_of(which)
        if page is None:
            print(
                f"qkv exercises: page {which!r} has no exercises; pages: {', '.join(PAGES)}",
                file=sys.stderr,
            )
            return 2
        pages = [page]
    print(f"{len(EXERCISES)} exercises; `qkv check ID FILE.py` grades one.")
    for page in pages:
        print(f"\npage {page}: {PAGES[page]}")
        for exercise in EXERCISES.values():
            if exercise.page == page:
                print(_statement(exercise) if which is not None else _line(exercise))
    return 0


def _indent(text: str, prefix: str = "        ") -> str:
    return textwrap.indent(text, prefix)


def cmd_check(args: argparse.Namespace) -> int:
    """Grade the learner's file for one exercise; 0 = passed, 1 = not yet, 2 = usage error."""
    from qkv.exercises import LoadError, check_path, get

    try:
        exercise = get(args.exercise)
    except KeyError as e:
        print(f"qkv check: {e.args[0]}", file=sys.stderr)
        return 2
    path = Path(args.path)
    if not path.exists():
        print(f"qkv check: {path}: no such file or folder", file=sys.stderr)
        return 2
    try:
        file, report = check_path(exercise, path)
    except LoadError as e:
        print(f"qkv check {exercise.id}: {e}", file=sys.stderr)
        return 1
    print(f"exercise {exercise.id}, {exercise.title}: checking `{exercise.name}` in {file}")
    for case in report.cases:
        print(f"  {'pass' if case.passed else 'FAIL'}  {case.tested}")
        if not case.passed:
            print(_indent(case.problem))
            if case.hint:
                print(_indent(f"hint: {case.hint}"))
    if report.passed:
        print(f"passed: all {len(report.cases)} cases.")
        return 0
    print("not passed yet: fix the failing case and check again (later cases were not run).")
    return 1


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``qkv exercises`` and ``qkv check`` to the command's subparsers."""
    p = sub.add_parser(
        "exercises",
        help="list the learning path's exercises (qkv check grades them)",
        description="List the exercises of the learning path, or show the statements of one "
        "page or one exercise.",
    )
    p.add_argument("which", nargs="?", help="a page (04) or an exercise (04.3); default: all")
    p.set_defaults(func=cmd_exercises)
    c = sub.add_parser(
        "check",
        help="grade your solution to an exercise",
        description="Import your file (your own code, run in this process), run the exercise's "
        "hidden cases on what it defines, and print which case fails with a hint. A folder is "
        "searched for ex_PAGE_N.py (ex_04_3.py for 04.3), else for the one .py file defining "
        "the exercise's function. Exit status 0 = passed, 1 = not passed, 2 = usage error.",
    )
    c.add_argument("exercise", help="the exercise id, e.g. 04.3")
    c.add_argument("path", help="your .py file, or the folder you work in")
    c.set_defaults(func=cmd_check)
