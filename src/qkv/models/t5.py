"""T5: an encoder-decoder Transformer with relative position biases, trained text to text.

    encoder:  h = EncoderLayer^L(tok_emb(x)),  scores_ij = q_i · k_j + b_enc[h, bucket(j - i)]
    decoder:  causal self-attention (+ b_dec), cross-attention to the encoder's output, FFN
    logits:   lm_head(RMSNorm(h_dec) * D^-1/2)   (v1.0: tied output, hence the rescaling)

Raffel et al., "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer", 2020 (arXiv:1910.10683). T5 v1.1 swaps the ReLU feed-forward network for GeGLU
(Shazeer, "GLU Variants Improve Transformer", 2020, arXiv:2002.05202) and unties the output layer.

What T5 changes from the 2017 encoder-decoder:

* pre-norm layers with RMSNorm (no mean subtraction, no shift) and no bias in any linear layer;
* no absolute positions: each stack learns one scalar per head and bucket of offsets j - i,
  added to the scores; it is computed once per stack and shared by all of its layers;
* scores are not divided by sqrt(E): the initialisation of W_Q absorbs that factor;
* one token embedding for encoder and decoder (and, in v1.0, the output layer)::

    input_ids -> tok_emb -> dropout -> EncoderLayer x L -> RMSNorm -> dropout -> memory
                                         (+ b_enc)                              |
    decoder_input_ids -> tok_emb -> dropout -> DecoderLayer x L_dec -> RMSNorm -> dropout
                                     (+ b_dec, cross-attention to memory)      -> lm_head

Shape legend: B batch · T decoder positions · S encoder positions · D model width ·
H heads · E head dim (d_kv) · F MLP hidden width · V vocabulary · L layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from qkv.attention.multihead import MultiHeadAttention
from qkv.blocks import DecoderLayer, EncoderLayer, LayerSpec, RMSNorm
from qkv.blocks.moe import Experts
from qkv.models import checks
from qkv.models.lm import DecoderContext, EncoderDecoderLM, decoder_stack, encoder_stack
from qkv.positional import T5RelativeBias

__all__ = ["PRESETS", "T5", "T5Config"]


# --8<-- [start:config]
@dataclass(frozen=True, kw_only=True)
class T5Config:
    """Sizes and switches of a T5 encoder-decoder, v1.0 (ReLU, tied) or v1.1 (GeGLU, untied)."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64  # E: T5 sets the head width on its own, not as d_model / n_heads
    d_ff: int = 2048
    n_layers: int = 6  # encoder layers
    n_decoder_layers: int | None = None  # None: as many as the encoder
    n_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout: float = 0.1  # embeddings, attention weights, FFN hidden, residuals, final output
    norm_eps: float = 1e-6
    feed_forward: Literal["relu", "gated-gelu"] = "relu"  # "gated-gelu": v1.1's GeGLU (tanh)
    tie_embeddings: bool = True  # v1.0: lm_head shares tok_emb and the output is scaled D^-1/2
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0  # T5 starts decoding from the pad token
    attn_impl: str = "auto"
    # A mixture of experts in place of every layer's feed-forward network, each expert of the
    # network's shape: qkv.blocks.moe.Experts, or a dict of its fields ({"n_experts": 4,
    # "top_k": 2}); None: dense. See docs/learn/13-cheaper-models.md.
    experts: Experts | None = None

    def __post_init__(self) -> None:
        checks.require_experts(self)
        sizes = ("vocab_size", "d_model", "d_kv", "d_ff", "n_layers", "n_heads")
        checks.require_positive(self, *sizes, must_be="a positive integer")
        if self.n_decoder_layers is not None and self.n_decoder_layers < 1:
            raise ValueError(f"n_decoder_layers must be >= 1 or None, got {self.n_decoder_layers}")
        if self.feed_forward not in ("relu", "gated-gelu"):
            raise ValueError(f"feed_forward must be 'relu' (T5 v1.0) or 'gated-gelu' (T5 v1.1), "
                             f"got {self.feed_forward!r}")  # fmt: skip
        nb, far = self.relative_attention_num_buckets, self.relative_attention_max_distance
        if nb < 4 or far <= nb // 2:
            raise ValueError(
                "need relative_attention_num_buckets >= 4 and relative_attention_max_distance > "
                f"num_buckets // 2 (T5: 32 and 128), got {nb} and {far}"
            )
        checks.require_rate(self, "dropout")
        checks.require_eps(self)
        for name in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(f"{name}={getattr(self, name)} is not a token id of a "
                                 f"vocab_size={self.vocab_size} vocabulary")  # fmt: skip

    @property
    def head_dim(self) -> int:
        return self.d_kv

    @property
    def decoder_layers(self) -> int:
        """The number of decoder layers, n_decoder_layers or else n_layers."""
        return self.n_layers if self.n_decoder_layers is None else self.n_decoder_layers


PRESETS: dict[str, T5Config] = {
    # Raffel et al. 2020 (arXiv:1910.10683), section 3.7: "Small", about 60 million parameters;
    # exactly 60,506,624, as transformers counts google-t5/t5-small (tied embeddings).
    "t5-small": T5Config(d_model=512, d_kv=64, d_ff=2048, n_layers=6, n_heads=8),
    # Section 3.7 "Base", about 220 million; exactly 222,903,552 (google-t5/t5-base).
    "t5-base": T5Config(d_model=768, d_kv=64, d_ff=3072, n_layers=12, n_heads=12),
    # T5 v1.1 (google/t5-v1_1-small checkpoint config; the T5 repository's released_checkpoints):
    # GeGLU, untied output layer: 76,961,152 parameters with its own lm_head (32128 x 512), as
    # transformers counts the loaded checkpoint (its fresh v1.1 models tie lm_head: 60,511,616).
    "t5-v1_1-small": T5Config(d_model=512, d_kv=64, d_ff=1024, n_layers=8, n_heads=6,
                              feed_forward="gated-gelu", tie_embeddings=False),
    # google/t5-v1_1-base: 247,577,856 parameters, t5-base's 222,903,552 plus the untied lm_head.
    "t5-v1_1-base": T5Config(d_model=768, d_kv=64, d_ff=2048, n_layers=12, n_heads=12,
                             feed_forward="gated-gelu", tie_embeddings=False),
    # Smoke tests: 2 + 2 layers, width 32.
    "tiny": T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, n_layers=2, n_heads=4,
                     relative_attention_num_buckets=8, relative_attention_max_distance=16),
}  # fmt: skip


# --8<-- [end:config]


class T5(EncoderDecoderLM[T5Config]):
    """T5 (Raffel et al. 2020): encoder, decoder and language-model head.

    Initialised like Mesh TensorFlow's T5 (the original code): embeddings and an untied lm_head
    normal(0, 1); W_Q normal(0, (D E)^-1/2), which stands in for the missing 1/sqrt(E);
    W_K, W_V and the FFN input normal(0, D^-1/2); W_O normal(0, (H E)^-1/2); the FFN output
    normal(0, F^-1/2); the position biases normal(0, D^-1/2); norm gains 1.

    ``forward``, ``shift_right``, ``encode``, ``decode`` and ``new_caches`` come from
    ``EncoderDecoderLM``: ``forward`` runs ``encode``, then ``decode`` on the labels shifted right
    behind the start token (the padding token), and adds the cross-entropy loss.

    Example:
        >>> import torch
        >>> model = T5(PRESETS["tiny"]).eval()
        >>> ids, labels = torch.randint(2, 128, (2, 6)), torch.randint(2, 128, (2, 4))
        >>> out = model(ids, torch.ones(2, 6, dtype=torch.long), labels=labels)
        >>> out.logits.shape, out.loss.shape
        (torch.Size([2, 4, 128]), torch.Size([]))
    """

    family = "t5"

    def __init__(self, config: T5Config) -> None:
        super().__init__(config)
        c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)  # shared by encoder and decoder
        nb, far = c.relative_attention_num_buckets, c.relative_attention_max_distance
        # One relative bias per stack, computed once per forward and shared by all its layers.
        self.encoder_pos_bias = T5RelativeBias(c.n_heads, num_buckets=nb, max_distance=far)
        self.decoder_pos_bias = T5RelativeBias(
            c.n_heads, bidirectional=False, num_buckets=nb, max_distance=far
        )
        gated = c.feed_forward == "gated-gelu"
        spec = LayerSpec(
            d_model=c.d_model, n_heads=c.n_heads, d_ff=c.d_ff, dropout=c.dropout,
            activation="gelu_tanh" if gated else "relu", gated=gated, norm="rms",
            norm_eps=c.norm_eps, bias=False, norm_first=True, head_dim=c.d_kv, attn_scale=1.0,
            attn_impl=c.attn_impl, experts=c.experts,
        )  # fmt: skip
        self.encoder_layers = nn.ModuleList(EncoderLayer(spec) for _ in range(c.n_layers))
        self.encoder_norm = RMSNorm(c.d_model, eps=c.norm_eps)
        self.decoder_layers = nn.ModuleList(DecoderLayer(spec) for _ in range(c.decoder_layers))
        self.decoder_norm = RMSNorm(c.d_model, eps=c.norm_eps)
        self.dropout = nn.Dropout(c.dropout)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight  # one tensor, counted once
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """T5's initialisation (see the class docstring)."""
        c, normal = self.config, nn.init.normal_
        normal(self.tok_emb.weight, std=1.0)
        if not c.tie_embeddings:
            normal(self.lm_head.weight, std=1.0)
        for rel in (self.encoder_pos_bias, self.decoder_pos_bias):
            normal(rel.relative_attention_bias.weight, std=c.d_model**-0.5)
        for m in self.modules():
            if isinstance(m, MultiHeadAttention):
                normal(m.q_proj.weight, std=(c.d_model * c.d_kv) ** -0.5)
                normal(m.k_proj.weight, std=c.d_model**-0.5)
                normal(m.v_proj.weight, std=c.d_model**-0.5)
                normal(m.out_proj.weight, std=(c.n_heads * c.d_kv) ** -0.5)
            elif isinstance(m, (EncoderLayer, DecoderLayer)):
                for name, p in m.mlp.named_parameters():
                    normal(p, std=(c.d_ff if name.startswith("down") else c.d_model) ** -0.5)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

    # --8<-- [start:encode]
    def _encoder_states(self, input_ids: Tensor, attention_mask: Tensor | None) -> list[Tensor]:
        """The embeddings and every encoder layer's output (the last normed), L + 1 x (B, S, D)."""
        s = input_ids.shape[1]
        bias = self.encoder_pos_bias.bias(s, s, device=input_ids.device)  # (1, H, S, S)
        x = self.dropout(self.tok_emb(input_ids))  # (B, S, D)
        states = encoder_stack(
            self.encoder_layers, x, attention_mask, bias=bias
        )  # one bias, all layers
        states[-1] = self.dropout(self.encoder_norm(states[-1]))  # (B, S, D)
        return states

    # --8<-- [end:encode]

    # --8<-- [start:decode]
    def _decoder_states(self, decoder_input_ids: Tensor, ctx: DecoderContext) -> list[Tensor]:
        """The embeddings and every decoder layer's output (the last normed), L + 1 x (B, T, D)."""
        t, device = decoder_input_ids.shape[1], decoder_input_ids.device
        bias = self.decoder_pos_bias.bias(t, ctx.past + t, device=device)  # (1, H, T, past + T)
        x = self.dropout(self.tok_emb(decoder_input_ids))  # (B, T, D)
        states = decoder_stack(self.decoder_layers, x, ctx, bias=bias)  # causal, cross-attending
        states[-1] = self.dropout(self.decoder_norm(states[-1]))  # (B, T, D)
        return states

    def _logits(self, hidden: Tensor) -> Tensor:
        # v1.0: the tied embedding rows have unit variance, so h · e grows like sqrt(D); rescale.
        scale = self.config.d_model**-0.5 if self.config.tie_embeddings else 1.0
        return self.lm_head(hidden * scale)  # (B, T, V)

    # --8<-- [end:decode]

    def _stacks(self) -> tuple[nn.ModuleList, nn.ModuleList]:
        return self.encoder_layers, self.decoder_layers
