"""Language-model batches: fixed-length windows cut from a long stream of token ids.

A causal language model learns from any T consecutive tokens of the corpus: it predicts
``window[1:]`` from ``window[:-1]``. Training windows start at random positions of the training
ids, drawn from a generator seeded by ``(seed, step)``; validation windows go over the held-out
ids in order::

    training     ....[=====T=====]......[=====T=====]..[=====T=====]...   random starts
    validation   [=====T=====]
                             [=====T=====]                                 stride T - 1
                                         [=====T=====]  (the remainder that does not fill a
                                                         window is dropped)

Consecutive validation windows share one token (stride T - 1), so every validation token after
the first is a prediction target exactly once. For masked language modelling (``mlm``) windows do
not overlap (stride T) and, when the tokenizer has ``[CLS]`` and ``[SEP]``, each window is
``[CLS]`` + T - 2 tokens + ``[SEP]``, as BERT's inputs are; the trainer does the masking.

Shape legend: B batch · T window length (``seq_len``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from qkv.data.config import step_generator, val_slices
from qkv.data.tokenizers import SpecialIds
from qkv.data.tokens import TokenFiles

__all__ = ["TokenWindows"]


class TokenWindows:
    """Windows of ``seq_len`` token ids for ``lm`` or ``mlm`` training (see module docstring).

    Attributes:
        kind: ``"lm"`` or ``"mlm"``.
        vocab_size: V, every id is below it.
        pad_id, unk_id, bos_id, eos_id, mask_id, cls_id, sep_id: special ids or None.
        special_ids: every special token's id (never chosen as an mlm replacement).
        train_tokens, val_tokens: the two memory-mapped id arrays.
    """

    def __init__(
        self,
        files: TokenFiles,
        *,
        kind: str,
        seq_len: int,
        vocab_size: int,
        specials: SpecialIds,
        fingerprint: Mapping[str, Any] | None = None,
    ) -> None:
        if kind not in ("lm", "mlm"):
            raise ValueError(f"TokenWindows serves kind 'lm' or 'mlm', not {kind!r}")
        if kind == "mlm" and specials.mask is None:
            raise ValueError(
                "the tokenizer has no mask token (<mask> or [MASK]), which mlm needs: use a "
                "char, bpe or wordpiece tokenizer, or one that defines a mask token"
            )
        self.kind = kind
        self.fingerprint = dict(fingerprint or {})  # what text this is (see CorpusInfo)
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self.pad_id = specials.pad
        self.unk_id = specials.unk
        self.bos_id = specials.bos
        self.eos_id = specials.eos
        self.mask_id = specials.mask
        self.cls_id = specials.cls
        self.sep_id = specials.sep
        self.special_ids = list(specials.all)
        self.train_tokens = files.train
        self.val_tokens = files.val
        # mlm with [CLS] and [SEP] spends two positions of each window on them.
        self._framed = kind == "mlm" and specials.cls is not None and specials.sep is not None
        self._content = seq_len - 2 if self._framed else seq_len  # corpus tokens per window
        if self._content < 1:
            raise ValueError(f"seq_len={seq_len} leaves no room for tokens between [CLS] and [SEP]")
        for name, ids in (("training", files.train), ("validation", files.val)):
            if len(ids) < self._content:
                raise ValueError(
                    f"the {name} split has {len(ids)} tokens, fewer than one window of "
                    f"{self._content}: lower seq_len, raise val_fraction or use a larger corpus"
                )
        self._stride = self._content if kind == "mlm" else self._content - 1

    def _batch(self, tokens: np.ndarray[Any, Any], starts: list[int]) -> dict[str, torch.Tensor]:
        rows = np.stack([tokens[s : s + self._content] for s in starts]).astype(np.int64)
        input_ids = torch.from_numpy(rows)  # (B, T) or (B, T - 2) before framing
        if self._framed:
            assert self.cls_id is not None and self.sep_id is not None
            b = input_ids.shape[0]
            cls = torch.full((b, 1), self.cls_id, dtype=torch.int64)
            sep = torch.full((b, 1), self.sep_id, dtype=torch.int64)
            input_ids = torch.cat([cls, input_ids, sep], dim=1)  # (B, T)
        if self.kind == "lm":
            return {"input_ids": input_ids}
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}

    def train_batch(self, step: int, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
        """``batch_size`` windows at random starts drawn from ``(seed, step)`` alone.

        Returns:
            ``{"input_ids": (B, T)}`` (int64), plus ``"attention_mask"`` (B, T) of ones for mlm.
        """
        g = step_generator(seed, step)
        high = len(self.train_tokens) - self._content + 1
        starts = torch.randint(0, high, (batch_size,), generator=g)  # (B,)
        return self._batch(self.train_tokens, starts.tolist())

    def val_starts(self) -> list[int]:
        """Start positions of the validation windows, in order (see the module docstring)."""
        last = len(self.val_tokens) - self._content
        return list(range(0, last + 1, self._stride))

    def val_batches(
        self, batch_size: int, max_batches: int | None = None
    ) -> Iterator[dict[str, torch.Tensor]]:
        """The validation windows in order, ``batch_size`` at a time (the last batch may be
        smaller); the same batches on every call."""
        starts = self.val_starts()
        for rows in val_slices(len(starts), batch_size, max_batches):
            yield self._batch(self.val_tokens, starts[rows])
