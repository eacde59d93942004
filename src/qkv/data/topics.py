"""Text classification on Python's own documentation: which part of the docs a paragraph is from.

Every Python ships the text of its help topics (``pydoc_data.topics``: ``help("assert")``), each
a section of the Language Reference or the Library Reference. The task groups the topics by the
chapter they come from and asks, for one paragraph, which group it belongs to::

    statements    Language Reference 7 and 8: simple and compound statements (assert, for, try, ...)
    expressions   Language Reference 6: calls, comparisons, operators, displays, lambda, ...
    lexical       Language Reference 2: identifiers, keywords, literals
    data-model    Language Reference 3 and 4: objects, special methods, execution model, naming
    library       the Library Reference: built-in types, string methods, format strings, pdb

A paragraph is a block of text between blank lines, at least ``MIN_CHARS`` characters long. The
same paragraph can appear under several topics (``compound`` repeats ``if``, ``while``, ...):
it is kept once, and left out when its topics fall into different groups (its label would be
ambiguous). Topics that are not in ``TOPIC_GROUPS`` (ones a newer Python adds) are left out, so
the labels never depend on a guess; the data fingerprint records how many examples there are.

The split is fixed by hashing: a paragraph is held out for validation when the first 8 bytes
of the BLAKE2b hash of its text, read as an integer, fall in the last ``val_fraction`` of the
range. It depends on the text alone (not on order, seed or Python version), so a paragraph that
two Pythons share lands on the same side in both. Validation paragraphs are ordered by that
hash too, which mixes the topics: the first few validation batches are a fair sample.

A batch holds ``input_ids`` (B, T) and ``attention_mask`` (B, T), padded to the longest row of
the batch, and ``labels`` (B,). When the tokenizer has a ``[CLS]`` token (WordPiece, MiniLM's
tokenizer) every row starts with it, since BERT's classifier reads position 0; rows longer than
``seq_len`` are cut.

Shape legend: B batch · T positions.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from qkv.data.config import step_generator, val_slices

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from qkv.data.tokenizers import SpecialIds

__all__ = [
    "GROUPS",
    "MIN_CHARS",
    "TOPIC_GROUPS",
    "TopicExample",
    "TopicParagraphs",
    "in_validation",
    "topic_examples",
]

MIN_CHARS = 80  # shorter blocks are headings, code fragments and list items
GROUPS: tuple[str, ...] = ("statements", "expressions", "lexical", "data-model", "library")

# --8<-- [start:groups]
# help() topic -> the group of the documentation chapter it comes from (Python 3.10 .. 3.13).
TOPIC_GROUPS: dict[str, str] = {
    **dict.fromkeys(
        ("assert", "assignment", "async", "augassign", "break", "class", "compound", "continue",
         "del", "else", "for", "function", "global", "if", "import", "nonlocal", "pass", "raise",
         "return", "try", "while", "with", "yield", "match", "type"),
        "statements",
    ),
    **dict.fromkeys(
        ("atom-identifiers", "atom-literals", "attribute-references", "await", "binary",
         "bitwise", "booleans", "calls", "comparisons", "conversions", "dict", "exprlists", "in",
         "lambda", "lists", "operator-summary", "power", "shifting", "slicings", "subscriptions",
         "unary"),
        "expressions",
    ),
    **dict.fromkeys(
        ("floating", "id-classes", "identifiers", "imaginary", "integers", "numbers", "strings"),
        "lexical",
    ),
    **dict.fromkeys(
        ("attribute-access", "callable-types", "context-managers", "customization",
         "dynamic-features", "exceptions", "execmodel", "naming", "numeric-types", "objects",
         "sequence-types", "specialnames", "types"),
        "data-model",
    ),
    **dict.fromkeys(
        ("bltin-code-objects", "bltin-ellipsis-object", "bltin-null-object",
         "bltin-type-objects", "debugger", "formatstrings", "specialattrs", "string-methods",
         "truth", "typesfunctions", "typesmapping", "typesmethods", "typesmodules", "typesseq",
         "typesseq-mutable"),
        "library",
    ),
}  # fmt: skip
# --8<-- [end:groups]


@dataclass(frozen=True)
class TopicExample:
    """One paragraph and the index of its group in ``GROUPS``."""

    text: str
    label: int


def in_validation(text: str, val_fraction: float) -> bool:
    """Whether ``text`` is held out: its hash falls in the last ``val_fraction`` of the range.

    Example:
        >>> in_validation("a paragraph", 0.0), in_validation("a paragraph", 0.999999)
        (False, True)
    """
    return int.from_bytes(_digest(text), "big") >= (1.0 - val_fraction) * 2**64


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()


def topic_examples(topics: dict[str, str] | None = None) -> list[TopicExample]:
    """Every labelled paragraph of ``topics`` (default: this Python's ``pydoc_data.topics``),
    in sorted topic order, each text once (see the module docstring).

    Raises:
        ValueError: this Python has no ``pydoc_data`` (some distributions package it apart).
    """
    if topics is None:
        try:
            from pydoc_data.topics import topics as shipped
        except ImportError:
            raise ValueError(
                "this Python has no pydoc_data module (some distributions package it "
                "separately), so the python-topics task has no text"
            ) from None
        topics = dict(shipped)
    groups: dict[str, set[str]] = {}
    order: list[str] = []
    for key in sorted(topics):
        if key not in TOPIC_GROUPS:
            continue
        for block in topics[key].split("\n\n"):
            text = block.strip()
            if len(text) < MIN_CHARS:
                continue
            if text not in groups:
                groups[text] = set()
                order.append(text)
            groups[text].add(TOPIC_GROUPS[key])
    return [
        TopicExample(text, GROUPS.index(next(iter(groups[text]))))
        for text in order
        if len(groups[text]) == 1  # a paragraph shared by two groups has no single label
    ]


class TopicParagraphs:
    """Batches of tokenized paragraphs and their group labels (see the module docstring).

    Args:
        tokenizer: turns a paragraph into ids (MiniLM's, or one trained on the training split).
        specials: the tokenizer's special ids (padding, [CLS]).
        seq_len: the longest row, in tokens.
        val_fraction: the share of paragraphs held out (by hash).
        examples: the labelled paragraphs (default: ``topic_examples()``).

    Attributes:
        kind: ``"classify"``. num_labels: ``len(GROUPS)``. vocab_size, pad_id, cls_id, ...: of
        the tokenizer. fingerprint: what the run records (counts per split, the text's hash).
    """

    kind = "classify"
    num_labels = len(GROUPS)

    def __init__(
        self, tokenizer: Tokenizer, *, specials: SpecialIds, seq_len: int, val_fraction: float,
        examples: list[TopicExample] | None = None,
    ) -> None:  # fmt: skip
        examples = topic_examples() if examples is None else examples
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.pad_id = specials.pad if specials.pad is not None else 0
        self.cls_id, self.bos_id, self.eos_id = specials.cls, specials.bos, specials.eos
        self.mask_id, self.sep_id = specials.mask, specials.sep
        self.special_ids = list(specials.all)
        self.seq_len = seq_len
        train = [e for e in examples if not in_validation(e.text, val_fraction)]
        val = [e for e in examples if in_validation(e.text, val_fraction)]
        val.sort(key=lambda e: _digest(e.text))  # topics mixed: the first batches are fair too
        if not train or not val:
            raise ValueError(
                f"val_fraction={val_fraction} leaves {len(train)} training and {len(val)} "
                "validation paragraphs; both need some (choose a fraction between 0.05 and 0.5)"
            )
        self.train_ids, self.train_labels = self._encode(tokenizer, train)
        self.val_ids, self.val_labels = self._encode(tokenizer, val)
        text_hash = hashlib.sha256("\n\n".join(e.text for e in examples).encode()).hexdigest()
        self.fingerprint = {
            "corpus": "python-topics",
            "sha256": text_hash,
            "train_examples": len(train),
            "val_examples": len(val),
            "val_class_counts": dict(sorted(Counter(GROUPS[e.label] for e in val).items())),
        }

    def _encode(
        self, tokenizer: Tokenizer, examples: list[TopicExample]
    ) -> tuple[list[list[int]], torch.Tensor]:
        rows = []
        for encoding in tokenizer.encode_batch([e.text for e in examples]):
            ids = list(encoding.ids)
            if self.cls_id is not None and ids[:1] != [self.cls_id]:
                ids.insert(0, self.cls_id)  # the classifier reads position 0
            rows.append(ids[: self.seq_len])
        return rows, torch.tensor([e.label for e in examples])  # (N,)

    def _batch(self, rows: list[list[int]], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        longest = max(len(r) for r in rows)
        ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros(len(rows), longest, dtype=torch.long)  # (B, T)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def train_batch(self, step: int, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
        """Random training paragraphs drawn from ``(seed, step)`` alone."""
        g = step_generator(seed, step)
        idx = torch.randint(0, len(self.train_ids), (batch_size,), generator=g).tolist()
        return self._batch([self.train_ids[i] for i in idx], self.train_labels[idx])

    def val_batches(
        self, batch_size: int, max_batches: int | None = None
    ) -> Iterator[dict[str, torch.Tensor]]:
        """The validation paragraphs in order (the last batch may be smaller)."""
        for rows in val_slices(len(self.val_ids), batch_size, max_batches):
            yield self._batch(self.val_ids[rows], self.val_labels[rows])

    def majority_accuracy(self) -> float:
        """The accuracy on the validation split of always guessing the training split's most
        frequent group: the baseline a classifier must beat."""
        majority = int(torch.bincount(self.train_labels).argmax())
        return float((self.val_labels == majority).float().mean())
