"""LoRA: fine-tune a frozen linear layer through a trainable low-rank update.

    h = x W^T + b + (alpha / r) * dropout(x) A^T B^T        A: (r, d_in), B: (d_out, r)

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021 (arXiv:2106.09685).

Fine-tuning changes a pretrained weight W by some dW. LoRA bets that the change needed for a new
task has a low rank, and writes it as dW = (alpha / r) B A with r much smaller than d_in and
d_out: instead of d_out * d_in numbers per matrix, only r * (d_in + d_out) are trained, and W
stays frozen. A starts random (Kaiming-uniform, as ``nn.Linear`` initialises its weight) and
B at zero, so training starts exactly from the pretrained model. alpha / r keeps the size of
the update comparable when r changes. After training, ``merge`` folds the update into W
(W + (alpha / r) B A): the adapted layer is again one plain matrix, as fast as the original.

``apply_lora`` puts an adapter on every ``nn.Linear`` of a model whose name matches a pattern
(the paper adapts the attention projections q_proj and v_proj), ``merge_lora`` folds them all
back into plain layers, and ``lora_state_dict`` keeps only the adapters' weights: a few hundred
kilobytes instead of the whole model.

Shapes: (..., d_in) in, (..., d_out) out, r the rank. The letters A and B are the paper's names
of the two matrices (not the batch size).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "LoRALinear",
    "LoRAReport",
    "apply_lora",
    "lora_state_dict",
    "matches_target",
    "merge_lora",
]


# --8<-- [start:lora_linear]
class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update: ``base(x) + s dropout(x) A^T B^T``.

    Args:
        base: the pretrained layer; its weight and bias are frozen (``requires_grad=False``).
        rank: r, the rank of the update; at most min(d_in, d_out).
        alpha: the update is scaled by s = alpha / r.
        dropout: dropout on the adapter's input while training (the base layer sees x as is).

    Attributes:
        lora_A: (r, d_in), Kaiming-uniform at start.
        lora_B: (d_out, r), zeros at start: the adapted layer starts equal to ``base``.
        merged: True after ``merge()``: the update then lives inside ``base.weight``.

    Example:
        >>> import torch
        >>> layer = LoRALinear(torch.nn.Linear(16, 8), rank=2, alpha=4)
        >>> layer(torch.randn(3, 16)).shape, layer.lora_A.shape, layer.lora_B.shape
        (torch.Size([3, 8]), torch.Size([2, 16]), torch.Size([8, 2]))
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear adapts an nn.Linear, got {type(base).__name__}")
        d_in, d_out = base.in_features, base.out_features
        if not 1 <= rank <= min(d_in, d_out):
            raise ValueError(
                f"rank={rank} must be between 1 and min(d_in, d_out) = min({d_in}, {d_out}); "
                "a larger rank adds parameters without adding expressiveness"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.base = base.requires_grad_(False)
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        w = base.weight  # (d_out, d_in); the adapter takes its device and dtype
        self.lora_A = nn.Parameter(w.new_empty(rank, d_in))  # (r, d_in)
        self.lora_B = nn.Parameter(w.new_zeros(d_out, rank))  # (d_out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear, loralib and PEFT
        self.dropout = nn.Dropout(dropout)
        self.merged = False
        self.train(base.training)  # an adapter put into an eval-mode model stays in eval mode

    def forward(self, x: Tensor) -> Tensor:
        """Adapt ``x`` (..., d_in); returns (..., d_out)."""
        y = self.base(x)  # (..., d_out), x W^T + b with the frozen W
        if self.merged:  # W already holds W + s B A
            return y
        down = self.dropout(x) @ self.lora_A.T  # (..., r), into the low-rank space
        return y + (down @ self.lora_B.T) * self.scaling  # (..., d_out), back out, scaled

    # --8<-- [end:lora_linear]

    def delta_weight(self) -> Tensor:
        """The update s B A that ``merge`` adds to the base weight, (d_out, d_in)."""
        return (self.lora_B @ self.lora_A) * self.scaling  # (d_out, d_in)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight: W <- W + s B A; the forward is then one matmul.

        Raises:
            RuntimeError: already merged (a second merge would add the update twice).
        """
        if self.merged:
            raise RuntimeError("this LoRALinear is already merged; unmerge() it first")
        self.base.weight += self.delta_weight()
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update out of the base weight again: W <- W - s B A (to keep training).

        Raises:
            RuntimeError: not merged.
        """
        if not self.merged:
            raise RuntimeError("this LoRALinear is not merged; there is nothing to unmerge")
        self.base.weight -= self.delta_weight()
        self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, merged={self.merged}"


@dataclass(frozen=True)
class LoRAReport:
    """What ``apply_lora`` did.

    Attributes:
        adapted: the qualified names of the layers that got an adapter.
        trainable: parameters that train (the adapters' A and B).
        total: all parameters of the model, adapters included, shared tensors counted once.
    """

    adapted: tuple[str, ...]
    trainable: int
    total: int

    @property
    def trainable_fraction(self) -> float:
        return self.trainable / self.total

    def __str__(self) -> str:
        return (
            f"LoRA on {len(self.adapted)} layers: {self.trainable:,} trainable parameters of "
            f"{self.total:,} ({100 * self.trainable_fraction:.3f}%)"
        )


def matches_target(name: str, pattern: str) -> bool:
    """Whether the module ``name`` matches ``pattern``, as in PEFT's ``target_modules`` list.

    A name matches when it equals the pattern or ends with "." + pattern
    (``layers.0.self_attn.q_proj`` matches ``q_proj`` and ``self_attn.q_proj``, not ``proj``).
    Patterns may use fnmatch's wildcards, compared the same way: ``*`` (any characters, dots
    included), ``?`` and ``[...]``: ``*_proj``, ``mlp.*``, ``layers.[01].self_attn.q_proj``.
    """
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


def _patterns(targets: str | Sequence[str]) -> list[str]:
    """Targets as a list of patterns; a string is split at commas ("q_proj,v_proj")."""
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    patterns = [p.strip() for p in items if p.strip()]
    if not patterns:
        raise ValueError(f"targets={targets!r} names no layer; e.g. targets='q_proj,v_proj'")
    return patterns


def _count(model: nn.Module, trainable: bool) -> int:
    """Parameters of ``model`` (only those that train, if ``trainable``), shared ones once."""
    unique = {id(p): p for p in model.parameters() if p.requires_grad or not trainable}
    return sum(p.numel() for p in unique.values())


def apply_lora(
    model: nn.Module,
    targets: str | Sequence[str],
    rank: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
) -> LoRAReport:
    """Put a ``LoRALinear`` on every ``nn.Linear`` of ``model`` matched by ``targets``, in place,
    and freeze every other parameter.

    Args:
        model: any module; its matching linear layers are replaced.
        targets: patterns (see ``matches_target``), as a list or one comma-separated string.
            Unlike PEFT, a single string is not a regular expression.
        rank, alpha, dropout: of each adapter (see ``LoRALinear``).

    Returns:
        A ``LoRAReport``: the adapted layers and the trainable and total parameter counts.

    Raises:
        ValueError: a pattern matches no linear layer (the message lists some that exist), or
            matches a layer that already has an adapter.

    Example:
        >>> from qkv.models.llama import PRESETS, Llama
        >>> model = Llama(PRESETS["tiny"])
        >>> report = apply_lora(model, "q_proj,v_proj", rank=4, alpha=8)
        >>> report.adapted[:2], report.trainable
        (('layers.0.self_attn.q_proj', 'layers.0.self_attn.v_proj'), 896)
    """
    patterns = _patterns(targets)
    adapted = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    linears = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.rpartition(".")[0] not in adapted
    ]
    chosen: list[str] = []
    for pattern in patterns:
        twice = sorted(n for n in adapted if matches_target(n, pattern))
        if twice:
            raise ValueError(
                f"target {pattern!r} matches layers that already have an adapter ({twice[:3]}); "
                "merge_lora(model) first, or target other layers"
            )
        found = [n for n in linears if matches_target(n, pattern)]
        if not found:
            roles = sorted({n.rpartition(".")[2] for n in linears})
            raise ValueError(
                f"target {pattern!r} matches no nn.Linear of {type(model).__name__}; its linear "
                f"layers are named {roles} (e.g. {linears[:3]})"
            )
        chosen += [n for n in found if n not in chosen]
    model.requires_grad_(False)  # everything frozen; the adapters below train
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, dropout))
    for layer in model.modules():  # (adapters from an earlier apply_lora keep training too)
        if isinstance(layer, LoRALinear):
            layer.lora_A.requires_grad_(True)
            layer.lora_B.requires_grad_(True)
    ordered = tuple(n for n in linears if n in chosen)  # the model's order, not the patterns'
    return LoRAReport(ordered, _count(model, trainable=True), _count(model, trainable=False))


def _lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA adapters; see apply_lora")
    return layers


def merge_lora(model: nn.Module) -> tuple[str, ...]:
    """Replace every ``LoRALinear`` of ``model`` by its base ``nn.Linear`` with the update
    merged into the weight, in place: plain layers again (for export, or for speed).

    The merged weights stay frozen, as ``apply_lora`` left them.

    Returns:
        The names of the merged layers.

    Raises:
        ValueError: the model has no adapters.
    """
    layers = _lora_layers(model)
    for name, layer in layers:
        if not layer.merged:
            layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base)
    return tuple(name for name, _ in layers)


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the adapters' weights: ``{"<layer>.lora_A": (r, d_in), "<layer>.lora_B": (d_out, r)}``.

    They load back with ``model.load_state_dict(state, strict=False)`` into a model given the
    same ``apply_lora``.

    Raises:
        ValueError: the model has no adapters.
    """
    state: dict[str, Tensor] = {}
    for name, layer in _lora_layers(model):
        state[f"{name}.lora_A"] = layer.lora_A.detach()  # (r, d_in)
        state[f"{name}.lora_B"] = layer.lora_B.detach()  # (d_out, r)
    return state
