"""Weight-only int8/int4 layers: error bounds, packing, the fast path against the reference, and
every bad input's error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qkv._quant_kernels import BF16_TOLERANCE, int4_supported, int8_supported
from qkv.blocks.quant import (
    Int4Linear,
    Int8Linear,
    QuantConfig,
    dequantize_int4,
    dequantize_int8,
    pack_int4,
    quantization_of,
    quantize_int4,
    quantize_int8,
    quantize_model,
    unpack_int4,
)
from qkv.models import GPT, GPTConfig

# The bounds below are half a quantisation step, plus float32 rounding of the division and the
# product (a few ulps of the weight): 2^-20 relative is far below a step and far above ulps.
REL = 2.0**-20


def test_int8_error_is_at_most_half_a_step_per_channel() -> None:
    w = torch.randn(48, 96) * torch.rand(48, 1) * 3  # rows of different sizes
    w[3] = 0.0  # an all-zero row: its scale must not divide by zero
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and scales.shape == (48,)
    assert int(q.abs().max()) <= 127
    err = (w - dequantize_int8(q, scales)).abs()  # (N, K)
    assert (err <= scales[:, None] / 2 + REL * w.abs()).all()
    assert torch.equal(dequantize_int8(q, scales)[3], torch.zeros(96))
    # The largest weight of each row is exact: it maps to +-127.
    rows = torch.arange(48)
    largest = w.abs().argmax(dim=1)
    assert torch.allclose(dequantize_int8(q, scales)[rows, largest], w[rows, largest])


def test_int4_error_is_at_most_half_a_step_per_group() -> None:
    w = torch.randn(16, 256) + torch.linspace(-3, 3, 256)  # groups with different ranges
    q, scales, offsets = quantize_int4(w, 64)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and scales.shape == (16, 4)
    step = scales.repeat_interleave(64, dim=1)  # (N, K)
    err = (w - dequantize_int4(q, scales, offsets)).abs()
    assert (err <= step / 2 + REL * w.abs()).all()
    # Level 0 is each group's minimum: asymmetric, so no level lies outside the group's range.
    assert torch.allclose(offsets, w.view(16, 4, 64).amin(dim=-1))


def test_int4_packing_round_trip_is_exact() -> None:
    q = torch.randint(0, 16, (8, 64), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (8, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), q)
    every_byte = torch.arange(256, dtype=torch.uint8).view(2, 128)
    assert torch.equal(pack_int4(unpack_int4(every_byte)), every_byte)
    # Column 2j is the low half of byte j: worked out by hand.
    assert pack_int4(torch.tensor([[3, 10]], dtype=torch.uint8)).item() == 3 + 10 * 16


def _bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return BF16_TOLERANCE * (x.abs() @ w.abs().T)  # (..., N)


def _layers(k: int, n: int, bias: bool) -> list[nn.Module]:
    linear = nn.Linear(k, n, bias=bias)
    return [Int8Linear.from_linear(linear), Int4Linear.from_linear(linear, group_size=64)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [(1,), (7,), (2, 5)])
@pytest.mark.parametrize("bias", [True, False])
def test_fast_path_equals_the_reference_within_bfloat16_rounding(
    dtype: torch.dtype, rows: tuple[int, ...], bias: bool
) -> None:
    for layer in _layers(192, 64, bias):
        x = torch.randn(*rows, 192).to(dtype)
        with torch.no_grad():
            fast, ref = layer(x), layer.reference_forward(x)
        assert fast.shape == ref.shape == (*rows, 64) and fast.dtype == dtype
        w = layer.dequantize()
        bound = _bound(x.float(), w) + (
            2.0**-7 * ref.float().abs() if dtype != torch.float32 else 0
        )
        assert ((fast.float() - ref.float()).abs() <= bound).all(), type(layer).__name__


def test_the_parity_check_catches_a_planted_error() -> None:
    layer = Int4Linear.from_linear(nn.Linear(128, 32, bias=False), group_size=64)
    x = torch.randn(4, 128)
    with torch.no_grad():
        ref = layer.reference_forward(x)
        w = layer.dequantize()
        q = layer.qweight
        layer.qweight = ((q & 0x0F) << 4) | (q >> 4)  # the two halves of each byte swapped
        fast = layer(x)
    assert not ((fast - ref).abs() <= _bound(x, w)).all()


def test_this_cpu_takes_the_packed_kernels_for_supported_shapes() -> None:
    int8, int4 = _layers(128, 32, True)
    x = torch.randn(2, 128)
    with torch.no_grad():
        assert int8_supported(x, int8.qweight) and int4_supported(x, int4.qweight, 64)
    assert not int4_supported(x, int4.qweight, 16)  # a group size the kernel lacks
    with torch.enable_grad():  # gradients wanted: the reference
        assert not int8_supported(x.requires_grad_(), int8.qweight)


def test_unsupported_shapes_and_gradients_go_through_the_reference() -> None:
    linear = nn.Linear(48, 24)  # 48 and 24: widths the kernels are not given
    for layer in (Int8Linear.from_linear(linear), Int4Linear.from_linear(linear, group_size=16)):
        x = torch.randn(3, 48, requires_grad=True)
        out = layer(x)
        assert torch.equal(out, layer.reference_forward(x))
        out.sum().backward()  # the gradient reaches the input
        assert x.grad is not None and x.grad.shape == x.shape


def test_impl_reference_is_exactly_the_reference_and_bad_impl_is_named() -> None:
    layer = Int8Linear.from_linear(nn.Linear(128, 32), impl="reference")
    x = torch.randn(2, 128)
    with torch.no_grad():
        assert torch.equal(layer(x), layer.reference_forward(x))
    with pytest.raises(ValueError, match="choose one of"):
        Int8Linear(4, 4, impl="fast")  # type: ignore[arg-type]


def test_group_size_that_does_not_divide_the_width_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="group_size=48 does not divide the input width 128"):
        Int4Linear.from_linear(nn.Linear(128, 16), group_size=48)
    with pytest.raises(ValueError, match="even number"):
        QuantConfig(bits=4, group_size=7)
    with pytest.raises(ValueError, match="group_size is for int4"):
        QuantConfig(bits=8, group_size=64)
    with pytest.raises(ValueError, match="8 or 4 bits"):
        QuantConfig(bits=3)
    assert QuantConfig(bits=4).group_size == 128


def _gpt() -> GPT:
    return GPT(GPTConfig(vocab_size=50, d_model=64, n_layers=2, n_heads=4, max_seq_len=32)).eval()


def test_quantize_model_skips_the_tied_head_and_refuses_bad_input_before_changing_anything() -> (
    None
):
    model = _gpt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"does not divide the input width 64 of 'layers\.0"):
        quantize_model(model, QuantConfig(bits=4, group_size=128))
    assert quantization_of(model) is None  # untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    names = quantize_model(model, QuantConfig(bits=4, group_size=32))
    assert len(names) == 2 * 6 and "lm_head" not in names
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.tok_emb.weight
    assert quantization_of(model) == QuantConfig(bits=4, group_size=32)


def test_quantising_twice_is_a_clear_error() -> None:
    model = _gpt()
    quantize_model(model, QuantConfig(bits=8))
    with pytest.raises(ValueError, match="already quantised"):
        quantize_model(model, QuantConfig(bits=4, group_size=32))
    with pytest.raises(ValueError, match="already quantised"):
        Int4Linear.from_linear(model.layers[0].mlp.up_proj, group_size=32)


@pytest.mark.parametrize("config", [QuantConfig(bits=8), QuantConfig(bits=4, group_size=32)])
def test_quantised_gpt_stays_close_to_float_and_generates(config: QuantConfig) -> None:
    model = _gpt()
    ids = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        plain = model(ids).logits  # (B, T, V)
        quantize_model(model, config)
        quant = model(ids).logits  # (B, T, V)
    assert (quant - plain).abs().max() < 0.1 * plain.abs().max()
    out = model.generate(ids[:1, :4], max_new_tokens=5)
    assert out.shape == (1, 9)
    model.to(torch.bfloat16)  # scales and offsets follow the model's dtype; levels stay integer
    assert model.layers[0].mlp.up_proj.qweight.dtype in (torch.int8, torch.uint8)
    with torch.no_grad():
        model(ids)


@pytest.mark.parametrize("bits", [8, 4])
def test_a_packed_kernel_that_computes_wrong_is_refused_and_the_reference_used(
    bits: int, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Every CPU takes this path when its packed kernel misbehaves (some AVX2 builds, Arm):
    the one-time probe catches a wrong kernel, warns once, and the layers use the reference."""
    from qkv import _quant_kernels as kernels

    name = "int8_packed_linear" if bits == 8 else "int4_packed_linear"
    real = getattr(kernels, name)
    monkeypatch.setattr(kernels, name, lambda *a, **k: real(*a, **k) * 1.5)  # a broken kernel
    kernels.packed_kernel_failure.cache_clear()
    try:
        with caplog.at_level("WARNING", logger=kernels.logger.name):
            assert kernels.packed_kernel_failure(bits) is not None
        assert "reference" in caplog.text and "differed" in caplog.text
        linear = nn.Linear(256, 64)
        layer = (
            Int8Linear.from_linear(linear) if bits == 8 else Int4Linear.from_linear(linear)
        ).eval()
        x = torch.randn(3, 256)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), layer.reference_forward(x), atol=0, rtol=0)
    finally:
        kernels.packed_kernel_failure.cache_clear()  # the real kernels, probed afresh
