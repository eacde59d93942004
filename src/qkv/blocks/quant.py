"""Weight-only quantisation: linear layers whose weights are stored in 8 or 4 bits.

    int8, one scale per output channel n (symmetric):
        s_n = max_k |W_nk| / 127      q_nk = round(W_nk / s_n) in [-127, 127]      W_nk ~ q_nk s_n
    int4, one scale and one offset per group of G input columns of a row (asymmetric):
        m = min W,  s = (max W - min W) / 15      q = round((W - m) / s) in [0, 15]      W ~ q s + m
    y = x W~^T + b        the activations x stay in floating point: only the weights are quantised

Rounding to the nearest level is off by at most half a step: |W - W~| <= s / 2, elementwise.
Per-channel int8 scales follow Dettmers et al., "LLM.int8(): 8-bit Matrix Multiplication for
Transformers at Scale", 2022 (arXiv:2208.07339); small groups for 4 bits, Dettmers and
Zettlemoyer, "The case for 4-bit precision: k-bit Inference Scaling Laws", 2022
(arXiv:2212.09720). No calibration data: plain round-to-nearest.

Why: decoding one token multiplies one row by every weight matrix, so it is bound by reading
the weights; int8 weights are a quarter of float32's bytes, int4 an eighth (plus the scales).
A group shares its scale, so one large weight coarsens only its group; int4 is asymmetric
because 16 levels are few: spanning [min, max] exactly wastes none of them on a side the group
does not reach. Two 4-bit values share a byte: column 2j in the low half, 2j + 1 in the high.

Each layer has the reference forward (``reference_forward``: dequantise, then ``F.linear``) and
a fast one on PyTorch's packed weight-only kernels (``qkv._quant_kernels``: activations rounded
to bfloat16, equal to the reference within that rounding), chosen by ``impl``; shapes, devices
and dtypes the kernels do not take go through the reference. ``quantize_model`` replaces a
model's linear layers. Inference only: the quantised weights are buffers, not parameters.

Shape legend: N output width (out_features) · K input width (in_features) · G group size.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qkv._quant_kernels import (
    int4_packed_linear,
    int4_supported,
    int8_packed_linear,
    int8_supported,
)

__all__ = [
    "QUANT_IMPLS",
    "Int4Linear",
    "Int8Linear",
    "QuantConfig",
    "dequantize_int4",
    "dequantize_int8",
    "pack_int4",
    "prepare_quantized",
    "quantization_of",
    "quantize_int4",
    "quantize_int8",
    "quantize_model",
    "unpack_int4",
]

QuantImpl = Literal["packed", "reference"]
QUANT_IMPLS: tuple[str, ...] = ("packed", "reference")
DEFAULT_GROUP_SIZE = 128
_TINY = 1e-12  # the step of an all-zero row or group (any positive number dequantises to 0)


@dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """How a model's linear layers are quantised: ``bits`` 8 (per output channel) or 4 (per
    group of ``group_size`` input columns, default 128). Saved as the checkpoint config's
    ``quantization`` entry."""

    bits: int
    group_size: int | None = None  # int4 only; None: DEFAULT_GROUP_SIZE

    def __post_init__(self) -> None:
        if self.bits not in (8, 4):
            raise ValueError(f"bits={self.bits}: weight-only quantisation is to 8 or 4 bits")
        if self.bits == 8 and self.group_size is not None:
            raise ValueError(
                "int8 has one scale per output channel; group_size is for int4 (drop it)"
            )
        if self.bits == 4 and self.group_size is None:
            object.__setattr__(self, "group_size", DEFAULT_GROUP_SIZE)
        if self.group_size is not None and (self.group_size < 2 or self.group_size % 2):
            raise ValueError(f"group_size={self.group_size} must be an even number >= 2")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        unknown = sorted(set(data) - {"bits", "group_size"})
        if unknown:
            raise ValueError(f"unknown quantization fields {unknown}; known: bits, group_size")
        return cls(**data)


# --8<-- [start:int8]
def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 with one scale per row: (N, K) -> q (N, K) int8, scales (N,) float32."""
    w = weight.detach().float()  # (N, K)
    scales = w.abs().amax(dim=1).clamp(min=_TINY) / 127  # (N,): the largest |w| maps to 127
    q = torch.round(w / scales[:, None]).clamp(-127, 127)  # (N, K): nearest level
    return q.to(torch.int8), scales


def dequantize_int8(q: Tensor, scales: Tensor) -> Tensor:
    """W~ = q s: (N, K) int8 and (N,) -> (N, K) in the scales' dtype."""
    return q.to(scales.dtype) * scales[:, None]  # (N, K)


# --8<-- [end:int8]


# --8<-- [start:int4]
def quantize_int4(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric 4-bit levels per group of G columns: (N, K) -> q (N, K) uint8 in [0, 15],
    scales (N, K/G), offsets (N, K/G) float32, with W ~ q * scale + offset."""
    n, k = weight.shape
    groups = weight.detach().float().view(n, k // group_size, group_size)  # (N, K/G, G)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)  # (N, K/G) each
    scales = ((high - low) / 15).clamp(min=_TINY)  # (N, K/G): 16 levels from low to high
    q = torch.round((groups - low[..., None]) / scales[..., None]).clamp(0, 15)  # (N, K/G, G)
    return q.view(n, k).to(torch.uint8), scales, low


def dequantize_int4(q: Tensor, scales: Tensor, offsets: Tensor) -> Tensor:
    """W~ = q s + m per group: (N, K) levels, (N, K/G), (N, K/G) -> (N, K) in the scales' dtype."""
    n, k = q.shape
    groups = q.view(n, scales.shape[1], -1).to(scales.dtype)  # (N, K/G, G)
    return (groups * scales[..., None] + offsets[..., None]).view(n, k)  # (N, K)


def pack_int4(q: Tensor) -> Tensor:
    """Two 4-bit values per byte: (N, K) in [0, 15] -> (N, K/2) uint8, column 2j in the low
    half of byte j, column 2j + 1 in the high half."""
    return q[:, 0::2] | (q[:, 1::2] << 4)  # (N, K/2)


def unpack_int4(packed: Tensor) -> Tensor:
    """The inverse of ``pack_int4``: (N, K/2) uint8 -> (N, K) uint8 in [0, 15]."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)  # (N, K)


# --8<-- [end:int4]


def _check_impl(impl: str) -> None:
    if impl not in QUANT_IMPLS:
        raise ValueError(f"impl={impl!r}: choose one of {QUANT_IMPLS}")


def _check_float_linear(linear: nn.Module, what: str) -> nn.Linear:
    if isinstance(linear, (Int8Linear, Int4Linear)):
        raise ValueError(
            f"{what}: the layer is already quantised ({type(linear).__name__}); quantise "
            "the floating-point layer instead"
        )
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"{what} quantises an nn.Linear, got {type(linear).__name__}")
    return linear


def _float_bias(linear: nn.Linear) -> Tensor | None:
    return None if linear.bias is None else linear.bias.detach().float().clone()  # (N,)


class Int8Linear(nn.Module):
    """A linear layer with int8 weights and one float scale per output channel.

    Buffers: ``qweight`` (N, K) int8, ``scales`` (N,), ``bias`` (N,) or None.

    Example:
        >>> layer = Int8Linear.from_linear(torch.nn.Linear(64, 16))
        >>> layer(torch.randn(3, 64)).shape, layer.qweight.dtype
        (torch.Size([3, 16]), torch.int8)
    """

    qweight: Tensor  # (N, K) int8
    scales: Tensor  # (N,)
    bias: Tensor | None  # (N,)

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, *,
        impl: QuantImpl = "packed",
    ) -> None:  # fmt: skip
        super().__init__()
        _check_impl(impl)
        self.in_features, self.out_features, self.impl = in_features, out_features, impl
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Module, *, impl: QuantImpl = "packed") -> Int8Linear:
        """Quantise ``linear``'s weight (its bias is kept in float32)."""
        lin = _check_float_linear(linear, "Int8Linear.from_linear")
        layer = cls(lin.in_features, lin.out_features, lin.bias is not None, impl=impl)
        layer.qweight, layer.scales = quantize_int8(lin.weight)
        layer.bias = _float_bias(lin)
        return layer.to(lin.weight.device)

    def dequantize(self) -> Tensor:
        """W~ (N, K) in the scales' dtype."""
        return dequantize_int8(self.qweight, self.scales)

    def reference_forward(self, x: Tensor) -> Tensor:
        """Dequantise, then ``F.linear``: (..., K) -> (..., N)."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize().to(x.dtype), bias)  # (..., N)

    def forward(self, x: Tensor) -> Tensor:
        if self.impl == "packed" and int8_supported(x, self.qweight):
            return int8_packed_linear(x, self.qweight, self.scales, self.bias)  # (..., N)
        return self.reference_forward(x)  # (..., N)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, impl={self.impl}"


class Int4Linear(nn.Module):
    """A linear layer with 4-bit weights, a scale and an offset per group of input columns.

    Buffers: ``qweight`` (N, K/2) uint8 (two values per byte), ``scales`` and ``offsets``
    (N, K/G), ``bias`` (N,) or None.

    Example:
        >>> layer = Int4Linear.from_linear(torch.nn.Linear(64, 16), group_size=32)
        >>> layer(torch.randn(3, 64)).shape, tuple(layer.qweight.shape)
        (torch.Size([3, 16]), (16, 32))
    """

    qweight: Tensor  # (N, K/2) uint8
    scales: Tensor  # (N, K/G)
    offsets: Tensor  # (N, K/G)
    bias: Tensor | None  # (N,)

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, *,
        group_size: int = DEFAULT_GROUP_SIZE, impl: QuantImpl = "packed",
    ) -> None:  # fmt: skip
        super().__init__()
        _check_impl(impl)
        QuantConfig(bits=4, group_size=group_size)  # validates the group size
        if in_features % group_size:
            raise ValueError(
                f"group_size={group_size} does not divide the input width {in_features}: "
                f"choose a divisor of {in_features} (e.g. {_divisors_hint(in_features)})"
            )
        self.in_features, self.out_features, self.impl = in_features, out_features, impl
        self.group_size = group_size
        n, groups = out_features, in_features // group_size
        self.register_buffer("qweight", torch.zeros(n, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(n, groups))
        self.register_buffer("offsets", torch.zeros(n, groups))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(
        cls, linear: nn.Module, *, group_size: int = DEFAULT_GROUP_SIZE, impl: QuantImpl = "packed"
    ) -> Int4Linear:
        """Quantise ``linear``'s weight in groups of ``group_size`` input columns."""
        lin = _check_float_linear(linear, "Int4Linear.from_linear")
        bias = lin.bias is not None
        layer = cls(lin.in_features, lin.out_features, bias, group_size=group_size, impl=impl)
        q, layer.scales, layer.offsets = quantize_int4(lin.weight, group_size)
        layer.qweight = pack_int4(q)  # (N, K/2)
        layer.bias = _float_bias(lin)
        return layer.to(lin.weight.device)

    def dequantize(self) -> Tensor:
        """W~ (N, K) in the scales' dtype."""
        return dequantize_int4(unpack_int4(self.qweight), self.scales, self.offsets)

    def reference_forward(self, x: Tensor) -> Tensor:
        """Dequantise, then ``F.linear``: (..., K) -> (..., N)."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize().to(x.dtype), bias)  # (..., N)

    def forward(self, x: Tensor) -> Tensor:
        if self.impl == "packed" and int4_supported(x, self.qweight, self.group_size):
            return int4_packed_linear(
                x, self.qweight, self.scales, self.offsets, self.bias, self.group_size
            )  # (..., N)
        return self.reference_forward(x)  # (..., N)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"group_size={self.group_size}, impl={self.impl}"
        )


QUANTIZED_LINEARS = (Int8Linear, Int4Linear)


def _divisors_hint(width: int) -> str:
    good = [g for g in (32, 64, 128, 256) if width % g == 0]
    return ", ".join(map(str, good)) if good else "an even divisor"


def _empty_like(linear: nn.Linear, config: QuantConfig, impl: QuantImpl) -> nn.Module:
    n, k, bias = linear.out_features, linear.in_features, linear.bias is not None
    if config.bits == 8:
        return Int8Linear(k, n, bias, impl=impl)
    assert config.group_size is not None
    return Int4Linear(k, n, bias, group_size=config.group_size, impl=impl)


def _quantized(linear: nn.Linear, config: QuantConfig, impl: QuantImpl) -> nn.Module:
    if config.bits == 8:
        return Int8Linear.from_linear(linear, impl=impl)
    assert config.group_size is not None
    return Int4Linear.from_linear(linear, group_size=config.group_size, impl=impl)


def quantize_model(
    model: nn.Module, config: QuantConfig, *, impl: QuantImpl = "packed"
) -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` by its quantised version, in place.

    A linear layer that shares its weight with an embedding (a tied output head) stays in
    floating point: quantising it would quantise the embedding too, or store the matrix twice.
    Every layer is checked before any is replaced, so an error leaves the model as it was.

    Args:
        model: a floating-point model; one that holds quantised layers is refused.
        config: bits and group size.
        impl: the layers' forward, "packed" (PyTorch's kernels where they apply) or "reference".

    Returns:
        The names of the layers replaced.
    """
    _check_impl(impl)
    done = [name for name, m in model.named_modules() if isinstance(m, QUANTIZED_LINEARS)]
    if done:
        raise ValueError(
            f"the model is already quantised ({len(done)} layers, e.g. {done[0]!r}); "
            "quantise the floating-point model instead"
        )
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and id(m.weight) not in tied
    ]
    for name, m in targets:  # refuse before changing anything
        if config.bits == 4 and config.group_size and m.in_features % config.group_size:
            raise ValueError(
                f"group_size={config.group_size} does not divide the input width "
                f"{m.in_features} of {name!r}: choose a divisor of {m.in_features} "
                f"(e.g. {_divisors_hint(m.in_features)})"
            )
    for name, m in targets:
        model.set_submodule(name, _quantized(m, config, impl))
    return [name for name, _ in targets]


def prepare_quantized(
    model: nn.Module, config: QuantConfig, names: Iterable[str], *, impl: QuantImpl = "packed"
) -> None:
    """Replace the named ``nn.Linear`` layers by empty quantised ones of the same shapes, in
    place, so that a saved quantised state dict can be loaded into ``model``."""
    _check_impl(impl)
    for name in names:
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{name!r} is a {type(linear).__name__}, not a linear layer")
        model.set_submodule(name, _empty_like(linear, config, impl))


def quantization_of(model: nn.Module) -> QuantConfig | None:
    """The quantisation of ``model``'s layers, or None when it has no quantised layer."""
    found = set()
    for m in model.modules():
        if isinstance(m, Int8Linear):
            found.add(QuantConfig(bits=8))
        elif isinstance(m, Int4Linear):
            found.add(QuantConfig(bits=4, group_size=m.group_size))
    if len(found) > 1:
        raise ValueError(f"the model mixes quantisations {sorted(map(str, found))}")
    return found.pop() if found else None
