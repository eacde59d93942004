"""Checks of the decoding protocol that every generating family's tests run on its own model.

Decoder-only families (GPT, LLaMA, Prefix-LM): ``forward(input_ids, attention_mask, cache=...)``,
with ``new_cache(batch_size, max_len)``. Encoder-decoders (Transformer, T5, BART/Marian):
``encode``, ``decode(decoder_input_ids, memory, attention_mask=, caches=)``, with
``new_caches(batch_size, max_len)``. Each check feeds a sequence through the cache in pieces and
compares with one forward pass over the whole of it, in float32, within ``ATOL`` (1e-5).

Shape legend: B batch · T target/decoder positions · S source positions · V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from tests.conftest import ATOL

CACHE_KINDS = ["dynamic", "static"]
TOL = ATOL[torch.float32]


def assert_close(ours: Tensor, expected: Tensor, what: str = "logits") -> None:
    """|ours - expected| <= 1e-5 (float32's ATOL) times the logits' scale, max(1, max |expected|).

    The scale matters only for large logits: T5's head (unit-variance weights, v1.1 untied)
    gives logits up to about 25, where float32 rounding, summed in another order, alone reaches
    1e-5 (the errors of the hidden states are multiplied by the head's large weights)."""
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(
        ours, expected, atol=TOL * scale, rtol=0.0, msg=lambda m: f"{what}: {m}"
    )


def new_cache(model: Any, kind: str, batch_size: int, max_len: int) -> list[Any]:
    """``model.new_cache`` (decoder-only) or ``model.new_caches`` (encoder-decoder) of ``kind``:
    dynamic, or static with room for ``max_len`` positions."""
    make = model.new_caches if hasattr(model, "new_caches") else model.new_cache
    caches = make(batch_size, max_len if kind == "static" else None)
    first = caches[0][0] if isinstance(caches[0], tuple) else caches[0]
    assert first.max_len == (max_len if kind == "static" else None)
    return caches


@torch.no_grad()
def run_decoder(
    model: Any,
    ids: Tensor,
    chunks: Sequence[int],
    *,
    cache: list[Any],
    attention_mask: Tensor | None = None,
    **kwargs: Any,
) -> Tensor:
    """Feed ``ids`` (B, T) to a decoder-only model in consecutive chunks: logits (B, T, V)."""
    assert sum(chunks) == ids.shape[1]
    logits, end = [], 0
    for n in chunks:
        start, end = end, end + n
        mask = None if attention_mask is None else attention_mask[:, :end]  # (B, past + n)
        logits.append(model(ids[:, start:end], mask, cache=cache, **kwargs).logits)
    assert cache[0].seq_len == ids.shape[1]
    return torch.cat(logits, dim=1)  # (B, T, V)


@torch.no_grad()
def run_encoder_decoder(
    model: Any,
    src: Tensor,
    src_mask: Tensor | None,
    tgt: Tensor,
    chunks: Sequence[int],
    *,
    caches: list[Any],
) -> Tensor:
    """Encode ``src`` (B, S) once, decode ``tgt`` (B, T) in consecutive chunks: (B, T, V)."""
    assert sum(chunks) == tgt.shape[1]
    memory = model.encode(src, src_mask)  # (B, S, D)
    logits, end = [], 0
    for n in chunks:
        start, end = end, end + n
        step = model.decode(tgt[:, start:end], memory, attention_mask=src_mask, caches=caches)
        logits.append(step)  # (B, n, V)
    self_cache, cross_cache = caches[0]
    assert self_cache.seq_len == tgt.shape[1] and cross_cache.seq_len == src.shape[1]
    return torch.cat(logits, dim=1)  # (B, T, V)


def left_pad(rows: Sequence[Tensor], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Rows (T_i,) of different lengths, left-padded: ids (B, T) and attention_mask (B, T)."""
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros(len(rows), t, dtype=torch.long)  # (B, T)
    for i, row in enumerate(rows):
        ids[i, t - len(row) :], mask[i, t - len(row) :] = row, 1
    return ids, mask


@torch.no_grad()
def check_left_padded_decoder(
    model: Any,
    vocab_size: int,
    kind: str,
    alone_kwargs: Callable[[int], dict[str, Any]] = lambda prompt_len: {},
) -> None:
    """Prompts of 7 and 4 tokens, left-padded into one batch, then 3 tokens one at a time with
    the cache: each row's logits equal those of the row alone, unpadded, in one forward pass."""
    prompts = [torch.randint(0, vocab_size, (n,)) for n in (7, 4)]
    new = torch.randint(0, vocab_size, (2, 3))  # (B, 3): the tokens fed after the prompts
    ids, mask = left_pad(prompts)  # (B, 7)
    ids, mask = torch.cat([ids, new], dim=1), torch.cat([mask, torch.ones_like(new)], dim=1)
    cache = new_cache(model, kind, 2, ids.shape[1])
    batched = run_decoder(model, ids, [7, 1, 1, 1], cache=cache, attention_mask=mask)
    for i, prompt in enumerate(prompts):
        alone = torch.cat([prompt, new[i]])[None]  # (1, T_i)
        expected = model(alone, **alone_kwargs(len(prompt))).logits[0]  # (T_i, V)
        assert_close(batched[i, mask[i].bool()], expected, f"row {i}")


@torch.no_grad()
def check_left_padded_source(model: Any, vocab_size: int, kind: str, pad_id: int) -> None:
    """Sources of 7 and 4 tokens, left-padded into one batch, decoded one token at a time with
    the caches: each row's logits equal those of the row alone, unpadded, in one forward pass."""
    low = 3  # leave the special tokens (0, 1, 2) out of the random ids
    sources = [torch.randint(low, vocab_size - 1, (n,)) for n in (7, 4)]
    tgt = torch.randint(low, vocab_size - 1, (2, 5))  # (B, T)
    src, src_mask = left_pad(sources, pad_id)  # (B, S)
    caches = new_cache(model, kind, 2, tgt.shape[1])
    batched = run_encoder_decoder(model, src, src_mask, tgt, [1] * 5, caches=caches)
    for i, source in enumerate(sources):
        expected = model(source[None], None, tgt[i : i + 1]).logits[0]  # (T, V)
        assert_close(batched[i], expected, f"row {i}")
