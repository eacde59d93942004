"""The question set: questions with known answers, built from the help topics themselves.

Retrieval is measured on questions whose answer is known: the topic that holds it. Nobody wrote
these questions; they are built from each topic's own title and first sentence by fixed rules,
so the set is the same on every run of the same Python, and two kinds test two directions:

``name``
    ``"Tell me about <title>."``: the topic's name, asked for. Headings are not passage text
    (see ``passages``), so this finds the topic's content from its name alone.
``description``
    the topic's first sentence with the words of its title masked (``___``): the definition,
    asked for without the name. "The ___ ___ is used for conditional execution." asks for
    ``if``. The sentence itself is in the corpus (with its words unmasked), so a method that
    matches the remaining words exactly is at an advantage: this is what keyword search is
    good at.

The first sentence is taken from the topic's first paragraph that starts at the margin, is
not a version note or a source link, and has at least ``MIN_SENTENCE_WORDS`` words; it ends
at the first ``.``, ``:``, ``?`` or ``!`` followed by white space. Markup (``*`` and ``"``)
is dropped, and so is a paragraph whose first line is a signature (``object.__new__(cls)``).
A word is masked when it starts with the first five letters of a title word ("assertions" is
masked for "assert"); the title's words "the", "and" and "of" are not masked. A description
with fewer than ``MIN_VISIBLE_WORDS`` words left unmasked is dropped. Two topics that give the
same question (``else`` repeats ``if``) make one question with both as answers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from qkv.rag.passages import sections

__all__ = ["MASK", "Question", "build_questions", "first_sentence", "mask_title_words"]

MASK = "___"
MIN_SENTENCE_WORDS = 6
MIN_VISIBLE_WORDS = 4
STEM_LETTERS = 5
_SKIP_PREFIXES = ("New in version", "Changed in version", "Added in version", "Deprecated",
                  "Source code:", "**Source code:**")  # fmt: skip
_SENTENCE_END = re.compile(r"[.:?!](?=\s|$)")
_SIGNATURE = re.compile(r"[\w.]+\(.*\)")
_UNMASKED = frozenset({"the", "and", "of"})


@dataclass(frozen=True)
class Question:
    """A question, the topics that answer it, and how it was built (``name``/``description``)."""

    text: str
    topics: tuple[str, ...]
    kind: str


def _plain(text: str) -> str:
    """Markup dropped and white space collapsed: ``*x*`` and ``"x"`` become ``x``."""
    return " ".join(text.replace("*", "").replace('"', "").split())


def first_sentence(text: str) -> str | None:
    """The first sentence of a topic's first prose paragraph (the rules above), or None."""
    for _, paragraphs in sections(text):
        for paragraph in paragraphs:
            if paragraph[:1].isspace() or paragraph.startswith(_SKIP_PREFIXES):
                continue  # grammar, code or a note, not prose
            if _SIGNATURE.fullmatch(paragraph.splitlines()[0].strip()):
                continue  # a method's signature
            plain = _plain(paragraph)
            if len(plain.split()) < MIN_SENTENCE_WORDS:
                continue
            end = _SENTENCE_END.search(plain)
            return plain if end is None else plain[: end.start()]
    return None


def mask_title_words(sentence: str, title: str) -> str:
    """``sentence`` with every word that starts like a word of ``title`` replaced by ``___``.

    Example:
        >>> mask_title_words("Assert statements insert assertions", 'The "assert" statement')
        '___ ___ insert ___'
    """
    title_words = set(re.findall(r"[a-z]+", title.lower())) - _UNMASKED
    stems = {w[:STEM_LETTERS] for w in title_words if len(w) >= 2}
    words = []
    for word in sentence.split():
        letters = re.sub(r"[^a-z]", "", word.lower())
        words.append(MASK if any(letters.startswith(s) for s in stems) else word)
    return " ".join(words)


# --8<-- [start:build_questions]
def build_questions(topics: Mapping[str, str]) -> list[Question]:
    """The fixed question set of ``topics``: a ``name`` and a ``description`` question for each
    topic where the rules allow, in sorted key order.

    Args:
        topics: topic name -> text, as ``pydoc_data.topics``.

    Returns:
        The questions; one that two topics give has both in ``topics``.
    """
    answers: dict[tuple[str, str], list[str]] = {}  # (kind, text) -> topics, in order
    for key in sorted(topics):
        parts = sections(topics[key])
        title = _plain(next((heading for heading, _ in parts if heading), key))
        answers.setdefault(("name", f"Tell me about {title}."), []).append(key)
        sentence = first_sentence(topics[key])
        if sentence is None:
            continue
        masked = mask_title_words(sentence, title)
        if sum(w != MASK for w in masked.split()) >= MIN_VISIBLE_WORDS:
            answers.setdefault(("description", masked + "."), []).append(key)
    return [Question(text, tuple(keys), kind) for (kind, text), keys in answers.items()]


# --8<-- [end:build_questions]
