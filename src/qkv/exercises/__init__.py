"""Exercises with checkers for the learning path: ``qkv exercises`` lists them, ``qkv check``
grades a learner's file.

Every page of docs/learn/ from 1 to 8, and page 10, ends with exercises that go from a number
worked out by hand to a function written in full. Each lives in the module of its page
(``p01_attention.py``, ...) with its checker: hidden cases from a fixed seed, compared with
qkv's own implementation, with hints aimed at the usual mistakes. ``grading.py`` holds the
machinery they share. The reference solutions are not part of the package: they live in the
repository, under tests/exercises/solutions/, where the tests prove that each passes its checker.

Only the command line (``qkv.cli``) imports this package.
"""

from __future__ import annotations

from pathlib import Path

from qkv.exercises import (
    p01_attention,
    p02_masks,
    p03_multi_head,
    p04_positions,
    p05_blocks,
    p06_architectures,
    p07_training,
    p08_generation,
    p10_looking_inside,
)
from qkv.exercises.grading import Exercise, LoadError, Report, find_file, grade, load_answer

__all__ = ["EXERCISES", "PAGES", "Exercise", "LoadError", "Report", "check_path", "get", "page_of"]

# The learning-path page of each group of exercises.
PAGES: dict[str, str] = {
    "01": "docs/learn/01-attention.md",
    "02": "docs/learn/02-self-attention-and-masks.md",
    "03": "docs/learn/03-multi-head.md",
    "04": "docs/learn/04-positions.md",
    "05": "docs/learn/05-blocks.md",
    "06": "docs/learn/06-architectures.md",
    "07": "docs/learn/07-training.md",
    "08": "docs/learn/08-generation.md",
    "10": "docs/learn/10-looking-inside.md",
}

EXERCISES: dict[str, Exercise] = {
    exercise.id: exercise
    for module in (
        p01_attention,
        p02_masks,
        p03_multi_head,
        p04_positions,
        p05_blocks,
        p06_architectures,
        p07_training,
        p08_generation,
        p10_looking_inside,
    )
    for exercise in module.EXERCISES
}


def page_of(text: str) -> str | None:
    """ "1", "01" -> "01" when that page has exercises; None otherwise."""
    page = text.strip().zfill(2)
    return page if page in PAGES else None


def get(exercise_id: str) -> Exercise:
    """The exercise "01.3" (also written "1.3"); a KeyError naming the choices otherwise."""
    page, _, number = exercise_id.strip().partition(".")
    key = f"{page.zfill(2)}.{number}"
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
