"""Exercises with checkers for the learning path: ``qkv exercises`` lists them, ``qkv check``
grades a learner's file.

The pages of docs/learn/ end with exercises that go from a number worked out by hand to a
function written in full. Each page's exercises live in one module (``p01_attention.py``, ...)
with their checkers: hidden cases from a fixed seed, compared with qkv's own implementation,
with hints aimed at the usual mistakes. ``grading.py`` holds the exercise record and runs the
learner's code; ``cases.py`` builds the hidden inputs and compares results. The reference
solutions are not part of the package: they live in the repository, under
tests/exercises/solutions/, where the tests prove that each passes its checker.

Only the command line (``qkv.cli``) imports this package.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from qkv.exercises.grading import Exercise, LoadError, Report, find_file, grade, load_answer

__all__ = ["EXERCISES", "PAGES", "Exercise", "LoadError", "Report", "check_path", "get", "page_of"]

# The page modules, in learning-path order: each defines PAGE (its docs/learn/ page) and
# EXERCISES. A new page's exercises need only their module's name here.
PAGE_MODULES = (
    "p00_why_attention",
    "p00b_tokens",
    "p01_attention",
    "p02_masks",
    "p03_multi_head",
    "p04_positions",
    "p05_blocks",
    "p06_architectures",
    "p07_training",
    "p08_generation",
    "p09_efficient_attention",
    "p10_looking_inside",
    "p11_loading_weights",
    "p12_fine_tuning",
    "p13_cheaper_models",
    "p14_retrieval",
    "p15_build_a_gpt",
)
_modules = [importlib.import_module(f"{__name__}.{name}") for name in PAGE_MODULES]

# The learning-path page of each group of exercises: "01" -> "docs/learn/01-attention.md".
PAGES: dict[str, str] = {e.page: module.PAGE for module in _modules for e in module.EXERCISES}

EXERCISES: dict[str, Exercise] = {e.id: e for module in _modules for e in module.EXERCISES}


def _page_id(text: str) -> str:
    """ "1" -> "01", "0b" -> "00b": a page's number to two digits, a letter after it kept."""
    text = text.strip()
    number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
    return number.zfill(2) + text[len(number) :] if number else text


def page_of(text: str) -> str | None:
    """ "1", "01" -> "01" (and "0b" -> "00b") when that page has exercises; None otherwise."""
    page = _page_id(text)
    return page if page in PAGES else None


def get(exercise_id: str) -> Exercise:
    """The exercise "01.3" (also written "1.3"); a KeyError naming the choices otherwise."""
    page, _, number = exercise_id.strip().partition(".")
    key = f"{_page_id(page)}.{number}"
    if key not in EXERCISES:
        raise KeyError(
            f"no exercise {exercise_id!r}; the exercises are {', '.join(EXERCISES)} "
            "(`qkv exercises` lists them)"
        )
    return EXERCISES[key]


def check_path(exercise: Exercise, path: Path) -> tuple[Path, Report]:
    """Grade the learner's file ``path`` (or the file for ``exercise`` in folder ``path``).

    Raises:
        LoadError: no such file, the file does not define the name, or importing it raised.
    """
    file = find_file(exercise, path)
    return file, grade(exercise, load_answer(exercise, file))
