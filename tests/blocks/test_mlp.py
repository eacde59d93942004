"""Feed-forward networks: plain and gated layers equal their formulas, activations are right."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from qkv.blocks import ACTIVATIONS, FeedForward, GatedFeedForward, get_activation
from tests.conftest import ATOL


def gelu_exact_by_hand(x: torch.Tensor) -> torch.Tensor:
    """x * Phi(x), Phi the standard normal CDF (Hendrycks and Gimpel 2016, section 2)."""
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def gelu_tanh_by_hand(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of GELU (Hendrycks and Gimpel 2016, section 2)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


BY_HAND = {
    "relu": lambda x: torch.where(x > 0, x, torch.zeros_like(x)),
    "gelu": gelu_exact_by_hand,
    "gelu_tanh": gelu_tanh_by_hand,
    "silu": lambda x: x / (1.0 + torch.exp(-x)),
}


def linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    """x W^T + b in float64."""
    out = x.double() @ layer.weight.double().T
    return out if layer.bias is None else out + layer.bias.double()


@pytest.mark.parametrize("name", sorted(BY_HAND))
def test_activation_equals_formula(name: str) -> None:
    x = torch.randn(1000, dtype=torch.float64) * 3
    torch.testing.assert_close(ACTIVATIONS[name](x), BY_HAND[name](x), atol=1e-12, rtol=0)


def test_gelu_variants_match_torch_and_differ() -> None:
    x = torch.linspace(-4, 4, 401)
    torch.testing.assert_close(ACTIVATIONS["gelu"](x), F.gelu(x, approximate="none"))
    torch.testing.assert_close(ACTIVATIONS["gelu_tanh"](x), F.gelu(x, approximate="tanh"))
    # The two are close but not equal, so a test mixing them up would notice.
    gap = (ACTIVATIONS["gelu"](x) - ACTIVATIONS["gelu_tanh"](x)).abs().max()
    assert 1e-5 < gap < 1e-2


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "silu"])
@pytest.mark.parametrize("bias", [True, False])
def test_feed_forward_equals_formula(activation: str, bias: bool) -> None:
    ffn = FeedForward(12, 40, activation=activation, bias=bias)  # type: ignore[arg-type]
    x = torch.randn(2, 5, 12)
    hidden = BY_HAND[activation](linear(x, ffn.up_proj))  # act(x W1 + b1)
    expected = linear(hidden, ffn.down_proj)  # (...) W2 + b2
    torch.testing.assert_close(ffn(x).double(), expected, atol=ATOL[torch.float32], rtol=0)


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "relu"])
def test_gated_feed_forward_equals_formula(activation: str) -> None:
    ffn = GatedFeedForward(12, 32, activation=activation)  # type: ignore[arg-type]
    assert ffn.gate_proj.bias is None  # Shazeer 2020 uses no biases
    x = torch.randn(2, 5, 12)
    gated = BY_HAND[activation](linear(x, ffn.gate_proj)) * linear(x, ffn.up_proj)
    expected = linear(gated, ffn.down_proj)
    torch.testing.assert_close(ffn(x).double(), expected, atol=ATOL[torch.float32], rtol=0)


def test_swiglu_and_geglu_differ() -> None:
    """Same weights, different gate activation: different outputs (SwiGLU vs GeGLU)."""
    swiglu = GatedFeedForward(8, 16, activation="silu")
    geglu = GatedFeedForward(8, 16, activation="gelu")
    geglu.load_state_dict(swiglu.state_dict())
    x = torch.randn(3, 8)
    assert not torch.allclose(swiglu(x), geglu(x), atol=1e-3)


def test_feed_forward_is_position_wise() -> None:
    """Each position is transformed on its own: permuting positions permutes the outputs."""
    ffn = FeedForward(8, 32, activation="gelu")
    x = torch.randn(2, 6, 8)
    perm = torch.randperm(6)
    torch.testing.assert_close(ffn(x[:, perm]), ffn(x)[:, perm])


def test_hidden_dropout_only_in_training() -> None:
    ffn = FeedForward(8, 64, dropout=0.5)
    x = torch.randn(4, 8)
    ffn.train()
    assert not torch.equal(ffn(x), ffn(x))
    ffn.eval()
    torch.testing.assert_close(ffn(x), ffn(x), atol=0, rtol=0)


def test_unknown_activation_lists_choices() -> None:
    with pytest.raises(ValueError, match=r"relu.*gelu.*gelu_tanh.*silu"):
        get_activation("swish")
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        FeedForward(4, 8, activation="tanh")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown activation"):
        GatedFeedForward(4, 8, activation="sigmoid")  # type: ignore[arg-type]
