"""Fused q/k/v projections (``qkv.attention.fused``) against the plain ones they replace."""

from __future__ import annotations

import pytest
import torch

from qkv.attention.fused import fused_projections
from qkv.attention.multihead import MultiHeadAttention
from tests.conftest import ATOL


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])  # MHA, GQA, MQA
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("t", [1, 5])
def test_fused_projections_equal_the_plain_ones(n_kv_heads: int, bias: bool, t: int) -> None:
    mha = MultiHeadAttention(d_model=16, n_heads=4, n_kv_heads=n_kv_heads, bias=bias).eval()
    x = torch.randn(2, t, 16)
    with torch.no_grad():
        plain = mha._plain_projections(x)
        with fused_projections([mha]):
            fused = mha._self_projections(x)
            out = mha(x, causal=True)
        reference = mha(x, causal=True)  # outside the block: the plain path
    for a, b in zip(fused, plain, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=ATOL[torch.float32], rtol=0)
    torch.testing.assert_close(out, reference, atol=ATOL[torch.float32], rtol=0)


def test_fused_weights_follow_parameter_changes() -> None:
    mha = MultiHeadAttention(d_model=16, n_heads=4).eval()
    x = torch.randn(1, 3, 16)
    with torch.no_grad():
        with fused_projections([mha]):
            before = mha(x)
        mha.k_proj.weight.add_(torch.randn_like(mha.k_proj.weight))  # an optimizer-like step
        mha.v_proj.bias.mul_(2.0)
        with fused_projections([mha]):
            after = mha(x)
        reference = mha(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, reference, atol=ATOL[torch.float32], rtol=0)
    mha = mha.double()  # new storage and dtype: rebuilt too
    with torch.no_grad(), fused_projections([mha]):
        fused64 = mha(x.double())
    with torch.no_grad():
        torch.testing.assert_close(fused64, mha(x.double()), atol=ATOL[torch.float64], rtol=0)


def test_fused_projections_leave_training_alone() -> None:
    mha = MultiHeadAttention(d_model=16, n_heads=4)
    x = torch.randn(2, 3, 16)
    with fused_projections([mha]):
        assert mha.fuse_projections
        mha(x).sum().backward()  # gradients on: the plain path, which reaches the parameters
    assert not mha.fuse_projections
    assert mha.q_proj.weight.grad is not None and mha.k_proj.weight.grad is not None


def test_fused_weights_built_in_inference_mode_serve_no_grad_later() -> None:
    mha = MultiHeadAttention(d_model=16, n_heads=4).eval()
    x = torch.randn(1, 2, 16)
    with torch.inference_mode(), fused_projections([mha]):
        first = mha(x)
    with torch.no_grad(), fused_projections([mha]):  # the same cached tensors, reused
        second = mha(x)
    torch.testing.assert_close(first.clone(), second, atol=0, rtol=0)


def test_fused_projections_skip_cross_attention_shapes() -> None:
    cross = MultiHeadAttention(d_model=16, n_heads=4, d_context=8).eval()
    with torch.no_grad(), fused_projections([cross]):
        assert not cross.fuse_projections  # its keys come from another width: left plain
        out = cross(torch.randn(1, 2, 16), torch.randn(1, 5, 8))
    assert out.shape == (1, 2, 16)
