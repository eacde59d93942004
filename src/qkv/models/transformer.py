"""The original Transformer: an encoder reads the source, a decoder writes the target.

    memory = Encoder(Emb(x) · sqrt(D) + PE)
    P(y_t | y_<t, x) = softmax(Decoder(Emb(y_<t) · sqrt(D) + PE, memory) Emb^T)

Vaswani et al., "Attention Is All You Need", 2017 (arXiv:1706.03762), sections 3 and 5.

Built for translation. The encoder's post-norm layers (self-attention, then a ReLU feed-forward
network, each followed by Add & Norm) read the source; their output, the "memory", is read by
every decoder layer through cross-attention. The decoder's self-attention is causal, so the
whole target trains in one pass ("teacher forcing"). Section 3.4: embeddings are multiplied by
sqrt(D), and the pre-softmax projection shares its matrix with the target embedding (with one
shared vocabulary, the source embedding too). Section 3.5: sinusoidal positions. Section 5.4:
dropout on each sublayer's output and on embeddings + positions; label smoothing 0.1::

    source --Emb·√D + PE--> N x [self-attn, FFN] -------------------------> memory
                                                                              |
    target --Emb·√D + PE--> N x [causal self-attn, cross-attn, FFN] <---------+ --> Emb^T

Shape legend: B batch · S source positions · T target positions · D model width · H heads ·
F MLP hidden width · V vocabulary · L layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from qkv.attention import masks
from qkv.attention.kv_cache import KVCache
from qkv.attention.multihead import recording_weights
from qkv.blocks import DecoderLayer, EncoderLayer
from qkv.models.base import ModelOutput, QkvModel
from qkv.models.common import (
    IGNORE_INDEX,
    attention_modules,
    check_attention_mask,
    default_position_ids,
    new_kv_caches,
    past_length,
    shift_right,
)
from qkv.positional import SinusoidalPositionalEncoding

__all__ = ["PRESETS", "Transformer", "TransformerConfig"]


# --8<-- [start:config]
@dataclass(frozen=True, kw_only=True)
class TransformerConfig:
    """Sizes and switches of the 2017 encoder-decoder Transformer (defaults: the base model)."""

    src_vocab_size: int = 37_000
    tgt_vocab_size: int = 37_000
    d_model: int = 512
    n_encoder_layers: int = 6
    n_decoder_layers: int = 6
    n_heads: int = 8
    d_ff: int = 2048
    dropout: float = 0.1  # P_drop
    max_seq_len: int = 1024  # rows of the sinusoidal table
    share_embeddings: bool = True  # one matrix for source and target tokens (equal vocabularies)
    tie_output: bool = True  # the output projection is the target embedding (section 3.4)
    label_smoothing: float = 0.1  # epsilon_ls of section 5.4
    norm_eps: float = 1e-5
    pad_token_id: int = 0
    decoder_start_token_id: int = 1  # BOS: the decoder's first input
    eos_token_id: int = 2
    attn_impl: str = "auto"

    def __post_init__(self) -> None:
        for name in ("src_vocab_size", "tgt_vocab_size", "n_encoder_layers", "n_decoder_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.share_embeddings and self.src_vocab_size != self.tgt_vocab_size:
            raise ValueError(
                f"share_embeddings=True needs one vocabulary, got src_vocab_size="
                f"{self.src_vocab_size} and tgt_vocab_size={self.tgt_vocab_size}; make them "
                "equal or set share_embeddings=False"
            )
        if self.n_heads < 1 or self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.d_model % 2:
            raise ValueError(f"d_model={self.d_model} must be even for sinusoidal positions")
        for name in ("dropout", "label_smoothing"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("pad_token_id", "decoder_start_token_id", "eos_token_id"):
            if not 0 <= getattr(self, name) < self.tgt_vocab_size:
                raise ValueError(
                    f"{name}={getattr(self, name)} is outside the target vocabulary "
                    f"[0, {self.tgt_vocab_size})"
                )


PRESETS: dict[str, TransformerConfig] = {
    # Vaswani et al. 2017, Table 3, "base": 65M parameters. The paper's EN-DE vocabulary, a
    # shared BPE of about 37,000 tokens, gives 63,082,496 here, and no single vocabulary size
    # gives both published counts (base and big), so each preset takes the round size that
    # reproduces its own: 40,000 tokens, 64,618,496 parameters (65M when rounded).
    "transformer-base": TransformerConfig(src_vocab_size=40_000, tgt_vocab_size=40_000),
    # Table 3, "big": 213M parameters, P_drop = 0.3 (EN-DE). The paper's 37,000 tokens give
    # 214,245,376; 36,000 tokens give 213,221,376 (213M when rounded).
    "transformer-big": TransformerConfig(
        src_vocab_size=36_000, tgt_vocab_size=36_000, d_model=1024, n_heads=16, d_ff=4096,
        dropout=0.3,
    ),
    # Smoke tests: 2 + 2 layers of width 32, a 64-token vocabulary.
    "tiny": TransformerConfig(
        src_vocab_size=64, tgt_vocab_size=64, d_model=32, n_encoder_layers=2,
        n_decoder_layers=2, n_heads=4, d_ff=64, max_seq_len=64,
    ),
}  # fmt: skip


# --8<-- [end:config]

Caches = list[tuple[KVCache, KVCache]]  # per decoder layer: (self-attention, cross-attention)
Layer = TypeVar("Layer", EncoderLayer, DecoderLayer)


def _layer(kind: type[Layer], c: TransformerConfig) -> Layer:
    """One layer of the paper: post-norm (Add & Norm after each sublayer, Figure 1), ReLU."""
    return kind(
        c.d_model, c.n_heads, c.d_ff, dropout=c.dropout, activation="relu", norm_eps=c.norm_eps,
        norm_first=False, attn_impl=c.attn_impl,
    )  # fmt: skip


class Transformer(QkvModel):
    """The encoder-decoder Transformer of "Attention Is All You Need" (post-norm, ReLU).

    Initialisation follows tensor2tensor, the paper's code: embeddings from normal(0, 1/D), so
    that after the sqrt(D) scaling they have unit variance like the positions; every other
    matrix Xavier-uniform (as ``torch.nn.Transformer``), biases 0, LayerNorms 1 and 0.

    Args:
        config: a ``TransformerConfig``.

    Example:
        >>> import torch
        >>> model = Transformer(PRESETS["tiny"])
        >>> src, tgt = torch.randint(3, 64, (2, 7)), torch.randint(3, 64, (2, 5))
        >>> out = model(src, labels=tgt)  # decoder inputs: the labels shifted right
        >>> out.logits.shape, out.loss.shape
        (torch.Size([2, 5, 64]), torch.Size([]))
    """

    family = "transformer"
    config_class = TransformerConfig
    config: TransformerConfig

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config)
        c = config
        self.src_emb = nn.Embedding(c.src_vocab_size, c.d_model)  # (V, D)
        self.tgt_emb = self.src_emb
        if not c.share_embeddings:
            self.tgt_emb = nn.Embedding(c.tgt_vocab_size, c.d_model)  # (V, D)
        self.pos_enc = SinusoidalPositionalEncoding(c.d_model, c.max_seq_len)
        self.dropout = nn.Dropout(c.dropout)
        self.encoder = nn.ModuleList(_layer(EncoderLayer, c) for _ in range(c.n_encoder_layers))
        self.decoder = nn.ModuleList(_layer(DecoderLayer, c) for _ in range(c.n_decoder_layers))
        self.lm_head = nn.Linear(c.d_model, c.tgt_vocab_size, bias=False)  # (V, D)
        for name, p in self.named_parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
            elif not name.endswith("norm.weight"):
                nn.init.zeros_(p)
        for emb in (self.src_emb, self.tgt_emb):
            nn.init.normal_(emb.weight, std=c.d_model**-0.5)
        if c.tie_output:
            self.lm_head.weight = self.tgt_emb.weight  # one (V, D) matrix, two roles

    def _embed(self, emb: nn.Embedding, ids: Tensor, positions: Tensor, past: int = 0) -> Tensor:
        """Token embeddings times sqrt(D), plus the encodings of ``positions`` (T,) or (B, T)."""
        if past + ids.shape[1] > self.config.max_seq_len:
            raise ValueError(
                f"{past + ids.shape[1]} positions exceed max_seq_len={self.config.max_seq_len}, "
                "the rows of the sinusoidal table; raise max_seq_len or pass a shorter input"
            )
        x = emb(ids) * math.sqrt(self.config.d_model)  # (B, T, D)
        return self.dropout(x + self.pos_enc(positions).to(x.dtype))  # (B, T, D)

    def _encoder_states(self, input_ids: Tensor, attention_mask: Tensor | None) -> list[Tensor]:
        """The embedded source and every encoder layer's output, each (B, S, D)."""
        keep = None if attention_mask is None else masks.padding(attention_mask)  # (B, 1, 1, S)
        # Positions count real tokens, so a left-padded source reads as it would alone.
        s, device = input_ids.shape[1], input_ids.device
        positions = default_position_ids(attention_mask, s, device=device)  # (B, S) or (S,)
        x = self._embed(self.src_emb, input_ids, positions)  # (B, S, D)
        states = [x]
        for layer in self.encoder:
            x = layer(x, mask=keep)  # (B, S, D)
            states.append(x)
        return states

    def _decoder_states(
        self,
        decoder_input_ids: Tensor,
        memory: Tensor,
        attention_mask: Tensor | None,
        decoder_attention_mask: Tensor | None,
        caches: Caches | None,
    ) -> list[Tensor]:
        """The embedded target and every decoder layer's output, each (B, T, D)."""
        t, device = decoder_input_ids.shape[1], decoder_input_ids.device
        past = past_length(caches, len(self.decoder))  # positions go on from the cache's length
        check_attention_mask(decoder_attention_mask, past + t, "decoder_attention_mask")
        memory_keep = None if attention_mask is None else masks.padding(attention_mask)
        self_keep = None  # padding of the target, (B, 1, 1, past + T); causal is added below
        if decoder_attention_mask is not None:
            self_keep = masks.padding(decoder_attention_mask)
        positions = torch.arange(past, past + t, device=device)  # (T,)
        x = self._embed(self.tgt_emb, decoder_input_ids, positions, past)  # (B, T, D)
        states = [x]
        for i, layer in enumerate(self.decoder):
            cache, cross_cache = caches[i] if caches is not None else (None, None)
            x = layer(
                x, memory, self_mask=self_keep, memory_mask=memory_keep, causal=True,
                cache=cache, cross_cache=cross_cache,
            )  # fmt: skip
            states.append(x)  # (B, T, D)
        return states

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Read the source tokens (B, S) once: the memory (B, S, D) every step attends to.

        ``attention_mask`` (B, S): 1 = real token, 0 = padding, on either side (positions count
        real tokens only).
        """
        return self._encoder_states(input_ids, attention_mask)[-1]

    def decode(
        self,
        decoder_input_ids: Tensor,
        memory: Tensor,
        *,
        attention_mask: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        caches: Caches | None = None,
    ) -> Tensor:
        """Next-token scores for the target positions given, attending to ``memory``.

        Args:
            decoder_input_ids: target tokens (B, T), starting with ``decoder_start_token_id``;
                with ``caches``, only the new tokens of this step.
            memory: ``encode``'s output (B, S, D).
            attention_mask: the source's (B, S), 1 = real token, 0 = padding.
            decoder_attention_mask: (B, past + T) or None; 1 = real token. Decoder positions
                go on from the cache's length, so decoder inputs are not left-padded.
            caches: from ``new_caches``; the new keys and values are appended, and the
                memory's keys and values are computed once, at the first step (pass the same
                ``memory`` and ``attention_mask`` at every step).

        Returns:
            logits (B, T, V).
        """
        states = self._decoder_states(
            decoder_input_ids, memory, attention_mask, decoder_attention_mask, caches
        )
        return self.lm_head(states[-1])  # (B, T, V)

    def new_caches(self, batch_size: int = 1, max_len: int | None = None) -> Caches:
        """Empty key/value caches for ``decode``: (self-attention, cross-attention) per layer.

        ``max_len``: None for dynamic self-attention caches, else static ones with room for
        ``max_len`` decoder positions (at most ``max_seq_len``) and ``batch_size`` rows. The
        cross-attention caches are dynamic: ``decode`` fills them once from the memory.
        """
        c = self.config
        self_caches = new_kv_caches(
            c.n_decoder_layers, batch_size, max_len, n_kv_heads=c.n_heads,
            head_dim=c.d_model // c.n_heads, max_seq_len=c.max_seq_len, dtype=self.dtype,
            device=self.device,
        )  # fmt: skip
        return [(kv, KVCache()) for kv in self_caches]

    def shift_right(self, labels: Tensor) -> Tensor:
        """Teacher forcing's inputs: ``decoder_start_token_id``, then labels[:, :-1] (B, T).

        Ignored labels (-100) become ``pad_token_id``.
        """
        c = self.config
        return shift_right(labels, c.decoder_start_token_id, c.pad_token_id)  # (B, T)

    # --8<-- [start:forward]
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
                -100 marks positions to ignore (padding).
            output_hidden_states: also return the embeddings and every layer's output.
            output_attentions: also return every layer's attention weights (B, H, T, S).

        Returns:
            ``ModelOutput`` with ``logits`` (B, T, V), ``loss`` (label-smoothed cross-entropy)
            with labels, ``last_hidden_state`` (B, T, D), the decoder's ``hidden_states`` and
            ``attentions``, the encoder's ``encoder_*``, and ``cross_attentions``.
        """
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("pass decoder_input_ids, or labels to shift right into them")
            decoder_input_ids = self.shift_right(labels)
        on = output_attentions
        with (
            recording_weights(attention_modules(self.encoder) if on else [], on) as enc_weights,
            recording_weights(
                attention_modules(self.decoder, "self_attn") if on else [], on
            ) as dec_weights,
            recording_weights(
                attention_modules(self.decoder, "cross_attn") if on else [], on
            ) as cross_weights,
        ):
            enc = self._encoder_states(input_ids, attention_mask)
            states = self._decoder_states(
                decoder_input_ids, enc[-1], attention_mask, decoder_attention_mask, None
            )
        logits = self.lm_head(states[-1])  # (B, T, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                label_smoothing=self.config.label_smoothing,
            )  # fmt: skip
        hidden = output_hidden_states
        return ModelOutput(
            logits=logits,
            loss=loss,
            last_hidden_state=states[-1],
            hidden_states=tuple(states) if hidden else None,
            attentions=tuple(dec_weights) if on else None,
            encoder_last_hidden_state=enc[-1],
            encoder_hidden_states=tuple(enc) if hidden else None,
            encoder_attentions=tuple(enc_weights) if on else None,
            cross_attentions=tuple(cross_weights) if on else None,
        )

    # --8<-- [end:forward]
