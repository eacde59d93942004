"""Synthetic sequence-to-sequence tasks, generated on the fly from a random generator.

Small tasks whose right answer is known make an encoder-decoder's learning visible within
minutes on a CPU, and need no download:

    copy      "qmvxe"            -> "qmvxe"
    reverse   "qmvxe"            -> "exvmq"        attention must look back to front
    sort      "qmvxe"            -> "emqvx"        each output depends on the whole input
    dates     "march 3, 1997"    -> "1997-03-03"   a small "translation" of human date formats
              "3 mar 1997", "tuesday, march 3, 1997", "03.03.1997", "march 3rd, 1997", ...

Letter tasks draw a length uniformly from 1 .. ``max_len`` and letters uniformly from a-z.
Dates are drawn uniformly from 1900-01-01 .. 2099-12-31 and written in one of ``DATE_FORMATS``
(day-first numeric only, so no source is ambiguous).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import torch

__all__ = [
    "DATE_FORMATS",
    "SYNTHETIC_TASKS",
    "format_date",
    "longest_date_source",
    "sample_example",
    "task_alphabet",
]

SYNTHETIC_TASKS: tuple[str, ...] = ("copy", "reverse", "sort", "dates")
LETTERS = "abcdefghijklmnopqrstuvwxyz"

MONTHS = (
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
)
WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
FIRST_DAY = dt.date(1900, 1, 1)
LAST_DAY = dt.date(2099, 12, 31)


def _ordinal(day: int) -> str:
    suffix = "th" if 10 <= day % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


# --8<-- [start:dates]
# Human ways of writing a date; every one says the day, the month and the year unambiguously.
DATE_FORMATS: tuple[Callable[[dt.date], str], ...] = (
    lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",  # march 3, 1997
    lambda d: f"{d.day} {MONTHS[d.month - 1][:3]} {d.year}",  # 3 mar 1997
    lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",  # 3 march 1997
    lambda d: f"{MONTHS[d.month - 1][:3]} {d.day} {d.year}",  # mar 3 1997
    lambda d: f"{MONTHS[d.month - 1]} {_ordinal(d.day)}, {d.year}",  # march 3rd, 1997
    lambda d: f"{WEEKDAYS[d.weekday()]}, {MONTHS[d.month - 1]} {d.day}, {d.year}",
    lambda d: f"{d.day:02d}.{d.month:02d}.{d.year}",  # 03.03.1997 (day first)
    lambda d: f"{d.year} {MONTHS[d.month - 1]} {d.day}",  # 1997 march 3
)
# --8<-- [end:dates]


def format_date(date: dt.date, style: int) -> str:
    """``date`` written in ``DATE_FORMATS[style]``."""
    return DATE_FORMATS[style](date)


def longest_date_source() -> int:
    """The longest source the dates task can produce, in characters."""
    # Longest month name (september) with the longest weekday (wednesday) and a 2-digit day.
    longest = dt.date(2021, 9, 29)
    assert longest.weekday() == 2  # a wednesday
    return max(len(fmt(longest)) for fmt in DATE_FORMATS)


def task_alphabet(task: str) -> str:
    """Every character the task's sources and targets can contain."""
    if task == "dates":
        return "".join(sorted(set("".join(MONTHS) + "".join(WEEKDAYS) + "0123456789 ,.-")))
    if task in SYNTHETIC_TASKS:
        return LETTERS
    raise ValueError(f"unknown synthetic task {task!r}; choose one of {', '.join(SYNTHETIC_TASKS)}")


def _randint(g: torch.Generator, low: int, high: int) -> int:
    """A uniform integer in ``low .. high`` (both included)."""
    return int(torch.randint(low, high + 1, (1,), generator=g))


# --8<-- [start:sample]
def sample_example(task: str, g: torch.Generator, max_len: int) -> tuple[str, str]:
    """One ``(source, target)`` pair of ``task`` drawn from ``g``.

    Args:
        task: one of ``SYNTHETIC_TASKS``.
        g: the random generator (the pair is a function of its state alone).
        max_len: the longest letter-task source (dates have their own lengths).

    Example:
        >>> sample_example("reverse", torch.Generator().manual_seed(0), 5)[1][::-1] == (
        ...     sample_example("reverse", torch.Generator().manual_seed(0), 5)[0])
        True
    """
    if task == "dates":
        day = FIRST_DAY + dt.timedelta(days=_randint(g, 0, (LAST_DAY - FIRST_DAY).days))
        style = _randint(g, 0, len(DATE_FORMATS) - 1)
        return format_date(day, style), day.isoformat()
    if task not in SYNTHETIC_TASKS:
        raise ValueError(
            f"unknown synthetic task {task!r}; choose one of {', '.join(SYNTHETIC_TASKS)}"
        )
    length = _randint(g, 1, max_len)
    letters = torch.randint(0, len(LETTERS), (length,), generator=g).tolist()
    source = "".join(LETTERS[i] for i in letters)
    if task == "copy":
        return source, source
    if task == "reverse":
        return source, source[::-1]
    return source, "".join(sorted(source))


# --8<-- [end:sample]
