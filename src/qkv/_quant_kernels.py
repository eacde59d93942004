"""Weight-only int8 and int4 products on PyTorch's packed CPU kernels: the quantised fast path.

    int8_packed_linear(x, q, s, b) ~= x (q * s[:, None])^T + b                    q: (N, K) int8
    int4_packed_linear(x, q, s, m, b) ~= x (q * s + m)^T + b   (per group of G columns)  q: 0..15

The readable layers, their reference (dequantise, then ``F.linear``) and the quantisation itself
are in ``qkv.blocks.quant``; this module only runs the same products faster, on
``torch.ops.aten._weight_int8pack_mm`` and ``torch.ops.aten._weight_int4pack_mm_for_cpu``, the
weight-only kernels PyTorch ships for CPUs (torchao 0.18 adds no CPU kernel of its own: its
int8 weight-only product is the dequantise-and-multiply of the reference, and its int4 formats
are for GPUs; ``benchmarks/quantization.py --kernels`` has the numbers).

What was measured (2-core Xeon with AVX512-BF16 and AMX, ``--kernels``): with float32
activations both kernels are slower than float32 ``F.linear`` (they convert and multiply in
float32 without vector units: 0.8 ms against 0.3 ms for one row times a 768 x 3072 int8
weight); with bfloat16 activations they run on the CPU's bfloat16 units and take about a third
of float32 ``F.linear``'s time for one row. So the fast path rounds the activations to bfloat16,
multiplies (the kernels sum in float32) and returns the result in the input's dtype, with the
bias added there. That is the reference computed with activations, scales and output rounded to
bfloat16: within ``BF16_TOLERANCE`` of it (relative to ``|x| |W|^T``), and far inside the
quantisation error itself (an int8 weight is off by up to half a step, 1/254 of the row's
largest weight; bfloat16 rounds to 1/512).

The kernels read memory they should not for some shapes (a width K that is not a multiple of 16
returned garbage or crashed the process when measured), so the fast path takes only shapes
known to work (``int8_supported``, ``int4_supported``) and the layers compute anything else
with the reference. Whether a kernel exists and agrees with the reference on this machine is
checked once per width (8 or 4 bits), on first use; a failure is logged once, as a warning
naming both paths. Not used on other devices (no kernel was measured there): the reference.
No gradient flows through the kernels; with gradients wanted, the layers take the reference.

Shape legend: M rows (batch times positions) · K input width · N output width · G group size.
"""

from __future__ import annotations

import functools
import logging
import weakref

import torch
from torch import Tensor

__all__ = [
    "BF16_TOLERANCE",
    "INT4_GROUP_SIZES",
    "int4_packed_linear",
    "int4_supported",
    "int8_packed_linear",
    "int8_supported",
    "packed_kernel_failure",
]

logger = logging.getLogger(__name__)

# The fast path's error against the float32 reference, relative to |x| |W|^T: activations, scales
# and output each rounded to bfloat16 (2^-9 relative each), summed in float32.
BF16_TOLERANCE = 2.0**-7
# The group sizes ``_weight_int4pack_mm_for_cpu`` accepts (it raises for others).
INT4_GROUP_SIZES = (32, 64, 128, 256)
_K_MULTIPLE = 64  # widths known to work (multiples of 16 worked when measured; this keeps a margin)
_N_MULTIPLE_INT4 = 16  # the int4 packing needs output widths in multiples of 16 (it raises)


def _want_no_grad(x: Tensor) -> bool:
    return not (torch.is_grad_enabled() and x.requires_grad)


def int8_supported(x: Tensor, qweight: Tensor) -> bool:
    """Whether ``int8_packed_linear`` takes this input and weight (else use the reference)."""
    return (
        x.device.type == "cpu"
        and qweight.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and qweight.shape[1] % _K_MULTIPLE == 0
        and _want_no_grad(x)
        and packed_kernel_failure(8) is None
    )


def int4_supported(x: Tensor, qweight: Tensor, group_size: int) -> bool:
    """Whether ``int4_packed_linear`` takes this input, packed weight and group size."""
    n, half_k = qweight.shape
    return (
        x.device.type == "cpu"
        and qweight.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and group_size in INT4_GROUP_SIZES
        and (2 * half_k) % _K_MULTIPLE == 0
        and n % _N_MULTIPLE_INT4 == 0
        and _want_no_grad(x)
        and packed_kernel_failure(4) is None
    )


def int8_packed_linear(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
    """``x (qweight * scales[:, None])^T + bias`` on ``_weight_int8pack_mm``, in bfloat16.

    Args:
        x: (..., K) float32 or bfloat16.
        qweight: (N, K) int8.
        scales: (N,) one per output channel.
        bias: (N,) or None, added in x's dtype.

    Returns:
        (..., N) in x's dtype.
    """
    rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # (M, K)
    out = torch.ops.aten._weight_int8pack_mm(rows, qweight, scales.to(torch.bfloat16))  # (M, N)
    out = out.to(x.dtype).view(*x.shape[:-1], qweight.shape[0])  # (..., N)
    return out if bias is None else out + bias.to(x.dtype)


# The kernel's own copy of each int4 weight, in its tiled layout, made on first use and dropped
# with the weight: {id(packed weight): (weak reference to it, versions, tiled, scales and zeros)}.
# (Tensors cannot key a WeakKeyDictionary: their == is elementwise.)
_INT4_KERNEL_WEIGHTS: dict[int, tuple[weakref.ref[Tensor], tuple[int, ...], Tensor, Tensor]] = {}


def _version(t: Tensor) -> int:
    """How many times ``t`` was changed in place (-1 for inference tensors, which do not
    count: they cannot change outside inference mode)."""
    try:
        return t._version
    except RuntimeError:
        return -1


def _int4_kernel_weight(qweight: Tensor, scales: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor]:
    """The int4 weight in the kernel's layout and its (K/G, N, 2) scales and zeros, cached.

    The kernel computes w = (q - 8) * scale + zero; the layers store w = q * scale + offset, so
    zero = offset + 8 * scale.
    """
    versions = (*(_version(t) for t in (qweight, scales, offsets)), scales.data_ptr())
    cached = _INT4_KERNEL_WEIGHTS.get(id(qweight))
    if cached is not None and cached[0]() is qweight and cached[1] == versions:
        return cached[2], cached[3]
    low, high = qweight & 0x0F, qweight >> 4  # (N, K/2) each: even and odd columns
    values = torch.stack([low, high], dim=-1).flatten(-2).to(torch.int32)  # (N, K)
    tiled = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 2)  # kernel's own layout
    zeros = offsets.float() + 8 * scales.float()  # (N, K/G)
    scales_zeros = torch.stack([scales.float().T, zeros.T], dim=-1)  # (K/G, N, 2)
    scales_zeros = scales_zeros.to(torch.bfloat16).contiguous()
    if cached is None or cached[0]() is not qweight:
        weakref.finalize(qweight, _INT4_KERNEL_WEIGHTS.pop, id(qweight), None)
    _INT4_KERNEL_WEIGHTS[id(qweight)] = (weakref.ref(qweight), versions, tiled, scales_zeros)
    return tiled, scales_zeros


def int4_packed_linear(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    offsets: Tensor,
    bias: Tensor | None,
    group_size: int,
) -> Tensor:
    """``x W^T + bias`` for the int4 weight W = q * scales + offsets (per group of columns), on
    ``_weight_int4pack_mm_for_cpu`` in bfloat16.

    Args:
        x: (..., K) float32 or bfloat16.
        qweight: (N, K/2) uint8, two 4-bit values per byte (column 2j low, 2j + 1 high).
        scales: (N, K/G) step of each group.
        offsets: (N, K/G) value of the level 0 of each group.
        bias: (N,) or None, added in x's dtype.
        group_size: G, one of ``INT4_GROUP_SIZES``.

    Returns:
        (..., N) in x's dtype.
    """
    tiled, scales_zeros = _int4_kernel_weight(qweight, scales, offsets)
    rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # (M, K)
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, tiled, group_size, scales_zeros)
    out = out.to(x.dtype).view(*x.shape[:-1], qweight.shape[0])  # (..., N)
    return out if bias is None else out + bias.to(x.dtype)


def _probe(bits: int) -> str | None:
    """Why the packed kernel for ``bits`` is not usable here, or None when it agrees with the
    dequantised product (written out here, as in ``qkv.blocks.quant``) on a small product."""
    g = torch.Generator().manual_seed(0)  # its own generator: the probe leaves the global seed
    n, k, group = 48, 256, 64
    x = torch.randn(3, k, generator=g)  # (M, K)
    try:  # the first use may come inside inference mode: the probe's tensors stay normal ones
        with torch.inference_mode(False), torch.no_grad():
            if bits == 8:
                q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)  # (N, K)
                s = torch.rand(n, generator=g) / 100  # (N,)
                w = q.float() * s[:, None]  # (N, K)
                fast = int8_packed_linear(x, q, s, None)  # (M, N)
            else:
                values = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)  # (N, K)
                q = values[:, 0::2] | (values[:, 1::2] << 4)  # (N, K/2)
                s = torch.rand(n, k // group, generator=g) / 100  # (N, K/G)
                m = -8 * s + torch.randn(n, k // group, generator=g) / 1000  # (N, K/G)
                w = values.float() * s.repeat_interleave(group, 1) + m.repeat_interleave(group, 1)
                fast = int4_packed_linear(x, q, s, m, None, group)  # (M, N)
    except (AttributeError, RuntimeError, TypeError, NotImplementedError) as error:
        first = str(error).strip().splitlines()
        return f"it raised {type(error).__name__}{f': {first[0]}' if first else ''}"
    plain = x @ w.T  # (M, N)
    bound = BF16_TOLERANCE * (x.abs() @ w.abs().T)  # (M, N)
    if fast.shape != plain.shape or not bool(((fast - plain).abs() <= bound).all()):
        return "its result differed from the dequantised product by more than bfloat16 rounding"
    return None


@functools.cache
def packed_kernel_failure(bits: int) -> str | None:
    """None when PyTorch's packed CPU kernel for ``bits`` (8 or 4) works here, else why not;
    checked once per width, and a failure is logged once as a warning naming both paths."""
    if bits not in (8, 4):
        raise ValueError(f"bits={bits}: the packed kernels are for 8 or 4 bits")
    reason = _probe(bits)
    if reason is not None:
        kernel = "_weight_int8pack_mm" if bits == 8 else "_weight_int4pack_mm_for_cpu"
        logger.warning(
            "int%d weight-only kernel (torch.ops.aten.%s) not used: %s; int%d layers multiply "
            "through their reference (dequantise, then F.linear) instead (slower)",
            bits, kernel, reason, bits,
        )  # fmt: skip
    return reason
