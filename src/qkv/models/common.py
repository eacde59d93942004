"""The small pieces several model families share: label conventions, the language-model losses,
teacher forcing's shifted inputs, default positions, key/value caches for decoding, recording
hidden states and attentions, GPT-2's initialisation, and the two small base classes of the
language models: ``DecoderLM`` (GPT, LLaMA, prefix-LM) and ``EncoderDecoderLM`` (Transformer,
T5, BART).

    causal LM loss   = -mean_t log softmax(logits_t)[y_{t+1}]          (GPT, LLaMA)
    seq2seq loss     = -mean_t log softmax(logits_t)[y_t]              (Transformer, T5, BART)
    decoder input    = [start, y_1, ..., y_{T-1}]                      (Transformer, T5, BART)
    position of x_t  = (number of real tokens up to t) - 1             (with left padding)

Each family file still reads top to bottom on its own, with its layers, its ``forward`` and
whatever makes the family different; what lives here is the same glue that would otherwise be
copied into several of them. Labels equal to ``IGNORE_INDEX`` (-100, the
value PyTorch's ``cross_entropy`` and Hugging Face use) are left out of every loss.

With a key/value cache a model reads only the T new tokens, while its attention mask covers the
cached positions too, (B, past + T); ``past_length`` and ``check_attention_mask`` hold that rule.

Shape legend: B batch · T positions (the new ones, with a cache; the target's in an
encoder-decoder) · S source positions · D model width · H heads · K key/value heads ·
E head dim · V vocabulary · L layers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from qkv.attention.kv_cache import KVCache
from qkv.attention.multihead import MultiHeadAttention, recording_weights
from qkv.blocks.norms import LayerNorm, RMSNorm
from qkv.models.base import ModelOutput, QkvModel

__all__ = [
    "IGNORE_INDEX",
    "DecoderLM",
    "EncoderDecoderCaches",
    "EncoderDecoderLM",
    "attention_modules",
    "causal_lm_loss",
    "check_attention_mask",
    "decoder_lm_output",
    "default_position_ids",
    "init_normal_",
    "new_kv_caches",
    "past_length",
    "recording_attentions",
    "seq2seq_loss",
    "shift_right",
]

IGNORE_INDEX = -100  # labels equal to this are left out of the loss (PyTorch's and HF's value)


def causal_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Next-token cross-entropy: the logits at t are scored against the label at t + 1.

    Args:
        logits: (B, T, V).
        labels: (B, T) token ids, usually ``input_ids`` itself (the shift happens here);
            ``IGNORE_INDEX`` (-100) marks positions left out of the loss.

    Returns:
        The mean loss over counted positions, a float32 scalar.

    Example:
        >>> logits = torch.zeros(1, 3, 4)  # uniform over V = 4 tokens
        >>> causal_lm_loss(logits, torch.tensor([[0, 1, -100]]))  # one counted position: log 4
        tensor(1.3863)
    """
    shift_logits = logits[:, :-1].float()  # (B, T - 1, V), predictions for positions 1 ..
    shift_labels = labels[:, 1:].to(logits.device)  # (B, T - 1), the tokens that came next
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),  # (B * (T - 1), V)
        shift_labels.reshape(-1),  # (B * (T - 1),)
        ignore_index=IGNORE_INDEX,
    )


def seq2seq_loss(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """An encoder-decoder's cross-entropy: the logits at t are scored against the label at t.

    No shift here: the decoder's inputs were already shifted right (``shift_right``). The
    logits are upcast to float32 first, as in ``causal_lm_loss`` (a no-op for float32 logits;
    with bf16 or fp16 the log-softmax over V keeps its precision).

    Args:
        logits: (B, T, V).
        labels: (B, T) target ids; ``IGNORE_INDEX`` (-100) marks positions left out.
        label_smoothing: epsilon of label smoothing (the 2017 Transformer: 0.1), 0 for none.

    Returns:
        The mean loss over counted positions, a float32 scalar.

    Example:
        >>> seq2seq_loss(torch.zeros(1, 2, 4), torch.tensor([[3, -100]]))  # log 4
        tensor(1.3863)
    """
    return F.cross_entropy(
        logits.flatten(0, 1).float(),  # (B * T, V)
        labels.flatten().to(logits.device),  # (B * T,)
        ignore_index=IGNORE_INDEX,
        label_smoothing=label_smoothing,
    )


def shift_right(labels: Tensor, start_token_id: int, pad_token_id: int) -> Tensor:
    """Teacher forcing: the decoder reads [start, y_1, ..., y_{T-1}] to predict [y_1, ..., y_T].

    Args:
        labels: target token ids (B, T); ``IGNORE_INDEX`` (-100) marks positions the loss ignores.
        start_token_id: the first decoder input (T5: the pad token; BART: the end token).
        pad_token_id: replaces -100 in the shifted ids, since -100 is not a token.

    Returns:
        decoder_input_ids (B, T).

    Example:
        >>> shift_right(torch.tensor([[5, -100, 6]]), start_token_id=2, pad_token_id=1)
        tensor([[2, 5, 1]])
    """
    start = labels.new_full((labels.shape[0], 1), start_token_id)  # (B, 1)
    shifted = torch.cat([start, labels[:, :-1]], dim=1)  # (B, T)
    return shifted.masked_fill(shifted == IGNORE_INDEX, pad_token_id)  # (B, T)


def default_position_ids(
    attention_mask: Tensor | None, t: int, past: int = 0, *, device: torch.device | None = None
) -> Tensor:
    """Positions of the T new tokens: counted over real tokens only when there is padding.

    With left padding (how batches are padded for generation) the first real token of each row
    must get position 0, as it did in training, so positions count real tokens:
    ``cumsum(attention_mask) - 1``, clamped at 0 for the padding before them.

    Args:
        attention_mask: (B, past + T), 1 = real token, 0 = padding; or None.
        t: T, the number of new tokens.
        past: positions already in the key/value cache.
        device: where to create positions when there is no mask.

    Returns:
        (B, T) from a mask, else (T,) = past .. past + T - 1.

    Example:
        >>> default_position_ids(torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]), 4)
        tensor([[0, 0, 0, 1],
                [0, 1, 2, 3]])
    """
    if attention_mask is None:
        return torch.arange(past, past + t, device=device)  # (T,)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, past + T)
    return positions[:, -t:]  # (B, T)


def new_kv_caches(
    n_layers: int,
    batch_size: int,
    max_len: int | None,
    *,
    n_kv_heads: int,
    head_dim: int,
    max_seq_len: int | None,
    dtype: torch.dtype,
    device: torch.device,
) -> list[KVCache]:
    """One empty key/value cache per layer: dynamic without ``max_len``, else static.

    Args:
        n_layers: how many caches (one per attention layer).
        batch_size: B of the static caches (a dynamic cache takes any B).
        max_len: None for dynamic caches that grow as needed; else the room, in positions, that
            each static cache allocates once, (B, K, max_len, E) for keys and again for values.
        n_kv_heads, head_dim: K and E of the attention the caches serve.
        max_seq_len: the model's positions; a larger ``max_len`` is an error. None: no limit.
        dtype, device: of the static caches (the model's).

    Example:
        >>> caches = new_kv_caches(2, 1, 8, n_kv_heads=2, head_dim=4, max_seq_len=16,
        ...                        dtype=torch.float32, device=torch.device("cpu"))
        >>> len(caches), caches[0].max_len, caches[0].seq_len
        (2, 8, 0)
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if max_len is None:
        return [KVCache() for _ in range(n_layers)]
    if max_len < 1:
        raise ValueError(f"max_len must be a positive number of positions (or None), got {max_len}")
    if max_seq_len is not None and max_len > max_seq_len:
        raise ValueError(
            f"max_len={max_len} exceeds the model's max_seq_len={max_seq_len}: it has no positions "
            f"beyond that, so a cache needs room for at most {max_seq_len}"
        )
    return [
        KVCache.static(batch_size, n_kv_heads, max_len, head_dim, dtype=dtype, device=device)
        for _ in range(n_layers)
    ]


def past_length(
    cache: Sequence[KVCache] | Sequence[tuple[KVCache, KVCache]] | None, n_layers: int
) -> int:
    """How many positions the cache already holds (0 without a cache).

    Args:
        cache: one ``KVCache`` per layer, or one (self-attention, cross-attention) pair per
            decoder layer; or None.
        n_layers: the number of layers the cache must cover.
    """
    if cache is None:
        return 0
    if len(cache) != n_layers:
        raise ValueError(
            f"the cache has {len(cache)} entries for {n_layers} layers; make it with the model's "
            "new_cache() / new_caches()"
        )
    first = cache[0]
    return (first[0] if isinstance(first, tuple) else first).seq_len


def check_attention_mask(
    attention_mask: Tensor | None, length: int, name: str = "attention_mask"
) -> None:
    """Raise a clear error unless the mask covers ``length`` = past + T positions.

    With a key/value cache the mask spans the cached positions and the new ones, (B, past + T);
    without a cache, past = 0.
    """
    if attention_mask is not None and (
        attention_mask.dim() != 2 or attention_mask.shape[-1] != length
    ):
        raise ValueError(
            f"{name} must be (B, past + T) with past + T = {length} (the cached positions and "
            f"the new ones), got shape {tuple(attention_mask.shape)}"
        )


def attention_modules(root: nn.Module, name: str | None = None) -> list[MultiHeadAttention]:
    """The ``MultiHeadAttention`` modules inside ``root``, layer by layer, for recording.

    Args:
        root: a model or a stack of layers (an ``nn.ModuleList``).
        name: keep only the modules registered under this attribute name, e.g. ``"self_attn"``
            or ``"cross_attn"`` of decoder layers; None keeps all of them (within a decoder
            layer, self-attention comes before cross-attention).

    Returns:
        The modules in registration order, to pass to ``qkv.attention.recording_weights``.
    """
    return [
        m
        for path, m in root.named_modules()
        if isinstance(m, MultiHeadAttention) and (name is None or path.rsplit(".", 1)[-1] == name)
    ]


def recording_attentions(
    layers: nn.Module, enabled: bool, name: str | None = None
) -> AbstractContextManager[list[Tensor]]:
    """``recording_weights`` over the attention modules of ``layers``, or nothing when disabled.

    Models write ``with recording_attentions(self.layers, output_attentions) as attentions:``
    around their layer loop; the list holds one (B, H, T, S) tensor per module when enabled,
    and stays empty otherwise.

    Args:
        layers: a stack of layers (an ``nn.ModuleList``).
        enabled: whether to record (a forward's ``output_attentions``).
        name: as in ``attention_modules``: e.g. ``"self_attn"`` or ``"cross_attn"``.
    """
    return recording_weights(attention_modules(layers, name) if enabled else [], enabled)


@torch.no_grad()
def init_normal_(model: nn.Module, std: float = 0.02) -> None:
    """GPT-2's initialisation, which the decoder families share: every linear and embedding
    weight from normal(0, std²), linear biases 0, norm gains 1 and shifts 0.

    Modules are visited in registration order; a matrix tied to another is drawn again where it
    appears the second time, and keeps that draw.
    """
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, LayerNorm):
            m.reset_parameters()  # gain 1, shift 0
        elif isinstance(m, RMSNorm):
            nn.init.ones_(m.weight)


def decoder_lm_output(
    logits: Tensor,
    loss: Tensor | None,
    last_hidden_state: Tensor,
    layer_inputs: list[Tensor],
    attentions: list[Tensor],
    *,
    output_hidden_states: bool,
    output_attentions: bool,
) -> ModelOutput:
    """A decoder-only model's ``ModelOutput``, recorded fields only where asked for.

    Args:
        logits: (B, T, V); loss: a scalar, or None without labels.
        last_hidden_state: the output of the final norm (B, T, D).
        layer_inputs: the input of every layer, L x (B, T, D), kept when
            ``output_hidden_states``; ``hidden_states`` adds ``last_hidden_state`` after them (the
            last layer's output after the final norm, as transformers reports it).
        attentions: from ``recording_attentions``, L x (B, H, T, S).
    """
    return ModelOutput(
        logits=logits,
        loss=loss,
        last_hidden_state=last_hidden_state,
        hidden_states=(*layer_inputs, last_hidden_state) if output_hidden_states else None,
        attentions=tuple(attentions) if output_attentions else None,
    )


class DecoderLMConfig(Protocol):
    """What ``DecoderLM`` reads from a family's config."""

    @property
    def max_seq_len(self) -> int: ...


class DecoderLM(QkvModel):
    """What the decoder-only language models (GPT, LLaMA, prefix-LM) share around their layers.

    A family registers its decoder layers as ``layers`` and a ``max_seq_len`` in its config;
    this class gives it the key/value cache that its ``forward(..., cache=)`` takes.
    """

    config: DecoderLMConfig
    layers: nn.ModuleList

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


EncoderDecoderCaches = list[tuple[KVCache, KVCache]]  # per decoder layer: (self, cross)
Weights = tuple[list[Tensor], list[Tensor], list[Tensor]]  # encoder, decoder, cross-attention


class EncoderDecoderLMConfig(Protocol):
    """What ``EncoderDecoderLM`` reads from a family's config (and ``max_seq_len``, if any)."""

    @property
    def decoder_start_token_id(self) -> int: ...

    @property
    def pad_token_id(self) -> int: ...


class EncoderDecoderLM(QkvModel):
    """What the encoder-decoders (Transformer, T5, BART) share around their two stacks.

    A family writes its own ``_encoder_states`` (the embedded source and every encoder layer's
    output, L + 1 x (B, S, D)), ``_decoder_states`` (the same for the target, attending to the
    memory, (B, T, D) each), ``_stacks`` (its two ``nn.ModuleList`` of layers) and, if its
    output layer is more than ``lm_head``, ``_logits``; and its ``forward``. Its config has
    ``decoder_start_token_id`` and ``pad_token_id``. This class turns those into teacher
    forcing (``shift_right``), ``encode`` / ``decode`` with key/value caches (``new_caches``),
    and the ``ModelOutput`` of ``forward``.
    """

    config: EncoderDecoderLMConfig
    lm_head: nn.Linear

    def _encoder_states(self, input_ids: Tensor, attention_mask: Tensor | None) -> list[Tensor]:
        raise NotImplementedError

    def _decoder_states(
        self,
        decoder_input_ids: Tensor,
        memory: Tensor,
        attention_mask: Tensor | None,
        decoder_attention_mask: Tensor | None,
        caches: EncoderDecoderCaches | None,
    ) -> list[Tensor]:
        raise NotImplementedError

    def _stacks(self) -> tuple[nn.ModuleList, nn.ModuleList]:
        """The encoder's layers and the decoder's layers."""
        raise NotImplementedError

    def _logits(self, hidden: Tensor) -> Tensor:
        """Next-token scores (B, T, V) from the decoder's last hidden states (B, T, D)."""
        return self.lm_head(hidden)  # (B, T, V)

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
        return self._encoder_states(input_ids, attention_mask)[-1]

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
        states = self._decoder_states(
            decoder_input_ids, memory, attention_mask, decoder_attention_mask, caches
        )
        return self._logits(states[-1])  # (B, T, V)

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

    def _decoder_inputs(self, decoder_input_ids: Tensor | None, labels: Tensor | None) -> Tensor:
        """``decoder_input_ids`` as given, or else ``shift_right(labels)``."""
        if decoder_input_ids is not None:
            return decoder_input_ids
        if labels is None:
            raise ValueError("pass decoder_input_ids, or labels to shift right into them")
        return self.shift_right(labels)  # (B, T)

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

    def _output(
        self,
        logits: Tensor,
        loss: Tensor | None,
        encoder_states: list[Tensor],
        decoder_states: list[Tensor],
        weights: Weights,
        *,
        output_hidden_states: bool,
        output_attentions: bool,
    ) -> ModelOutput:
        """``forward``'s ``ModelOutput``: the decoder's fields, the encoder's ``encoder_*``
        fields, and the recorded ones only where asked for."""
        enc_weights, dec_weights, cross_weights = weights
        hidden, on = output_hidden_states, output_attentions
        return ModelOutput(
            logits=logits,
            loss=loss,
            last_hidden_state=decoder_states[-1],
            hidden_states=tuple(decoder_states) if hidden else None,
            attentions=tuple(dec_weights) if on else None,
            cross_attentions=tuple(cross_weights) if on else None,
            encoder_last_hidden_state=encoder_states[-1],
            encoder_hidden_states=tuple(encoder_states) if hidden else None,
            encoder_attentions=tuple(enc_weights) if on else None,
        )
