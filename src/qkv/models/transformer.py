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

import torch
from torch import Tensor, nn

from qkv.blocks import DecoderLayer, EncoderLayer, LayerSpec
from qkv.blocks.moe import Experts
from qkv.models import checks
from qkv.models.common import default_position_ids, seq2seq_loss
from qkv.models.lm import DecoderContext, EncoderDecoderLM, decoder_stack, encoder_stack
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
    # A mixture of experts in place of every layer's feed-forward network, each expert of the
    # network's shape: qkv.blocks.moe.Experts, or a dict of its fields ({"n_experts": 4,
    # "top_k": 2}); None: dense. See docs/learn/13-cheaper-models.md.
    experts: Experts | None = None

    def __post_init__(self) -> None:
        checks.require_experts(self)
        sizes = ("src_vocab_size", "tgt_vocab_size", "d_model", "n_heads", "d_ff", "max_seq_len")
        checks.require_positive(self, *sizes, "n_encoder_layers", "n_decoder_layers")
        if self.share_embeddings and self.src_vocab_size != self.tgt_vocab_size:
            raise ValueError(
                f"share_embeddings=True needs one vocabulary, got src_vocab_size="
                f"{self.src_vocab_size} and tgt_vocab_size={self.tgt_vocab_size}; make them "
                "equal or set share_embeddings=False"
            )
        checks.require_divisible(self, "d_model", "n_heads")
        if self.d_model % 2:
            raise ValueError(f"d_model={self.d_model} must be even for sinusoidal positions")
        checks.require_rate(self, "dropout", "label_smoothing")
        checks.require_eps(self)
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


def _layer_spec(c: TransformerConfig) -> LayerSpec:
    """Every layer of the paper: post-norm (Add & Norm after each sublayer, Figure 1), ReLU."""
    return LayerSpec(
        d_model=c.d_model, n_heads=c.n_heads, d_ff=c.d_ff, dropout=c.dropout, activation="relu",
        norm_eps=c.norm_eps, norm_first=False, attn_impl=c.attn_impl, experts=c.experts,
    )  # fmt: skip


class Transformer(EncoderDecoderLM[TransformerConfig]):
    """The encoder-decoder Transformer of "Attention Is All You Need" (post-norm, ReLU).

    Initialisation follows tensor2tensor, the paper's code: embeddings from normal(0, 1/D), so
    that after the sqrt(D) scaling they have unit variance like the positions; every other
    matrix Xavier-uniform (as ``torch.nn.Transformer``), biases 0, LayerNorms 1 and 0.

    ``forward``, ``shift_right``, ``encode``, ``decode`` and ``new_caches`` come from
    ``EncoderDecoderLM``; this class says how each stack embeds its tokens and which loss trains it.

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

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config)
        c = config
        self.src_emb = nn.Embedding(c.src_vocab_size, c.d_model)  # (V, D)
        self.tgt_emb = self.src_emb
        if not c.share_embeddings:
            self.tgt_emb = nn.Embedding(c.tgt_vocab_size, c.d_model)  # (V, D)
        self.pos_enc = SinusoidalPositionalEncoding(c.d_model, c.max_seq_len)
        self.dropout = nn.Dropout(c.dropout)
        spec = _layer_spec(c)
        self.encoder = nn.ModuleList(EncoderLayer(spec) for _ in range(c.n_encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(spec) for _ in range(c.n_decoder_layers))
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

    # --8<-- [start:embed]
    def _embed(self, emb: nn.Embedding, ids: Tensor, positions: Tensor, past: int = 0) -> Tensor:
        """Token embeddings times sqrt(D), plus the encodings of ``positions`` (T,) or (B, T)."""
        if past + ids.shape[1] > self.config.max_seq_len:
            raise ValueError(
                f"{past + ids.shape[1]} positions exceed max_seq_len={self.config.max_seq_len}, "
                "the rows of the sinusoidal table; raise max_seq_len or pass a shorter input"
            )
        x = emb(ids) * math.sqrt(self.config.d_model)  # (B, T, D)
        return self.dropout(x + self.pos_enc(positions).to(x.dtype))  # (B, T, D)

    # --8<-- [end:embed]

    # --8<-- [start:forward]
    # forward (``EncoderDecoderLM``): the source through _encoder_states, the memory it returns
    # into _decoder_states with the target shifted right (teacher forcing), lm_head, _loss.
    def _encoder_states(self, input_ids: Tensor, attention_mask: Tensor | None) -> list[Tensor]:
        """The embedded source and every encoder layer's output, each (B, S, D)."""
        # Positions count real tokens, so a left-padded source reads as it would alone.
        s, device = input_ids.shape[1], input_ids.device
        positions = default_position_ids(attention_mask, s, device=device)  # (B, S) or (S,)
        x = self._embed(self.src_emb, input_ids, positions)  # (B, S, D)
        return encoder_stack(self.encoder, x, attention_mask)  # padding hidden, L + 1 x (B, S, D)

    def _decoder_states(self, decoder_input_ids: Tensor, ctx: DecoderContext) -> list[Tensor]:
        """The embedded target and every decoder layer's output, each (B, T, D)."""
        t, device = decoder_input_ids.shape[1], decoder_input_ids.device
        positions = torch.arange(ctx.past, ctx.past + t, device=device)  # (T,), after the cache
        x = self._embed(self.tgt_emb, decoder_input_ids, positions, ctx.past)  # (B, T, D)
        return decoder_stack(self.decoder, x, ctx)  # causal, cross-attending, L + 1 x (B, T, D)

    def _stacks(self) -> tuple[nn.ModuleList, nn.ModuleList]:
        return self.encoder, self.decoder

    def _loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Section 5.4: cross-entropy with label smoothing (epsilon_ls = 0.1 in the paper)."""
        return seq2seq_loss(logits, labels, label_smoothing=self.config.label_smoothing)

    # --8<-- [end:forward]
