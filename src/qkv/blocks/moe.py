"""Mixture of experts: many feed-forward networks, each token sent through only k of them.

    logits     = x W_r                                   the router, (N, X)
    i_1 .. i_k = the k largest logits of the token       its experts
    g_j        = softmax(logits[i_1 .. i_k])_j           Mixtral: softmax over the k chosen
          (or  = softmax(logits)[i_j]                    Switch: probability among all X)
    MoE(x)     = sum_j g_j FFN_{i_j}(x)

Shazeer et al., "Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts
Layer", 2017 (arXiv:1701.06538).
Fedus et al., "Switch Transformers", 2021 (arXiv:2101.03961): top-1 routing, the capacity
factor and the load-balancing loss (section 2.2, eq. 4-6).
Zoph et al., "ST-MoE: Designing Stable and Transferable Sparse Expert Models", 2022
(arXiv:2202.08906): the router z-loss (section 3.1, eq. 5).
Jiang et al., "Mixtral of Experts", 2024 (arXiv:2401.04088): top-2 of 8 SwiGLU experts.

A model gets more parameters without more compute per token: X experts hold X times the
weights of one feed-forward network, but each token runs through only k of them. The router
is one linear map D -> X; its k largest scores pick the experts, and the output is their
outputs weighted by the gates g.

Routing alone is unstable: a few experts win early, get all the gradient and keep winning.
Two auxiliary losses, added to the training loss with small coefficients, push back:

    load balancing   X * sum_i f_i P_i        f_i: share of tokens that picked expert i
                                              P_i: mean router probability of expert i
    router z-loss    mean_t logsumexp(logits_t)^2          keeps the logits small

With top-k routing, f_i counts every token that has i among its k choices, so sum_i f_i = k and
a perfectly even router scores k (transformers' Mixtral counts the same way; with k = 1 this is
Switch's loss, eq. 4-6). Both gradients reach the router through P and the logits; f is a count.

Capacity (Switch): an expert takes at most C = ceil(capacity_factor * N * k / X) tokens per
forward, so that the work is bounded and even across devices. Tokens are served first choices
first, then in order of position; the ones over capacity are dropped by that expert (its output
for them is zero, and the residual connection around the layer carries them on unchanged).
``capacity_factor=None`` sets no limit and drops nothing, as Mixtral does.

Two implementations compute the same thing: ``"loop"`` (the reference: for each expert, pick
its tokens, run it, add its weighted output back) and ``"sorted"`` (sort the N k choices by
expert once, so each expert's tokens are one contiguous slice, and add every output back in
one call). A test holds them equal, outputs and gradients.

Shape legend: B batch · T positions · N = B T tokens · D model width · F MLP hidden width ·
X experts · k experts per token · C capacity per expert.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from qkv.blocks.mlp import ActivationName, FeedForward, GatedFeedForward

__all__ = [
    "MOE_IMPLS",
    "Experts",
    "MixtureOfExperts",
    "MoEOutput",
    "MoEStats",
    "expert_capacity",
    "experts_loop",
    "experts_regularizer",
    "experts_sorted",
    "load_balancing_loss",
    "route",
    "router_z_loss",
]

GateSoftmax = Literal["top_k", "all"]
MoEImpl = Literal["loop", "sorted"]


def expert_capacity(
    n_tokens: int, n_experts: int, top_k: int, capacity_factor: float | None
) -> int | None:
    """C = ceil(capacity_factor * N * k / X), the most tokens one expert takes; None: no limit."""
    if capacity_factor is None:
        return None
    return math.ceil(capacity_factor * n_tokens * top_k / n_experts)


# --8<-- [start:route]
def route(logits: Tensor, top_k: int, gate_softmax: GateSoftmax = "top_k") -> tuple[Tensor, Tensor]:
    """Each token's k experts and their gates, from the router's logits (N, X).

    ``gate_softmax="top_k"`` (Mixtral) normalises over the k chosen logits, so the gates sum to
    1; ``"all"`` (Switch) keeps each chosen expert's probability among all X, so that with
    k = 1 the gate is below 1 and the router learns from the main loss too.

    Returns:
        gates (N, k) float32 and experts (N, k) long, the largest logit first.
    """
    top_logits, experts = logits.float().topk(top_k, dim=-1)  # (N, k) each
    if gate_softmax == "top_k":
        gates = top_logits.softmax(dim=-1)  # (N, k), sums to 1 per token
    else:
        gates = logits.float().softmax(dim=-1).gather(-1, experts)  # (N, k), p_i of the chosen
    return gates, experts


# --8<-- [end:route]


# --8<-- [start:losses]
def load_balancing_loss(logits: Tensor, top_k: int, mask: Tensor | None = None) -> Tensor:
    """Switch's auxiliary loss X * sum_i f_i P_i over the tokens of ``logits`` (N, X).

    f_i is the share of tokens with expert i among their k choices (sum_i f_i = k), P_i the
    mean probability the router gives expert i. ``mask`` (N,), 1 = counted, leaves tokens
    (padding) out. A float32 scalar, k when the routing is perfectly even.
    """
    n_experts = logits.shape[-1]
    probs = logits.float().softmax(dim=-1)  # (N, X)
    chosen = logits.float().topk(top_k, dim=-1).indices  # (N, k)
    picked = F.one_hot(chosen, n_experts).sum(dim=1).float()  # (N, X), 1 where i is chosen
    weight = probs.new_ones(probs.shape[0]) if mask is None else mask.float()  # (N,)
    total = weight.sum().clamp(min=1.0)
    f = (picked * weight[:, None]).sum(dim=0) / total  # (X,) share of tokens per expert
    p = (probs * weight[:, None]).sum(dim=0) / total  # (X,) mean router probability
    return n_experts * (f * p).sum()


def router_z_loss(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """ST-MoE's z-loss, mean_t logsumexp(logits_t)^2 over the tokens of ``logits`` (N, X).

    ``mask`` (N,), 1 = counted, leaves tokens out. A float32 scalar.
    """
    z = torch.logsumexp(logits.float(), dim=-1)  # (N,)
    weight = torch.ones_like(z) if mask is None else mask.float()  # (N,)
    return (z.square() * weight).sum() / weight.sum().clamp(min=1.0)


# --8<-- [end:losses]

# Both run ``experts`` on the tokens routed to them and return the combined output (N, D) and
# which of the N k choices were served, (N, k) bool (False: over capacity, dropped).
ExpertsImpl = Callable[[Tensor, nn.ModuleList, Tensor, Tensor, int | None], tuple[Tensor, Tensor]]


# --8<-- [start:experts_loop]
def experts_loop(
    x: Tensor, experts: nn.ModuleList, gates: Tensor, chosen: Tensor, capacity: int | None
) -> tuple[Tensor, Tensor]:
    """The reference: for each expert, select its tokens, run it, add them back weighted.

    Args:
        x: tokens (N, D); gates, chosen: from ``route``, (N, k) each.
        capacity: C, the most tokens an expert serves (first choices first, then by position);
            None: no limit.

    Returns:
        The output (N, D) and the served choices (N, k) bool.
    """
    out = torch.zeros_like(x)  # (N, D)
    served = torch.zeros_like(chosen, dtype=torch.bool)  # (N, k)
    for e, expert in enumerate(experts):
        # Row-major over (k, N): every first choice of e in token order, then every second.
        rank, token = torch.nonzero((chosen == e).T, as_tuple=True)  # (n_e,) each
        if capacity is not None:
            rank, token = rank[:capacity], token[:capacity]  # the rest are dropped
        served[token, rank] = True
        y = expert(x[token])  # (n_e, D)
        # Summed in x's dtype: under autocast the experts return bfloat16, the stream is float32.
        out.index_add_(0, token, y.to(x.dtype) * gates[token, rank, None].to(x.dtype))  # (N, D)
    return out, served


# --8<-- [end:experts_loop]


GROUP_ALIGN = 64  # experts_sorted pads each expert's rows to a multiple of this


# --8<-- [start:experts_sorted]
def experts_sorted(
    x: Tensor, experts: nn.ModuleList, gates: Tensor, chosen: Tensor, capacity: int | None
) -> tuple[Tensor, Tensor]:
    """The batched path: the N k choices sorted by expert, each expert runs on one slice.

    The same computation as ``experts_loop``, reordered: one stable sort replaces the X
    selections (keeping the loop's order of service within each expert), one gather and one
    ``index_add_`` replace the X of each. The loop over experts remains (each has its own
    weights); nothing loops over tokens. Each expert's slice is padded with zero rows to a
    multiple of ``GROUP_ALIGN``: their outputs are never read, and the matrix products keep
    sizes the CPU's bfloat16 kernels run fast (about 1.8x faster training steps of a small
    GPT with experts under bfloat16 autocast, ``benchmarks/moe.py``).
    """
    n, k = chosen.shape
    flat = chosen.T.reshape(-1)  # (k N,), choice i = rank * N + token, as the loop serves them
    order = torch.argsort(flat, stable=True)  # (k N,) grouped by expert, service order kept
    counts = torch.bincount(flat, minlength=len(experts))  # (X,)
    starts = counts.cumsum(0) - counts  # (X,) where each expert's run begins
    place = torch.arange(k * n, device=x.device) - starts[flat[order]]  # (k N,) place in queue
    if capacity is not None:
        kept = place < capacity  # over capacity: dropped
        order, place, counts = order[kept], place[kept], counts.clamp(max=capacity)  # (M,)
    rank, token = order // n, order % n  # (M,) each
    padded = (counts + GROUP_ALIGN - 1) // GROUP_ALIGN * GROUP_ALIGN  # (X,) rows per expert
    row = (padded.cumsum(0) - padded)[flat[order]] + place  # (M,) each choice's row
    groups = x.new_zeros(int(padded.sum()), x.shape[-1]).index_copy_(0, row, x[token])
    slices = groups.split(padded.tolist())  # X slices (padded n_e, D), one per expert
    y = torch.cat([expert(s) for expert, s in zip(experts, slices, strict=True)])[row]  # (M, D)
    weighted = y.to(x.dtype) * gates[token, rank, None].to(x.dtype)  # (M, D), in x's dtype
    out = torch.zeros_like(x).index_add_(0, token, weighted)  # (N, D)
    served = torch.zeros(k * n, dtype=torch.bool, device=x.device)  # (k N,)
    served[order] = True
    return out, served.view(k, n).T  # (N, D), (N, k)


# --8<-- [end:experts_sorted]

MOE_IMPLS: dict[str, ExpertsImpl] = {"loop": experts_loop, "sorted": experts_sorted}


@dataclass(frozen=True)
class MoEStats:
    """What one forward did with its tokens, for logging and plots (counts, no gradient).

    Attributes:
        tokens_per_expert: (X,) long, the choices the router made for each expert (N k in all),
            before capacity.
        dropped_per_expert: (X,) long, of those, the ones over the expert's capacity.
        capacity: C, or None when there was no limit.
    """

    tokens_per_expert: Tensor
    dropped_per_expert: Tensor
    capacity: int | None

    @property
    def dropped_fraction(self) -> float:
        """The share of the N k choices that were dropped, in [0, 1]."""
        total = int(self.tokens_per_expert.sum())
        return int(self.dropped_per_expert.sum()) / total if total else 0.0

    @property
    def load_share(self) -> Tensor:
        """(X,) float, each expert's share of the choices; 1 / X each when balanced."""
        counts = self.tokens_per_expert.float()
        return counts / counts.sum().clamp(min=1.0)


@dataclass(frozen=True)
class MoEOutput:
    """``MixtureOfExperts.forward_with_losses``'s result.

    Attributes:
        output: (B, T, D).
        router_logits: (N, X), N = B T, in the input's dtype.
        aux_loss: the load-balancing loss over these N tokens, a float32 scalar.
        z_loss: the router z-loss over these N tokens, a float32 scalar.
        stats: the counts of this forward.
    """

    output: Tensor
    router_logits: Tensor
    aux_loss: Tensor
    z_loss: Tensor
    stats: MoEStats


def _check_routing(
    n_experts: int, top_k: int, capacity_factor: float | None, gate_softmax: str, impl: str
) -> None:
    """Raise a ValueError that names the fix for routing settings that cannot work."""
    if n_experts < 1:
        raise ValueError(f"n_experts must be at least 1, got {n_experts}")
    if not 1 <= top_k <= n_experts:
        raise ValueError(
            f"top_k={top_k} must be between 1 and n_experts={n_experts}: each token picks "
            "top_k distinct experts; lower top_k or add experts"
        )
    if capacity_factor is not None and not capacity_factor > 0:
        raise ValueError(
            f"capacity_factor must be > 0 (1.0: an even share per expert; Switch uses "
            f"1.0 to 1.25), or None for no limit; got {capacity_factor}"
        )
    if gate_softmax not in ("top_k", "all"):
        raise ValueError(f"gate_softmax must be 'top_k' or 'all', got {gate_softmax!r}")
    if impl not in MOE_IMPLS:
        raise ValueError(f"unknown MoE impl {impl!r}; choose one of {list(MOE_IMPLS)}")


@dataclass(frozen=True, kw_only=True)
class Experts:
    """A mixture of experts in place of a layer's feed-forward network.

    ``LayerSpec(experts=Experts(...))`` gives every layer built from the spec a
    ``MixtureOfExperts`` whose experts have the feed-forward network's shape (width F, its
    activation, gating and bias); a model config's ``experts`` field (a dict of these fields in
    config.json and YAML) does the same for a whole model. The training loss then gains
    ``aux_loss_coef`` x the load-balancing loss and ``z_loss_coef`` x the router z-loss, each a
    mean over the layers (``experts_regularizer``).

    Attributes:
        n_experts: X. top_k: k, experts per token (1: Switch, 2: Mixtral).
        capacity_factor: see ``expert_capacity``; None: no limit.
        gate_softmax: ``"top_k"`` (Mixtral) or ``"all"`` (Switch), see ``route``.
        impl: ``"sorted"`` (batched) or ``"loop"`` (the reference).
        aux_loss_coef: weight of the load-balancing loss (Switch: 0.01).
        z_loss_coef: weight of the router z-loss (ST-MoE: 0.001).

    Example:
        >>> spec = Experts.of({"n_experts": 4, "top_k": 1})  # a config's dict
        >>> spec.top_k, spec.aux_loss_coef
        (1, 0.01)
    """

    n_experts: int
    top_k: int = 2
    capacity_factor: float | None = None
    gate_softmax: GateSoftmax = "top_k"
    impl: MoEImpl = "sorted"
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001

    def __post_init__(self) -> None:
        _check_routing(self.n_experts, self.top_k, self.capacity_factor, self.gate_softmax,
                       self.impl)  # fmt: skip
        if self.aux_loss_coef < 0 or self.z_loss_coef < 0:
            raise ValueError("aux_loss_coef and z_loss_coef must be >= 0 (0 turns a loss off)")

    @classmethod
    def of(cls, value: Experts | dict[str, Any] | None) -> Experts | None:
        """An ``Experts`` from itself, from a config's dict of its fields, or None from None."""
        if value is None or isinstance(value, Experts):
            return value
        if not isinstance(value, dict):
            raise TypeError(
                f"experts must be a mapping of Experts fields (n_experts, top_k, ...), got "
                f"{type(value).__name__}"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(value) - known):
            raise ValueError(f"unknown experts field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**value)


class MixtureOfExperts(nn.Module):
    """A feed-forward layer of ``n_experts`` FFNs and a router; each token uses ``top_k``.

    A drop-in for ``FeedForward`` / ``GatedFeedForward``: ``forward`` maps (B, T, D) to
    (B, T, D). It also keeps what the training loss and the logs need from its last call:
    ``last_output`` (a ``MoEOutput``: router logits and both auxiliary losses, with their
    gradients) and ``last_stats`` (counts). ``forward_with_losses`` returns all of it.

    Args:
        d_model: D. d_ff: F, each expert's hidden width.
        n_experts: X.
        top_k: k, experts per token (1: Switch, 2: Mixtral).
        gated: experts are ``GatedFeedForward`` (SwiGLU with "silu") or else ``FeedForward``.
        activation, bias, dropout: of every expert, as in ``blocks/mlp.py``.
        capacity_factor: C = ceil(capacity_factor * N k / X) tokens per expert at most
            (Switch: 1.0 to 1.25); None: no limit (Mixtral).
        gate_softmax: ``"top_k"`` (Mixtral) or ``"all"`` (Switch), see ``route``.
        impl: ``"sorted"`` (batched) or ``"loop"`` (the reference); same results.

    Example:
        >>> moe = MixtureOfExperts(16, 32, n_experts=4, top_k=2)
        >>> moe(torch.randn(2, 5, 16)).shape
        torch.Size([2, 5, 16])
        >>> int(moe.last_stats.tokens_per_expert.sum())  # N k = 10 * 2 choices
        20
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        n_experts: int,
        *,
        top_k: int = 2,
        gated: bool = True,
        activation: ActivationName = "silu",
        bias: bool = False,
        dropout: float = 0.0,
        capacity_factor: float | None = None,
        gate_softmax: GateSoftmax = "top_k",
        impl: MoEImpl = "sorted",
    ) -> None:
        super().__init__()
        _check_routing(n_experts, top_k, capacity_factor, gate_softmax, impl)
        self.n_experts, self.top_k, self.impl = n_experts, top_k, impl
        self.capacity_factor, self.gate_softmax = capacity_factor, gate_softmax
        self.router = nn.Linear(d_model, n_experts, bias=False)  # W_r
        kind = GatedFeedForward if gated else FeedForward
        self.experts = nn.ModuleList(
            kind(d_model, d_ff, activation=activation, bias=bias, dropout=dropout)
            for _ in range(n_experts)
        )
        self.last_output: MoEOutput | None = None
        self.spec: Experts | None = None  # set by from_spec: the loss coefficients

    @classmethod
    def from_spec(
        cls, spec: Experts, d_model: int, d_ff: int, *, gated: bool, activation: ActivationName,
        bias: bool, dropout: float,
    ) -> MixtureOfExperts:  # fmt: skip
        """The mixture ``spec`` describes, its experts shaped like the FFN it replaces."""
        moe = cls(
            d_model, d_ff, spec.n_experts, top_k=spec.top_k, gated=gated, activation=activation,
            bias=bias, dropout=dropout, capacity_factor=spec.capacity_factor,
            gate_softmax=spec.gate_softmax, impl=spec.impl,
        )  # fmt: skip
        moe.spec = spec
        return moe

    @property
    def last_stats(self) -> MoEStats | None:
        """The counts of the last forward (None before the first)."""
        return None if self.last_output is None else self.last_output.stats

    # --8<-- [start:forward]
    def forward_with_losses(self, x: Tensor) -> MoEOutput:
        """Route ``x`` (B, T, D) through its experts; the output, losses and counts."""
        tokens = x.reshape(-1, x.shape[-1])  # (N, D)
        logits = self.router(tokens)  # (N, X)
        gates, chosen = route(logits, self.top_k, self.gate_softmax)  # (N, k) each
        capacity = expert_capacity(len(tokens), self.n_experts, self.top_k, self.capacity_factor)
        out, served = MOE_IMPLS[self.impl](tokens, self.experts, gates, chosen, capacity)
        with torch.no_grad():  # counts for the logs
            routed = torch.bincount(chosen.flatten(), minlength=self.n_experts)  # (X,)
            dropped = torch.bincount(chosen[~served], minlength=self.n_experts)  # (X,)
        return MoEOutput(
            output=out.view_as(x),  # (B, T, D)
            router_logits=logits,
            aux_loss=load_balancing_loss(logits, self.top_k),
            z_loss=router_z_loss(logits),
            stats=MoEStats(tokens_per_expert=routed, dropped_per_expert=dropped, capacity=capacity),
        )

    def forward(self, x: Tensor) -> Tensor:
        """The FFN's interface: (B, T, D) -> (B, T, D); the rest is kept in ``last_output``."""
        self.last_output = self.forward_with_losses(x)
        return self.last_output.output

    # --8<-- [end:forward]

    def extra_repr(self) -> str:
        return (
            f"n_experts={self.n_experts}, top_k={self.top_k}, capacity_factor="
            f"{self.capacity_factor}, gate_softmax={self.gate_softmax!r}, impl={self.impl!r}"
        )


def experts_regularizer(model: nn.Module) -> Tensor | None:
    """The router losses of ``model``'s last forward, weighted: the mean over its mixture-of-
    experts layers of aux_loss_coef x load balancing + z_loss_coef x z-loss, with each layer's
    coefficients from the ``Experts`` it was built from (layers built without one count 0).
    None when the model has no such layer or has not run since it was built."""
    terms = []
    for module in model.modules():
        if isinstance(module, MixtureOfExperts) and module.last_output is not None:
            spec, out = module.spec, module.last_output
            if spec is not None:
                terms.append(spec.aux_loss_coef * out.aux_loss + spec.z_loss_coef * out.z_loss)
    return torch.stack(terms).mean() if terms else None
