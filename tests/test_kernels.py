"""``qkv._kernels.inference_linear`` against ``F.linear``, on both sides of its size threshold."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import qkv._kernels as kernels
from qkv._kernels import (
    ONEDNN_MIN_ENTRIES,
    bound_linear,
    inference_linear,
    linear_kernel,
    onednn_available,
)

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="PyTorch built without oneDNN")

# (out, in): under the threshold (F.linear) and over it (oneDNN where available).
SHAPES = [(48, 32), (1024, 512), (600, 700)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [(1,), (5,), (2, 3)])
def test_inference_linear_equals_f_linear_in_float32(
    shape: tuple[int, int], bias: bool, rows: tuple[int, ...]
) -> None:
    n_out, n_in = shape
    weight = torch.randn(n_out, n_in) / n_in**0.5
    b = torch.randn(n_out) if bias else None
    x = torch.randn(*rows, n_in)
    with torch.inference_mode():
        fast = inference_linear(x, weight, b)
        bound = bound_linear(weight, b)(x)
    reference = F.linear(x.double(), weight.double(), None if b is None else b.double())
    assert fast.shape == (*rows, n_out) and fast.dtype == torch.float32
    # Both kernels sum n_in float32 products of size ~1: rounding stays near 1e-6.
    torch.testing.assert_close(fast.double(), reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(bound, fast, atol=0, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_inference_linear_in_bfloat16_is_as_close_as_f_linear(shape: tuple[int, int]) -> None:
    n_out, n_in = shape
    weight = (torch.randn(n_out, n_in) / n_in**0.5).bfloat16()
    b = torch.randn(n_out).bfloat16()
    x = torch.randn(3, n_in).bfloat16()
    exact = F.linear(x.double(), weight.double(), b.double())
    with torch.inference_mode():
        fast_err = (inference_linear(x, weight, b).double() - exact).abs().max()
        plain_err = (F.linear(x, weight, b).double() - exact).abs().max()
    # Both round their output to bfloat16 (8 bits of mantissa): within a few of its steps.
    assert fast_err <= max(2 * plain_err, 2.0**-6)


@needs_onednn
def test_kernel_choice_follows_size_dtype_and_layout() -> None:
    big = torch.randn(ONEDNN_MIN_ENTRIES // 256, 256)  # exactly the threshold
    small = torch.randn(ONEDNN_MIN_ENTRIES // 256 - 1, 256)
    assert linear_kernel(big) is not F.linear
    assert linear_kernel(big.bfloat16()) is not F.linear
    assert linear_kernel(small) is F.linear
    assert linear_kernel(big.double()) is F.linear  # no oneDNN kernel for float64
    assert linear_kernel(big.t()) is F.linear  # not contiguous
    assert linear_kernel(big, torch.zeros(big.shape[0], dtype=torch.float64)) is F.linear


def test_other_dtypes_and_mixed_inputs_fall_back_to_f_linear() -> None:
    weight = torch.randn(1024, 512, dtype=torch.float64)
    x = torch.randn(2, 512, dtype=torch.float64)
    with torch.inference_mode():
        torch.testing.assert_close(inference_linear(x, weight), F.linear(x, weight), atol=0, rtol=0)
        with pytest.raises(RuntimeError):  # a dtype mismatch is F.linear's clear error
            inference_linear(x.float(), weight)


def test_with_gradients_wanted_it_is_f_linear_and_gradients_flow() -> None:
    weight = torch.randn(1024, 512, requires_grad=True)
    x = torch.randn(2, 512, requires_grad=True)
    inference_linear(x, weight).sum().backward()
    grads = x.grad.clone(), weight.grad.clone()
    x.grad = weight.grad = None
    F.linear(x, weight).sum().backward()
    torch.testing.assert_close(grads[0], x.grad, atol=0, rtol=0)
    torch.testing.assert_close(grads[1], weight.grad, atol=0, rtol=0)


def test_without_onednn_it_falls_back_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    kernels._onednn_op.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="qkv._kernels"):
            assert not onednn_available()
        assert "no oneDNN" in caplog.text and "torch.nn.functional.linear" in caplog.text
        weight = torch.randn(1024, 512)
        assert linear_kernel(weight) is F.linear
        x = torch.randn(3, 512)
        torch.testing.assert_close(inference_linear(x, weight), F.linear(x, weight))
    finally:
        kernels._onednn_op.cache_clear()  # the next caller probes the real build again
