"""Norms: RMSNorm matches its formula, LayerNorm's reference matches torch.nn.LayerNorm."""

from __future__ import annotations

import pytest
import torch

from qkv.blocks import LayerNorm, RMSNorm, layer_norm_reference, make_norm, rms_norm
from tests.conftest import ATOL


def rms_norm_by_hand(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight, in float64 with plain arithmetic."""
    x, weight = x.double(), weight.double()
    mean_square = (x * x).sum(-1, keepdim=True) / x.shape[-1]
    return x / (mean_square + eps) ** 0.5 * weight


@pytest.mark.parametrize("eps", [1e-6, 1e-2])
def test_rms_norm_equals_formula(eps: float) -> None:
    norm = RMSNorm(24, eps=eps)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 7, 24) * 3
    expected = rms_norm_by_hand(x, norm.weight, eps)
    torch.testing.assert_close(norm(x).double(), expected, atol=ATOL[torch.float32], rtol=0)


def test_rms_norm_small_inputs_feel_eps() -> None:
    """With tiny inputs eps dominates: the output is x / sqrt(eps), not unit RMS."""
    x = torch.full((2, 8), 1e-4)
    expected = rms_norm_by_hand(x, torch.ones(8), eps=1e-2)
    torch.testing.assert_close(rms_norm(x, eps=1e-2).double(), expected, atol=1e-7, rtol=0)
    assert rms_norm(x, eps=1e-2).abs().max() < 0.01


def test_rms_norm_float64_stays_float64() -> None:
    x = torch.randn(4, 16, dtype=torch.float64)
    out = rms_norm(x, torch.ones(16, dtype=torch.float64))
    assert out.dtype == torch.float64
    expected = rms_norm_by_hand(x, torch.ones(16), 1e-6)
    torch.testing.assert_close(out, expected, atol=ATOL[torch.float64], rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rms_norm_half_in_half_out(dtype: torch.dtype) -> None:
    norm = RMSNorm(32)
    x = (torch.randn(2, 5, 32) * 300).to(dtype)  # squares overflow float16 unless upcast
    out = norm(x)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    expected = rms_norm_by_hand(x, norm.weight, norm.eps)
    # One rounding to the half dtype at the end: |error| <= eps_dtype * |value| (values are ~1-4).
    tol = 4 * torch.finfo(dtype).eps
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=0)


@pytest.mark.skipif(not hasattr(torch.nn, "RMSNorm"), reason="torch.nn.RMSNorm needs torch 2.4")
def test_rms_norm_matches_torch() -> None:
    ours, theirs = RMSNorm(16, eps=1e-6), torch.nn.RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        ours.weight.normal_()
        theirs.weight.copy_(ours.weight)
    x = torch.randn(3, 4, 16)
    torch.testing.assert_close(ours(x), theirs(x), atol=ATOL[torch.float32], rtol=0)


@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_reference_equals_torch(affine: bool) -> None:
    torch_norm = torch.nn.LayerNorm(20, eps=1e-5, elementwise_affine=affine)
    if affine:
        with torch.no_grad():
            torch_norm.weight.normal_()
            torch_norm.bias.normal_()
    x = torch.randn(3, 6, 20) * 2 + 1
    out = layer_norm_reference(x, torch_norm.weight, torch_norm.bias, eps=1e-5)
    torch.testing.assert_close(out, torch_norm(x), atol=ATOL[torch.float32], rtol=0)


def test_layer_norm_reference_normalises() -> None:
    out = layer_norm_reference(torch.randn(5, 64, dtype=torch.float64) * 4 - 2, eps=0.0)
    torch.testing.assert_close(out.mean(-1), torch.zeros(5, dtype=torch.float64))
    torch.testing.assert_close(out.var(-1, unbiased=False), torch.ones(5, dtype=torch.float64))


def test_make_norm() -> None:
    layer = make_norm("layer", 8, eps=1e-3, bias=False)
    assert isinstance(layer, LayerNorm) and layer.bias is None and layer.eps == 1e-3
    rms = make_norm("rms", 8, eps=1e-3)
    assert isinstance(rms, RMSNorm) and rms.eps == 1e-3
    with pytest.raises(ValueError, match="'layer', 'rms'"):
        make_norm("batch", 8)  # type: ignore[arg-type]
