"""The checks that model configs share: sizes, token ids, divisibility, rates.

Every family's config validates itself in ``__post_init__``. Most of its checks are the same
few questions about different fields, so they live here once; each raises a ``ValueError``
that names the field, its value and what it must be. A check only a family needs (RoPE's even
head width, ViT's pooler) stays in that family's config.

    require_positive(self, "vocab_size", "d_model")          # sizes are at least 1
    require_token_ids(self, "eos_token_id", vocab_size=V)    # None, or an id in [0, V)
    require_divisible(self, "d_model", "n_heads")            # each head gets D / H features
    require_rate(self, "dropout")                            # a probability in [0, 1)
    require_eps(self)                                        # norm_eps > 0
    require_experts(self)                                    # None, or a valid Experts
"""

from __future__ import annotations

from typing import Any

from qkv.blocks import ACTIVATIONS
from qkv.blocks.moe import Experts

__all__ = [
    "require_activation",
    "require_divisible",
    "require_eps",
    "require_experts",
    "require_positive",
    "require_rate",
    "require_token_ids",
]


def require_positive(config: Any, *names: str, must_be: str = "positive") -> None:
    """Each named field is at least 1; else "<name> must be <must_be>, got <value>"."""
    for name in names:
        value = getattr(config, name)
        if value < 1:
            raise ValueError(f"{name} must be {must_be}, got {value}")


def require_token_ids(config: Any, *names: str, vocab_size: int) -> None:
    """Each named token id is None (the vocabulary has no such token) or in [0, vocab_size)."""
    for name in names:
        token = getattr(config, name)
        if token is not None and not 0 <= token < vocab_size:
            raise ValueError(f"{name}={token} is not in the vocabulary [0, {vocab_size})")


def require_divisible(config: Any, name: str, by: str, *, advice: str = "") -> None:
    """Field ``name`` is a multiple of field ``by`` (itself at least 1).

    ``advice``, when given, follows the message after a semicolon: what to change and why.
    """
    value, divisor = getattr(config, name), getattr(config, by)
    if divisor < 1 or value % divisor:
        message = f"{name}={value} is not divisible by {by}={divisor}"
        raise ValueError(f"{message}; {advice}" if advice else message)


def require_rate(config: Any, *names: str) -> None:
    """Each named field is a probability of dropping (or smoothing) in [0, 1)."""
    for name in names:
        value = getattr(config, name)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")


def require_eps(config: Any, name: str = "norm_eps") -> None:
    """Field ``name`` is a normalisation's epsilon, above 0: at 0 a row of equal features
    (LayerNorm) or of zeros (RMSNorm) divides by zero; below 0 the square root can be of a
    negative number."""
    value = getattr(config, name)
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value}")


def require_activation(config: Any, name: str = "activation") -> None:
    """Field ``name`` names one of the feed-forward activations of ``qkv.blocks``."""
    value = getattr(config, name)
    if value not in ACTIVATIONS:
        raise ValueError(f"unknown {name} {value!r}; choose one of {list(ACTIVATIONS)}")


def require_experts(config: Any, name: str = "experts") -> None:
    """Field ``name`` is None or a mixture of experts: an ``Experts`` or a dict of its fields
    (what config.json and YAML hold), which becomes an ``Experts`` in the (frozen) config."""
    try:
        value = Experts.of(getattr(config, name))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: {e}") from None
    object.__setattr__(config, name, value)
