"""Tiny models of every generating family, and reference loops that recompute everything."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch
from torch import Tensor

from qkv.models import bart, gpt, llama, prefix_lm, t5, transformer

DECODER_ONLY = ["gpt", "llama", "mistral", "prefix_lm"]
ENCODER_DECODER = ["bart", "t5", "transformer"]


def tiny(family: str) -> torch.nn.Module:
    """The family's ``tiny`` preset with random weights, in eval mode."""
    build = {
        "gpt": lambda: gpt.GPT(gpt.PRESETS["tiny"]),
        "llama": lambda: llama.Llama(llama.PRESETS["tiny"]),
        # Mistral's sliding window, narrower than the prompts, so that the cache must drop keys.
        "mistral": lambda: llama.Llama(replace(llama.PRESETS["tiny"], sliding_window=4)),
        "prefix_lm": lambda: prefix_lm.PrefixLM(prefix_lm.PRESETS["tiny"]),
        "bart": lambda: bart.Bart(bart.PRESETS["tiny"]),
        "t5": lambda: t5.T5(t5.PRESETS["tiny"]),
        "transformer": lambda: transformer.Transformer(transformer.PRESETS["tiny"]),
    }
    return build[family]().eval()


def vocab(model: torch.nn.Module) -> int:
    c = model.config
    return getattr(c, "tgt_vocab_size", None) or c.vocab_size


def source_vocab(model: torch.nn.Module) -> int:
    c = model.config
    return getattr(c, "src_vocab_size", None) or c.vocab_size


def is_encoder_decoder(model: torch.nn.Module) -> bool:
    return hasattr(model, "encode")


@torch.no_grad()
def greedy_without_cache(
    model: torch.nn.Module,
    input_ids: Tensor,
    max_new_tokens: int,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """The plain reference: re-run the whole sequence at every step, take the argmax.

    Decoder-only: returns prompt + new tokens. Encoder-decoder: start token + new tokens.
    """
    if is_encoder_decoder(model):
        memory = model.encode(input_ids, attention_mask)
        y = input_ids.new_full((input_ids.shape[0], 1), model.config.decoder_start_token_id)
        for _ in range(max_new_tokens):
            logits = model.decode(y, memory, attention_mask=attention_mask)  # (B, t, V)
            y = torch.cat([y, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        return y
    ids, mask = input_ids, attention_mask
    prompt_len = input_ids.shape[1]
    for _ in range(max_new_tokens):
        kwargs = {}
        if hasattr(model, "build_mask"):  # Prefix-LM: the prompt is the prefix
            kwargs["prefix_lengths"] = prompt_len
        logits = model(ids, mask, **kwargs).logits  # (B, t, V)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    return ids


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Width-32 models gain nothing from intra-op threads, and on a busy machine waiting for a
    descheduled worker thread makes every tiny matmul cost milliseconds (about 10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=DECODER_ONLY + ENCODER_DECODER)
def family(request: pytest.FixtureRequest) -> str:
    return request.param
