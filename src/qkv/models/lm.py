"""Running a stack of layers, and the two base classes of the language models built on it:
``DecoderLM`` (GPT, LLaMA, prefix-LM) and ``EncoderDecoderLM`` (Transformer, T5, BART).

Each family file reads top to bottom on its own, with its layers, how it embeds tokens and
positions, its masks and whatever else makes the family different; what lives here is the glue
that would otherwise be copied into each: the loop over the layers that keeps every hidden state
and attention map, the output head and loss, the key/value caches and the ``ModelOutput``.

Shape legend: B batch · T positions (the new ones, with a cache; the target's in an
encoder-decoder) · S source positions · D model width · V vocabulary · L layers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple, Protocol, TypeVar

from torch import Tensor, nn

from qkv.attention import masks
from qkv.attention.kv_cache import KVCache
from qkv.models.base import ModelOutput, QkvModel
from qkv.models.common import (
    attention_modules,
    causal_lm_loss,
    check_attention_mask,
    check_token_ids,
    default_position_ids,
    new_kv_caches,
    past_length,
    recording_attentions,
    seq2seq_loss,
    shift_right,
)

__all__ = [
    "DecoderContext",
    "DecoderLM",
    "EncoderDecoderCaches",
    "EncoderDecoderLM",
    "decoder_stack",
    "encoder_stack",
]


def encoder_stack(
    layers: nn.ModuleList,
    x: Tensor,
    attention_mask: Tensor | None = None,
    *,
    bias: Tensor | None = None,
) -> list[Tensor]:
    """Run a stack of encoder layers: every position attends to every real position.

    Args:
        layers: the ``EncoderLayer`` stack, L layers.
        x: the embedded input (B, T, D).
        attention_mask: (B, T), 1 = real token, 0 = padding (hidden from every query); or None.
        bias: additive attention scores that every layer shares (T5's relative positions).

    Returns:
        The input and every layer's output, L + 1 x (B, T, D).
    """
    mask = None if attention_mask is None else masks.padding(attention_mask)  # (B, 1, 1, T)
    states = [x]
    for layer in layers:
        x = layer(x, mask=mask, bias=bias)  # (B, T, D)
        states.append(x)
    return states


EncoderDecoderCaches = list[tuple[KVCache, KVCache]]  # per decoder layer: (self, cross)
Weights = tuple[list[Tensor], list[Tensor], list[Tensor]]  # encoder, decoder, cross-attention


class DecoderContext(NamedTuple):
    """What an encoder-decoder's decoder layers read besides the target: the memory, the two
    padding masks, the caches and where the new positions start."""

    memory: Tensor  # the encoder's output (B, S, D)
    memory_mask: Tensor | None  # the source's padding, (B, 1, 1, S)
    self_mask: Tensor | None  # the target's padding, (B, 1, 1, past + T); causal is added
    caches: EncoderDecoderCaches | None  # one (self, cross) pair per decoder layer
    past: int  # target positions already in the caches; the T new ones follow


def decoder_stack(
    layers: nn.ModuleList, x: Tensor, ctx: DecoderContext, *, bias: Tensor | None = None
) -> list[Tensor]:
    """Run a stack of decoder layers: causal self-attention, then cross-attention to the memory.

    Args:
        layers: the ``DecoderLayer`` stack (with cross-attention), L layers.
        x: the embedded target (B, T, D); with caches, only the T new positions.
        ctx: the memory, masks and caches (``EncoderDecoderLM._decoder_context``).
        bias: additive self-attention scores that every layer shares (T5's relative positions).

    Returns:
        The input and every layer's output, L + 1 x (B, T, D).
    """
    states = [x]
    for i, layer in enumerate(layers):
        cache, cross_cache = (None, None) if ctx.caches is None else ctx.caches[i]
        x = layer(
            x, ctx.memory, self_mask=ctx.self_mask, memory_mask=ctx.memory_mask, causal=True,
            bias=bias, cache=cache, cross_cache=cross_cache,
        )  # (B, T, D)  # fmt: skip
        states.append(x)
    return states


class DecoderLMConfig(Protocol):
    """What ``DecoderLM`` reads from a family's config."""

    @property
    def max_seq_len(self) -> int: ...


DecoderLMConfigT = TypeVar("DecoderLMConfigT", bound=DecoderLMConfig)


class DecoderLM(QkvModel[DecoderLMConfigT]):
    """What the decoder-only language models (GPT, LLaMA, prefix-LM) share around their layers.

    A family registers its decoder layers as ``layers``, its ``final_norm`` and ``lm_head``, and
    a ``max_seq_len`` in its config. Its ``forward`` embeds the tokens and builds the mask (what
    makes the family different); this class checks the inputs and gives the positions
    (``_positions``), runs the layers, the final norm, the head and the loss (``_run_layers``),
    and gives the key/value cache that ``forward(..., cache=)`` takes (``new_cache``).
    """

    layers: nn.ModuleList
    final_norm: nn.Module
    lm_head: nn.Linear

    def new_cache(self, batch_size: int = 1, max_len: int | None = None) -> list[KVCache]:
        """An empty key/value cache, one ``KVCache`` per layer, to pass as ``cache=``.

        Args:
            batch_size: B of the static caches.
            max_len: None for dynamic caches; else static ones with room for ``max_len``
                positions (at most ``max_seq_len``), in the model's dtype and on its device.
                Each holds the K key/value heads of its layer's attention (with grouped-query
                attention, fewer than the H query heads: a smaller cache).
        """
        attn = attention_modules(self.layers)  # one per layer
        return new_kv_caches(
            len(attn), batch_size, max_len, n_kv_heads=attn[0].n_kv_heads,
            head_dim=attn[0].head_dim, max_seq_len=self.config.max_seq_len, dtype=self.dtype,
            device=self.device,
        )  # fmt: skip

    def _positions(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        position_ids: Tensor | None,
        cache: list[KVCache] | None,
    ) -> tuple[int, Tensor]:
        """Check ``forward``'s inputs; return past, the positions already in the cache, and the
        positions of the T new tokens: ``position_ids`` if given, else ``default_position_ids``
        (real tokens counted, so a left-padded row starts at 0), (B, T) or (T,)."""
        check_token_ids(input_ids)
        (b, t), max_seq_len = input_ids.shape, self.config.max_seq_len
        past = past_length(cache, len(self.layers))  # S = past + T keys
        if past + t > max_seq_len:
            raise ValueError(
                f"{past + t} positions exceed max_seq_len={max_seq_len}, the longest sequence "
                "this model is built for (its positions end there); pass a shorter input"
            )
        check_attention_mask(attention_mask, past + t, batch=b)
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, t, past, device=input_ids.device)
        return past, position_ids

    def _run_layers(
        self,
        x: Tensor,
        mask: Tensor | None,
        *,
        causal: bool = True,
        position_ids: Tensor | None = None,
        cache: list[KVCache] | None,
        labels: Tensor | None,
        output_hidden_states: bool,
        output_attentions: bool,
    ) -> ModelOutput:
        """The second half of ``forward``: the L layers, the final norm, the head, the loss.

        Args:
            x: the embedded tokens (B, T, D).
            mask: boolean, True = may attend, broadcastable to (B, 1, T, S), S = past + T.
            causal: add the causal mask in every layer (False when ``mask`` holds it).
            position_ids: the positions of the T tokens, for rotary attention; None without.
            cache: one ``KVCache`` per layer, extended in place; or None.
            labels: (B, T) or None; ``causal_lm_loss`` scores position t on label t + 1.
            output_hidden_states: keep every layer's input, then the final norm's output.
            output_attentions: record every layer's attention weights (B, H, T, S).

        Returns:
            ``ModelOutput`` with logits (B, T, V), the loss with labels, the last hidden state
            (after the final norm, as transformers reports it) and what was asked for.
        """
        hidden: list[Tensor] = []  # on request, the input of every layer
        with recording_attentions(self.layers, output_attentions) as attentions:
            for i, layer in enumerate(self.layers):
                if output_hidden_states:
                    hidden.append(x)
                kv = None if cache is None else cache[i]
                x = layer(
                    x, self_mask=mask, causal=causal, position_ids=position_ids, cache=kv
                )  # (B, T, D)
        x = self.final_norm(x)  # (B, T, D)
        logits = self.lm_head(x)  # (B, T, V)
        return ModelOutput(
            logits=logits,
            loss=None if labels is None else causal_lm_loss(logits, labels),
            last_hidden_state=x,
            hidden_states=(*hidden, x) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )


class EncoderDecoderLMConfig(Protocol):
    """What ``EncoderDecoderLM`` reads from a family's config (and ``max_seq_len``, if any)."""

    @property
    def decoder_start_token_id(self) -> int: ...

    @property
    def pad_token_id(self) -> int: ...


EncoderDecoderLMConfigT = TypeVar("EncoderDecoderLMConfigT", bound=EncoderDecoderLMConfig)


class EncoderDecoderLM(QkvModel[EncoderDecoderLMConfigT]):
    """What the encoder-decoders (Transformer, T5, BART) share around their two stacks.

    A family writes how it embeds and runs each stack: ``_encoder_states`` (the embedded source
    and every encoder layer's output, L + 1 x (B, S, D), usually through ``encoder_stack``),
    ``_decoder_states`` (the same for the target, (B, T, D) each, attending to the memory,
    usually through ``decoder_stack``) and ``_stacks`` (its two ``nn.ModuleList`` of layers);
    and, where its output layer or loss is more than ``lm_head`` and cross-entropy, ``_logits``
    or ``_loss``. Its config has ``decoder_start_token_id`` and ``pad_token_id``. This class
    turns those into ``forward`` with teacher forcing (``shift_right``), and ``encode`` /
    ``decode`` with key/value caches (``new_caches``).
    """

    lm_head: nn.Linear

    def _encoder_states(self, input_ids: Tensor, attention_mask: Tensor | None) -> list[Tensor]:
        raise NotImplementedError

    def _decoder_states(self, decoder_input_ids: Tensor, ctx: DecoderContext) -> list[Tensor]:
        raise NotImplementedError

    def _stacks(self) -> tuple[nn.ModuleList, nn.ModuleList]:
        """The encoder's layers and the decoder's layers."""
        raise NotImplementedError

    def _logits(self, hidden: Tensor) -> Tensor:
        """Next-token scores (B, T, V) from the decoder's last hidden states (B, T, D)."""
        return self.lm_head(hidden)  # (B, T, V)

    def _loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """The training loss: cross-entropy of logits (B, T, V) against labels (B, T)."""
        return seq2seq_loss(logits, labels)

    def shift_right(self, labels: Tensor) -> Tensor:
        """Teacher forcing's inputs: ``decoder_start_token_id``, then labels[:, :-1] (B, T).

        Ignored labels (-100) become ``pad_token_id``.
        """
        c = self.config
        return shift_right(labels, c.decoder_start_token_id, c.pad_token_id)  # (B, T)

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Read the source (B, S) once: the memory (B, S, D) that every decoding step attends to.

        ``attention_mask`` (B, S): 1 = real token, 0 = padding, on either side (absolute
        positions count real tokens only; relative ones do not see padding at all).
        """
        return self._checked_encoder_states(input_ids, attention_mask)[-1]

    def _checked_encoder_states(
        self, input_ids: Tensor, attention_mask: Tensor | None
    ) -> list[Tensor]:
        """``_encoder_states``, once the source (B, S) and its mask have passed their checks."""
        check_token_ids(input_ids)
        b, s = input_ids.shape
        check_attention_mask(attention_mask, s, batch=b, span="S")
        return self._encoder_states(input_ids, attention_mask)

    def decode(
        self,
        decoder_input_ids: Tensor,
        memory: Tensor,
        *,
        attention_mask: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        caches: EncoderDecoderCaches | None = None,
    ) -> Tensor:
        """Next-token scores for the target positions given, attending to ``memory``.

        Args:
            decoder_input_ids: target tokens (B, T), starting with ``decoder_start_token_id``;
                with ``caches``, only the new tokens of this step.
            memory: ``encode``'s output (B, S, D).
            attention_mask: the source's (B, S), 1 = real token, 0 = padding.
            decoder_attention_mask: (B, past + T) or None; 1 = real token. Decoder positions
                go on from the cache's length, so decoder inputs are not left-padded.
            caches: from ``new_caches``, one (self-attention, cross-attention) pair per decoder
                layer; the new keys and values are appended, and the memory's are computed once,
                at the first step (pass the same ``memory`` and ``attention_mask`` every step).

        Returns:
            logits (B, T, V).
        """
        ctx = self._decoder_context(
            decoder_input_ids, memory, attention_mask, decoder_attention_mask, caches
        )
        return self._logits(self._decoder_states(decoder_input_ids, ctx)[-1])  # (B, T, V)

    def new_caches(self, batch_size: int = 1, max_len: int | None = None) -> EncoderDecoderCaches:
        """Empty key/value caches for ``decode``: (self-attention, cross-attention) per layer.

        ``max_len``: None for dynamic self-attention caches, else static ones with room for
        ``max_len`` decoder positions and ``batch_size`` rows (at most the config's
        ``max_seq_len`` where the family has one; T5's relative positions set no limit). The
        cross-attention caches are dynamic: ``decode`` fills them once from the memory.
        """
        attn = attention_modules(self._stacks()[1], "self_attn")  # one per decoder layer
        self_caches = new_kv_caches(
            len(attn), batch_size, max_len, n_kv_heads=attn[0].n_kv_heads,
            head_dim=attn[0].head_dim, max_seq_len=getattr(self.config, "max_seq_len", None),
            dtype=self.dtype, device=self.device,
        )  # fmt: skip
        return [(kv, KVCache()) for kv in self_caches]

    def _decoder_context(
        self,
        decoder_input_ids: Tensor,
        memory: Tensor,
        attention_mask: Tensor | None,
        decoder_attention_mask: Tensor | None,
        caches: EncoderDecoderCaches | None,
    ) -> DecoderContext:
        """The decoder's ``DecoderContext`` for the T new target positions of
        ``decoder_input_ids`` (B, T), once they pass their checks: masks from the padding of the
        source (B, S) and of the target (B, past + T), past from the caches."""
        check_token_ids(decoder_input_ids, "decoder_input_ids")
        b, t = decoder_input_ids.shape
        if memory.shape[0] != b:
            raise ValueError(
                f"decoder_input_ids and the memory (the encoded source) must have the same B, "
                f"one target row per source row; got {b} and {memory.shape[0]}"
            )
        past = past_length(caches, len(self._stacks()[1]))  # target positions already cached
        check_attention_mask(attention_mask, memory.shape[1], batch=b, span="S")
        name = "decoder_attention_mask"
        check_attention_mask(decoder_attention_mask, past + t, name, batch=b)
        memory_mask = None if attention_mask is None else masks.padding(attention_mask)
        self_mask = None  # (B, 1, 1, past + T); the layers add the causal mask
        if decoder_attention_mask is not None:
            self_mask = masks.padding(decoder_attention_mask)
        return DecoderContext(memory, memory_mask, self_mask, caches, past)

    @contextmanager
    def _recording(self, enabled: bool) -> Iterator[Weights]:
        """Record attention weights on request: the encoder's, the decoder's self-attention's
        and its cross-attention's, three lists of L x (B, H, T, S) (empty when disabled)."""
        encoder, decoder = self._stacks()
        with (
            recording_attentions(encoder, enabled) as enc_weights,
            recording_attentions(decoder, enabled, "self_attn") as dec_weights,
            recording_attentions(decoder, enabled, "cross_attn") as cross_weights,
        ):
            yield enc_weights, dec_weights, cross_weights

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        decoder_input_ids: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        *,
        labels: Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> ModelOutput:
        """Encode the source, decode the target with teacher forcing, score every position.

        Args:
            input_ids: source tokens (B, S); ``attention_mask`` (B, S), 1 = real, 0 = padding.
            decoder_input_ids: target inputs (B, T); by default ``shift_right(labels)``.
            decoder_attention_mask: (B, T), 1 = real token, 0 = padding.
            labels: the target tokens (B, T), not shifted: position t predicts labels[:, t];
                -100 marks positions left out of the loss (``_loss``).
            output_hidden_states: also return the embeddings and every layer's output (each
                stack's last one as the family reports it, after T5's final norm).
            output_attentions: also return every layer's attention weights: the decoder's
                (B, H, T, T) in ``attentions``, (B, H, T, S) in ``cross_attentions``, the
                encoder's (B, H, S, S) in ``encoder_attentions``.

        Returns:
            ``ModelOutput`` with ``logits`` (B, T, V), ``loss`` with labels, the decoder's
            ``last_hidden_state`` (B, T, D), ``hidden_states``, ``attentions`` and
            ``cross_attentions``, and the encoder's ``encoder_*`` fields.
        """
        if decoder_input_ids is None:  # teacher forcing: the target shifted right
            if labels is None:
                raise ValueError("pass decoder_input_ids, or labels to shift right into them")
            decoder_input_ids = self.shift_right(labels)  # (B, T)
        with self._recording(output_attentions) as (enc_weights, dec_weights, cross_weights):
            enc = self._checked_encoder_states(input_ids, attention_mask)  # L + 1 x (B, S, D)
            ctx = self._decoder_context(
                decoder_input_ids, enc[-1], attention_mask, decoder_attention_mask, None
            )
            dec = self._decoder_states(decoder_input_ids, ctx)  # L + 1 x (B, T, D)
        logits = self._logits(dec[-1])  # (B, T, V)
        hidden, on = output_hidden_states, output_attentions
        return ModelOutput(
            logits=logits,
            loss=None if labels is None else self._loss(logits, labels),
            last_hidden_state=dec[-1],
            hidden_states=tuple(dec) if hidden else None,
            attentions=tuple(dec_weights) if on else None,
            cross_attentions=tuple(cross_weights) if on else None,
            encoder_last_hidden_state=enc[-1],
            encoder_hidden_states=tuple(enc) if hidden else None,
            encoder_attentions=tuple(enc_weights) if on else None,
        )
