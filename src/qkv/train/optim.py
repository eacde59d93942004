"""AdamW with weight decay on the matrices that multiply activations, and nowhere else.

Decoupled weight decay (Loshchilov and Hutter, "Decoupled Weight Decay Regularization", 2019,
arXiv:1711.05101) shrinks every decayed weight a little each step, θ <- θ - lr * λ * θ, apart
from the Adam update. Which parameters to decay is a choice that codebases make differently.
Shrinking a LayerNorm gain or a bias towards zero only fights the normalisation, and nearly all of
them exempt those. Embeddings are where they differ: BERT's original code and nanoGPT decay them,
while others exempt them, since decay penalises a rare token's row, which gets few gradients to
push back. qkv chooses the second, with two parameter groups:

    decay       weights of nn.Linear and convolutions (the (out, in) matrices)
    no decay    everything else: norm gains and shifts, biases, token and position embeddings
                (also when tied to an output head), ViT's class token, T5's relative biases
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from qkv.train.config import OptimConfig

__all__ = ["build_optimizer", "param_groups"]


# --8<-- [start:groups]
def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, object]]:
    """Two AdamW parameter groups: decayed matrices, and the rest with ``weight_decay=0``.

    Args:
        model: any module; shared (tied) parameters appear once.
        weight_decay: λ of the decayed group.

    Returns:
        ``[{"params": decay, "weight_decay": λ}, {"params": no_decay, "weight_decay": 0.0}]``,
        each list in ``named_parameters`` order (so optimizer state lines up across runs).

    Example:
        >>> groups = param_groups(nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 4)), 0.1)
        >>> [len(g["params"]) for g in groups]  # Linear.weight | Embedding.weight, Linear.bias
        [1, 2]
    """
    matrices: set[int] = set()
    embeddings: set[int] = set()
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            matrices.add(id(module.weight))
        if isinstance(module, nn.Embedding):
            embeddings.add(id(module.weight))
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # shared parameters are listed once
        if not p.requires_grad:
            continue
        if id(p) in matrices and id(p) not in embeddings:
            decay.append(p)
        else:
            no_decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # --8<-- [end:groups]


def build_optimizer(
    model: nn.Module, config: OptimConfig, head: Sequence[nn.Parameter] = ()
) -> torch.optim.AdamW:
    """AdamW over ``param_groups(model, config.weight_decay)``.

    With ``config.head_lr``, the ``head`` parameters (what a pretrained checkpoint lacked, see
    ``qkv.train.finetune``) go into groups of their own whose ``lr_scale`` is head_lr / lr: the
    loop multiplies the schedule's learning rate by it, so the head follows the same warmup and
    decay at its own peak.

    The learning rate set here is a placeholder: the loop sets each step's from the schedule.
    On CPUs and CUDA GPUs the update runs as PyTorch's fused kernel (one pass over each
    parameter for all of Adam's arithmetic instead of one per operation; about 5x faster on a
    CPU, see benchmarks/RESULTS.md): the same update, to rounding.
    """
    groups = param_groups(model, config.weight_decay)
    if head and config.head_lr:
        ids = {id(p) for p in head}
        body = [{**g, "params": [p for p in g["params"] if id(p) not in ids]} for g in groups]  # type: ignore[attr-defined]
        heads = [
            {**g, "params": [p for p in g["params"] if id(p) in ids],  # type: ignore[attr-defined]
             "lr_scale": config.head_lr / config.lr}
            for g in groups
        ]  # fmt: skip
        groups = body + heads
    params = [p for group in groups for p in group["params"]]  # type: ignore[attr-defined]
    fused = all(p.device.type in _FUSED_DEVICES and p.is_floating_point() for p in params)
    return torch.optim.AdamW(
        groups,
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        eps=config.eps,
        fused=fused or None,
    )


# Devices with a fused AdamW kernel in every torch qkv supports (2.7 and later).
_FUSED_DEVICES = ("cpu", "cuda")
