"""Passages and questions: fixed rules, so the same topics always give the same sets."""

from __future__ import annotations

from qkv.rag.passages import Passage, python_docs_topics, sections, split_topics
from qkv.rag.questions import MASK, build_questions, first_sentence, mask_title_words

TOPICS = {
    "loops": (
        "Loop statements\n***************\n\n"
        "A loop statement repeats its body while a condition holds.\n\n"
        '   while_stmt ::= "while" expression ":" suite\n\n'
        "Breaking out\n============\n\n"
        "The break statement ends the nearest enclosing loop at once."
    ),
    "also-loops": (
        "Loops again\n***********\n\nThe break statement ends the nearest enclosing loop at once."
    ),
    "numbers": (
        "Numbers\n*******\n\nNew in version 3.0.\n\n"
        "Integers have unlimited precision in Python, always."
    ),
}


def test_sections_follow_the_underlines() -> None:
    parts = sections(TOPICS["loops"])
    assert [heading for heading, _ in parts] == ["Loop statements", "Breaking out"]
    assert parts[0][1][1].startswith("   while_stmt")  # code keeps its indentation
    assert sections("no heading here\n\nsecond paragraph") == [
        ("", ["no heading here", "second paragraph"])
    ]
    # An indented line of dashes (a table rule in code) is no underline.
    assert [h for h, _ in sections("Title\n*****\n\ntext\n  ----\n")] == ["Title"]


def test_split_is_deterministic_and_dedupes_shared_text() -> None:
    passages = split_topics(TOPICS)
    assert passages == split_topics(dict(reversed(TOPICS.items())))  # sorted key order
    shared = [p for p in passages if p.text.startswith("The break statement")]
    assert shared == [
        Passage(
            "The break statement ends the nearest enclosing loop at once.",
            "Loops again",
            ("also-loops", "loops"),
        )
    ]
    assert "Loop statements › Breaking out" not in {p.title for p in passages}  # seen first above


def test_paragraphs_pack_up_to_max_words() -> None:
    text = "T\n*\n\n" + "\n\n".join(["one two three"] * 3) + "\n\n" + " ".join(["w"] * 10)
    passages = split_topics({"t": text}, max_words=7)
    assert [len(p.text.split()) for p in passages] == [6, 3, 7, 3]  # packed, then a long one cut
    assert all(p.title == "T" for p in passages)


def test_python_docs_passages_are_reproducible() -> None:
    topics = python_docs_topics()
    first, again = split_topics(topics), split_topics(topics)
    assert first == again and len(first) > 300
    assert all(len(p.text.split()) <= 120 for p in first)
    assert len({p.text for p in first}) == len(first)
    assert all(p.topics == tuple(sorted(set(p.topics), key=p.topics.index)) for p in first)


def test_questions_mask_the_title_and_merge_repeats() -> None:
    sentence = first_sentence(TOPICS["numbers"])  # the version note is skipped, the end cut
    assert sentence == "Integers have unlimited precision in Python, always"
    assert mask_title_words("The if statement is used.", 'The "if" statement') == (
        f"The {MASK} {MASK} is used."
    )
    questions = build_questions(TOPICS)
    by_text = {q.text: q for q in questions}
    assert by_text["Tell me about Loop statements."].topics == ("loops",)
    described = by_text[f"A {MASK} {MASK} repeats its body while a condition holds."]
    assert described.kind == "description" and described.topics == ("loops",)
    assert build_questions(TOPICS) == questions


def test_python_docs_questions() -> None:
    questions = build_questions(python_docs_topics())
    kinds = {q.kind for q in questions}
    assert kinds == {"name", "description"} and len(questions) > 100
    assert all(MASK not in q.text for q in questions if q.kind == "name")
    merged = [q for q in questions if q.kind == "description" and "if" in q.topics]
    assert merged and merged[0].topics == ("else", "if")  # `else` shows the text of `if`
