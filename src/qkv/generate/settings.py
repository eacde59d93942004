"""What a ``generate`` call asks for: one frozen record, checked when it is made.

``GenerationSettings`` holds every option of ``qkv.generate.generate`` and ``stream``. Its
constructor checks each option against the others, so a wrong one fails with a message that
says what to change before any model runs; ``resolved_for(model.config)`` then fills in what
depends on the model (the end and pad ids) and checks token ids against its vocabulary. The
decoding loops read plain, already-checked values.

Shape legend: B batch · T prompt positions · V vocabulary.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from torch import Tensor

from qkv.models.common import check_token_ids

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = ["GenerationSettings", "check_prompt", "output_vocab_size"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class GenerationSettings:
    """The options of one ``generate`` (or ``stream``) call.

    Build one and pass it (``generate(model, ids, settings)``), or pass its fields as
    keywords (``generate(model, ids, max_new_tokens=8)``); keywords given next to a settings
    record replace its fields.

    Attributes:
        max_new_tokens: the most tokens to add (>= 1); fewer when every row ends earlier.
        do_sample: draw from the distribution instead of taking the most likely token.
        temperature: divide the logits by it before sampling (> 0).
        top_k: sample among the k most likely tokens only.
        top_p: sample within the smallest set of tokens whose probability reaches top_p.
        min_p: sample among tokens at least min_p times as likely as the most likely one.
        repetition_penalty: CTRL's penalty θ on tokens already in the sequence (> 1 avoids
            them).
        num_beams: beam width; > 1 runs beam search (``qkv.generate.beam``), which cannot
            sample.
        length_penalty: beam search: a finished hypothesis scores sum log p / length^this.
        early_stopping: beam search: stop a batch row once it has num_beams finished
            hypotheses (True), when no running beam can still win (False), or never early
            ("never").
        eos_token_id: id(s) that end a row; None: the model's ``config.eos_token_id``; [] for
            none. Ids outside the vocabulary are never produced and are dropped.
        pad_token_id: what rows hold after they ended; None: the model's
            ``config.pad_token_id`` where it names one (as transformers does), else the first
            end id, else the first stop token id.
        stop: more stop token ids (ints) and stop strings (need ``tokenizer``); a stop string
            ends a row once its decoded output contains it.
        tokenizer: a ``tokenizers.Tokenizer``, to decode for stop strings (and, in
            ``stream``, to yield text).
        seed: seeds the sampler's own ``torch.Generator``: the same seed, the same tokens.
        static_cache: preallocate the KV caches for the whole sequence.

    Sequences (``eos_token_id``, ``stop``) are stored as tuples, numbers as floats, so that a
    record never changes after it is checked.

    Raises:
        ValueError: an option out of its range or at odds with another, naming what to change.

    Example:
        >>> settings = GenerationSettings(max_new_tokens=8, do_sample=True, top_p=0.9, seed=0)
        >>> settings.top_p, settings.num_beams
        (0.9, 1)
        >>> GenerationSettings(max_new_tokens=8, top_k=0)
        Traceback (most recent call last):
        ...
        ValueError: top_k must be an int >= 1 (or None to keep every token), got 0
    """

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
    eos_token_id: int | Sequence[int] | None = None
    pad_token_id: int | None = None
    stop: int | str | Sequence[int | str] | None = None
    tokenizer: Tokenizer | None = None
    seed: int | None = None
    static_cache: bool = False

    def __post_init__(self) -> None:
        _check_lengths(self.max_new_tokens, self.num_beams, self.do_sample)
        _check_beam_options(self.early_stopping, self.length_penalty)
        _check_sampling(self)
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        stop = _stop_entries(self.stop)
        strings = [s for s in stop if isinstance(s, str)]
        if strings and self.tokenizer is None:
            raise ValueError(
                f"stop strings {strings} need tokenizer= (a tokenizers.Tokenizer) to decode "
                "the generated ids"
            )
        if any(s == "" for s in strings):
            raise ValueError("a stop string must not be empty")
        # A frozen dataclass sets its own fields through object.__setattr__ (the dataclasses
        # idiom): here only to store the checked values in one canonical form.
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "length_penalty", float(self.length_penalty))
        object.__setattr__(self, "stop", stop)
        if self.eos_token_id is not None:
            object.__setattr__(self, "eos_token_id", _ids(self.eos_token_id))

    @classmethod
    def from_options(
        cls, settings: GenerationSettings | None = None, /, **options: Any
    ) -> GenerationSettings:
        """``settings`` with ``options`` (its fields, by keyword) replacing its values; without
        ``settings``, a record of ``options`` alone (which must include ``max_new_tokens``).

        Raises:
            TypeError: ``settings`` is not a ``GenerationSettings``, an option is not one of
                its fields (the error lists them), or ``max_new_tokens`` is missing.
            ValueError: as the constructor.
        """
        if settings is not None and not isinstance(settings, GenerationSettings):
            raise TypeError(
                f"settings must be a GenerationSettings (or None), got {type(settings).__name__}"
            )
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [name for name in options if name not in names]
        if unknown:
            close = difflib.get_close_matches(unknown[0], names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(
                f"unknown generation option(s) {unknown}{hint}; the options are: "
                + ", ".join(names)
            )
        if settings is not None:
            return dataclasses.replace(settings, **options)
        if "max_new_tokens" not in options:
            raise TypeError(
                "max_new_tokens is required: pass max_new_tokens=... (the most tokens to add) "
                "or settings=GenerationSettings(max_new_tokens=...)"
            )
        return cls(**options)

    def resolved_for(self, config: Any) -> GenerationSettings:
        """These settings with the model's defaults filled in, checked against its vocabulary.

        Args:
            config: the model's config (``eos_token_id``, ``pad_token_id``, ``vocab_size`` or
                ``tgt_vocab_size`` where it has them); None for a model without one.

        Returns:
            A new record whose ``eos_token_id`` is a tuple of in-vocabulary ids and whose
            ``pad_token_id`` is set whenever a row can end. Resolving it again changes nothing.

        Raises:
            ValueError: a stop or pad id outside the vocabulary, or stop strings with nothing
                to pad the ended rows with.
        """
        vocab_size = output_vocab_size(config)
        for token in self._stop_ids:
            if token < 0 or (vocab_size is not None and token >= vocab_size):
                raise ValueError(
                    f"unknown stop token id {token}: not in the model's vocabulary "
                    f"[0, {vocab_size})"
                )
        eos = self.eos_token_id
        if eos is None:
            eos = getattr(config, "eos_token_id", None)
        # An end id outside the vocabulary can never be produced: it is dropped (a way to
        # ignore the config's end token, like eos_token_id=[]).
        eos = tuple(e for e in _ids(eos) if e >= 0 and (vocab_size is None or e < vocab_size))
        pad = self.pad_token_id
        if pad is None:
            pad = getattr(config, "pad_token_id", None)
        stop_ids = [*eos, *self._stop_ids]
        if pad is None and stop_ids:
            pad = stop_ids[0]
        if pad is None and self.stop_strings:
            raise ValueError(
                "rows that end on a stop string are padded, but there is no pad_token_id and "
                "no eos_token_id to pad with; pass pad_token_id"
            )
        if pad is not None and (pad < 0 or (vocab_size is not None and pad >= vocab_size)):
            raise ValueError(f"pad_token_id {pad} is not in the vocabulary [0, {vocab_size})")
        sampling_only = {
            "temperature": self.temperature != 1.0,
            "top_k": self.top_k is not None,
            "top_p": self.top_p is not None,
            "min_p": self.min_p is not None,
        }
        if not self.do_sample and any(sampling_only.values()):
            ignored = [name for name, is_set in sampling_only.items() if is_set]
            logger.warning("%s only shape sampling; with do_sample=False they are ignored", ignored)
        return dataclasses.replace(self, eos_token_id=eos, pad_token_id=pad)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The end-of-sequence ids (as given: the model's are filled in by ``resolved_for``)."""
        return _ids(self.eos_token_id)

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """The strings of ``stop``."""
        return tuple(s for s in _stop_entries(self.stop) if isinstance(s, str))

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Every id that ends a row: the end-of-sequence ids first, then ``stop``'s, no repeats."""
        return tuple(dict.fromkeys([*self.eos_token_ids, *self._stop_ids]))

    @property
    def _stop_ids(self) -> list[int]:
        return [operator.index(s) for s in _stop_entries(self.stop) if not isinstance(s, str)]

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


def _check_lengths(max_new_tokens: Any, num_beams: Any, do_sample: bool) -> None:
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


def _check_beam_options(early_stopping: Any, length_penalty: float) -> None:
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    if not math.isfinite(length_penalty):
        raise ValueError(f"length_penalty must be a finite number, got {length_penalty}")


def _check_sampling(s: GenerationSettings) -> None:
    if s.do_sample and not s.temperature > 0:
        raise ValueError(
            f"temperature must be > 0 when sampling, got {s.temperature}; for the most likely "
            "token use do_sample=False (greedy)"
        )
    top_k = s.top_k
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an int >= 1 (or None to keep every token), got {top_k!r}")
    if s.top_p is not None and not 0.0 < s.top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (or None), got {s.top_p}")
    if s.min_p is not None and not 0.0 <= s.min_p <= 1.0:
        raise ValueError(f"min_p must be in [0, 1] (or None), got {s.min_p}")
    if s.repetition_penalty is not None and not s.repetition_penalty > 0:
        raise ValueError(
            f"repetition_penalty must be > 0 (1.0: no penalty), got {s.repetition_penalty}"
        )


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


def _stop_entries(stop: int | str | Sequence[int | str] | None) -> tuple[int | str, ...]:
    """``stop`` as a tuple of token ids (ints) and strings.

    Raises:
        ValueError: an entry that is neither.
    """
    if stop is None:
        return ()
    entries = [stop] if isinstance(stop, str) or not isinstance(stop, Iterable) else list(stop)
    out: list[int | str] = []
    for entry in entries:
        if isinstance(entry, str):
            out.append(entry)
        elif isinstance(entry, bool) or not _is_index(entry):
            raise ValueError(f"stop entry {entry!r} is neither a token id (int) nor a string")
        else:
            out.append(operator.index(entry))
    return tuple(out)


def check_prompt(input_ids: Tensor, attention_mask: Tensor | None, what: str = "prompt") -> None:
    """A prompt is (B, T) token ids with T >= 1, every row with a real token; the mask matches.

    Raises:
        ValueError: an empty prompt, a row of padding only, or shapes that do not fit.
        TypeError: ids that are not integers (the models' own ``check_token_ids``).
    """
    check_token_ids(input_ids)
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
