"""The position-wise feed-forward network, plain or gated: the Transformer's per-token MLP.

    FFN(x)    = act(x W_1 + b_1) W_2 + b_2                 (plain)
    GLU_FF(x) = (act(x W_gate) * (x W_up)) W_down          (gated; * is elementwise)

Vaswani et al., "Attention Is All You Need", 2017 (arXiv:1706.03762), section 3.3, eq. 2.
Shazeer, "GLU Variants Improve Transformer", 2020 (arXiv:2002.05202).
Hendrycks and Gimpel, "Gaussian Error Linear Units (GELUs)", 2016 (arXiv:1606.08415).

Attention mixes information across positions; the feed-forward network then transforms each
position on its own, with the same weights everywhere: widen D -> F, apply a nonlinearity,
project back F -> D. F is usually 4 D.

The gated form multiplies the activated "gate" elementwise with a second linear "up"
projection: SwiGLU uses SiLU (x * sigmoid(x)) as the activation, GeGLU uses GELU, ReGLU uses
ReLU. With three matrices instead of two, gated layers usually take F = 8/3 D so that the
parameter count stays that of a plain F = 4 D layer (LLaMA, PaLM).

Shape legend: B batch · T query positions · D model width · F MLP hidden width.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from torch import Tensor, nn
from torch.nn import functional as F

from qkv._kernels import autocast_input

__all__ = ["ACTIVATIONS", "ActivationName", "FeedForward", "GatedFeedForward", "get_activation"]

ActivationName = Literal["relu", "gelu", "gelu_tanh", "silu"]


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,  # max(0, x)
    "gelu": F.gelu,  # x * Phi(x), Phi the standard normal CDF (exact, with erf)
    "gelu_tanh": _gelu_tanh,  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (GPT-2, T5 v1.1)
    "silu": F.silu,  # x * sigmoid(x), also called Swish
}


def get_activation(name: str) -> Callable[[Tensor], Tensor]:
    """The activation function called ``name``; a ValueError listing the choices otherwise."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; choose one of {list(ACTIVATIONS)}"
        ) from None


# --8<-- [start:feed_forward]
class FeedForward(nn.Module):
    """The plain position-wise feed-forward network: ``down_proj(act(up_proj(x)))``.

    Args:
        d_model: D, the width of the input and output.
        d_ff: F, the hidden width (4 D in the original Transformer).
        activation: ``"relu"`` (the 2017 paper), ``"gelu"``, ``"gelu_tanh"`` or ``"silu"``.
        bias: whether the two projections have biases.
        dropout: dropout on the hidden activations while training.

    Example:
        >>> import torch
        >>> ffn = FeedForward(16, 64, activation="gelu")
        >>> ffn(torch.randn(2, 5, 16)).shape
        torch.Size([2, 5, 16])
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        *,
        activation: ActivationName = "relu",
        bias: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.activation = activation
        self.act = get_activation(activation)
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)  # W_1, b_1
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)  # W_2, b_2
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """Transform each position of ``x`` (B, T, D) on its own; returns (B, T, D)."""
        h = self.act(self.up_proj(x))  # (B, T, F)
        if self.training:  # (dropout is the identity at inference: skip the call)
            h = self.dropout(h)
        return self.down_proj(h)  # (B, T, D)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


# --8<-- [end:feed_forward]


# --8<-- [start:gated_feed_forward]
class GatedFeedForward(nn.Module):
    """The gated feed-forward network: ``down_proj(act(gate_proj(x)) * up_proj(x))``.

    ``activation="silu"`` gives SwiGLU (LLaMA, Mistral), ``"gelu"`` or ``"gelu_tanh"`` GeGLU
    (T5 v1.1, Gemma), ``"relu"`` ReGLU.

    Args:
        d_model: D, the width of the input and output.
        d_ff: F, the hidden width (often 8/3 D, see the module docstring).
        activation: applied to the gate: ``"silu"``, ``"gelu"``, ``"gelu_tanh"`` or ``"relu"``.
        bias: whether the three projections have biases (the paper and LLaMA use none).
        dropout: dropout on the gated hidden activations while training.

    Example:
        >>> import torch
        >>> swiglu = GatedFeedForward(16, 48, activation="silu")
        >>> swiglu(torch.randn(2, 5, 16)).shape
        torch.Size([2, 5, 16])
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        *,
        activation: ActivationName = "silu",
        bias: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.activation = activation
        self.act = get_activation(activation)
        self.gate_proj = nn.Linear(d_model, d_ff, bias=bias)  # W_gate
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)  # W_up
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)  # W_down
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """Transform each position of ``x`` (B, T, D) on its own; returns (B, T, D)."""
        x = autocast_input(x)  # under autocast: one bfloat16 copy of x for gate and up
        gate = self.act(self.gate_proj(x))  # (B, T, F)
        h = gate * self.up_proj(x)  # (B, T, F), the gate scales each hidden feature
        if self.training:  # (dropout is the identity at inference: skip the call)
            h = self.dropout(h)
        return self.down_proj(h)  # (B, T, D)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


# --8<-- [end:gated_feed_forward]
