"""A Mixtral-style decoder: LLaMA / Mistral with a mixture of experts for every feed-forward.

    h_l = h_{l-1} + Attn(RMSNorm(h_{l-1}), RoPE)          causal, grouped-query, as in LLaMA
    h_l = h_l + sum_j g_j SwiGLU_{i_j}(RMSNorm(h_l))      the k of X experts the router picks
    loss = cross-entropy + c_aux * load balancing + c_z * router z-loss

Jiang et al., "Mixtral of Experts", 2024 (arXiv:2401.04088).
Fedus et al., "Switch Transformers", 2021 (arXiv:2101.03961), the load-balancing loss.
Zoph et al., "ST-MoE", 2022 (arXiv:2202.08906), the router z-loss.

Where it differs from LLaMA (``llama.py``), and only there:

* feed-forward: each layer's SwiGLU becomes ``n_experts`` SwiGLU experts and a router
  (``blocks/moe.py``); each token runs through its ``top_k`` experts (Mixtral: 2 of 8), with
  gates from a softmax over the chosen logits;
* loss: with labels, the cross-entropy plus ``router_aux_loss_coef`` times the load-balancing
  loss (and ``router_z_loss_coef`` times the z-loss, 0 in Mixtral).

Everything else (embeddings, RoPE, grouped-query attention, the sliding window, RMSNorm, the
cache) is LLaMA's: ``Mixtral`` builds a ``Llama`` and swaps each layer's ``mlp``::

    x ──┬── RMSNorm ── Attention(RoPE, GQA) ──(+)──┬── RMSNorm ── router ── k of X SwiGLU ──(+)──>
        └─────────────────────────────────────┘    └───────────────────────────────────────┘

The auxiliary losses are those of transformers' ``MixtralForCausalLM``: the load-balancing
loss is computed once over the tokens of all layers together (f and P averaged over every
layer's real tokens, padding left out), not averaged layer by layer; the z-loss likewise. With a
``capacity_factor`` (Switch's token dropping; Mixtral has none), a token's output depends on the
other tokens of the batch, so a cached decoding step can differ from a full forward.

Shape legend: B batch · T query positions · S key/value positions · D model width ·
H query heads · K key/value heads · E head dim · F MLP hidden width · V vocabulary · L layers ·
X experts · N = B T tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

from qkv.attention.kv_cache import KVCache
from qkv.blocks.moe import MixtureOfExperts, MoEImpl, MoEStats, load_balancing_loss, router_z_loss
from qkv.models import checks
from qkv.models.base import ModelOutput
from qkv.models.common import causal_lm_loss
from qkv.models.llama import Llama, LlamaConfig

__all__ = ["PRESETS", "Mixtral", "MixtralConfig", "MixtralOutput"]


# --8<-- [start:config]
@dataclass(frozen=True, kw_only=True)
class MixtralConfig(LlamaConfig):
    """A ``LlamaConfig`` (every field of it, see ``llama.py``) and the experts.

    Attributes:
        n_experts: X, experts per layer (Mixtral: 8).
        top_k: experts per token (Mixtral: 2).
        router_aux_loss_coef: weight of the load-balancing loss in the training loss
            (transformers' default 0.001).
        router_z_loss_coef: weight of the router z-loss (ST-MoE: 0.001; Mixtral: none, 0).
        capacity_factor: Switch's limit on tokens per expert, see ``blocks/moe.py``; None (no
            limit, nothing dropped) is Mixtral.
        moe_impl: ``"sorted"`` (batched) or ``"loop"`` (the reference); same results.
    """

    n_experts: int = 8
    top_k: int = 2
    router_aux_loss_coef: float = 0.001
    router_z_loss_coef: float = 0.0
    capacity_factor: float | None = None
    moe_impl: MoEImpl = "sorted"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.experts is not None:
            raise ValueError(
                "experts: Mixtral's feed-forward networks are already mixtures of experts, set "
                "by n_experts, top_k and capacity_factor; leave experts unset"
            )
        checks.require_positive(self, "n_experts", "top_k")
        if self.top_k > self.n_experts:
            raise ValueError(
                f"top_k={self.top_k} exceeds n_experts={self.n_experts}: each token picks "
                "top_k distinct experts; lower top_k or add experts"
            )
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(
                f"capacity_factor must be > 0, or None for no limit; got {self.capacity_factor}"
            )
        if self.router_aux_loss_coef < 0 or self.router_z_loss_coef < 0:
            raise ValueError(
                "router_aux_loss_coef and router_z_loss_coef must be >= 0, got "
                f"{self.router_aux_loss_coef} and {self.router_z_loss_coef}"
            )


PRESETS: dict[str, MixtralConfig] = {
    # Jiang et al. 2024 (arXiv:2401.04088), Table 1: 46,702,792,704 parameters (the paper's
    # "47B"), 12.9B of them active per token. rope_base from the released checkpoint's config.
    "mixtral-8x7b": MixtralConfig(
        vocab_size=32_000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14_336,
        max_seq_len=32_768, rope_base=1e6, norm_eps=1e-5, n_experts=8, top_k=2,
    ),
    # For tests and smoke runs: LLaMA's tiny sizes, 4 experts of which each token uses 2.
    "tiny": MixtralConfig(
        vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
        max_seq_len=64, n_experts=4, top_k=2,
    ),
}  # fmt: skip


# --8<-- [end:config]


@dataclass
class MixtralOutput(ModelOutput):
    """``ModelOutput`` and what the routers did.

    Attributes:
        aux_loss: the load-balancing loss over all layers' real tokens (a float32 scalar).
        z_loss: the router z-loss over all layers' real tokens (a float32 scalar).
        router_logits: every layer's router logits, L x (N, X), N = B T.
    """

    aux_loss: Tensor | None = None
    z_loss: Tensor | None = None
    router_logits: tuple[Tensor, ...] | None = None


class Mixtral(Llama):
    """A Mixtral-style sparse mixture-of-experts language model.

    Weights start as LLaMA's: every linear matrix (router and experts included) and the
    embedding normal(0, 0.02), RMSNorm gains 1 (transformers' ``initializer_range=0.02``).

    Args:
        config: a ``MixtralConfig``.

    Example:
        >>> model = Mixtral(PRESETS["tiny"])
        >>> ids = torch.randint(0, 128, (2, 6))
        >>> out = model(ids, labels=ids)
        >>> out.logits.shape, out.loss.shape, len(out.router_logits)
        (torch.Size([2, 6, 128]), torch.Size([]), 2)
        >>> [s.tokens_per_expert.sum().item() for s in model.router_stats()]  # B T k choices
        [24, 24]
    """

    family = "mixtral"
    config_class = MixtralConfig
    config: MixtralConfig

    def __init__(self, config: MixtralConfig) -> None:
        super().__init__(config)  # LLaMA, with one SwiGLU per layer
        c = config
        for layer in self.layers:  # the one change: each SwiGLU becomes X experts and a router
            layer.mlp = MixtureOfExperts(
                c.d_model, c.d_ff, c.n_experts, top_k=c.top_k, gated=True, activation="silu",
                bias=False, dropout=c.dropout, capacity_factor=c.capacity_factor,
                gate_softmax="top_k", impl=c.moe_impl,
            )  # fmt: skip
        self.reset_parameters()

    def moe_layers(self) -> list[MixtureOfExperts]:
        """Each layer's mixture of experts, first layer first."""
        moes = [layer.mlp for layer in self.layers]
        assert all(isinstance(m, MixtureOfExperts) for m in moes), (
            "each layer's mlp is a MixtureOfExperts"
        )
        return cast(list[MixtureOfExperts], moes)

    def router_stats(self) -> list[MoEStats]:
        """The counts of the last forward, one ``MoEStats`` per layer (see ``viz/moe.py``)."""
        stats = [moe.last_stats for moe in self.moe_layers()]
        if any(s is None for s in stats):
            raise RuntimeError("router_stats() reports the last forward: run the model first")
        return [s for s in stats if s is not None]

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
    ) -> MixtralOutput:
        """Next-token logits for every position, and the router losses; the arguments are
        ``Llama.forward``'s.

        Returns:
            ``MixtralOutput``: ``Llama``'s fields, ``router_logits``, ``aux_loss``, ``z_loss``
            and with labels ``loss`` = cross-entropy + c_aux aux_loss + c_z z_loss.
        """
        out = super().forward(  # Llama, without labels
            input_ids, attention_mask, position_ids=position_ids, cache=cache,
            output_hidden_states=output_hidden_states, output_attentions=output_attentions,
        )  # fmt: skip
        moe_outputs = [moe.last_output for moe in self.moe_layers()]  # set by that forward
        router_logits = tuple(o.router_logits for o in moe_outputs if o is not None)  # L x (N, X)
        # The router losses: one over every layer's new tokens, padding left out (as
        # transformers computes them), for the training loss or for a trainer to add.
        t, c = input_ids.shape[1], self.config
        mask = None if attention_mask is None else attention_mask[:, -t:].reshape(-1)  # (N,)
        logits = torch.cat(router_logits)  # (L N, X)
        mask = None if mask is None else mask.repeat(len(router_logits))  # (L N,)
        aux_loss = load_balancing_loss(logits, c.top_k, mask)
        z_loss = router_z_loss(logits, mask)
        self._regularizer = c.router_aux_loss_coef * aux_loss + c.router_z_loss_coef * z_loss
        loss = None
        if labels is not None and out.logits is not None:
            loss = causal_lm_loss(out.logits, labels)  # (Llama ran without labels)
            loss = loss + c.router_aux_loss_coef * aux_loss + c.router_z_loss_coef * z_loss
        fields = {**vars(out), "loss": loss}
        return MixtralOutput(
            **fields, aux_loss=aux_loss, z_loss=z_loss, router_logits=router_logits
        )

    # --8<-- [end:forward]

    def training_regularizer(self) -> Tensor | None:
        """c_aux aux_loss + c_z z_loss of the last forward, for a trainer to add to its loss."""
        return getattr(self, "_regularizer", None)
