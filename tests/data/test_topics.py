"""The python-topics classification task: labels, the hashed split, batches."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from qkv.data import DataConfig, build_data, char_tokenizer, special_ids
from qkv.data.topics import (
    GROUPS,
    MIN_CHARS,
    TOPIC_GROUPS,
    TopicExample,
    TopicParagraphs,
    in_validation,
    topic_examples,
)

LONG = "x" * MIN_CHARS


def test_every_group_has_paragraphs_and_each_text_appears_once() -> None:
    examples = topic_examples()
    counts = Counter(GROUPS[e.label] for e in examples)
    assert set(counts) == set(GROUPS) and min(counts.values()) >= 20
    assert len({e.text for e in examples}) == len(examples)
    assert all(len(e.text) >= MIN_CHARS for e in examples)


def test_unknown_topics_and_paragraphs_shared_by_two_groups_are_left_out() -> None:
    topics = {
        "assert": f"short\n\nA {LONG}\n\nshared {LONG}",  # statements
        "calls": f"shared {LONG}\n\nB {LONG}",  # expressions
        "some-new-topic": f"C {LONG}",  # not in TOPIC_GROUPS
    }
    assert "some-new-topic" not in TOPIC_GROUPS
    examples = topic_examples(topics)
    assert examples == [
        TopicExample(f"A {LONG}", GROUPS.index("statements")),
        TopicExample(f"B {LONG}", GROUPS.index("expressions")),
    ]


def test_the_split_depends_on_the_text_alone() -> None:
    texts = [f"paragraph {i}" for i in range(2000)]
    held = [t for t in texts if in_validation(t, 0.2)]
    assert 0.15 < len(held) / len(texts) < 0.25
    assert held == [t for t in reversed(texts) if in_validation(t, 0.2)][::-1]
    # a larger fraction holds out a superset: the boundary only moves
    assert set(held) <= {t for t in texts if in_validation(t, 0.3)}


def _source(seq_len: int = 16) -> TopicParagraphs:
    examples = topic_examples()
    tokenizer = char_tokenizer(e.text for e in examples)
    return TopicParagraphs(
        tokenizer, specials=special_ids(tokenizer), seq_len=seq_len, val_fraction=0.2,
        examples=examples,
    )  # fmt: skip


def test_batches_are_padded_masked_and_a_function_of_seed_and_step() -> None:
    source = _source()
    batch = source.train_batch(3, 8, seed=1)
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[0] == 8 and batch["input_ids"].shape[1] <= 16
    assert batch["labels"].shape == (8,) and int(batch["labels"].max()) < len(GROUPS)
    padding = batch["attention_mask"] == 0
    assert bool((batch["input_ids"][padding] == source.pad_id).all())
    again = source.train_batch(3, 8, seed=1)
    assert all(torch.equal(batch[k], again[k]) for k in batch)
    other = source.train_batch(4, 8, seed=1)
    assert not all(torch.equal(batch[k], other[k]) for k in ("input_ids", "labels"))


def test_validation_is_fixed_mixed_and_the_majority_baseline_is_a_class_share() -> None:
    source = _source()
    first = [b["labels"] for b in source.val_batches(32)]
    second = [b["labels"] for b in source.val_batches(32)]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    labels = torch.cat(first)
    assert len(labels) == source.fingerprint["val_examples"]
    assert len(set(first[0].tolist())) >= 3  # ordered by hash, not by topic
    shares = torch.bincount(labels, minlength=len(GROUPS)).float() / len(labels)
    assert any(abs(source.majority_accuracy() - s) < 1e-6 for s in shares.tolist())


def test_a_tokenizer_with_cls_starts_every_row_with_it(tmp_path: Path) -> None:
    config = DataConfig(kind="classify", corpus="python-topics", tokenizer="wordpiece",
                        vocab_size=300, seq_len=24)  # fmt: skip
    source, tokenizer = build_data(config, tmp_path)
    assert source.kind == "classify" and tokenizer is not None
    cls = special_ids(tokenizer).cls
    batch = source.train_batch(0, 4, seed=0)
    assert bool((batch["input_ids"][:, 0] == cls).all())
    assert source.num_labels == len(GROUPS) and source.vocab_size == tokenizer.get_vocab_size()


def test_the_task_needs_its_kind(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="kind='classify'"):
        build_data(DataConfig(kind="lm", corpus="python-topics"), tmp_path)
