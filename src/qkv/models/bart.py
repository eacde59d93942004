"""BART and Marian: a post-norm encoder-decoder that turns one text into another.

    memory   = Encoder(Embed(x))                          bidirectional over the source x
    h_t      = Decoder(Embed(y_<t), memory)               causal, plus cross-attention to memory
    p(y_t)   = softmax(h_t E^T + b)                       E the shared token embedding

Lewis et al., "BART: Denoising Sequence-to-Sequence Pre-training for Natural Language
Generation, Translation, and Comprehension", 2019 (arXiv:1910.13461).
Junczys-Dowmunt et al., "Marian: Fast Neural Machine Translation in C++", 2018 (arXiv:1804.00344).

Both are the 2017 Transformer (post-norm layers, arXiv:1706.03762): the encoder reads the whole
source, the decoder writes the target one token at a time. BART is pre-trained to restore
corrupted text (a denoising autoencoder), Marian's OPUS-MT models to translate; the network is
the same. One token table E serves the
encoder's input, the decoder's input and, transposed, the output layer (weight tying), which
adds a fixed per-token bias ``final_logits_bias`` (zero unless a checkpoint sets it).

They differ only in how tokens enter the stacks, a few config switches::

                      BART (positions="learned")        Marian (positions="sinusoidal")
    token embedding   E[x]                              E[x] * sqrt(D)   (scale_embedding)
    positions         learned table, row t + 2          fixed sin/cos table, row t
    embedding norm    LayerNorm (layernorm_embedding)   none
    activation        GELU                              SiLU, called "swish"

BART's learned table has two extra rows, 0 and 1, that no position reads: fairseq counted
positions from ``pad_token_id + 1 = 2``, and the checkpoints keep that offset
(``LearnedPositionalEmbedding(..., offset=2)``). Marian's sinusoids are those of the 2017 paper
with the columns regrouped: all the sines first, then all the cosines, where the paper
interleaves sin, cos, sin, cos (``qkv.positional.sinusoidal_table(..., interleaved=False)``).

Shape legend: B batch · T target positions · S source positions · D model width · H heads ·
F MLP hidden width · V vocabulary · L layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from qkv.blocks import ActivationName, DecoderLayer, EncoderLayer, LayerSpec
from qkv.blocks.moe import Experts
from qkv.models import checks
from qkv.models.common import default_position_ids
from qkv.models.lm import DecoderContext, EncoderDecoderLM, decoder_stack, encoder_stack
from qkv.positional import LearnedPositionalEmbedding, SinusoidalPositionalEncoding

__all__ = ["PRESETS", "Bart", "BartConfig"]


# --8<-- [start:config]
@dataclass(frozen=True, kw_only=True)
class BartConfig:
    """Sizes and switches of a BART- or Marian-style encoder-decoder (see the module docstring)."""

    vocab_size: int
    d_model: int = 768
    n_encoder_layers: int = 6
    n_decoder_layers: int = 6
    n_heads: int = 12
    d_ff: int = 3072
    max_seq_len: int = 1024  # positions per sequence, in the encoder and in the decoder
    positions: Literal["learned", "sinusoidal"] = "learned"  # BART / Marian
    scale_embedding: bool = False  # multiply token embeddings by sqrt(D) (Marian)
    layernorm_embedding: bool = True  # LayerNorm after token + position embeddings (BART)
    activation: ActivationName = "gelu"
    dropout: float = 0.1  # embeddings and residual branches
    attention_dropout: float = 0.0  # attention weights
    activation_dropout: float = 0.0  # feed-forward hidden activations
    init_std: float = 0.02  # weights ~ N(0, init_std²), biases 0, as in fairseq and HF
    pad_token_id: int = 1
    bos_token_id: int | None = 0
    eos_token_id: int = 2
    decoder_start_token_id: int = 2  # the first decoder input; labels shift right behind it
    attn_impl: str = "auto"
    # A mixture of experts in place of every layer's feed-forward network, each expert of the
    # network's shape: qkv.blocks.moe.Experts, or a dict of its fields ({"n_experts": 4,
    # "top_k": 2}); None: dense. See docs/learn/13-cheaper-models.md.
    experts: Experts | None = None

    def __post_init__(self) -> None:
        checks.require_experts(self)
        sizes = ("vocab_size", "d_model", "n_encoder_layers", "n_decoder_layers", "n_heads", "d_ff")
        checks.require_positive(self, *sizes, "max_seq_len")
        advice = "each head gets d_model / n_heads dimensions"
        checks.require_divisible(self, "d_model", "n_heads", advice=advice)
        if self.positions not in ("learned", "sinusoidal"):
            raise ValueError(f"positions must be 'learned' or 'sinusoidal', got {self.positions!r}")
        if self.positions == "sinusoidal" and self.d_model % 2:
            raise ValueError(f"sinusoidal positions need an even d_model, got {self.d_model}")
        checks.require_activation(self)
        checks.require_rate(self, "dropout", "attention_dropout", "activation_dropout")
        tokens = ("pad_token_id", "eos_token_id", "decoder_start_token_id", "bos_token_id")
        checks.require_token_ids(self, *tokens, vocab_size=self.vocab_size)


# Counts are Hugging Face's num_parameters() for the matching config (tied tensors once).
PRESETS: dict[str, BartConfig] = {
    # Lewis et al. 2019 (arXiv:1910.13461) section 2.1, facebook/bart-base: 139,420,416
    # (fairseq's README: "140M").
    "bart-base": BartConfig(
        vocab_size=50265, d_model=768, n_encoder_layers=6, n_decoder_layers=6, n_heads=12,
        d_ff=3072, dropout=0.1, attention_dropout=0.1, activation_dropout=0.1,
    ),
    # Lewis et al. 2019 section 2.1, facebook/bart-large: 406,291,456 (fairseq: "400M").
    "bart-large": BartConfig(
        vocab_size=50265, d_model=1024, n_encoder_layers=12, n_decoder_layers=12, n_heads=16,
        d_ff=4096, dropout=0.1, attention_dropout=0.1, activation_dropout=0.1,
    ),
    # Junczys-Dowmunt et al. 2018 (arXiv:1804.00344), transformer-base as trained by OPUS-MT,
    # Helsinki-NLP/opus-mt-en-de: 73,886,208. Hugging Face reports 74,410,496: it also counts
    # its two fixed 512 x 512 sinusoid tables as (frozen) parameters; qkv keeps them as buffers.
    "marian-en-de": BartConfig(
        vocab_size=58101, d_model=512, n_encoder_layers=6, n_decoder_layers=6, n_heads=8,
        d_ff=2048, max_seq_len=512, positions="sinusoidal", scale_embedding=True,
        layernorm_embedding=False, activation="silu", pad_token_id=58100, bos_token_id=None,
        eos_token_id=0, decoder_start_token_id=58100,
    ),
    # Smoke tests: 2 + 2 layers, width 32.
    "tiny": BartConfig(
        vocab_size=96, d_model=32, n_encoder_layers=2, n_decoder_layers=2, n_heads=4, d_ff=64,
        max_seq_len=64,
    ),
    "tiny-marian": BartConfig(
        vocab_size=96, d_model=32, n_encoder_layers=2, n_decoder_layers=2, n_heads=4, d_ff=64,
        max_seq_len=64, positions="sinusoidal", scale_embedding=True, layernorm_embedding=False,
        activation="silu", pad_token_id=95, bos_token_id=None, eos_token_id=0,
        decoder_start_token_id=95,
    ),
}  # fmt: skip


# --8<-- [end:config]


def _positions(c: BartConfig) -> LearnedPositionalEmbedding | SinusoidalPositionalEncoding:
    """BART: learned, position t at row t + 2 (fairseq's offset); Marian: sinusoids in halves."""
    if c.positions == "learned":
        return LearnedPositionalEmbedding(c.max_seq_len, c.d_model, offset=2)  # (max_len + 2, D)
    return SinusoidalPositionalEncoding(c.d_model, c.max_seq_len, interleaved=False)  # a buffer


class Bart(EncoderDecoderLM[BartConfig]):
    """BART / Marian for text-to-text: a post-norm encoder-decoder with a tied output layer.

    ``forward``, ``shift_right``, ``encode``, ``decode`` and ``new_caches`` come from
    ``EncoderDecoderLM``; this class says how each stack embeds its tokens, and adds
    ``final_logits_bias`` to the output layer.

    Example:
        >>> import torch
        >>> model = Bart(PRESETS["tiny"])
        >>> src, tgt = torch.randint(3, 96, (2, 7)), torch.randint(3, 96, (2, 5))
        >>> out = model(src, torch.ones(2, 7, dtype=torch.long), labels=tgt)
        >>> out.logits.shape, out.loss.shape
        (torch.Size([2, 5, 96]), torch.Size([]))
    """

    family = "bart"
    final_logits_bias: Tensor

    def __init__(self, config: BartConfig) -> None:
        super().__init__(config)
        c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model, padding_idx=c.pad_token_id)
        self.embed_scale = math.sqrt(c.d_model) if c.scale_embedding else 1.0
        self.enc_pos = _positions(c)
        self.dec_pos = _positions(c)
        self.enc_emb_norm = nn.LayerNorm(c.d_model) if c.layernorm_embedding else nn.Identity()
        self.dec_emb_norm = nn.LayerNorm(c.d_model) if c.layernorm_embedding else nn.Identity()
        self.emb_dropout = nn.Dropout(c.dropout)
        spec = LayerSpec(
            d_model=c.d_model, n_heads=c.n_heads, d_ff=c.d_ff, dropout=c.dropout,
            attention_dropout=c.attention_dropout, activation_dropout=c.activation_dropout,
            activation=c.activation, norm_first=False, attn_impl=c.attn_impl, experts=c.experts,
        )  # fmt: skip
        self.encoder = nn.ModuleList(EncoderLayer(spec) for _ in range(c.n_encoder_layers))
        self.decoder = nn.ModuleList(
            DecoderLayer(spec, cross_attention=True) for _ in range(c.n_decoder_layers)
        )
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # tied: one tensor, (V, D)
        self.register_buffer("final_logits_bias", torch.zeros(c.vocab_size))  # (V,)
        self._init_weights()

    def _init_weights(self) -> None:
        """N(0, init_std²) for linear and embedding weights, zero biases and padding row."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)) and m is not self.lm_head:
                nn.init.normal_(m.weight, std=self.config.init_std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.tok_emb.weight[self.config.pad_token_id].zero_()

    def _embed(
        self, ids: Tensor, positions: nn.Module, norm: nn.Module, position_ids: Tensor, past: int
    ) -> Tensor:
        if past + ids.shape[1] > self.config.max_seq_len:
            raise ValueError(
                f"{past + ids.shape[1]} positions exceed max_seq_len={self.config.max_seq_len}"
            )
        x = self.tok_emb(ids) * self.embed_scale + positions(position_ids)  # (B, T, D)
        return self.emb_dropout(norm(x))  # (B, T, D)

    # --8<-- [start:forward]
    # forward (``EncoderDecoderLM``): the source through _encoder_states, the memory it returns
    # into _decoder_states with the target shifted right, _logits, the cross-entropy loss.
    def _encoder_states(self, input_ids: Tensor, attention_mask: Tensor | None) -> list[Tensor]:
        """The embeddings' output and every encoder layer's output, L + 1 x (B, S, D)."""
        # Positions count real tokens, so a left-padded source reads as it would alone.
        s, device = input_ids.shape[1], input_ids.device
        position_ids = default_position_ids(attention_mask, s, device=device)  # (B, S) or (S,)
        x = self._embed(input_ids, self.enc_pos, self.enc_emb_norm, position_ids, 0)  # (B, S, D)
        return encoder_stack(self.encoder, x, attention_mask)

    def _decoder_states(self, decoder_input_ids: Tensor, ctx: DecoderContext) -> list[Tensor]:
        """The embeddings' output and every decoder layer's output, L + 1 x (B, T, D)."""
        t, device, past = decoder_input_ids.shape[1], decoder_input_ids.device, ctx.past
        position_ids = torch.arange(past, past + t, device=device)  # (T,)
        x = self._embed(decoder_input_ids, self.dec_pos, self.dec_emb_norm, position_ids, past)
        return decoder_stack(self.decoder, x, ctx)  # (B, T, D) each

    def _logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(hidden) + self.final_logits_bias  # (B, T, V): h E^T + b

    def _stacks(self) -> tuple[nn.ModuleList, nn.ModuleList]:
        return self.encoder, self.decoder

    # --8<-- [end:forward]
