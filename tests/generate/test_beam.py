"""Beam search: reordering the caches equals recomputing the chosen beams, padding changes
nothing, and its rules (width 1, length penalty, early stopping) behave as stated."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from qkv.generate import generate
from qkv.models.base import ModelOutput
from tests.generate.conftest import source_vocab, tiny, vocab


class _History:
    """Stands in for a KV cache: it keeps the tokens themselves and is reordered like one."""

    def __init__(self) -> None:
        self.ids: Tensor | None = None

    def append(self, ids: Tensor) -> Tensor:
        self.ids = ids if self.ids is None else torch.cat([self.ids, ids], dim=1)
        return self.ids

    def reorder(self, index: Tensor) -> None:
        if self.ids is not None:
            self.ids = self.ids.index_select(0, index)


class RecomputingDecoder(nn.Module):
    """A decoder-only model that runs the whole sequence at every step (no KV cache)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.config = inner, inner.config

    def new_cache(self, batch_size: int = 1, max_len: int | None = None) -> list[_History]:
        return [_History()]

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, *, position_ids=None,
        cache: list[_History],
    ) -> ModelOutput:  # fmt: skip
        everything = cache[0].append(input_ids)  # (B, past + T)
        logits = self.inner(everything, attention_mask).logits  # (B, past + T, V)
        return ModelOutput(logits=logits[:, -input_ids.shape[1] :])


class RecomputingEncoderDecoder(nn.Module):
    """An encoder-decoder whose decoder re-reads all its tokens at every step."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.config = inner, inner.config

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.inner.encode(input_ids, attention_mask)

    def new_caches(self, batch_size: int = 1, max_len: int | None = None) -> list:
        return [(_History(), _History())]

    def decode(self, decoder_input_ids, memory, *, attention_mask=None, caches) -> Tensor:
        everything = caches[0][0].append(decoder_input_ids)  # (B, past + T)
        logits = self.inner.decode(everything, memory, attention_mask=attention_mask)
        return logits[:, -decoder_input_ids.shape[1] :]


def _padded(rows: list[Tensor], pad: int) -> tuple[Tensor, Tensor]:
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, t - len(r) :], mask[i, t - len(r) :] = r, 1
    return ids, mask


@pytest.mark.parametrize("name", ["gpt", "llama", "bart", "t5"])
def test_reordered_caches_equal_recomputed_beams(name: str) -> None:
    model = tiny(name)
    wrap = RecomputingEncoderDecoder if hasattr(model, "encode") else RecomputingDecoder
    rows = [torch.randint(3, source_vocab(model), (n,)) for n in (3, 6)]
    ids, mask = _padded(rows, pad=0)
    free = generate(model, ids, mask, max_new_tokens=8, num_beams=3, eos_token_id=[])
    eos = int(free[0, -5])  # a token the search does produce, so beams end on it
    kw = dict(max_new_tokens=8, num_beams=3, eos_token_id=eos, pad_token_id=0, length_penalty=0.7)
    cached = generate(model, ids, mask, **kw)
    recomputed = generate(wrap(model), ids, mask, **kw)
    assert torch.equal(cached, recomputed)
    assert torch.equal(generate(model, ids, mask, static_cache=True, **kw), cached)


@pytest.mark.parametrize("name", ["gpt", "transformer"])
def test_beam_batch_equals_each_prompt_alone(name: str) -> None:
    model = tiny(name)
    rows = [torch.randint(3, source_vocab(model), (n,)) for n in (2, 7, 4)]
    ids, mask = _padded(rows, pad=0)
    free = generate(model, ids, mask, max_new_tokens=6, num_beams=4, eos_token_id=[])
    eos = int(free[1, -3])
    kw = dict(max_new_tokens=6, num_beams=4, eos_token_id=eos, pad_token_id=1)
    batch = generate(model, ids, mask, **kw)
    prefix = 1 if hasattr(model, "encode") else ids.shape[1]
    for i, row in enumerate(rows):
        alone = generate(model, row[None], **kw)
        start = 1 if hasattr(model, "encode") else len(row)
        n = alone.shape[1] - start
        assert batch[i, prefix : prefix + n].tolist() == alone[0, start:].tolist()
        assert (batch[i, prefix + n :] == 1).all()  # padding after a shorter hypothesis


def test_one_beam_is_greedy() -> None:
    model = tiny("gpt")
    prompt = torch.randint(3, vocab(model), (2, 4))
    assert torch.equal(
        generate(model, prompt, max_new_tokens=6, num_beams=1, eos_token_id=[]),
        generate(model, prompt, max_new_tokens=6, eos_token_id=[]),
    )


def test_one_step_of_beam_search_is_the_argmax() -> None:
    """After one step every hypothesis has one token, so the best is the most likely token."""
    model = tiny("llama")
    prompt = torch.randint(3, vocab(model), (3, 5))
    one = generate(model, prompt, max_new_tokens=1, num_beams=3, eos_token_id=[])
    assert torch.equal(one, generate(model, prompt, max_new_tokens=1, eos_token_id=[]))


def test_early_stopping_returns_once_num_beams_hypotheses_finished() -> None:
    """With early_stopping=True and an end token that every beam produces at once, the search
    stops after the first step; without early stopping it may go on, never shorter."""
    model = tiny("gpt")
    prompt = torch.randint(3, vocab(model), (1, 4))
    with torch.no_grad():
        top = model(prompt).logits[0, -1].topk(6).indices.tolist()
    # Every candidate of the first step that may finish ends with a stop token.
    kw = dict(max_new_tokens=6, num_beams=2, eos_token_id=top[0], stop=top[1:4], pad_token_id=0)
    early = generate(model, prompt, early_stopping=True, **kw)
    assert early.shape == (1, 5) and early[0, -1].item() in top[:4]
    late = generate(model, prompt, early_stopping="never", length_penalty=0.0, **kw)
    assert late.shape[1] >= early.shape[1]
