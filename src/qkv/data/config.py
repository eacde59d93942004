"""What to train on: the data config, and the protocol every data source follows.

A training run asks its data for two things: a batch for step ``n`` of the run, and the
validation batches. Both are pure functions of their arguments: ``train_batch(step, B, seed)``
draws its examples from a random generator seeded by ``(seed, step)`` alone, so a resumed run
sees exactly the batches it would have seen, and ranks of a distributed run need only different
seeds (or steps), never shared state. ``val_batches`` goes over a fixed validation set in the
same order every call.

Batch dictionaries by kind (CPU tensors; ids are int64):

    lm        input_ids (B, T)                  T = seq_len consecutive corpus tokens
    mlm       input_ids (B, T), attention_mask (B, T)        masking is the trainer's job
    seq2seq   input_ids (B, S), attention_mask (B, S), labels (B, T), decoder_attention_mask (B, T)
    images    pixel_values (B, C, H, W) float32, labels (B,)
    classify  input_ids (B, T), attention_mask (B, T), labels (B,)     one class per text

Shape legend: B batch · T target (or window) positions · S source positions · C channels.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch

__all__ = ["DataConfig", "DataKind", "DataSource", "step_generator", "val_slices"]

DataKind = Literal["lm", "mlm", "seq2seq", "images", "classify"]
KINDS: tuple[str, ...] = ("lm", "mlm", "seq2seq", "images", "classify")


# --8<-- [start:config]
@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Which corpus, which tokenizer, and how it is cut into training examples."""

    kind: DataKind = "lm"
    # A built-in name (python-docs, python-code, python-topics, digits, copy, reverse, sort,
    # dates), a path, folder or glob of UTF-8 text files, or a .tsv / .jsonl file of
    # parallel text (seq2seq).
    corpus: str = "python-docs"
    # "char" | "bpe" | "wordpiece" | path to a tokenizer.json | "checkpoint": the tokenizer of
    # the run's model.init_from (qkv.train resolves it to that path)
    tokenizer: str = "char"
    vocab_size: int = 0  # target size for bpe / wordpiece training; 0 picks a default
    seq_len: int = 256  # tokens per window (lm, mlm); longest sequence (seq2seq)
    val_fraction: float = 0.1  # the LAST fraction of the text (or pairs, or a digits split)
    max_bytes: int = 0  # text corpora: 0 reads them whole; else only their first max_bytes
    num_examples: int = 0  # size of a synthetic task's fixed validation set; 0 picks 500
    augment: bool = False  # images: shift training images by up to one pixel
    seed: int = 0  # fixes validation sets and splits that are drawn at random

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r} is not one of {', '.join(KINDS)}")
        if not self.corpus:
            raise ValueError("corpus is empty: name a built-in corpus or a path")
        if not self.tokenizer:
            raise ValueError("tokenizer is empty: use char, bpe, wordpiece or a tokenizer.json")
        if self.vocab_size < 0:
            raise ValueError(f"vocab_size={self.vocab_size} is negative; use 0 for the default")
        if self.seq_len < 2:
            raise ValueError(f"seq_len={self.seq_len} must be at least 2 (an input and a target)")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(
                f"val_fraction={self.val_fraction} must be between 0 and 1 (0.1 holds out 10%)"
            )
        if self.max_bytes < 0:
            raise ValueError(f"max_bytes={self.max_bytes} is negative; use 0 for the whole corpus")
        if self.num_examples < 0:
            raise ValueError(f"num_examples={self.num_examples} is negative; use 0 for 500")


# --8<-- [end:config]


# --8<-- [start:source]
@runtime_checkable
class DataSource(Protocol):
    """Training and validation batches; batches are a pure function of (seed, step).

    Sources also carry what a model and trainer need to know, where it applies:
    ``vocab_size``, ``pad_id``, ``bos_id``, ``eos_id``, ``mask_id``, ``cls_id``, ``sep_id``
    (``int | None``) and ``special_ids`` for token data; ``num_labels``, ``image_size`` and
    ``num_channels`` for images; and ``fingerprint``, a small dict that identifies the data
    (a corpus's SHA-256 and counts, a task's name), which a training run records.
    """

    kind: str

    def train_batch(self, step: int, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
        """The training batch of ``step``: the same arguments always give the same batch."""
        ...

    def val_batches(
        self, batch_size: int, max_batches: int | None = None
    ) -> Iterator[dict[str, torch.Tensor]]:
        """The validation set in batches, in the same fixed order on every call."""
        ...


# --8<-- [end:source]


def step_generator(seed: int, step: int, stream: str = "train") -> torch.Generator:
    """A CPU random generator seeded by ``(stream, seed, step)`` alone.

    The pair is hashed (BLAKE2b) rather than added, so neighbouring seeds and steps give
    unrelated streams; ``stream`` separates independent uses (training draws, a validation set).
    """
    digest = hashlib.blake2b(f"{stream}:{seed}:{step}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def val_slices(n: int, batch_size: int, max_batches: int | None = None) -> Iterator[slice]:
    """The rows of each validation batch, in order: ``batch_size`` of the ``n`` examples at a
    time (the last batch may be smaller), and no more than ``max_batches`` batches (None: all).

    Example:
        >>> list(val_slices(5, 2))
        [slice(0, 2, None), slice(2, 4, None), slice(4, 6, None)]
        >>> len(list(val_slices(5, 2, max_batches=1)))
        1
    """
    for count, start in enumerate(range(0, n, batch_size)):
        if max_batches is not None and count >= max_batches:
            return
        yield slice(start, start + batch_size)
