"""A LLaMA-style decoder: the GPT recipe with RMSNorm, SwiGLU, rotary positions and GQA.

    h_0 = E[x]                                            token embeddings, no position vectors
    h_l = h_{l-1} + Attn(RMSNorm(h_{l-1}), RoPE)          causal, grouped-query
    h_l = h_l + SwiGLU(RMSNorm(h_l))                      l = 1 .. L
    p(x_{t+1} | x_{<=t}) = softmax(RMSNorm(h_L) W_out)

Touvron et al., "LLaMA: Open and Efficient Foundation Language Models", 2023 (arXiv:2302.13971).
Touvron et al., "Llama 2: Open Foundation and Fine-Tuned Chat Models", 2023 (arXiv:2307.09288).
Jiang et al., "Mistral 7B", 2023 (arXiv:2310.06825).

Where it differs from GPT (``gpt.py``), and only there:

* norm: RMSNorm without bias instead of LayerNorm (``blocks/norms.py``);
* feed-forward: gated SwiGLU, three bias-free matrices, instead of a GELU MLP (``blocks/mlp.py``);
* positions: no position embeddings; q and k are rotated by RoPE inside every attention
  (``positional/rope.py``), so the scores see only relative offsets;
* attention: no biases, and K <= H key/value heads (grouped-query attention, Llama 2 70B and
  Mistral), which shrinks the key/value cache by H / K;
* output: a separate ``lm_head`` (not tied to the embeddings), no dropout anywhere.

Mistral adds a sliding window: each token sees only the ``sliding_window`` most recent
positions (itself included); information from further back still flows through the layers,
one window per layer. Every layer is pre-norm::

    x ──┬── RMSNorm ── Attention(RoPE, GQA) ──(+)──┬── RMSNorm ── SwiGLU ──(+)──> next layer
        └─────────────────────────────────────┘    └──────────────────────────┘

Shape legend: B batch · T query positions · S key/value positions · D model width ·
H query heads · K key/value heads · E head dim · F MLP hidden width · V vocabulary · L layers.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from qkv.attention import masks
from qkv.attention.kv_cache import KVCache
from qkv.blocks.block import DecoderLayer, LayerSpec
from qkv.blocks.moe import Experts
from qkv.blocks.norms import RMSNorm
from qkv.models import checks
from qkv.models.base import ModelOutput
from qkv.models.common import init_normal_
from qkv.models.lm import DecoderLM
from qkv.positional.rope import RotaryEmbedding

__all__ = ["PRESETS", "Llama", "LlamaConfig"]


# --8<-- [start:config]
@dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Sizes and switches of a LLaMA-style decoder (LLaMA 1 and 2, Mistral).

    Attributes:
        vocab_size: V.
        d_model: D, the width of the residual stream.
        n_layers: L.
        n_heads: H, query heads.
        n_kv_heads: K, key/value heads; fewer than H gives grouped-query attention.
        d_ff: F, the SwiGLU hidden width (about 8/3 D, rounded up; see ``blocks/mlp.py``).
        max_seq_len: the longest sequence the model is run on (RoPE refuses later positions).
        rope_base: the base of the rotary frequencies.
        norm_eps: RMSNorm's epsilon (1e-6 in LLaMA 1, 1e-5 in Llama 2 and Mistral).
        sliding_window: Mistral's window (each token sees this many positions); None = all.
        tie_embeddings: share one matrix between ``tok_emb`` and ``lm_head`` (LLaMA: False).
        bos_token_id, eos_token_id: the tokens that begin and end a text (LLaMA 1 and 2 and
            Mistral: 1 and 2, "<s>" and "</s>"); None when there is none.
        dropout: attention, hidden and residual dropout while training (LLaMA uses none).
        attn_impl: the attention backend: ``"auto"``, ``"sdpa"``, ``"reference"``, ...
    """

    vocab_size: int
    d_model: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int = 8  # fewer than n_heads gives grouped-query attention
    d_ff: int = 1376
    max_seq_len: int = 1024
    rope_base: float = 10_000.0
    norm_eps: float = 1e-5
    sliding_window: int | None = None
    tie_embeddings: bool = False
    dropout: float = 0.0
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2  # generation stops here by default
    pad_token_id: int | None = None  # fills rows that ended (None: the eos id)
    attn_impl: str = "auto"
    # A mixture of experts in place of every layer's feed-forward network, each expert of the
    # network's shape: qkv.blocks.moe.Experts, or a dict of its fields ({"n_experts": 4,
    # "top_k": 2}); None: dense. See docs/learn/13-cheaper-models.md.
    experts: Experts | None = None

    def __post_init__(self) -> None:
        checks.require_experts(self)
        sizes = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff")
        checks.require_positive(self, *sizes, "max_seq_len")
        tokens = ("bos_token_id", "eos_token_id", "pad_token_id")
        checks.require_token_ids(self, *tokens, vocab_size=self.vocab_size)
        advice = "change one so that each head gets d_model / n_heads dimensions"
        checks.require_divisible(self, "d_model", "n_heads", advice=advice)
        if self.head_dim % 2:
            raise ValueError(
                f"head_dim = d_model / n_heads = {self.head_dim} must be even: RoPE rotates "
                "pairs of dimensions"
            )
        advice = "each key/value head must serve the same number of query heads"
        checks.require_divisible(self, "n_heads", "n_kv_heads", advice=advice)
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(
                f"sliding_window must be None (attend to all) or at least 1, "
                f"got {self.sliding_window}"
            )
        checks.require_eps(self)
        if self.rope_base <= 1:
            raise ValueError(f"rope_base must be > 1 (LLaMA: 10000), got {self.rope_base}")
        checks.require_rate(self, "dropout")

    @property
    def head_dim(self) -> int:
        """E = D / H."""
        return self.d_model // self.n_heads


# Parameter counts are what transformers reports for the matching Hugging Face config (a test
# checks them on the meta device); the papers round them.
PRESETS: dict[str, LlamaConfig] = {
    # Touvron et al. 2023 (arXiv:2302.13971), Table 2, "6.7B": 6,738,415,616 parameters.
    "llama-7b": LlamaConfig(
        vocab_size=32_000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, d_ff=11_008,
        max_seq_len=2048, norm_eps=1e-6,
    ),
    # Touvron et al. 2023 (arXiv:2307.09288), Table 1, "7B": the LLaMA-7B shapes with a 4k
    # context (the checkpoint's config: rms_norm_eps 1e-5); 6,738,415,616 parameters.
    "llama2-7b": LlamaConfig(
        vocab_size=32_000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, d_ff=11_008,
        max_seq_len=4096, norm_eps=1e-5,
    ),
    # Jiang et al. 2023 (arXiv:2310.06825), Table 1; "7B" in the title, 7.3B in the release notes,
    # 7,241,732,096 exactly: 8 KV heads, window 4096. max_seq_len follows Mistral-7B-v0.1's
    # config (max_position_embeddings 32768); the paper's Table 1 gives context_len 8192.
    "mistral-7b": LlamaConfig(
        vocab_size=32_000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14_336,
        max_seq_len=32_768, norm_eps=1e-5, sliding_window=4096,
    ),
    # For tests and smoke runs: 2 layers, width 32, 4 query heads sharing 2 KV heads.
    "tiny": LlamaConfig(
        vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=88,
        max_seq_len=64,
    ),
}  # fmt: skip


# --8<-- [end:config]


class Llama(DecoderLM[LlamaConfig]):
    """A LLaMA-style decoder-only language model.

    Weights start as in the original: every linear and embedding matrix normal(0, 0.02), RMSNorm
    gains 1 (Hugging Face's ``initializer_range=0.02``).

    Args:
        config: a ``LlamaConfig``.

    Example:
        >>> import torch
        >>> model = Llama(PRESETS["tiny"])
        >>> ids = torch.randint(0, 128, (2, 6))
        >>> out = model(ids, labels=ids)
        >>> out.logits.shape, out.loss.shape
        (torch.Size([2, 6, 128]), torch.Size([]))
    """

    family = "llama"

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config)
        c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)  # no position embedding: RoPE
        # One rotary module, shared by every layer's attention (it holds no parameters).
        self.rotary = RotaryEmbedding(c.head_dim, base=c.rope_base, max_seq_len=c.max_seq_len)
        # Pre-norm RMSNorm layers: bias-free rotary GQA attention, then bias-free SwiGLU.
        spec = LayerSpec(
            d_model=c.d_model, n_heads=c.n_heads, d_ff=c.d_ff, n_kv_heads=c.n_kv_heads,
            dropout=c.dropout, activation="silu", gated=True, norm="rms", norm_eps=c.norm_eps,
            bias=False, norm_first=True, rotary=self.rotary, attn_impl=c.attn_impl,
            experts=c.experts,
        )  # fmt: skip
        self.layers = nn.ModuleList(
            DecoderLayer(spec, cross_attention=False) for _ in range(c.n_layers)
        )
        self.final_norm = RMSNorm(c.d_model, eps=c.norm_eps)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight  # one shared (V, D) parameter
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """LLaMA's initialisation (see the class docstring); it has no biases to zero."""
        init_normal_(self, std=0.02)

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
        """Next-token logits for every position.

        Args:
            input_ids: token ids, (B, T) long; with a cache, only the T new tokens.
            attention_mask: 1 = real token, 0 = padding, (B, past + T) covering the cached and
                the new positions (past = 0 without a cache); padding may sit on either side.
            position_ids: positions for RoPE, (B, T) or (T,); default: the number of real tokens
                before each one (so left-padded sequences start at 0), else past .. past + T - 1.
            labels: (B, T) target ids, usually ``input_ids``; shifted inside, so position t is
                scored on token t + 1. -100 marks positions left out of the loss.
            cache: from ``new_cache``, one ``KVCache`` per layer; extended in place by the T new
                positions, which attend to the cached ones (masks aligned bottom-right).
            output_hidden_states: also return the embeddings and every layer's output
                (the last one after the final norm, as transformers does), each (B, T, D).
            output_attentions: also return every layer's attention weights, each (B, H, T, S).

        Returns:
            ``ModelOutput`` with ``logits`` (B, T, V), ``last_hidden_state`` (B, T, D), and
            ``loss`` (scalar, mean cross-entropy) when labels are given.
        """
        past, position_ids = self._positions(input_ids, attention_mask, position_ids, cache)
        t, device, c = input_ids.shape[1], input_ids.device, self.config
        mask = None if attention_mask is None else masks.padding(attention_mask)  # (B, 1, 1, S)
        if c.sliding_window is not None:  # Mistral: only the last W positions
            window = masks.sliding_window(t, c.sliding_window, past + t, device=device)  # (T, S)
            mask = window if mask is None else mask & window  # (T, S) or (B, 1, T, S)
        x = self.tok_emb(input_ids)  # (B, T, D): no position embedding
        # The L layers (causal, RoPE by position_ids), final_norm, lm_head and the loss: DecoderLM.
        return self._run_layers(
            x, mask, position_ids=position_ids, cache=cache, labels=labels,
            output_hidden_states=output_hidden_states, output_attentions=output_attentions,
        )  # fmt: skip

    # --8<-- [end:forward]
