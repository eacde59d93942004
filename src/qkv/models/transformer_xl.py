"""Transformer-XL: a causal language model that reads a long text segment by segment, and
carries each layer's states of the last segment forward as memory.

    h_τ^0   = TokenEmbedding(x_τ)                                    no absolute positions
    h~_τ^l  = [SG(m_τ^l); h_τ^{l-1}]                                 memory, then the segment
    h_τ^l   = Layer_l(h_τ^{l-1}, keys and values from h~_τ^l)         relative attention, causal
    m_τ+1^l = the last mem_len positions of [m_τ^l; h_τ^{l-1}]       the input of layer l
    logits  = LayerNorm(h_τ^L) W_E^T

Dai et al., "Transformer-XL: Attentive Language Models Beyond a Fixed-Length Context", 2019
(arXiv:1901.02860), sections 3.2 (recurrence) and 3.3 (relative positions).

Where it differs from GPT, and only there:

* **Segment-level recurrence.** A GPT sees one window and forgets it. Transformer-XL keeps, for
  every layer, the input states of the previous segment, (B, M, D), and lets the current
  segment's queries attend over [memory; segment]: the memory sits before the segment, so the
  causal mask, aligned bottom-right, shows each position all of the memory and its segment up
  to itself. The memory is detached (SG, stop-gradient): training back-propagates within a
  segment only, yet layer l reaches l segments back, since its memory was computed by a layer
  that saw the segment before that. ``forward`` returns the next memory; pass it back in.
* **Relative positions.** Absolute positions would clash: the first token of every segment
  would be position 0, and the memory would repeat positions. So positions enter only inside
  attention, as the distance between query and key (sinusoids R_{i-j} with learned u and v,
  see ``qkv.attention.variants.xl_relative``), and the same state means the same thing
  whichever segment it sits in.

Everything else is GPT-2's: pre-norm layers (the authors' code offers it as ``pre_lnorm``; its
default is post-norm), a final LayerNorm, the tied output head and GPT-2's initialisation. The
paper's adaptive input and softmax (for WikiText-103's 267k words) are left out.

Because layer l's memory is exactly what layer l computed for the previous positions, a segment
read with the memory of everything before it gives the same outputs as one forward over the
whole text (``tests/models/test_transformer_xl.py`` holds that).

Shape legend: B batch · T positions of the segment · M memory positions · S key/value
positions (M + T) · D model width · H heads · E head dim · F MLP hidden width ·
V vocabulary · L layers · N tokens of a long text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from qkv.attention.variants.xl_relative import XLRelativeAttention
from qkv.blocks.block import residual_sublayer
from qkv.blocks.mlp import ActivationName, FeedForward
from qkv.blocks.norms import LayerNorm
from qkv.models import checks
from qkv.models.base import ModelOutput, QkvModel
from qkv.models.common import causal_lm_loss, check_token_ids, init_gpt2_

__all__ = [
    "PRESETS",
    "TransformerXL",
    "TransformerXLConfig",
    "XLOutput",
    "evaluate_with_memory",
]


# --8<-- [start:config]
@dataclass(frozen=True, kw_only=True)
class TransformerXLConfig:
    """Sizes and switches of a Transformer-XL language model."""

    vocab_size: int = 256
    d_model: int = 512
    n_layers: int = 12
    n_heads: int = 8
    d_ff: int | None = None  # F; None means 4 * d_model
    mem_len: int = 512  # M: positions of each layer's input kept as memory; 0 turns it off
    dropout: float = 0.1  # embeddings, attention weights, residual branches, MLP hidden
    norm_eps: float = 1e-5
    activation: ActivationName = "relu"  # the authors' code
    tie_embeddings: bool = True  # lm_head shares its weight with tok_emb
    attn_impl: str = "auto"  # see qkv.scaled_dot_product_attention

    def __post_init__(self) -> None:
        checks.require_positive(self, "vocab_size", "d_model", "n_layers", "n_heads")
        advice = "each head gets d_model / n_heads features, so change one of them"
        checks.require_divisible(self, "d_model", "n_heads", advice=advice)
        if self.d_model % 2:
            raise ValueError(f"d_model={self.d_model} must be even: R has a sin and a cos per pair")
        if self.d_ff is not None and self.d_ff < 1:
            raise ValueError(f"d_ff must be positive (or None for 4 * d_model), got {self.d_ff}")
        if self.mem_len < 0:
            raise ValueError(f"mem_len must be >= 0 (0: no memory), got {self.mem_len}")
        checks.require_rate(self, "dropout")
        checks.require_eps(self)
        checks.require_activation(self)

    @property
    def ff_width(self) -> int:
        """F: ``d_ff``, or 4 * d_model when it is None."""
        return 4 * self.d_model if self.d_ff is None else self.d_ff

    @property
    def head_dim(self) -> int:
        """E = D / H."""
        return self.d_model // self.n_heads


PRESETS: dict[str, TransformerXLConfig] = {
    # The authors' enwik8 base model (kimiyoung/transformer-xl, pytorch/run_enwik8_base.sh:
    # 12 layers, 512 wide, 8 heads of 64, inner 2048, dropout 0.1, segments and memory of 512),
    # over all 256 byte values (the script's vocabulary is the bytes that occur in enwik8).
    "enwik8-base": TransformerXLConfig(),
    # For smoke tests and learning: runs in milliseconds on a CPU.
    "tiny": TransformerXLConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=4, mem_len=16),
}


# --8<-- [end:config]


@dataclass
class XLOutput(ModelOutput):
    """``ModelOutput`` plus ``memory``: every layer's input, its last mem_len positions,
    (L, B, M, D), detached; pass it as ``memory=`` with the next segment."""

    memory: Tensor | None = None


class XLLayer(nn.Module):
    """GPT-2's pre-norm layer, its self-attention reading the memory before the segment."""

    def __init__(self, c: TransformerXLConfig) -> None:
        super().__init__()
        self.attn_norm = LayerNorm(c.d_model, eps=c.norm_eps)
        self.self_attn = XLRelativeAttention(
            c.d_model, c.n_heads, dropout=c.dropout, attn_impl=c.attn_impl
        )
        self.mlp_norm = LayerNorm(c.d_model, eps=c.norm_eps)
        self.mlp = FeedForward(c.d_model, c.ff_width, activation=c.activation, dropout=c.dropout)
        self.dropout = nn.Dropout(c.dropout)  # residual dropout

    def forward(self, x: Tensor, memory: Tensor) -> Tensor:
        """x (B, T, D), this layer's memory (B, M, D) -> (B, T, D)."""

        # The norm acts on each position alone, so norm([m; h]) = [norm(m); norm(h)].
        def attend(h: Tensor) -> Tensor:
            return self.self_attn(h, self.attn_norm(memory))  # (B, T, D)

        x = residual_sublayer(x, attend, self.attn_norm, self.dropout, norm_first=True)
        return residual_sublayer(x, self.mlp, self.mlp_norm, self.dropout, norm_first=True)


class TransformerXL(QkvModel[TransformerXLConfig]):
    """A Transformer-XL language model: embeddings, L layers with memory, a tied head.

    Args:
        config: the sizes, see ``TransformerXLConfig`` and ``PRESETS``.

    Example:
        >>> model = TransformerXL(PRESETS["tiny"]).eval()
        >>> first, second = torch.randint(0, 128, (2, 2, 6))
        >>> out = model(first, labels=first)  # memory=None: the first segment
        >>> out.logits.shape, out.memory.shape  # memory (L, B, M, D)
        (torch.Size([2, 6, 128]), torch.Size([2, 2, 6, 32]))
        >>> model(second, out.memory).memory.shape  # 12 positions, mem_len keeps 16
        torch.Size([2, 2, 12, 32])
    """

    family = "transformer_xl"

    def __init__(self, config: TransformerXLConfig) -> None:
        super().__init__(config)
        c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)  # weight (V, D)
        self.dropout = nn.Dropout(c.dropout)
        self.layers = nn.ModuleList(XLLayer(c) for _ in range(c.n_layers))
        self.final_norm = LayerNorm(c.d_model, eps=c.norm_eps)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)  # weight (V, D)
        if c.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight  # one shared parameter, not a copy
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2's initialisation (see ``qkv.models.gpt``); u and v keep their own N(0, 0.02²)."""
        init_gpt2_(self, self.config.n_layers, std=0.02)

    def new_memory(self, batch_size: int = 1) -> Tensor:
        """The memory before the first segment: nothing yet, (L, B, 0, D)."""
        c = self.config
        return torch.zeros(
            c.n_layers, batch_size, 0, c.d_model, dtype=self.dtype, device=self.device
        )  # (L, B, 0, D)

    def _check_memory(self, memory: Tensor, batch_size: int) -> None:
        c = self.config
        if (
            not isinstance(memory, Tensor)
            or memory.dim() != 4
            or (memory.shape[0], memory.shape[1], memory.shape[3])
            != (c.n_layers, batch_size, c.d_model)
            or memory.shape[2] > c.mem_len
        ):
            got = tuple(memory.shape) if isinstance(memory, Tensor) else type(memory).__name__
            raise ValueError(
                f"memory must be (L, B, M, D) = ({c.n_layers}, {batch_size}, M, {c.d_model}) "
                f"with M <= mem_len={c.mem_len}, got {got}; pass the memory this model returned "
                f"for the previous segment of the same rows, or None (new_memory({batch_size}))"
            )

    # --8<-- [start:forward]
    def forward(
        self, input_ids: Tensor, memory: Tensor | None = None, *, labels: Tensor | None = None
    ) -> XLOutput:
        """Score every next token of one segment, attending to the memory of the ones before.

        Args:
            input_ids: the segment's token ids (B, T).
            memory: the previous call's ``XLOutput.memory``, (L, B, M, D); None for the first
                segment (the same as ``new_memory(B)``). No gradient flows into it.
            labels: (B, T), usually ``input_ids``; shifted inside, -100 = ignored. The memory
                makes the first position of a segment well informed, but its loss is not
                counted here (no label before it); ``evaluate_with_memory`` counts every token.

        Returns:
            ``XLOutput`` with logits (B, T, V), the loss with labels, the last hidden states
            (B, T, D) and the next memory (L, B, min(M + T, mem_len), D).
        """
        check_token_ids(input_ids)
        b = input_ids.shape[0]
        memory = self.new_memory(b) if memory is None else memory
        self._check_memory(memory, b)
        x = self.dropout(self.tok_emb(input_ids))  # (B, T, D): no position embedding
        layer_inputs = []  # h^{l-1}: what layer l keeps as memory
        for layer, layer_memory in zip(self.layers, memory, strict=True):
            layer_inputs.append(x)
            x = layer(x, layer_memory)  # (B, T, D)
        x = self.final_norm(x)  # (B, T, D)
        logits = self.lm_head(x)  # (B, T, V)
        loss = None if labels is None else causal_lm_loss(logits, labels)
        # m_τ+1 = the last mem_len positions of [m_τ; h_τ], cut from this segment's graph.
        states = torch.cat([memory, torch.stack(layer_inputs)], dim=2)  # (L, B, M + T, D)
        keep = min(states.shape[2], self.config.mem_len)
        next_memory = states[:, :, states.shape[2] - keep :].detach()  # (L, B, keep, D)
        return XLOutput(logits=logits, loss=loss, last_hidden_state=x, memory=next_memory)

    # --8<-- [end:forward]


# --8<-- [start:evaluate]
@torch.no_grad()
def evaluate_with_memory(
    model: TransformerXL, ids: Tensor, segment_len: int, use_memory: bool
) -> float:
    """The mean next-token loss over a long text, read ``segment_len`` tokens at a time.

    Every one of the N - 1 next tokens is scored once: segment k reads ids[kT : (k + 1)T] and
    is scored against the tokens one position later. With ``use_memory`` each segment attends
    to the memory of the ones before (the model's context reaches up to mem_len positions
    further per layer); without it each segment starts afresh, as a model with a fixed window.

    Args:
        model: a ``TransformerXL`` (run in eval mode here, its mode restored afterwards).
        ids: token ids (N,) or (B, N), N >= 2.
        segment_len: T, tokens per segment.
        use_memory: carry the memory from segment to segment.

    Returns:
        The mean cross-entropy in nats per token.

    Example:
        >>> model = TransformerXL(PRESETS["tiny"])
        >>> ids = torch.randint(0, 128, (40,))
        >>> 4.0 < evaluate_with_memory(model, ids, segment_len=8, use_memory=True) < 6.0
        True
    """
    ids = ids[None] if ids.dim() == 1 else ids  # (B, N)
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise ValueError(f"ids must be (N,) or (B, N) with N >= 2, got shape {tuple(ids.shape)}")
    if segment_len < 1:
        raise ValueError(f"segment_len must be positive, got {segment_len}")
    was_training = model.training
    model.eval()
    memory, total, count = None, 0.0, 0
    for start in range(0, ids.shape[1] - 1, segment_len):
        window = ids[:, start : start + segment_len + 1]  # (B, T + 1): the segment, one more
        out = model(window[:, :-1], memory if use_memory else None)
        logits = out.logits.flatten(0, 1).float()  # (B * T, V)
        total += float(F.cross_entropy(logits, window[:, 1:].flatten(), reduction="sum"))
        count += window[:, 1:].numel()
        memory = out.memory
    model.train(was_training)
    return total / count


# --8<-- [end:evaluate]
