"""Passages: Python's help topics cut into pieces small enough to embed and to read.

A retriever does not search whole documents: a topic such as ``help("types")`` runs to tens of
thousands of characters, far beyond the 256 word pieces the sentence encoder reads, and a
reader wants the paragraph that answers, not the chapter. The topics of ``pydoc_data.topics``
(the text ``help()`` shows) are cut by fixed rules, so that the same Python gives the same
passages on every run (every cached embedding and measured number depends on them):

1. Topics are read in sorted key order.
2. A heading is a line that starts at the margin and is followed by an underline: a line of one
   character from ``*=-~^`` repeated at least as long as the heading (reStructuredText's rule).
   Headings are not passage text: a topic's first heading is its title, and each passage
   carries ``"title › section"`` to show where it is from.
3. Between two headings, paragraphs are the blocks separated by blank lines. Consecutive
   paragraphs are packed greedily into passages of at most ``MAX_WORDS`` words (words split at
   whitespace); a paragraph longer than that is cut every ``MAX_WORDS`` words.
4. Paragraphs keep their text as written (code stays indented); a passage joins its paragraphs
   with a blank line.
5. A passage whose text appears under several topics (``compound`` repeats ``if``, ``while``,
   ...) is kept once, where it first appears; its ``topics`` lists every topic that holds it.

``MAX_WORDS = 120`` keeps almost every passage within the encoder's 256 word pieces (code and
punctuation cost more pieces than prose); what goes beyond is cut by the tokenizer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["MAX_WORDS", "Passage", "python_docs_topics", "sections", "split_topics"]

MAX_WORDS = 120
_UNDERLINE = re.compile(r"([*=\-~^])\1*")


@dataclass(frozen=True)
class Passage:
    """One piece of a topic: its text, where it comes from, and every topic that holds it."""

    text: str
    title: str  # "topic title › section title"
    topics: tuple[str, ...]  # the help() keys whose text contains it, first one first


def python_docs_topics() -> dict[str, str]:
    """Python's help topics (``pydoc_data.topics``): key -> text, as ``help(key)`` shows it."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise ValueError(
            "this Python has no pydoc_data module (some distributions package it separately); "
            "pass the topics yourself as a mapping of name -> text"
        ) from None
    return dict(topics)


def _is_underline(line: str, heading: str) -> bool:
    return bool(_UNDERLINE.fullmatch(line)) and len(line) >= len(heading.rstrip())


# --8<-- [start:sections]
def sections(text: str) -> list[tuple[str, list[str]]]:
    """``(heading, paragraphs)`` for each section of a topic, in order (rules 2 and 4).

    Text before the first heading forms a section with an empty heading.
    """
    lines = text.splitlines()
    found: list[tuple[str, list[str]]] = [("", [])]
    block: list[str] = []

    def end_block() -> None:
        if any(x.strip() for x in block):
            found[-1][1].append("\n".join(block).strip("\n"))
        block.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        is_heading = (
            line[:1].strip() != ""  # starts at the margin
            and i + 1 < len(lines)
            and _is_underline(lines[i + 1], line)
        )
        if is_heading:
            end_block()
            found.append((line.strip(), []))
            i += 2  # the heading and its underline
            continue
        if line.strip():
            block.append(line)
        else:
            end_block()
        i += 1
    end_block()
    return [(heading, paragraphs) for heading, paragraphs in found if heading or paragraphs]


# --8<-- [end:sections]


def _pack(paragraphs: list[str], max_words: int) -> list[str]:
    """Rule 3: paragraphs packed greedily into pieces of at most ``max_words`` words."""
    pieces: list[str] = []
    current: list[str] = []
    count = 0
    for paragraph in paragraphs:
        words = paragraph.split()
        if len(words) > max_words:  # too long on its own: cut it every max_words words
            if current:
                pieces.append("\n\n".join(current))
                current, count = [], 0
            pieces.extend(
                " ".join(words[i : i + max_words]) for i in range(0, len(words), max_words)
            )
            continue
        if count + len(words) > max_words and current:
            pieces.append("\n\n".join(current))
            current, count = [], 0
        current.append(paragraph)
        count += len(words)
    if current:
        pieces.append("\n\n".join(current))
    return pieces


# --8<-- [start:split_topics]
def split_topics(topics: Mapping[str, str], max_words: int = MAX_WORDS) -> list[Passage]:
    """Cut every topic into passages by the rules of this module, in sorted key order.

    Args:
        topics: topic name -> text, as ``pydoc_data.topics`` (``python_docs_topics()``).
        max_words: the most words of one passage (rule 3).

    Returns:
        The passages, each text once (rule 5).

    Example:
        >>> text = "Title\\n*****\\n\\nOne paragraph.\\n\\nPart\\n====\\n\\nAnother one."
        >>> [(p.title, p.text) for p in split_topics({"t": text})]
        [('Title', 'One paragraph.'), ('Title › Part', 'Another one.')]
    """
    if max_words < 1:
        raise ValueError(f"max_words={max_words}: a passage needs room for at least one word")
    order: dict[str, tuple[str, list[str]]] = {}  # text -> (title, topics), first seen first
    for key in sorted(topics):
        parts = sections(topics[key])
        title = next((heading for heading, _ in parts if heading), key)
        for heading, paragraphs in parts:
            where = title if heading in ("", title) else f"{title} › {heading}"
            for text in _pack(paragraphs, max_words):
                _, holders = order.setdefault(text, (where, []))
                if key not in holders:
                    holders.append(key)
    return [Passage(text, where, tuple(holders)) for text, (where, holders) in order.items()]


# --8<-- [end:split_topics]
