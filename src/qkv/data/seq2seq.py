"""Sequence-to-sequence batches: padded sources, and targets as labels ending in end-of-sequence.

An encoder-decoder reads the whole source and writes the target one token at a time. A batch
holds both sides right-padded to the longest row::

    input_ids               s1  s2  s3  pad pad        source ids (B, S)
    attention_mask          1   1   1   0   0          1 on real source tokens
    labels                  t1  t2  eos -100 -100      target ids + eos (B, T); -100 is ignored
    decoder_attention_mask  1   1   1   0   0          1 on real label positions

The trainer feeds the decoder ``[bos, t1, t2]`` (labels shifted right behind the decoder-start
token ``bos_id``) and scores its predictions against ``labels``. Sources are cut to ``seq_len``
tokens and targets to ``seq_len - 1`` so that labels with their eos fit in ``seq_len``.

Training pairs are drawn afresh for every ``(seed, step)`` (from a task generator, or from the
training pairs of a parallel file); the validation pairs are one fixed list.

Shape legend: B batch · S source positions · T target positions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from tokenizers import Tokenizer

from qkv.data.config import step_generator, val_slices
from qkv.data.tokenizers import SpecialIds

__all__ = ["IGNORE_INDEX", "Seq2SeqSource"]

IGNORE_INDEX = -100  # the label cross-entropy skips (torch's default ignore_index)

PairSampler = Callable[[torch.Generator], tuple[str, str]]


class Seq2SeqSource:
    """Batches of (source, target) pairs for an encoder-decoder (see module docstring).

    Attributes:
        kind: ``"seq2seq"``.
        vocab_size: V, shared by sources and targets.
        pad_id, bos_id, eos_id, unk_id, mask_id, cls_id, sep_id: special ids (``bos_id`` is
            the decoder-start token; ``pad_id`` where the tokenizer has no begin token).
        special_ids: every special token's id.
        seq_len: the longest source, and the longest labels (target + eos).
    """

    kind = "seq2seq"

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        sample_pair: PairSampler,
        val_pairs: Sequence[tuple[str, str]],
        seq_len: int,
        specials: SpecialIds,
        fingerprint: Mapping[str, Any] | None = None,
    ) -> None:
        if specials.pad is None or specials.eos is None:
            raise ValueError(
                "seq2seq needs a tokenizer with a padding and an end-of-sequence token (<pad> "
                "and <eos> or </s>); the char and bpe tokenizers have both"
            )
        self.tokenizer = tokenizer
        self.fingerprint = dict(fingerprint or {})  # what data this is (task or file hash)
        self.seq_len = seq_len
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.pad_id: int = specials.pad
        self.eos_id: int = specials.eos
        self.bos_id: int = specials.bos if specials.bos is not None else specials.pad
        self.unk_id = specials.unk
        self.mask_id = specials.mask
        self.cls_id = specials.cls
        self.sep_id = specials.sep
        self.special_ids = list(specials.all)
        self._sample_pair = sample_pair
        self._val_pairs = list(val_pairs)

    def val_examples(self) -> list[tuple[str, str]]:
        """The fixed validation pairs as texts ``(source, target)``, in batch order."""
        return list(self._val_pairs)

    # --8<-- [start:collate]
    def collate(self, pairs: Sequence[tuple[str, str]]) -> dict[str, torch.Tensor]:
        """Encode and right-pad ``pairs`` into one batch (see the module docstring)."""
        sources = self.tokenizer.encode_batch([s for s, _ in pairs], add_special_tokens=False)
        targets = self.tokenizer.encode_batch([t for _, t in pairs], add_special_tokens=False)
        src_rows = [e.ids[: self.seq_len] for e in sources]
        label_rows = [[*e.ids[: self.seq_len - 1], self.eos_id] for e in targets]
        b = len(pairs)
        s = max(1, max(len(r) for r in src_rows))
        t = max(len(r) for r in label_rows)
        input_ids = torch.full((b, s), self.pad_id, dtype=torch.int64)  # (B, S)
        attention_mask = torch.zeros((b, s), dtype=torch.int64)  # (B, S)
        labels = torch.full((b, t), IGNORE_INDEX, dtype=torch.int64)  # (B, T)
        decoder_attention_mask = torch.zeros((b, t), dtype=torch.int64)  # (B, T)
        for i, (src, lab) in enumerate(zip(src_rows, label_rows, strict=True)):
            input_ids[i, : len(src)] = torch.tensor(src, dtype=torch.int64)
            attention_mask[i, : len(src)] = 1
            labels[i, : len(lab)] = torch.tensor(lab, dtype=torch.int64)
            decoder_attention_mask[i, : len(lab)] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "decoder_attention_mask": decoder_attention_mask,
        }

    # --8<-- [end:collate]

    def train_batch(self, step: int, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
        """``batch_size`` fresh training pairs drawn from ``(seed, step)`` alone."""
        g = step_generator(seed, step)
        return self.collate([self._sample_pair(g) for _ in range(batch_size)])

    def val_batches(
        self, batch_size: int, max_batches: int | None = None
    ) -> Iterator[dict[str, torch.Tensor]]:
        """The validation pairs in order, ``batch_size`` at a time (the last may be smaller)."""
        for rows in val_slices(len(self._val_pairs), batch_size, max_batches):
            yield self.collate(self._val_pairs[rows])
