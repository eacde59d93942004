"""A model run one token at a time with its key/value cache, behind one small interface.

Generation needs three moves from a model, whatever its family:

    prefill(prompt)  read the whole prompt once, fill the caches    -> logits of the next token
    step(x)          read one new token per row, extend the caches  -> logits of the next token
    reorder(index)   keep, repeat or permute rows of the caches     (beam search)

Two protocols provide them (every generating family implements one; see ``qkv.models``):

* decoder-only (GPT, LLaMA, Prefix-LM): ``forward(ids, attention_mask, position_ids=...,
  cache=...)`` and ``new_cache(batch_size, max_len)``. The prompt may be left-padded; the mask
  (B, past + T) grows by one column per step and each row's positions count its real tokens.
  (A Prefix-LM reads what its first cached call gets, the prompt, as its prefix.)
* encoder-decoder (T5, BART, the 2017 Transformer): ``encode(ids, mask)`` once, then
  ``decode(y, memory, attention_mask=..., caches=...)`` per step, starting from
  ``decoder_start_token_id``; ``new_caches`` holds (self, cross) caches per decoder layer.

Shape legend: B batch · N rows (B, or B times the beam width) · T prompt positions ·
S source positions · D model width · V vocabulary.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from qkv.attention.kv_cache import KVCache
from qkv.generate.flat import flat_step

__all__ = [
    "CachedDecoder",
    "CachedEncoderDecoder",
    "cached_model",
    "check_generates",
    "is_encoder_decoder",
]


def is_encoder_decoder(model: Any) -> bool:
    """Whether ``model`` follows the encoder-decoder protocol (``encode``, ``decode``,
    ``new_caches``)."""
    return all(callable(getattr(model, m, None)) for m in ("encode", "decode", "new_caches"))


def _positions_limit(model: Any, what: str, n: int) -> int | None:
    """The model's number of positions (``config.max_seq_len``; None: no limit), after checking
    that the input, ``n`` tokens of ``what`` (the prompt or the source), fits in them."""
    limit = getattr(model.config, "max_seq_len", None)
    if limit is not None and n > limit:
        raise ValueError(
            f"the {what} has {n} tokens, longer than the model's {limit} positions "
            "(config.max_seq_len); shorten it"
        )
    return limit


class CachedDecoder:
    """A decoder-only model fed its prompt once, then one token per step.

    Args:
        model: implements ``forward(..., position_ids=, cache=)`` and ``new_cache``.
        input_ids: the prompt (B, T), left-padded when rows differ in length.
        attention_mask: (B, T), 1 = real token, 0 = padding; None = no padding.
        max_new_tokens: how many steps may follow (sizes the mask and a static cache).
        static_cache: preallocate the caches for T + max_new_tokens - 1 positions.
        flat: take the model's flat decoding step when it has one (``qkv.generate.flat``:
            the same logits with fewer calls); False always steps through ``model.forward``.
    """

    def __init__(
        self,
        model: Any,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        *,
        max_new_tokens: int,
        static_cache: bool = False,
        flat: bool = True,
    ) -> None:
        b, t = input_ids.shape
        limit = _positions_limit(model, "prompt", t)
        if limit is not None and t + max_new_tokens > limit:
            raise ValueError(
                f"prompt ({t} tokens) + max_new_tokens ({max_new_tokens}) = {t + max_new_tokens}"
                f" exceeds the model's {limit} positions (config.max_seq_len); lower "
                f"max_new_tokens to at most {limit - t}"
            )
        self.model = model
        self.input_ids = input_ids
        # No padding anywhere: drop the mask; the model then runs its mask-free path.
        if attention_mask is not None and bool(attention_mask.bool().all()):
            attention_mask = None
        self.mask: Tensor | None = None  # (B, T + max_new_tokens), sliced to (B, past + 1)
        if attention_mask is not None:
            ones = attention_mask.new_ones(b, max_new_tokens)  # (B, max_new_tokens)
            self.mask = torch.cat([attention_mask, ones], dim=1)  # (B, T + max_new_tokens)
        self.length = t  # positions in the cache after the prefill
        self.position: Tensor | None = None  # (B, 1) the next token's position, with a mask
        self.cache: list[KVCache] = (
            model.new_cache(b, t + max_new_tokens - 1) if static_cache else model.new_cache()
        )
        self.flat_step = flat_step(model) if flat else None

    @property
    def prefix(self) -> Tensor:
        """The ids the output starts with: the prompt (B, T)."""
        return self.input_ids

    @property
    def seen(self) -> Tensor:
        """The prompt's real tokens for the repetition penalty (B, T): each padding position
        repeats the row's last token, which is real under left padding."""
        if self.mask is None:
            return self.input_ids
        real = self.mask[:, : self.input_ids.shape[1]].bool()  # (B, T)
        return torch.where(real, self.input_ids, self.input_ids[:, -1:])  # (B, T)

    # --8<-- [start:prefill_step]
    def prefill(self) -> Tensor:
        """Read the prompt; the next token's logits (B, V)."""
        mask = None if self.mask is None else self.mask[:, : self.length]  # (B, T)
        out = self.model(self.input_ids, mask, cache=self.cache)
        if mask is not None:
            self.position = mask.sum(dim=-1, keepdim=True)  # (B, 1): real tokens so far
        return out.logits[:, -1]  # (B, V)

    def step(self, tokens: Tensor) -> Tensor:
        """Append one token per row (N,); the next token's logits (N, V)."""
        self.length += 1
        mask = None if self.mask is None else self.mask[:, : self.length]  # (N, past + 1), a view
        if self.flat_step is not None:  # the same function, written flat (see flat.py)
            logits = self.flat_step(tokens, self.cache, mask, self.position)  # (N, V)
        else:
            out = self.model(tokens[:, None], mask, position_ids=self.position, cache=self.cache)
            logits = out.logits[:, -1]  # (N, V)
        if self.position is not None:  # set with a mask: each row's next position
            self.position = self.position + 1  # (N, 1)
        return logits

    # --8<-- [end:prefill_step]

    def repeat_rows(self, n: int) -> None:
        """Repeat every row n times, in place (B -> B n rows: beam search's beams)."""
        index = torch.arange(self.input_ids.shape[0], device=self.input_ids.device)
        index = index.repeat_interleave(n)  # (B n,)
        for cache in self.cache:
            cache.reorder(index)
        if self.mask is not None:
            self.mask = self.mask.index_select(0, index)  # (B n, T + max_new_tokens)
        if self.position is not None:
            self.position = self.position.index_select(0, index)  # (B n, 1)

    def reorder(self, index: Tensor) -> None:
        """Keep the cache rows ``index`` (N,), taken within each prompt's group of rows.

        Rows of one group share their prompt, mask and positions, so only the caches move.
        """
        for cache in self.cache:
            cache.reorder(index)


class CachedEncoderDecoder:
    """An encoder-decoder: the source encoded once, the decoder fed one token per step.

    Args:
        model: implements ``encode``, ``decode(..., caches=)`` and ``new_caches``.
        input_ids: the source (B, S), padded on either side.
        attention_mask: the source's (B, S), 1 = real token; None = no padding.
        max_new_tokens: how many tokens the decoder may write.
        static_cache: preallocate the self-attention caches for max_new_tokens positions.
    """

    def __init__(
        self,
        model: Any,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        *,
        max_new_tokens: int,
        static_cache: bool = False,
    ) -> None:
        b, s = input_ids.shape
        limit = _positions_limit(model, "source", s)
        if limit is not None and 1 + max_new_tokens > limit:
            raise ValueError(
                f"the start token + max_new_tokens ({max_new_tokens}) exceed the decoder's "
                f"{limit} positions (config.max_seq_len); lower max_new_tokens to at most "
                f"{limit - 1}"
            )
        start_id = model.config.decoder_start_token_id
        self.model = model
        self.source = input_ids
        if attention_mask is not None and bool(attention_mask.bool().all()):
            attention_mask = None
        self.source_mask = attention_mask  # (B, S) or None
        self.memory: Tensor | None = None  # (B, S, D) after the prefill
        self.start = input_ids.new_full((b, 1), start_id)  # (B, 1)
        self.caches: list[tuple[KVCache, KVCache]] = (
            model.new_caches(b, max_new_tokens) if static_cache else model.new_caches()
        )

    @property
    def prefix(self) -> Tensor:
        """The ids the output starts with: ``decoder_start_token_id`` (B, 1)."""
        return self.start

    @property
    def seen(self) -> Tensor:
        """The decoder's tokens before the first step, for the repetition penalty (B, 1)."""
        return self.start

    def prefill(self) -> Tensor:
        """Encode the source, read the start token; the first token's logits (B, V)."""
        self.memory = self.model.encode(self.source, self.source_mask)  # (B, S, D)
        return self.step(self.start[:, 0])

    def step(self, tokens: Tensor) -> Tensor:
        """Append one token per row (N,); the next token's logits (N, V)."""
        logits = self.model.decode(
            tokens[:, None], self.memory, attention_mask=self.source_mask, caches=self.caches
        )  # (N, 1, V)
        return logits[:, -1]  # (N, V)

    def repeat_rows(self, n: int) -> None:
        """Repeat every row n times, in place (B -> B n rows: beam search's beams)."""
        assert self.memory is not None, "prefill first"
        index = torch.arange(self.source.shape[0], device=self.source.device)
        index = index.repeat_interleave(n)  # (B n,)
        self.memory = self.memory.index_select(0, index)  # (B n, S, D)
        if self.source_mask is not None:
            self.source_mask = self.source_mask.index_select(0, index)  # (B n, S)
        self.reorder(index)

    def reorder(self, index: Tensor) -> None:
        """Keep the cache rows ``index`` (N,): self-attention and cross-attention caches."""
        for self_cache, cross_cache in self.caches:
            self_cache.reorder(index)
            cross_cache.reorder(index)


def check_generates(model: Any) -> None:
    """Raise a clear TypeError unless ``model`` implements one of the two protocols."""
    if not (is_encoder_decoder(model) or callable(getattr(model, "new_cache", None))):
        raise TypeError(
            f"{type(model).__name__} does not generate: generation needs a decoder-only model "
            "(forward with cache= and new_cache) or an encoder-decoder (encode, decode with "
            "caches=, new_caches)"
        )


def cached_model(
    model: Any,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    *,
    max_new_tokens: int,
    static_cache: bool = False,
) -> CachedDecoder | CachedEncoderDecoder:
    """Wrap ``model`` in the runner for the protocol it implements.

    Raises:
        TypeError: the model implements neither protocol (an encoder such as BERT or ViT).
    """
    check_generates(model)
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "static_cache": static_cache}
    if is_encoder_decoder(model):
        return CachedEncoderDecoder(model, input_ids, attention_mask, **kwargs)
    return CachedDecoder(model, input_ids, attention_mask, **kwargs)
