"""Prefix-LM: one decoder stack that reads a prefix in both directions and writes the rest.

    mask[i, j] = (j <= i) or (j < prefix_len)       query i may see key j
    loss = -mean_{t >= prefix_len} log P(x_t | x_<t)

Raffel et al., "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer", 2020 (arXiv:1910.10683), section 3.2.1 and Figure 3. Dong et al., "Unified
Language Model Pre-training for Natural Language Understanding and Generation" (UniLM), 2019
(arXiv:1905.03197).

A decoder-only language model is causal everywhere: even the input it is given (a question,
a sentence to translate) is read left to right. A prefix-LM lifts the causal mask on the
prefix: its tokens see each other in both directions, as an encoder would, while the
continuation stays causal, so the model can still generate it token by token. Only the
attention mask changes; the layers are those of a pre-norm GPT-style decoder, and the loss
counts only the continuation (predicting the prefix would leak: its tokens see the future)::

    prefix_len = 2, T = 4          keys ->
                                   p p c c
                         query p   1 1 . .      prefix: bidirectional
                               p   1 1 . .
                               c   1 1 1 .      continuation: causal
                               c   1 1 1 1

Generating with a key/value cache, the prompt is the prefix: the first call reads it whole, in
both directions, and every token generated after it is causal. A cached position never sees a
later one, so the prefix must come in that first call; it cannot grow across calls.

Shape legend: B batch · T new positions · S key/value positions (past + T) · D model width ·
H heads · F MLP hidden width · V vocabulary · L layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from qkv.attention import masks
from qkv.attention.kv_cache import KVCache
from qkv.blocks import ActivationName, DecoderLayer, LayerNorm, LayerSpec
from qkv.blocks.moe import Experts
from qkv.models import checks
from qkv.models.base import ModelOutput
from qkv.models.common import IGNORE_INDEX, causal_lm_loss, init_normal_
from qkv.models.lm import DecoderLM
from qkv.positional import LearnedPositionalEmbedding

__all__ = ["PRESETS", "PrefixLM", "PrefixLMConfig", "prefix_lm_loss"]


# --8<-- [start:config]
@dataclass(frozen=True, kw_only=True)
class PrefixLMConfig:
    """Sizes and switches of a decoder-only prefix language model (pre-norm, learned positions)."""

    vocab_size: int = 32_000
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    d_ff: int = 3072
    max_seq_len: int = 512  # how many positions have a learned embedding
    dropout: float = 0.1
    norm_eps: float = 1e-5
    activation: ActivationName = "relu"
    tie_embeddings: bool = True  # lm_head shares its weight with tok_emb
    bos_token_id: int | None = None  # the tokens that begin and end a text, if the
    eos_token_id: int | None = None  # vocabulary has them; generation stops at eos
    pad_token_id: int | None = None  # fills rows that ended (None: the eos id)
    attn_impl: str = "auto"
    # A mixture of experts in place of every layer's feed-forward network, each expert of the
    # network's shape: qkv.blocks.moe.Experts, or a dict of its fields ({"n_experts": 4,
    # "top_k": 2}); None: dense. See docs/learn/13-cheaper-models.md.
    experts: Experts | None = None

    def __post_init__(self) -> None:
        checks.require_experts(self)
        checks.require_positive(self, "vocab_size", "d_model", "n_layers", "d_ff", "max_seq_len")
        tokens = ("bos_token_id", "eos_token_id", "pad_token_id")
        checks.require_token_ids(self, *tokens, vocab_size=self.vocab_size)
        checks.require_divisible(self, "d_model", "n_heads")
        checks.require_rate(self, "dropout")
        checks.require_eps(self)
        checks.require_activation(self)


PRESETS: dict[str, PrefixLMConfig] = {
    # Raffel et al. 2020, section 3.2 and Table 2: the prefix-LM of the architecture comparison,
    # one 12-block stack of the T5 baseline's size (D = 768, F = 3072, 12 heads, ReLU, 32k
    # SentencePiece vocabulary, 512 tokens), here with learned positions, LayerNorm and biases
    # instead of T5's relative bias, RMSNorm and bias-free layers. The paper gives no exact count
    # (Table 2 calls it P, one stack of the ~220M encoder-decoder baseline); this one has
    # 110,025,216 parameters.
    "prefix-lm-base": PrefixLMConfig(),
    # Smoke tests: 2 layers of width 32, a 64-token vocabulary.
    "tiny": PrefixLMConfig(
        vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=64
    ),
}


# --8<-- [end:config]


def prefix_lm_loss(logits: Tensor, labels: Tensor, prefix_lengths: Tensor) -> Tensor:
    """Next-token cross-entropy over the continuation only: ``causal_lm_loss`` with the
    prefix's labels ignored.

    The logits at t score the label at t + 1, which counts only when t + 1 >= prefix_len: the
    last prefix position predicts the first continuation token, the prefix itself is not scored.

    Args:
        logits: (B, T, V).
        labels: (B, T), usually ``input_ids``; -100 marks further positions to ignore (padding).
        prefix_lengths: (B,).

    Returns:
        The mean loss over counted positions, a float32 scalar.
    """
    return causal_lm_loss(logits, _ignore_prefix(labels, prefix_lengths))


def _ignore_prefix(labels: Tensor, prefix_lengths: Tensor) -> Tensor:
    """``labels`` (B, T) with each row's first ``prefix_lengths`` (B,) positions set to -100."""
    positions = torch.arange(labels.shape[1], device=labels.device)  # (T,)
    in_prefix = positions < prefix_lengths.to(labels.device)[:, None]  # (B, T)
    return labels.masked_fill(in_prefix, IGNORE_INDEX)  # (B, T)


class PrefixLM(DecoderLM[PrefixLMConfig]):
    """A decoder-only language model whose prefix attends bidirectionally.

    Initialisation as GPT-2 and BERT: linear and embedding weights from normal(0, 0.02²),
    biases 0, LayerNorms 1 and 0.

    Args:
        config: a ``PrefixLMConfig``.

    Example:
        >>> import torch
        >>> model = PrefixLM(PRESETS["tiny"])
        >>> ids = torch.randint(0, 64, (2, 10))
        >>> out = model(ids, prefix_lengths=torch.tensor([4, 6]), labels=ids)
        >>> out.logits.shape, out.loss.shape
        (torch.Size([2, 10, 64]), torch.Size([]))
    """

    family = "prefix_lm"

    def __init__(self, config: PrefixLMConfig) -> None:
        super().__init__(config)
        c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)  # (V, D)
        self.pos_emb = LearnedPositionalEmbedding(c.max_seq_len, c.d_model)
        self.dropout = nn.Dropout(c.dropout)
        spec = LayerSpec(
            d_model=c.d_model, n_heads=c.n_heads, d_ff=c.d_ff, dropout=c.dropout,
            activation=c.activation, norm_eps=c.norm_eps, norm_first=True, attn_impl=c.attn_impl,
            experts=c.experts,
        )  # fmt: skip
        self.layers = nn.ModuleList(
            DecoderLayer(spec, cross_attention=False) for _ in range(c.n_layers)
        )
        self.final_norm = LayerNorm(c.d_model, eps=c.norm_eps)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)  # (V, D)
        if c.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight  # one (V, D) matrix, two roles
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2's initialisation (see the class docstring)."""
        init_normal_(self, std=0.02)

    def build_mask(
        self, prefix_lengths: Tensor, t: int, attention_mask: Tensor | None = None, *, past: int = 0
    ) -> Tensor:
        """Which keys each query sees: prefix both ways, the rest causal, padding hidden.

        Args:
            prefix_lengths: (B,) integers in [0, T], counted from the first position (left
                padding included); with a filled cache (past > 0), at most ``past``.
            t: T, the new positions.
            attention_mask: (B, past + T), 1 = real token, 0 = padding.
            past: positions already in the key/value cache; the T queries are the last of
                S = past + T positions (bottom-right).

        Returns:
            Boolean (B, 1, T, S), True = may attend.
        """
        limit, span = (past, f"past={past}") if past else (t, f"T={t}")
        if prefix_lengths.dim() != 1 or ((prefix_lengths < 0) | (prefix_lengths > limit)).any():
            raise ValueError(
                f"prefix_lengths must be a (B,) tensor of lengths in [0, {span}], got "
                f"{prefix_lengths.tolist()}; with a cache, the first call reads the whole prefix "
                "(cached positions never see later ones)"
            )
        s, device = past + t, prefix_lengths.device
        mask = masks.prefix_lm(prefix_lengths, t, s, device=device)  # (B, 1, T, S)
        if attention_mask is not None:
            mask = mask & masks.padding(attention_mask).to(device)  # (B, 1, T, S)
        return mask

    def _prefix_lengths(
        self, prefix_lengths: Tensor | int | None, b: int, t: int, past: int, device: torch.device
    ) -> Tensor:
        """(B,) prefix lengths; None: the whole input of a first call, none of a later one."""
        if prefix_lengths is None:  # generation: the prompt is the prefix, the rest is causal
            prefix_lengths = t if past == 0 else 0
        prefix = torch.as_tensor(prefix_lengths, device=device)  # () or (B,)
        prefix = prefix.expand(b) if prefix.dim() == 0 else prefix  # (B,)
        if prefix.shape != (b,) or prefix.is_floating_point():
            raise ValueError(
                f"prefix_lengths must be an int or a (B,) tensor of B={b} integers, got "
                f"{prefix.tolist()}"
            )
        return prefix

    # --8<-- [start:forward]
    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        prefix_lengths: Tensor | int | None = None,
        position_ids: Tensor | None = None,
        labels: Tensor | None = None,
        cache: list[KVCache] | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> ModelOutput:
        """Score every next token of ``input_ids``, the first ``prefix_lengths`` read both ways.

        Args:
            input_ids: token ids (B, T), prefix first; with a cache, only the T new tokens.
            attention_mask: (B, past + T) covering the cached and the new positions (past = 0
                without a cache); 1 = real token, 0 = padding (right, or left for generation).
            prefix_lengths: (B,) how many leading positions of each row form its prefix (an
                int: the same for every row). None: all of the input when nothing is cached
                (the prompt), none of it after (generated tokens are causal).
            position_ids: (B, T) or (T,); default ``default_position_ids`` (counts real tokens).
            labels: (B, T), usually ``input_ids``; shifted inside like a causal LM. The model
                itself leaves the prefix out of the loss; mark padding with -100.
            cache: from ``new_cache``, one ``KVCache`` per layer, extended in place.
            output_hidden_states: also return the embeddings and each layer's output (the last
                one after ``final_norm``, as transformers' GPT-2 reports it), each (B, T, D).
            output_attentions: also return each layer's attention weights (B, H, T, S).

        Returns:
            ``ModelOutput`` with ``logits`` (B, T, V) and, with labels, the loss.
        """
        past, position_ids = self._positions(input_ids, attention_mask, position_ids, cache)
        (b, t), device = input_ids.shape, input_ids.device
        prefix = self._prefix_lengths(prefix_lengths, b, t, past, device)  # (B,)
        mask = self.build_mask(prefix, t, attention_mask, past=past)  # (B, 1, T, S)
        x = self.dropout(self.tok_emb(input_ids) + self.pos_emb(position_ids))  # (B, T, D)
        if labels is not None:  # the prefix positions among the T new ones are not scored
            labels = _ignore_prefix(labels, (prefix - past).clamp(min=0))  # (B, T)
        # causal=False: the prefix-LM mask already holds the causal part. The L layers,
        # final_norm, lm_head and the next-token loss: DecoderLM.
        return self._run_layers(
            x, mask, causal=False, cache=cache, labels=labels,
            output_hidden_states=output_hidden_states, output_attentions=output_attentions,
        )  # fmt: skip

    # --8<-- [end:forward]
