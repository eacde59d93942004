"""What a ``generate`` call asked for, checked once, before any model runs.

Every argument of ``qkv.generate.generate`` is validated here and gathered into one frozen
record, so that the decoding loops read plain, already-checked values and each wrong input
fails with a message that says what to change.

Shape legend: B batch · T prompt positions · V vocabulary.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from torch import Tensor

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = ["GenerationSettings", "check_prompt", "output_vocab_size", "resolve_settings"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class GenerationSettings:
    """The checked options of one ``generate`` call (see its docstring for their meaning)."""

    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False
    eos_token_ids: tuple[int, ...] = ()  # end-of-sequence ids; they also stop a row
    stop_token_ids: tuple[int, ...] = ()  # eos ids first, then the other stop ids
    stop_strings: tuple[str, ...] = ()
    tokenizer: Tokenizer | None = None
    pad_token_id: int | None = None  # what finished rows are filled with
    seed: int | None = None
    static_cache: bool = False

    @property
    def uses_processors(self) -> bool:
        """Whether any logits processor is set (the fast path skips them otherwise)."""
        warps = self.do_sample and (
            self.temperature != 1.0
            or self.top_k is not None
            or (self.top_p is not None and self.top_p < 1.0)
            or bool(self.min_p)
        )
        return warps or self.repetition_penalty is not None


def output_vocab_size(config: Any) -> int | None:
    """V of the generated tokens: ``tgt_vocab_size`` where source and target vocabularies
    differ (the 2017 Transformer), else ``vocab_size``; None when the config has neither."""
    size = getattr(config, "tgt_vocab_size", None)
    return getattr(config, "vocab_size", None) if size is None else size


def _is_index(value: Any) -> bool:
    """Whether ``value`` is an integer (a Python, NumPy or 0-d integer tensor one)."""
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def _ids(value: int | Sequence[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, Sequence):
        return tuple(operator.index(v) for v in value)
    return (operator.index(value),)


def resolve_settings(
    config: Any,
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
    streamer: Any = None,
    static_cache: bool = False,
) -> GenerationSettings:
    """Check every option against the others and the model's ``config``; fill the defaults.

    ``eos_token_id`` defaults to ``config.eos_token_id`` (pass ``[]`` for none; ids outside
    the vocabulary are never produced and are dropped), and ``pad_token_id`` to
    ``config.pad_token_id`` where the checkpoint names one (as transformers does), else the
    first end-of-sequence id, else the first stop token id.

    Raises:
        ValueError: naming the option and what to change.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise ValueError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams (the beam width) must be an int >= 1, got {num_beams!r}")
    if num_beams > 1 and do_sample:
        raise ValueError(
            "beam search with sampling (num_beams > 1 and do_sample=True) is not supported; "
            "use num_beams=1 to sample, or do_sample=False for beam search"
        )
    if num_beams > 1 and streamer is not None:
        raise ValueError("a streamer needs num_beams=1: beam search settles its tokens at the end")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    if not math.isfinite(length_penalty):
        raise ValueError(f"length_penalty must be a finite number, got {length_penalty}")
    if do_sample and not temperature > 0:
        raise ValueError(
            f"temperature must be > 0 when sampling, got {temperature}; for the most likely "
            "token use do_sample=False (greedy)"
        )
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an int >= 1 (or None to keep every token), got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (or None), got {top_p}")
    if min_p is not None and not 0.0 <= min_p <= 1.0:
        raise ValueError(f"min_p must be in [0, 1] (or None), got {min_p}")
    if repetition_penalty is not None and not repetition_penalty > 0:
        raise ValueError(
            f"repetition_penalty must be > 0 (1.0: no penalty), got {repetition_penalty}"
        )
    sampling_only = {"temperature": temperature != 1.0, "top_k": top_k is not None,
                     "top_p": top_p is not None, "min_p": min_p is not None}  # fmt: skip
    if not do_sample and any(sampling_only.values()):
        ignored = [name for name, is_set in sampling_only.items() if is_set]
        logger.warning("%s only shape sampling; with do_sample=False they are ignored", ignored)
    if seed is not None and not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")

    vocab_size = output_vocab_size(config)
    eos = _ids(getattr(config, "eos_token_id", None) if eos_token_id is None else eos_token_id)
    if stop is None:
        stops: list[Any] = []
    elif isinstance(stop, str) or not isinstance(stop, Iterable):
        stops = [stop]
    else:
        stops = list(stop)
    stop_strings = [s for s in stops if isinstance(s, str)]
    stop_ids = []
    for entry in stops:
        if isinstance(entry, str):
            continue
        if isinstance(entry, bool) or not _is_index(entry):
            raise ValueError(f"stop entry {entry!r} is neither a token id (int) nor a string")
        token = operator.index(entry)
        stop_ids.append(token)
        if token < 0 or (vocab_size is not None and token >= vocab_size):
            raise ValueError(
                f"unknown stop token id {token}: not in the model's vocabulary [0, {vocab_size})"
            )
    # An end id outside the vocabulary can never be produced: it is dropped (a way to ignore
    # the config's end token, like eos_token_id=[]).
    eos = tuple(e for e in eos if e >= 0 and (vocab_size is None or e < vocab_size))
    if stop_strings and tokenizer is None:
        raise ValueError(
            f"stop strings {stop_strings} need tokenizer= (a tokenizers.Tokenizer) to decode "
            "the generated ids"
        )
    if any(s == "" for s in stop_strings):
        raise ValueError("a stop string must not be empty")
    all_stops = tuple(dict.fromkeys([*eos, *stop_ids]))  # eos first, no repeats
    if pad_token_id is None:
        pad_token_id = getattr(config, "pad_token_id", None)
    if pad_token_id is None and all_stops:
        pad_token_id = all_stops[0]
    if pad_token_id is None and stop_strings:
        raise ValueError(
            "rows that end on a stop string are padded, but there is no pad_token_id and no "
            "eos_token_id to pad with; pass pad_token_id"
        )
    if pad_token_id is not None and (
        pad_token_id < 0 or (vocab_size is not None and pad_token_id >= vocab_size)
    ):
        raise ValueError(f"pad_token_id {pad_token_id} is not in the vocabulary [0, {vocab_size})")
    return GenerationSettings(
        max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=float(temperature),
        top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
        num_beams=num_beams, length_penalty=float(length_penalty), early_stopping=early_stopping,
        eos_token_ids=eos, stop_token_ids=all_stops, stop_strings=tuple(stop_strings),
        tokenizer=tokenizer, pad_token_id=pad_token_id, seed=seed, static_cache=static_cache,
    )  # fmt: skip


def check_prompt(input_ids: Tensor, attention_mask: Tensor | None, what: str = "prompt") -> None:
    """A prompt is (B, T) token ids with T >= 1, every row with a real token; the mask matches.

    Raises:
        ValueError: an empty prompt, a row of padding only, or shapes that do not fit.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, T) token ids, got shape {tuple(input_ids.shape)}")
    if input_ids.is_floating_point():
        raise ValueError(f"input_ids must be integer token ids, got {input_ids.dtype}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(
            f"empty {what}: input_ids has shape {tuple(input_ids.shape)}; give at least one "
            "token per row (for example a start-of-text token)"
        )
    if attention_mask is None:
        return
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask {tuple(attention_mask.shape)} must have input_ids' shape "
            f"{tuple(input_ids.shape)}"
        )
    empty = ~attention_mask.bool().any(dim=-1)  # (B,)
    if bool(empty.any()):
        raise ValueError(
            f"empty {what} in row(s) {empty.nonzero()[:, 0].tolist()}: attention_mask has no "
            "real token there"
        )
