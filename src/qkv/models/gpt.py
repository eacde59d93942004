"""GPT: a decoder-only Transformer that predicts each next token, in the GPT-2 layout.

    h_0    = TokenEmbedding(x_t) + PositionEmbedding(t)
    h_l    = DecoderLayer_l(h_{l-1})              pre-norm, causal self-attention, l = 1 .. L
    logits = LayerNorm(h_L) W_E^T                 the output head is the token embedding W_E
    loss   = -mean_t log softmax(logits_t)[x_{t+1}]

Radford et al., "Language Models are Unsupervised Multitask Learners", 2019 (OpenAI report,
no arXiv id): GPT-2, sections 2.3 and Table 2. Radford et al., "Improving Language
Understanding by Generative Pre-Training", 2018 (OpenAI report, no arXiv id): GPT-1, the
decoder-only language model this builds on. Press and Wolf, "Using the Output Embedding to
Improve Language Models", 2017 (arXiv:1608.05859): the tied output head.

A GPT is the decoder of the 2017 Transformer without cross-attention. Each position sees only
itself and the positions before it, so one forward pass trains on every next-token prediction
of the sequence at once. GPT-2 moved the LayerNorms to the input of each sublayer (pre-norm)
and added one final LayerNorm after the last layer::

    input_ids (B, T) ──> tok_emb + pos_emb ──> dropout          (B, T, D)
                                 │
                 ┌──> attn_norm ──> causal self-attention ──(+)     x L  (DecoderLayer,
                 └──> mlp_norm  ──> feed-forward (GELU)     ──(+)         norm_first=True)
                                 │
                 final_norm ──> lm_head (= tok_emb.weight) ──> logits (B, T, V)

Initialisation follows GPT-2: weights of linear layers and embeddings from N(0, 0.02²), biases
zero, LayerNorm gains one; the two projections that write into the residual stream
(``out_proj`` and ``mlp.down_proj``) use 0.02 / sqrt(2 L), so that the stream's variance does not
grow with depth (GPT-2, section 2.3).

Shape legend: B batch · T query positions · S key/value positions · D model width ·
H query heads · E head dim · F MLP hidden width · V vocabulary · L layers.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from qkv.attention import masks
from qkv.attention.kv_cache import KVCache
from qkv.blocks.block import DecoderLayer, LayerSpec
from qkv.blocks.mlp import ActivationName
from qkv.blocks.moe import Experts
from qkv.blocks.norms import LayerNorm
from qkv.models import checks
from qkv.models.base import ModelOutput
from qkv.models.common import init_gpt2_
from qkv.models.lm import DecoderLM
from qkv.positional.learned import LearnedPositionalEmbedding

__all__ = ["GPT", "PRESETS", "GPTConfig"]


# --8<-- [start:config]
@dataclass(frozen=True, kw_only=True)
class GPTConfig:
    """Sizes and switches of a GPT-2 style decoder-only language model."""

    vocab_size: int = 50257
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    d_ff: int | None = None  # F; None means 4 * d_model (see ``ff_width``)
    max_seq_len: int = 1024  # how many positions have a learned embedding
    # On the embeddings, attention weights, residual branches and (unlike GPT-2) the MLP hidden.
    dropout: float = 0.1
    norm_eps: float = 1e-5
    activation: ActivationName = "gelu_tanh"
    tie_embeddings: bool = True  # lm_head shares its weight with tok_emb
    bos_token_id: int | None = None  # GPT-2: 50256, "<|endoftext|>" (one token for both)
    eos_token_id: int | None = None  # generation stops here by default
    pad_token_id: int | None = None  # fills rows that ended (None: the eos id)
    attn_impl: str = "auto"  # see qkv.scaled_dot_product_attention
    # A mixture of experts in place of every layer's feed-forward network, each expert of the
    # network's shape: qkv.blocks.moe.Experts, or a dict of its fields ({"n_experts": 4,
    # "top_k": 2}); None: dense. See docs/learn/13-cheaper-models.md.
    experts: Experts | None = None

    def __post_init__(self) -> None:
        checks.require_experts(self)
        sizes = ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len")
        checks.require_positive(self, *sizes, must_be="a positive integer")
        tokens = ("bos_token_id", "eos_token_id", "pad_token_id")
        checks.require_token_ids(self, *tokens, vocab_size=self.vocab_size)
        advice = "each head gets d_model / n_heads features, so change one of them"
        checks.require_divisible(self, "d_model", "n_heads", advice=advice)
        if self.d_ff is not None and self.d_ff < 1:
            raise ValueError(f"d_ff must be positive (or None for 4 * d_model), got {self.d_ff}")
        checks.require_rate(self, "dropout")
        checks.require_eps(self)
        checks.require_activation(self)

    @property
    def ff_width(self) -> int:
        """F, the feed-forward hidden width: ``d_ff``, or 4 * d_model when it is None."""
        return 4 * self.d_model if self.d_ff is None else self.d_ff

    @property
    def head_dim(self) -> int:
        """E = D / H."""
        return self.d_model // self.n_heads


def _gpt2(d_model: int, n_layers: int, n_heads: int) -> GPTConfig:
    """A released GPT-2 size; every one ends (and begins) texts with 50256, "<|endoftext|>"."""
    return GPTConfig(
        d_model=d_model, n_layers=n_layers, n_heads=n_heads, bos_token_id=50256,
        eos_token_id=50256,
    )  # fmt: skip


# Radford et al. 2019, Table 2 (widths, depths) and OpenAI's released checkpoints (heads,
# vocabulary, 1024 positions, dropout 0.1). Table 2 prints 117M / 345M / 762M / 1542M; OpenAI
# later corrected these to 124M / 355M / 774M / 1558M (the gpt-2 repository's README), and the
# exact counts below, with the head tied, are those transformers' GPT2LMHeadModel reports.
PRESETS: dict[str, GPTConfig] = {
    "gpt2": _gpt2(d_model=768, n_layers=12, n_heads=12),  # 124,439,808
    "gpt2-medium": _gpt2(d_model=1024, n_layers=24, n_heads=16),  # 354,823,168
    "gpt2-large": _gpt2(d_model=1280, n_layers=36, n_heads=20),  # 774,030,080
    "gpt2-xl": _gpt2(d_model=1600, n_layers=48, n_heads=25),  # 1,557,611,200
    # For smoke tests and learning: runs in milliseconds on a CPU.
    "tiny": GPTConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=4, max_seq_len=64),
}


# --8<-- [end:config]


def _layer_spec(c: GPTConfig) -> LayerSpec:
    """Every GPT-2 layer: pre-norm LayerNorms, causal self-attention (no cross-attention)."""
    return LayerSpec(
        d_model=c.d_model, n_heads=c.n_heads, d_ff=c.ff_width, dropout=c.dropout,
        activation=c.activation, norm="layer", norm_eps=c.norm_eps, norm_first=True,
        attn_impl=c.attn_impl, experts=c.experts,
    )  # fmt: skip


class GPT(DecoderLM[GPTConfig]):
    """A GPT-2 style language model: embeddings, L pre-norm decoder layers, a tied head.

    Args:
        config: the sizes, see ``GPTConfig`` and ``PRESETS``.

    Example:
        >>> import torch
        >>> model = GPT(PRESETS["tiny"])
        >>> ids = torch.randint(0, 128, (2, 10))
        >>> out = model(ids, labels=ids)
        >>> out.logits.shape, out.loss.shape
        (torch.Size([2, 10, 128]), torch.Size([]))
    """

    family = "gpt"

    def __init__(self, config: GPTConfig) -> None:
        super().__init__(config)
        c = config
        # --8<-- [start:embeddings]
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)  # weight (V, D)
        self.pos_emb = LearnedPositionalEmbedding(c.max_seq_len, c.d_model)  # (max_seq_len, D)
        self.dropout = nn.Dropout(c.dropout)
        spec = _layer_spec(c)
        self.layers = nn.ModuleList(
            DecoderLayer(spec, cross_attention=False) for _ in range(c.n_layers)
        )
        self.final_norm = LayerNorm(c.d_model, eps=c.norm_eps)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)  # weight (V, D)
        if c.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight  # one shared parameter, not a copy
        # --8<-- [end:embeddings]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2's initialisation (see the module docstring)."""
        init_gpt2_(self, self.config.n_layers, std=0.02)  # out_proj, down_proj: 0.02 / sqrt(2 L)

    # --8<-- [start:forward]
    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        position_ids: Tensor | None = None,
        labels: Tensor | None = None,
        cache: list[KVCache] | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> ModelOutput:
        """Score every next token of ``input_ids``.

        Args:
            input_ids: token ids (B, T); with a cache, only the T new tokens.
            attention_mask: (B, past + T), covering the cached and the new positions (past = 0
                without a cache); 1 = real token, 0 = padding (left padding batches prompts).
            position_ids: (B, T) or (T,); default ``default_position_ids`` (counts real tokens,
                so left padding works).
            labels: (B, T), usually ``input_ids``; shifted inside, -100 = ignored.
            cache: from ``new_cache``, one ``KVCache`` per layer; extended in place by the T new
                positions, which attend to the cached ones (masks aligned bottom-right).
            output_hidden_states: also return the embeddings and each layer's output (the last
                one after ``final_norm``, as transformers reports it), each (B, T, D).
            output_attentions: also return each layer's attention weights (B, H, T, S).

        Returns:
            ``ModelOutput`` with logits (B, T, V) and, with labels, the loss.
        """
        _, position_ids = self._positions(input_ids, attention_mask, position_ids, cache)
        mask = None if attention_mask is None else masks.padding(attention_mask)  # (B, 1, 1, S)
        x = self.dropout(self.tok_emb(input_ids) + self.pos_emb(position_ids))  # (B, T, D)
        # The L layers (causal), final_norm, lm_head (tied) and the next-token loss: DecoderLM.
        return self._run_layers(
            x, mask, cache=cache, labels=labels, output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )  # fmt: skip

    # --8<-- [end:forward]
