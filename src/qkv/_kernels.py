"""The matrix product that inference runs through: ``x W^T + b`` on the fastest kernel at hand.

    inference_linear(x, W, b) == torch.nn.functional.linear(x, W, b)     (within rounding)

Decoding one token at a time multiplies a single row by every weight matrix of the model, so a
decoding step is bound by how fast the kernel reads the weights. On a CPU, ``F.linear``
hands a one-row product to a BLAS matrix-vector routine that, measured on a 2-core machine,
reads weights at about 13 GB/s from one core; oneDNN's inner-product kernel (the one
``torch.compile`` emits for CPU linear layers) reads the same (out, in) weights, unchanged, at
about 19-30 GB/s with both cores (``python benchmarks/generation.py --layouts``). A oneDNN call
costs about 15 microseconds more to start, though, so for small weights (under about 2^18
entries, 1 MB in float32: they sit in the CPU's cache and BLAS multiplies them in a few
microseconds) ``F.linear`` is faster. This module picks oneDNN for large float32 and bfloat16
weights on the CPU when PyTorch was built with it, and ``F.linear`` everywhere else (small
weights, GPUs, other dtypes, builds without oneDNN).

It is for inference only: no gradient flows through the oneDNN call, so callers use it under
``torch.no_grad()`` or ``torch.inference_mode()`` (``inference_linear`` itself falls back to
``F.linear`` when a gradient is wanted). The oneDNN operator is private to PyTorch (its compiler
emits it); it is checked once against ``F.linear`` on first use, and a build without it, or one
where it misbehaves, falls back to ``F.linear`` with a logged warning.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ONEDNN_MIN_ENTRIES",
    "LinearKernel",
    "bound_linear",
    "inference_linear",
    "linear_kernel",
    "onednn_available",
]

logger = logging.getLogger(__name__)

LinearKernel = Callable[[Tensor, Tensor, Tensor | None], Tensor]

_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)
# Weights with fewer entries go to F.linear: measured on the benchmark machine, the two cross
# at about 2^18 entries (a 512 x 512 matrix).
ONEDNN_MIN_ENTRIES = 1 << 18


@functools.cache
def _onednn_op() -> Callable[..., Tensor] | None:
    """PyTorch's oneDNN linear operator, checked once against ``F.linear`` on a small product;
    None (with a logged warning naming both paths) when this build lacks it or it misbehaves."""
    reason = None
    if not torch.backends.mkldnn.is_available():
        reason = "this PyTorch build has no oneDNN"
    else:
        try:
            op = torch.ops.mkldnn._linear_pointwise
            x, w, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)
            with torch.no_grad():
                if torch.allclose(op(x, w, b, "none", [], ""), F.linear(x, w, b), atol=1e-5):
                    return op
            reason = "its result differed from F.linear"
        except (AttributeError, RuntimeError, TypeError) as error:
            reason = f"it is not usable here ({error})"
    logger.warning(
        "oneDNN linear kernel (torch.ops.mkldnn._linear_pointwise) not used: %s; inference "
        "products run on torch.nn.functional.linear instead (slower for one-row products)",
        reason,
    )
    return None


def onednn_available() -> bool:
    """Whether ``inference_linear`` can use oneDNN on this build of PyTorch."""
    return _onednn_op() is not None


def linear_kernel(weight: Tensor, bias: Tensor | None = None) -> LinearKernel:
    """The kernel ``inference_linear`` takes for these parameters and inputs of their dtype.

    A decoding loop that multiplies by the same weights at every step can choose once, and
    then call the kernel directly: ``kernel(x, weight, bias)``.
    """
    if (
        weight.device.type != "cpu"
        or weight.dtype not in _ONEDNN_DTYPES
        or (bias is not None and bias.dtype != weight.dtype)
        or weight.numel() < ONEDNN_MIN_ENTRIES
        or weight.dim() != 2
        or not weight.is_contiguous()
    ):
        return F.linear
    op = _onednn_op()
    if op is None:
        return F.linear

    def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        return op(x, weight, bias, "none", [], "")

    return onednn_linear


def inference_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias`` for inference: (..., in) x (out, in) -> (..., out).

    Same result as ``torch.nn.functional.linear`` up to rounding (the kernels sum in another
    order). With gradients wanted (grad mode on and an input that requires them) it is
    ``F.linear`` itself, so nothing is lost when called outside inference.
    """
    if x.dtype != weight.dtype or x.dim() < 2:
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return F.linear(x, weight, bias)
    return linear_kernel(weight, bias)(x, weight, bias)


def bound_linear(weight: Tensor, bias: Tensor | None = None) -> Callable[[Tensor], Tensor]:
    """``x -> inference_linear(x, weight, bias)`` with the kernel chosen once, for inputs of the
    weight's dtype (a decoding loop multiplies by the same weights at every step). For
    inference only: the oneDNN kernel passes no gradient."""
    kernel = linear_kernel(weight, bias)

    def linear(x: Tensor) -> Tensor:
        return kernel(x, weight, bias)

    return linear
