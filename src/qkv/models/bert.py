"""BERT: a bidirectional Transformer encoder, pre-trained by filling in masked-out words.

    h_0    = LayerNorm(TokEmb(x_t) + TypeEmb(segment_t) + PosEmb(t))
    h_l    = EncoderLayer_l(h_{l-1}),  l = 1 .. L      (post-norm, GELU, no causal mask)
    pooled = tanh(W_p h_L[0] + b_p)                    (the [CLS] token, position 0)

Devlin et al., "BERT: Pre-training of Deep Bidirectional Transformers for Language
Understanding", 2018 (arXiv:1810.04805).
Wang et al., "MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression of
Pre-Trained Transformers", 2020 (arXiv:2002.10957): a 6-layer, 384-wide BERT (``minilm-l6``).
Reimers and Gurevych, "Sentence-BERT: Sentence Embeddings using Siamese BERT-Networks", 2019
(arXiv:1908.10084): mean pooling into sentence embeddings (``sentence_embedding``).

Every position sees every real position, left and right: the only mask hides padding. BERT
learns by predicting tokens hidden behind ``[MASK]`` from both sides (the masked-LM head); a
pooled summary of the first token, ``[CLS]``, feeds sentence-level classifiers::

    input_ids     token_type_ids     positions 0 .. T-1
        |               |                  |
     tok_emb   +    type_emb     +      pos_emb                     (B, T, D)
        |
     emb_norm, dropout                        h_0                   (B, T, D)
        |
     L x EncoderLayer (post-norm)             h_1 .. h_L            (B, T, D)
        |                               |
     head="mlm": transform, act,      pooler: tanh(Linear(h_L[:, 0]))       (B, D)
     norm, lm_head (tied to tok_emb)    |
        (B, T, V)                     head="classification": dropout, Linear (B, C)

Weights start as in the original: every linear and embedding weight from N(0, 0.02²), biases
at zero, LayerNorm at weight 1 and bias 0, the padding token's embedding at zero.

Shape legend: B batch · T query positions · S key/value positions · D model width ·
H query heads · F MLP hidden width · V vocabulary · L layers; here also C classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from qkv.blocks.block import EncoderLayer, LayerSpec
from qkv.blocks.mlp import ActivationName, get_activation
from qkv.blocks.moe import Experts
from qkv.blocks.norms import LayerNorm
from qkv.models import checks
from qkv.models.base import ModelOutput, QkvModel
from qkv.models.common import (
    IGNORE_INDEX,
    check_attention_mask,
    check_labels,
    check_token_ids,
    recording_attentions,
)
from qkv.models.lm import encoder_stack
from qkv.positional.learned import LearnedPositionalEmbedding

__all__ = [
    "PRESETS",
    "Bert",
    "BertConfig",
    "ClassificationHead",
    "MaskedLMHead",
    "sentence_embedding",
]

HeadKind = Literal["none", "mlm", "classification"]
INIT_STD = 0.02  # the original's initializer_range


# --8<-- [start:config]
@dataclass(frozen=True, kw_only=True)
class BertConfig:
    """Sizes and switches of a BERT encoder and its optional head."""

    vocab_size: int = 30_522  # BERT's uncased WordPiece vocabulary
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    d_ff: int = 3072
    max_seq_len: int = 512  # rows of the learned position table
    type_vocab_size: int = 2  # segments: sentence A and sentence B
    dropout: float = 0.1  # embeddings, attention weights, residual branches, classifier
    norm_eps: float = 1e-12
    activation: ActivationName = "gelu"  # exact (erf) GELU, as in Hugging Face's "gelu"
    pad_token_id: int | None = 0  # its embedding starts at zero and gets no gradient
    head: HeadKind = "none"  # "mlm": masked-LM logits; "classification": class logits
    num_labels: int = 2  # classification only; 1 means regression (MSE loss)
    add_pooler: bool = True  # the [CLS] pooler; checkpoints of a masked-LM model have none
    attn_impl: str = "auto"
    # A mixture of experts in place of every layer's feed-forward network, each expert of the
    # network's shape: qkv.blocks.moe.Experts, or a dict of its fields ({"n_experts": 4,
    # "top_k": 2}); None: dense. See docs/learn/13-cheaper-models.md.
    experts: Experts | None = None

    def __post_init__(self) -> None:
        checks.require_experts(self)
        sizes = ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len")
        checks.require_positive(self, *sizes, "type_vocab_size", "num_labels", must_be="at least 1")
        checks.require_divisible(self, "d_model", "n_heads")
        checks.require_rate(self, "dropout")
        checks.require_eps(self)
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id={self.pad_token_id} is not in [0, {self.vocab_size})")
        if self.head not in ("none", "mlm", "classification"):
            raise ValueError(f"unknown head {self.head!r}; choose none, mlm or classification")
        if self.head == "classification" and not self.add_pooler:
            raise ValueError("head='classification' reads the pooled [CLS]: set add_pooler=True")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


# Parameter counts are those of transformers' BertModel (with its pooler) built from the
# matching config; the papers round them.
PRESETS: dict[str, BertConfig] = {
    # Devlin et al. 2018, section 3, BERT_BASE (L=12, H=768, A=12): "110M"; 109,482,240 exactly.
    "bert-base": BertConfig(),
    # BERT_LARGE (L=24, H=1024, A=16): "340M" in the paper, a loose rounding of 335,141,888.
    "bert-large": BertConfig(d_model=1024, n_layers=24, n_heads=16, d_ff=4096),
    # Wang et al. 2020, MiniLM L6xH384 (22M), the checkpoint nreimers/MiniLM-L6-H384-uncased
    # that sentence-transformers/all-MiniLM-L6-v2 fine-tunes: 22,713,216.
    "minilm-l6": BertConfig(d_model=384, n_layers=6, n_heads=12, d_ff=1536),
    # Smoke tests: 2 layers, width 32; 24,416 parameters.
    "tiny": BertConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=64),
}


# --8<-- [end:config]


class MaskedLMHead(nn.Module):
    """Masked-LM head: a transform, then scores against the (tied) token embeddings.

    ``lm_head.weight`` *is* ``tok_emb.weight`` (one shared parameter); ``lm_head.bias`` is a
    learned output-only bias per token.
    """

    def __init__(self, config: BertConfig, tok_emb: nn.Embedding) -> None:
        super().__init__()
        self.transform = nn.Linear(config.d_model, config.d_model)
        self.act = get_activation(config.activation)
        self.norm = LayerNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size)
        self.lm_head.weight = tok_emb.weight  # weight tying: (V, D), shared

    def forward(self, hidden: Tensor, pooled: Tensor | None) -> Tensor:
        """Scores over the vocabulary at every position: hidden (B, T, D) -> (B, T, V)."""
        h = self.norm(self.act(self.transform(hidden)))  # (B, T, D)
        return self.lm_head(h)  # (B, T, V)

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy at the positions whose label is not -100 (the masked ones), in float32
        as in every family's loss."""
        check_labels(labels, logits)
        scores = logits.flatten(0, 1).float()  # (B * T, V)
        return F.cross_entropy(scores, labels.flatten(), ignore_index=IGNORE_INDEX)


class ClassificationHead(nn.Module):
    """Sequence classification (or regression, with one label) from the pooled [CLS] vector."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(config.d_model, config.num_labels)

    def forward(self, hidden: Tensor, pooled: Tensor | None) -> Tensor:
        """Class scores: pooled (B, D) -> (B, C)."""
        if pooled is None:
            raise ValueError("the classification head needs the pooler (add_pooler=True)")
        return self.classifier(self.dropout(pooled))  # (B, C)

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """MSE for one label (regression); cross-entropy for integer class labels (-100 is
        ignored); binary cross-entropy for float multi-label targets (B, C). All in float32."""
        scores = logits.float()  # (B, C)
        if scores.shape[-1] == 1:
            return F.mse_loss(scores.flatten(), labels.flatten().float())
        if labels.is_floating_point():
            return F.binary_cross_entropy_with_logits(scores, labels.float())
        return F.cross_entropy(scores, labels.flatten(), ignore_index=IGNORE_INDEX)


# --8<-- [start:sentence_embedding]
def sentence_embedding(
    last_hidden_state: Tensor, attention_mask: Tensor | None = None, *, normalize: bool = True
) -> Tensor:
    """One vector per sequence: the mean of its real tokens' states, optionally L2-normalised.

    Args:
        last_hidden_state: (B, T, D).
        attention_mask: (B, T), 1 = real token, 0 = padding; None means all real.
        normalize: scale each vector to unit length, so a dot product is the cosine.

    Returns:
        (B, D), in the dtype of ``last_hidden_state``.
    """
    h = last_hidden_state
    if attention_mask is None:
        attention_mask = torch.ones(h.shape[:2], device=h.device)  # (B, T)
    weights = attention_mask.to(h.dtype).unsqueeze(-1)  # (B, T, 1)
    total = (h * weights).sum(dim=1)  # (B, D)
    pooled = total / weights.sum(dim=1).clamp(min=1e-9)  # (B, D)
    return F.normalize(pooled, p=2.0, dim=-1) if normalize else pooled  # (B, D)


# --8<-- [end:sentence_embedding]


class Bert(QkvModel[BertConfig]):
    """BERT: embeddings, a post-norm encoder stack, a [CLS] pooler and an optional head.

    Args:
        config: a ``BertConfig``; ``config.head`` picks the head (``PRESETS`` has named sizes).

    Example:
        >>> import torch
        >>> model = Bert(PRESETS["tiny"]).eval()
        >>> ids = torch.tensor([[2, 5, 7, 3], [2, 9, 3, 0]])
        >>> out = model(ids, attention_mask=(ids != 0).long())
        >>> out.last_hidden_state.shape, out.pooler_output.shape
        (torch.Size([2, 4, 32]), torch.Size([2, 32]))
        >>> emb = model.embed(ids, (ids != 0).long())  # (B, D), unit length
        >>> bool(torch.allclose(emb.norm(dim=-1), torch.ones(2)))
        True
    """

    family = "bert"

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model, padding_idx=c.pad_token_id)
        self.pos_emb = LearnedPositionalEmbedding(c.max_seq_len, c.d_model)
        self.type_emb = nn.Embedding(c.type_vocab_size, c.d_model)
        self.emb_norm = LayerNorm(c.d_model, eps=c.norm_eps)
        self.emb_dropout = nn.Dropout(c.dropout)
        spec = LayerSpec(
            d_model=c.d_model, n_heads=c.n_heads, d_ff=c.d_ff, dropout=c.dropout,
            activation=c.activation, norm_eps=c.norm_eps, norm_first=False, attn_impl=c.attn_impl,
            experts=c.experts,
        )  # fmt: skip
        self.layers = nn.ModuleList(EncoderLayer(spec) for _ in range(c.n_layers))
        self.pooler = nn.Linear(c.d_model, c.d_model) if c.add_pooler else None
        self.head: MaskedLMHead | ClassificationHead | None = None
        if c.head == "mlm":
            self.head = MaskedLMHead(c, self.tok_emb)
        elif c.head == "classification":
            self.head = ClassificationHead(c)
        self.apply(_init_weights)
        if c.pad_token_id is not None:  # re-zero: the tied lm_head was initialised after it
            with torch.no_grad():
                self.tok_emb.weight[c.pad_token_id].zero_()

    # --8<-- [start:forward]
    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        *,
        labels: Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> ModelOutput:
        """Encode a batch, pool its [CLS] token and apply the head.

        Args:
            input_ids: token ids (B, T), int64.
            attention_mask: (B, T), 1 = real token, 0 = padding; None means all real.
            token_type_ids: segment ids (B, T) in [0, type_vocab_size); default all 0.
            labels: the head's targets: token ids (B, T) for "mlm" (-100 = not scored);
                class ids (B,), floats (B,) for regression, or floats (B, C) for multi-label.
            output_hidden_states: also return h_0 .. h_L, each (B, T, D).
            output_attentions: also return every layer's attention weights (B, H, T, T).

        Returns:
            ``ModelOutput`` with last_hidden_state (B, T, D), pooler_output (B, D) when the
            config has a pooler, logits (B, T, V) or (B, C) and loss when a head is set.
        """
        check_token_ids(input_ids)
        b, t = input_ids.shape
        check_attention_mask(attention_mask, t, batch=b, span="T")
        positions = torch.arange(t, device=input_ids.device)  # (T,)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)  # (B, T)
        elif token_type_ids.shape != input_ids.shape:
            raise ValueError(f"token_type_ids must be shaped like input_ids, (B, T) = ({b}, {t}), "
                             f"got {tuple(token_type_ids.shape)}")  # fmt: skip
        h = self.tok_emb(input_ids) + self.type_emb(token_type_ids)  # (B, T, D)
        h = self.emb_dropout(self.emb_norm(h + self.pos_emb(positions)))  # (B, T, D)
        with recording_attentions(self.layers, output_attentions) as weights:
            hidden = encoder_stack(self.layers, h, attention_mask)  # h_0 .. h_L, padding hidden
        h = hidden[-1]  # (B, T, D)
        pooled = None if self.pooler is None else torch.tanh(self.pooler(h[:, 0]))  # (B, D)
        logits = loss = None
        if self.head is not None:
            logits = self.head(h, pooled)  # (B, T, V) or (B, C)
            if labels is not None:
                loss = self.head.loss(logits, labels)
        return ModelOutput(
            logits=logits,
            loss=loss,
            last_hidden_state=h,
            pooler_output=pooled,
            hidden_states=tuple(hidden) if output_hidden_states else None,
            attentions=tuple(weights) if output_attentions else None,  # each (B, H, T, T)
        )

    # --8<-- [end:forward]

    def embed(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        *,
        normalize: bool = True,
    ) -> Tensor:
        """Sentence embeddings (B, D): mean of the real tokens' final states (Sentence-BERT),
        L2-normalised unless ``normalize=False``; see ``sentence_embedding``."""
        out = self(input_ids, attention_mask, token_type_ids)
        assert out.last_hidden_state is not None
        return sentence_embedding(out.last_hidden_state, attention_mask, normalize=normalize)


def _init_weights(module: nn.Module) -> None:
    """BERT's initialisation: N(0, 0.02²) weights, zero biases, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=INIT_STD)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=INIT_STD)
    elif isinstance(module, LayerNorm):
        nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
