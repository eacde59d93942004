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
weights on the CPU when PyTorch was built with it and its kernel works for that dtype on this
machine, and ``F.linear`` everywhere else (small weights, GPUs, other dtypes, builds without
oneDNN, CPUs where oneDNN has no kernel for the dtype).

It is for inference only: no gradient flows through the oneDNN call, so callers use it under
``torch.no_grad()`` or ``torch.inference_mode()`` (``inference_linear`` itself falls back to
``F.linear`` when a gradient is wanted). The oneDNN operator is private to PyTorch (its compiler
emits it), and whether it works depends on the dtype and the CPU: on x86 CPUs without AVX-512
(AVX2 only) the float32 kernel runs but the bfloat16 one raises "could not create a primitive
descriptor". So it is checked against ``F.linear`` once per dtype, on first use with that
dtype, on a product over the size threshold (the kernels oneDNN picks depend on the shape);
a dtype for which it is missing or misbehaves falls back to ``F.linear`` with one logged
warning naming both paths and the dtype. ``kernel_report()`` says what each dtype takes.

For training, ``autocast_input`` casts an input that several products read (q, k and v of one
x; a gated network's gate and up) once to autocast's dtype, instead of once per product.
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
    "autocast_input",
    "bound_linear",
    "inference_kernel_name",
    "inference_linear",
    "kernel_report",
    "linear_kernel",
    "onednn_available",
]

logger = logging.getLogger(__name__)

LinearKernel = Callable[[Tensor, Tensor, Tensor | None], Tensor]

_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)
# Weights with fewer entries go to F.linear: measured on the benchmark machine, the two cross
# at about 2^18 entries (a 512 x 512 matrix).
ONEDNN_MIN_ENTRIES = 1 << 18

# The probe's product: (out, in) weights just over the threshold, with an inner width that is
# not a power of two (kernels handle the tail separately), multiplied by one row (a decoding
# step) and by a few rows (a prompt).
_PROBE_WEIGHT_SHAPE = (512, 520)  # (out, in): 266,240 entries >= 2^18
_PROBE_ROWS = (1, 7)
# Outputs are of size ~1. Both kernels accumulate in float32 and differ only in summation order
# (~1e-6 in float32); in bfloat16 both round the output to 8 bits of mantissa, so they may
# differ by an output step or two (2^-7 relative each). A broken kernel misses by far more.
_PROBE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2.0**-6}


def _onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias`` through oneDNN's inner product (PyTorch's private operator):
    (..., in) x (out, in) -> (..., out). No gradient flows through it."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _probe_failure(dtype: torch.dtype) -> str | None:
    """Why oneDNN's kernel is not usable for ``dtype`` here, or None when it agrees with
    ``F.linear`` on the probe product."""
    if not torch.backends.mkldnn.is_available():
        return "this PyTorch build has no oneDNN"
    g = torch.Generator().manual_seed(0)  # its own generator: the probe leaves the global seed
    n_out, n_in = _PROBE_WEIGHT_SHAPE
    weight = (torch.randn(n_out, n_in, generator=g) / n_in**0.5).to(dtype)  # (out, in)
    bias = torch.randn(n_out, generator=g).to(dtype)  # (out,)
    tolerance = _PROBE_TOLERANCE[dtype]
    try:
        # Autocast off: the first use may come inside it, and would cast F.linear's inputs.
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            for rows in _PROBE_ROWS:
                x = torch.randn(rows, n_in, generator=g).to(dtype)  # (rows, in)
                fast = _onednn_linear(x, weight, bias).float()  # (rows, out)
                plain = F.linear(x, weight, bias).float()  # (rows, out)
                if fast.shape != plain.shape:
                    return f"its output has shape {tuple(fast.shape)}, not {tuple(plain.shape)}"
                if not torch.allclose(fast, plain, rtol=tolerance, atol=tolerance):
                    diff = (fast - plain).abs().max().item()
                    return f"its result differed from F.linear by up to {diff:.2g}"
    except (AttributeError, RuntimeError, TypeError) as error:
        # oneDNN's messages go on with advice on its debug output: keep the first sentence.
        first = str(error).strip().split(". ")[0].splitlines()
        detail = f": {first[0]}" if first else ""
        return f"it raised {type(error).__name__}{detail}"
    return None


@functools.cache
def _onednn_probe(dtype: torch.dtype) -> str | None:
    """None when oneDNN's kernel for ``dtype`` (float32 or bfloat16) agrees with ``F.linear``
    on a product over the size threshold, else why it does not: checked once per dtype, and a
    failure is logged once, as a warning naming both paths and the dtype."""
    reason = _probe_failure(dtype)
    if reason is not None:
        name = _dtype_name(dtype)
        logger.warning(
            "oneDNN linear kernel (torch.ops.mkldnn._linear_pointwise) not used for %s: %s; %s "
            "inference products run on torch.nn.functional.linear instead (slower for one-row "
            "products)",
            name,
            reason,
            name,
        )
    return reason


def onednn_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether ``inference_linear`` can use oneDNN for weights of ``dtype`` on this CPU.

    Args:
        dtype: the weights' dtype; oneDNN is considered for float32 and bfloat16 only.

    Returns:
        True when this PyTorch build has oneDNN and its kernel for ``dtype`` agreed with
        ``F.linear`` (the first call per dtype runs that check, a few milliseconds).
    """
    return dtype in _ONEDNN_DTYPES and _onednn_probe(dtype) is None


def inference_kernel_name(dtype: torch.dtype, device: torch.device | str = "cpu") -> str:
    """Which kernel ``inference_linear`` takes for weights of ``dtype`` on ``device``, in words.

    For bug reports (``qkv env`` prints it): either oneDNN's inner product, for weights over
    the size threshold, or ``F.linear`` with the reason oneDNN is not used.

    Args:
        dtype: the weights' (and inputs') dtype.
        device: where the product runs; oneDNN is considered on the CPU only.

    Returns:
        e.g. ``"oneDNN inner product (weights >= 2^18 entries), F.linear below"`` or
        ``"F.linear (oneDNN not used for bfloat16: it raised RuntimeError: ...)"``.

    >>> inference_kernel_name(torch.float64)
    "F.linear (oneDNN's kernel is not used for float64)"
    """
    device = torch.device(device)
    if device.type != "cpu":
        return f"F.linear (oneDNN's kernel is used on the CPU only, not {device.type})"
    if dtype not in _ONEDNN_DTYPES:
        return f"F.linear (oneDNN's kernel is not used for {_dtype_name(dtype)})"
    reason = _onednn_probe(dtype)
    if reason is not None:
        return f"F.linear (oneDNN not used for {_dtype_name(dtype)}: {reason})"
    return "oneDNN inner product (weights >= 2^18 entries), F.linear below"


def kernel_report(
    device: torch.device | str = "cpu",
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16),
) -> dict[str, str]:
    """``inference_kernel_name`` for each of ``dtypes`` on ``device``.

    Returns:
        the kernel in words, keyed by the dtype's name (``"float32"``, ``"bfloat16"``, ...).
    """
    return {_dtype_name(dtype): inference_kernel_name(dtype, device) for dtype in dtypes}


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
    if _onednn_probe(weight.dtype) is not None:
        return F.linear
    return _onednn_linear


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


def autocast_input(x: Tensor) -> Tensor:
    """``x`` in autocast's dtype when autocast is on for its device, else ``x`` itself.

    Under autocast each ``F.linear`` casts its input on its own, so the q, k and v products of
    one ``x`` make three bfloat16 copies of it and keep all three for the backward pass. Cast
    once here and the three share one copy: the same values (autocast would round ``x`` the
    same way), a third of the copies, and less memory between the forward and backward passes.

    Example:
        >>> x = torch.randn(2, 3)
        >>> autocast_input(x) is x  # autocast is off
        True
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     autocast_input(x).dtype
        torch.bfloat16
    """
    device = x.device.type
    if not x.is_floating_point() or not torch.is_autocast_enabled(device):
        return x
    return x.to(torch.get_autocast_dtype(device))
