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

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from qkv.attention.fused import fused_projections
from qkv.generate.beam import beam_search
from qkv.generate.cached import (
    CachedDecoder,
    CachedEncoderDecoder,
    cached_model,
    check_generates,
)
from qkv.generate.cached import is_encoder_decoder as _is_encoder_decoder
from qkv.generate.sampling import greedy, process_logits, sample
from qkv.generate.settings import GenerationSettings, check_prompt, resolve_settings
from qkv.generate.stopping import StopCondition
from qkv.models.common import attention_modules

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
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | Literal["never"] = False,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    stop: int | str | Sequence[int | str] | None = None,
    tokenizer: Tokenizer | None = None,
    seed: int | None = None,
    streamer: Streamer | None = None,
    static_cache: bool = False,
) -> Tensor:
    """Continue ``input_ids`` with up to ``max_new_tokens`` tokens.

    Args:
        model: a decoder-only family (GPT, LLaMA, Prefix-LM) or an encoder-decoder (T5, BART,
            Transformer); see ``qkv.generate.cached`` for the protocols.
        input_ids: (B, T) long. Decoder-only: the prompt, left-padded when rows differ in
            length. Encoder-decoder: the source.
        attention_mask: (B, T), 1 = real token, 0 = padding; None = no padding.
        max_new_tokens: the most tokens to add (>= 1); fewer when every row ends earlier.
        do_sample: draw from the distribution instead of taking the most likely token.
        temperature: divide the logits by it before sampling (> 0).
        top_k: sample among the k most likely tokens only.
        top_p: sample within the smallest set of tokens whose probability reaches top_p.
        min_p: sample among tokens at least min_p times as likely as the most likely one.
        repetition_penalty: CTRL's penalty θ on tokens already in the sequence (> 1 avoids them).
        num_beams: beam width; > 1 runs beam search (``qkv.generate.beam``), which cannot sample.
        length_penalty: beam search: a finished hypothesis scores sum log p / length^this.
        early_stopping: beam search: stop a batch row once it has num_beams finished hypotheses
            (True), when no running beam can still win (False), or never early ("never").
        eos_token_id: id(s) that end a row; default ``model.config.eos_token_id``; [] for none.
        pad_token_id: what rows hold after they ended; default the first eos id.
        stop: more stop token ids (ints) and stop strings (need ``tokenizer``); a stop string
            ends a row once its decoded output contains it.
        tokenizer: a ``tokenizers.Tokenizer``, to decode for stop strings.
        seed: seeds the sampler's own ``torch.Generator``: the same seed, the same tokens.
        streamer: called with each step's new tokens (B,) as soon as they are chosen.
        static_cache: preallocate the KV caches for the whole sequence.

    Returns:
        (B, T + n) long ids, n <= max_new_tokens: decoder-only, the prompt then the new tokens;
        encoder-decoder, ``decoder_start_token_id`` then the new tokens (T = 1).

    Raises:
        ValueError: a wrong option or prompt, with what to change.
        TypeError: the model does not generate (an encoder such as BERT or ViT).

    Example:
        >>> from qkv.models.gpt import GPT, PRESETS
        >>> model = GPT(PRESETS["tiny"])
        >>> prompt = torch.tensor([[5, 6, 7]])
        >>> generate(model, prompt, max_new_tokens=4, eos_token_id=[]).shape
        torch.Size([1, 7])
    """
    check_generates(model)
    settings = resolve_settings(
        getattr(model, "config", None), max_new_tokens=max_new_tokens, do_sample=do_sample,
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        repetition_penalty=repetition_penalty, num_beams=num_beams,
        length_penalty=length_penalty, early_stopping=early_stopping,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, stop=stop, tokenizer=tokenizer,
        seed=seed, streamer=streamer, static_cache=static_cache,
    )  # fmt: skip
    check_prompt(input_ids, attention_mask, "source" if _is_encoder_decoder(model) else "prompt")
    device = _device(model)
    input_ids = input_ids.to(device)
    attention_mask = None if attention_mask is None else attention_mask.to(device)
    # Each attention layer's projections from fused weights (see fused_projections).
    fused = fused_projections(attention_modules(model))
    with torch.inference_mode(), _eval_mode(model), fused:
        runner = cached_model(
            model, input_ids, attention_mask, max_new_tokens=max_new_tokens,
            static_cache=static_cache,
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
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    num_beams: int = 1,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    stop: int | str | Sequence[int | str] | None = None,
    tokenizer: Tokenizer | None = None,
    seed: int | None = None,
    static_cache: bool = False,
) -> Iterator[int] | Iterator[str]:
    """Generate for one prompt, handing out each token as soon as it is chosen.

    The same tokens as ``generate`` with the same options (greedy or sampling; no beams).

    Args:
        input_ids: one prompt (or source), (1, T) or (T,).
        tokenizer: when given, yield text pieces instead of ids: each piece is what the new
            token adds to the decoded text (held back while it ends in an incomplete character).
        num_beams: must be 1 (taken so that one set of options serves both functions).
        others: as in ``generate``.

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
    settings = resolve_settings(
        getattr(model, "config", None), max_new_tokens=max_new_tokens, do_sample=do_sample,
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        repetition_penalty=repetition_penalty, num_beams=num_beams, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id, stop=stop, tokenizer=tokenizer, seed=seed,
        static_cache=static_cache,
    )  # fmt: skip
    if num_beams > 1:
        raise ValueError(
            "stream hands out each token as it is chosen, but beam search (num_beams > 1) "
            "settles its tokens only at the end; use generate for beam search"
        )
    check_prompt(ids, mask, "source" if _is_encoder_decoder(model) else "prompt")
    device = _device(model)
    ids, mask = ids.to(device), None if mask is None else mask.to(device)
    if tokenizer is None:
        return _stream_ids(model, ids, mask, settings)
    return _stream_text(_stream_ids(model, ids, mask, settings), tokenizer)


def _stream_ids(
    model: nn.Module, ids: Tensor, mask: Tensor | None, settings: GenerationSettings
) -> Iterator[int]:
    # Inference mode (and the fused projections) are entered around each step only: the
    # caller's code between two tokens runs in whatever mode it chose.
    attns = attention_modules(model)
    with _eval_mode(model):
        with torch.inference_mode():
            runner = cached_model(
                model, ids, mask, max_new_tokens=settings.max_new_tokens,
                static_cache=settings.static_cache,
            )  # fmt: skip
            steps = decode_steps(runner, settings)
        while True:
            with torch.inference_mode(), fused_projections(attns):
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
