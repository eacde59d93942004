"""The decoding loop: read the prompt once, then produce one token per step from the KV cache.

    logits = prefill(prompt)                         one pass over the T prompt tokens
    repeat max_new_tokens times:
        x      = choose(process(logits))            greedy argmax, or a seeded sample
        x      = pad where the row already ended     finished rows only pad
        output = output + [x]                        (and the streamer sees x)
        stop if every row has ended                  a stop token, or a stop string in its text
        logits = step(x)                             one new position, cached keys reused

Prompts of different lengths share a batch by left padding: the attention mask hides the
padding, grows by one column per step, and positions count real tokens only, so each row
produces exactly what it would alone. ``generate`` also dispatches beam search (``beam.py``);
``stream`` hands out the tokens (or text pieces) while they are produced.

Shape legend: B batch · T prompt positions · V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from qkv.generate.beam import beam_search
from qkv.generate.cached import (
    CachedDecoder,
    CachedEncoderDecoder,
    cached_model,
    check_generates,
)
from qkv.generate.cached import is_encoder_decoder as _is_encoder_decoder
from qkv.generate.sampling import greedy, process_logits, sample
from qkv.generate.settings import GenerationSettings, check_prompt
from qkv.generate.stopping import StopCondition

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = ["decode_steps", "generate", "stream"]

Streamer = Callable[[Tensor], Any]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Run without dropout, and give the model back in the mode it came in."""
    was_training = model.training
    if was_training:
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


# --8<-- [start:loop]
def decode_steps(
    runner: CachedDecoder | CachedEncoderDecoder, settings: GenerationSettings
) -> Iterator[Tensor]:
    """Greedy or sampled decoding, one step at a time: yields the B new tokens (B,) per step.

    Ends after ``settings.max_new_tokens`` steps, or earlier once every row has ended. Rows
    that ended produce ``settings.pad_token_id``.
    """
    s = settings
    device = runner.prefix.device
    stop = StopCondition(s.stop_token_ids, s.stop_strings, s.tokenizer, device)
    generator = None
    if s.do_sample and s.seed is not None:
        generator = torch.Generator(device=device).manual_seed(s.seed)
    pad = 0 if s.pad_token_id is None else s.pad_token_id  # set whenever a row can end
    processed = s.uses_processors
    warp = s.do_sample  # temperature, top-k, top-p and min-p reshape only what is sampled
    seen = runner.seen if s.repetition_penalty is not None else None  # (B, T)
    generated: list[Tensor] = []  # (B,) per step, kept only for stop strings
    finished: Tensor | None = None  # (B,) bool, once a row can end
    logits = runner.prefill()  # (B, V)
    tokens = runner.prefix[:, -1]  # (B,), replaced at the first step
    for i in range(s.max_new_tokens):
        if i > 0:
            logits = runner.step(tokens)  # (B, V)
        if processed:
            logits = process_logits(
                logits.float(), seen=seen, repetition=s.repetition_penalty,
                tau=s.temperature if warp else 1.0, top_k=s.top_k if warp else None,
                top_p=s.top_p if warp else None, min_p=s.min_p if warp else None,
            )  # fmt: skip
        tokens = sample(logits, generator) if s.do_sample else greedy(logits)  # (B,)
        if stop.active:
            if finished is not None:
                tokens = tokens.masked_fill(finished, pad)  # (B,)
            history = None
            if stop.strings:
                generated.append(tokens)
                history = torch.stack(generated, dim=1)  # (B, i + 1)
            hits = stop.hits(tokens, history, None if finished is None else ~finished)  # (B,)
            finished = hits if finished is None else finished | hits
        if seen is not None:
            seen = torch.cat([seen, tokens[:, None]], dim=1)  # (B, T + i + 1)
        yield tokens
        if finished is not None and bool(finished.all()):
            return


# --8<-- [end:loop]


def generate(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    settings: GenerationSettings | None = None,
    *,
    streamer: Streamer | None = None,
    **overrides: Any,
) -> Tensor:
    """Continue ``input_ids`` with up to ``settings.max_new_tokens`` tokens.

    Args:
        model: a decoder-only family (GPT, LLaMA, Prefix-LM) or an encoder-decoder (T5, BART,
            Transformer); see ``qkv.generate.cached`` for the protocols.
        input_ids: (B, T) long. Decoder-only: the prompt, left-padded when rows differ in
            length. Encoder-decoder: the source.
        attention_mask: (B, T), 1 = real token, 0 = padding; None = no padding.
        settings: what to generate (``GenerationSettings``: length, greedy or sampling, beams,
            end and stop tokens); None: from ``overrides`` alone.
        streamer: called with each step's new tokens (B,) as soon as they are chosen.
        **overrides: fields of ``GenerationSettings`` by keyword (``max_new_tokens=8``,
            ``do_sample=True``, ...); they replace those of ``settings``.

    Returns:
        (B, T + n) long ids, n <= max_new_tokens: decoder-only, the prompt then the new tokens;
        encoder-decoder, ``decoder_start_token_id`` then the new tokens (T = 1).

    Raises:
        ValueError: a wrong option or prompt, with what to change.
        TypeError: the model does not generate (an encoder such as BERT or ViT), or an
            override is not a field of ``GenerationSettings``.

    Example:
        >>> from qkv.models.gpt import GPT, PRESETS
        >>> model = GPT(PRESETS["tiny"])
        >>> prompt = torch.tensor([[5, 6, 7]])
        >>> generate(model, prompt, max_new_tokens=4, eos_token_id=[]).shape
        torch.Size([1, 7])
        >>> greedy4 = GenerationSettings(max_new_tokens=4, eos_token_id=[])
        >>> generate(model, prompt, settings=greedy4, max_new_tokens=2).shape
        torch.Size([1, 5])
    """
    check_generates(model)
    settings = GenerationSettings.from_options(settings, **overrides)
    settings = settings.resolved_for(getattr(model, "config", None))
    if settings.num_beams > 1 and streamer is not None:
        raise ValueError("a streamer needs num_beams=1: beam search settles its tokens at the end")
    check_prompt(input_ids, attention_mask, "source" if _is_encoder_decoder(model) else "prompt")
    device = _device(model)
    input_ids = input_ids.to(device)
    attention_mask = None if attention_mask is None else attention_mask.to(device)
    with torch.inference_mode(), _eval_mode(model):
        runner = cached_model(
            model, input_ids, attention_mask, max_new_tokens=settings.max_new_tokens,
            static_cache=settings.static_cache,
        )  # fmt: skip
        if settings.num_beams > 1:
            new = beam_search(runner, settings)  # (B, n)
        else:
            steps = []
            for tokens in decode_steps(runner, settings):
                steps.append(tokens)
                if streamer is not None:
                    streamer(tokens)
            new = torch.stack(steps, dim=1)  # (B, n)
        prefix = runner.prefix  # (B, T)
    # Joined outside inference mode, so the result is an ordinary tensor.
    return torch.cat([prefix, new], dim=1)  # (B, T + n)


def stream(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    settings: GenerationSettings | None = None,
    **overrides: Any,
) -> Iterator[int] | Iterator[str]:
    """Generate for one prompt, handing out each token as soon as it is chosen.

    The same tokens as ``generate`` with the same settings (greedy or sampling; no beams).

    Args:
        input_ids: one prompt (or source), (1, T) or (T,).
        settings, overrides: as in ``generate``; ``num_beams`` must be 1. With a
            ``tokenizer``, yield text pieces instead of ids: each piece is what the new token
            adds to the decoded text (held back while it ends in an incomplete character).
        model, attention_mask: as in ``generate``.

    Yields:
        Token ids (int), or text pieces (str) with a tokenizer.

    Example:
        >>> from qkv.models.gpt import GPT, PRESETS
        >>> model = GPT(PRESETS["tiny"])
        >>> len(list(stream(model, torch.tensor([5, 6]), max_new_tokens=3, eos_token_id=[])))
        3
    """
    check_generates(model)
    ids = input_ids[None] if input_ids.dim() == 1 else input_ids
    mask = attention_mask
    if mask is not None and mask.dim() == 1:
        mask = mask[None]
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(
            f"stream takes one prompt, (1, T) or (T,), got shape {tuple(input_ids.shape)}; "
            "use generate for batches"
        )
    settings = GenerationSettings.from_options(settings, **overrides)
    settings = settings.resolved_for(getattr(model, "config", None))
    if settings.num_beams > 1:
        raise ValueError(
            "stream hands out each token as it is chosen, but beam search (num_beams > 1) "
            "settles its tokens only at the end; use generate for beam search"
        )
    check_prompt(ids, mask, "source" if _is_encoder_decoder(model) else "prompt")
    device = _device(model)
    ids, mask = ids.to(device), None if mask is None else mask.to(device)
    if settings.tokenizer is None:
        return _stream_ids(model, ids, mask, settings)
    return _stream_text(_stream_ids(model, ids, mask, settings), settings.tokenizer)


def _stream_ids(
    model: nn.Module, ids: Tensor, mask: Tensor | None, settings: GenerationSettings
) -> Iterator[int]:
    # Inference mode is entered around each step only: the caller's code between two tokens
    # runs in whatever mode it chose.
    with _eval_mode(model):
        with torch.inference_mode():
            runner = cached_model(
                model, ids, mask, max_new_tokens=settings.max_new_tokens,
                static_cache=settings.static_cache,
            )  # fmt: skip
            steps = decode_steps(runner, settings)
        while True:
            with torch.inference_mode():
                tokens = next(steps, None)
            if tokens is None:
                return
            yield int(tokens[0])


# --8<-- [start:stream_text]
def _stream_text(ids: Iterator[int], tokenizer: Tokenizer) -> Iterator[str]:
    """What each new token adds to the decoded text; a piece ending in an incomplete UTF-8
    character (shown as U+FFFD) waits for the tokens that complete it."""
    seen: list[int] = []
    shown = ""
    for token in ids:
        seen.append(token)
        text = tokenizer.decode(seen)
        if text.endswith("\ufffd"):
            continue
        if len(text) > len(shown):
            yield text[len(shown) :]
        shown = text
    text = tokenizer.decode(seen)
    if len(text) > len(shown):
        yield text[len(shown) :]


# --8<-- [end:stream_text]
